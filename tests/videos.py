"""Synthesised test videos: frame i is a flat grey of value 16 + (20 * i) % 220 with a white corner mark."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def frame_value(i: int) -> int:
    return 16 + (20 * i) % 220


def make_video(
    path: Path,
    *,
    frames: int = 30,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    codec: str = "libx264",
    audio: bool = False,
    rotation: int | None = None,
    gop: int | None = None,
) -> Path:
    """Write a small video (``size`` is W, H); ``rotation`` sets the display matrix (degrees CCW)."""
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = size
    stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    if gop:
        stream.codec_context.gop_size = gop
    if codec == "libx264":
        stream.options = {"crf": "0"}  # lossless, so frame content identifies the frame
    if rotation is not None:
        stream.set_display_rotation(rotation)
    sound = container.add_stream("aac", rate=8000) if audio else None
    for i in range(frames):
        img = np.full((size[1], size[0], 3), frame_value(i), np.uint8)
        img[:8, :8] = 255
        frame = av.VideoFrame.from_ndarray(img, format="bgr24")
        frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    if sound is not None:
        step = sound.codec_context.frame_size or 1024
        for t in range(0, frames * 8000 // fps, step):
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, step), np.float32), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 8000, t
            for packet in sound.encode(chunk):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)
    container.close()
    return path


def corrupt_middle(src: Path, dst: Path, length: int = 600) -> Path:
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    data[mid : mid + length] = b"\x00" * length
    dst.write_bytes(bytes(data))
    return dst
