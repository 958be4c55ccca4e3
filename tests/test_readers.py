"""Image decoding: what the demo's cv2.imread gives, and one clear reason per bad input."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from sapiens2_cli.readers import MIN_SIDE, ReadError, decode_image, prefetch, read_image

DATA = Path(__file__).parent / "data"


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an APP1 EXIF segment holding only the Orientation tag."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def encode(ext: str, image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def test_photos_decode_like_cv2_imread():
    for name in ("astronaut.png", "grace_hopper.jpg"):
        np.testing.assert_array_equal(read_image(DATA / name), cv2.imread(str(DATA / name)))


def test_exif_orientation_is_applied():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:10, :10] = 255  # white top-left corner
    data = with_exif_orientation(encode(".jpg", image), 6)  # 6: rotate 90 degrees clockwise
    out = decode_image(data)
    assert out.shape == (60, 40, 3)
    assert out[:10, -10:].mean() > 200 and out[:10, :10].mean() < 50  # the corner moved to the top-right


def test_unicode_path(tmp_path):
    path = tmp_path / "fotos ünïcødé" / "日本.png"
    path.parent.mkdir()
    path.write_bytes((DATA / "astronaut.png").read_bytes())
    assert read_image(path).shape == (256, 256, 3)


def test_grey_rgba_and_16_bit():
    grey = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 256
    out = decode_image(encode(".png", grey.astype(np.uint8)))
    assert out.shape == (32, 32, 3) and (out == grey[..., None]).all()
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent blue: alpha is dropped, not composited
    assert (decode_image(encode(".png", rgba)) == [200, 0, 0]).all()
    wide = np.full((32, 32, 3), 0x1234, np.uint16)
    wide[0, 0] = 0xFFFF
    out = decode_image(encode(".png", wide))  # 16-bit PNG: the high byte
    assert out.dtype == np.uint8 and out[1, 1, 0] == 0x12 and out[0, 0, 0] == 0xFF


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, this is text", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "truncated PNG"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "truncated JPEG"),
    ],
    ids=["empty", "text", "png-header-only", "jpeg-header-only"],
)
def test_bad_bytes_give_a_reason(data, reason):
    with pytest.raises(ReadError, match=reason):
        decode_image(data)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp", ".tif"])
def test_truncated_files_are_refused(ext):
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encode(ext, image)
    assert decode_image(data).shape == (64, 64, 3)
    with pytest.raises(ReadError):
        decode_image(data[: len(data) // 2])


def test_jpeg_cut_just_before_its_end_marker_is_refused():
    data = encode(".jpg", np.full((64, 64, 3), 128, np.uint8))
    with pytest.raises(ReadError, match="truncated JPEG"):
        decode_image(data[:-2])


def test_too_small():
    decode_image(encode(".png", np.zeros((MIN_SIDE, MIN_SIDE, 3), np.uint8)))
    with pytest.raises(ReadError, match=r"too small \(40x15 pixels"):
        decode_image(encode(".png", np.zeros((15, 40, 3), np.uint8)))


def test_unreadable_paths(tmp_path):
    with pytest.raises(ReadError, match="no such file"):
        read_image(tmp_path / "missing.jpg")
    with pytest.raises(ReadError, match="is a directory"):
        read_image(tmp_path)


def test_prefetch_keeps_order_and_bounds_the_window():
    running = []

    def work(i):
        running.append(i)
        return i * i

    for workers in (0, 3):
        running.clear()
        out = list(prefetch(range(20), work, workers=workers, depth=4))
        assert out == [(i, i * i) for i in range(20)]
        assert sorted(running) == list(range(20))
    running.clear()
    stream = prefetch(range(20), work, workers=3, depth=4)
    assert next(stream) == (0, 0)
    time.sleep(0.1)
    assert len(running) == 5  # the first item plus a window of 4, nothing further
    stream.close()


def test_prefetch_propagates_errors():
    def work(i):
        if i == 3:
            raise KeyError(i)
        return i

    with pytest.raises(KeyError):
        list(prefetch(range(10), work, workers=2, depth=2))
