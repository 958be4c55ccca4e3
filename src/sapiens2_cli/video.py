"""Streaming video decoding and encoding with PyAV (any container/codec FFmpeg reads).

Frames are decoded one packet at a time, so memory stays flat however long the video is.
A frame's index is derived from its presentation time (``round(t * fps)``), so the same frame
gets the same index whether a run starts at the beginning, seeks with ``start`` or resumes;
a packet that fails to decode fails only the frames it covers, reported as ``FrameError``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from sapiens2_cli.sources import VIDEO_EXTENSIONS  # noqa: F401 - re-exported: the video names
from sapiens2_cli.writers import part_path


class VideoError(RuntimeError):
    """A video cannot be opened or read; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a video stream is: size after rotation (pixels), rate, time base, length."""

    path: str
    width: int
    height: int
    fps: Fraction
    time_base: Fraction
    start_time: float  # seconds of the first frame
    duration: float | None  # seconds
    frames: int | None  # estimate from the container, may be None
    rotation: int  # degrees clockwise applied to decoded frames for display
    codec: str
    has_audio: bool


@dataclasses.dataclass(frozen=True)
class VideoFrame:
    """A decoded frame: ``index`` (from its time), ``time`` seconds, ``pts`` in the time base, BGR uint8."""

    index: int
    time: float
    pts: int | None
    image: np.ndarray  # [H, W, 3] BGR uint8, rotation applied


@dataclasses.dataclass(frozen=True)
class FrameError:
    """Frames that could not be decoded: ``index`` is the first frame the bad packet covers."""

    index: int
    time: float | None
    reason: str


def parse_position(text: str | None) -> tuple[str, float] | None:
    """``--start``/``--end`` values: ``120`` or ``120f`` is a frame number, ``4.5s``, ``4.5`` or
    ``01:02.5`` (``[hh:]mm:ss[.f]``) is a time in seconds. Returns ``("frame"|"time", value)``."""
    if text is None or text == "":
        return None
    text = text.strip().lower()
    if re.fullmatch(r"\d+f?", text):
        return "frame", float(text.rstrip("f"))
    if re.fullmatch(r"\d+(\.\d*)?s?|\.\d+s?", text):
        return "time", float(text.rstrip("s"))
    if m := re.fullmatch(r"(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)", text):
        h, mnt, sec = m.groups()
        return "time", int(h or 0) * 3600 + int(mnt) * 60 + float(sec)
    raise ValueError(f"cannot read position {text!r}: use a frame number (120), seconds (4.5s) or mm:ss")


def _open(path: str | os.PathLike):
    import av

    try:
        container = av.open(os.fspath(path))
    except (av.error.FFmpegError, OSError) as err:
        raise VideoError(f"{path}: cannot open as a video ({err})") from err
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream")
    return container


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video's stream parameters without decoding it (rotation from the first frame)."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate or Fraction(25)
        tb = stream.time_base or Fraction(1, 1000)
        start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
        duration = float(stream.duration * tb) if stream.duration else (
            container.duration / 1e6 if container.duration else None
        )
        rotation = 0
        width, height = stream.codec_context.width, stream.codec_context.height
        try:
            for frame in container.decode(stream):
                rotation = _frame_rotation(frame)
                break
        except Exception:  # noqa: BLE001 - a broken first packet is reported when frames are read
            pass
        if rotation in (90, 270):
            width, height = height, width
        return VideoInfo(
            path=os.fspath(path),
            width=width,
            height=height,
            fps=Fraction(fps),
            time_base=Fraction(tb),
            start_time=start,
            duration=duration,
            frames=stream.frames or (round(duration * fps) if duration else None),
            rotation=rotation,
            codec=stream.codec_context.name,
            has_audio=bool(container.streams.audio),
        )
    finally:
        container.close()


def _frame_rotation(frame) -> int:
    # PyAV reports the display matrix angle counter-clockwise; frames must be turned clockwise.
    return int(round(-getattr(frame, "rotation", 0) or 0)) % 360


def _rotate(image: np.ndarray, degrees: int) -> np.ndarray:
    if degrees == 90:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if degrees == 180:
        return cv2.rotate(image, cv2.ROTATE_180)
    if degrees == 270:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


def iter_frames(
    path: str | os.PathLike,
    *,
    stride: int = 1,
    start: str | None = None,
    end: str | None = None,
) -> Iterator[VideoFrame | FrameError]:
    """Decode frames ``start <= index < end`` keeping every ``stride``-th (index % stride == 0).

    Streams packet by packet; seeks to the keyframe before ``start``. Yields ``FrameError`` for
    packets that fail to decode (decoding goes on after them) and raises ``VideoError`` only
    when the file cannot be opened at all.
    """
    import av

    if stride < 1:
        raise ValueError("stride must be >= 1")
    info = probe(path)
    fps = float(info.fps)
    first = _to_index(parse_position(start), fps, 0)
    last = _to_index(parse_position(end), fps, None)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        exact_tb = Fraction(stream.time_base)  # times are exact fractions rounded once to float
        tb = float(exact_tb)
        origin = stream.start_time or 0
        if first > 0:
            container.seek(int(origin + (first / fps) / tb), stream=stream, backward=True, any_frame=False)
        previous = -1
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as err:
                if packet.pts is None:
                    continue
                at = float((packet.pts - origin) * exact_tb)
                index = round(at * fps)
                if first <= index and (last is None or index < last) and index % stride == 0:
                    yield FrameError(index, at, f"undecodable packet ({err})")
                continue
            for frame in frames:
                pts = frame.pts
                time = float((pts - origin) * exact_tb) if pts is not None else (previous + 1) / fps
                index = max(round(time * fps), previous + 1)  # VFR: never reuse an index
                previous = index
                if last is not None and index >= last:
                    return
                if index < first or index % stride:
                    continue
                image = _rotate(frame.to_ndarray(format="bgr24"), _frame_rotation(frame))
                yield VideoFrame(index, time, pts, image)
    finally:
        container.close()


def _to_index(pos: tuple[str, float] | None, fps: float, default: int | None) -> int | None:
    if pos is None:
        return default
    kind, value = pos
    return int(value) if kind == "frame" else round(value * fps)


class VideoWriter:
    """Encode BGR frames to H.264 MP4 at a source's rate and time base, copying its audio.

    Written to a temporary name (``.<name>.part``, the one every output uses, so that the next
    run replaces a killed run's leftover) and renamed on ``close()``: a killed run never leaves
    a half-written video under the final name. ``abort()`` removes the temporary file. Frames
    take the size of the first one (cropped to even sides for yuv420p); later frames of another
    size are cropped or padded with black to it.
    """

    def __init__(self, path: str | os.PathLike, source: VideoInfo, *, crf: int = 20, copy_audio: bool = True) -> None:
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = part_path(self.path)
        self._source = av.open(source.path) if copy_audio and source.has_audio else None
        self.container = av.open(str(self.tmp), mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=source.fps)
        self.stream.time_base = source.time_base
        self.stream.codec_context.time_base = source.time_base
        self.stream.options = {"crf": str(crf)}
        self.stream.pix_fmt = "yuv420p"
        self._size: tuple[int, int] | None = None
        self._audio_in = self._source.streams.audio[0] if self._source else None
        self._audio_out = (
            self.container.add_stream_from_template(self._audio_in) if self._audio_in is not None else None
        )

    def write(self, image: np.ndarray, pts: int | None) -> None:
        """Append one BGR frame with the source presentation timestamp ``pts`` (time-base units)."""
        import av

        h, w = image.shape[:2]
        if self._size is None:
            self._size = (w - w % 2, h - h % 2)  # yuv420p needs even sizes
            self.stream.width, self.stream.height = self._size
        if (w, h) != self._size:
            fitted = np.zeros((self._size[1], self._size[0], 3), np.uint8)
            fitted[: min(h, self._size[1]), : min(w, self._size[0])] = image[: self._size[1], : self._size[0]]
            image = fitted
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        frame.pts = pts
        frame.time_base = self.stream.time_base
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self, *, audio_from: float | None = None, audio_to: float | None = None) -> Path:
        """Flush, copy the audio (the packets starting in ``[audio_from, audio_to)`` seconds of
        the source's audio stream, all by default), and move the file to its final name."""
        for packet in self.stream.encode():
            self.container.mux(packet)
        if self._audio_in is not None:
            tb = self._audio_in.time_base
            for packet in self._source.demux(self._audio_in):
                if packet.dts is None:
                    continue
                t = float(packet.pts * tb) if packet.pts is not None and tb else None
                if t is not None and ((audio_from is not None and t < audio_from) or (audio_to is not None and t >= audio_to)):
                    continue
                packet.stream = self._audio_out
                self.container.mux(packet)
        self.container.close()
        if self._source is not None:
            self._source.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - already failing; the temp file is removed below
            pass
        if self._source is not None:
            self._source.close()
        self.tmp.unlink(missing_ok=True)
