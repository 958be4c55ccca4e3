"""Reading training files: images, label maps, float maps, masks, intrinsics.

Every reader raises :class:`DataError` naming the file and the reason (missing, undecodable,
wrong shape or dtype). Images come back as 8-bit BGR ``[H, W, 3]`` (OpenCV convention, as the
released pipelines).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from sapiens2_cli.exr import read_exr

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "find_target",
    "list_images",
    "read_float_map",
    "read_image",
    "read_intrinsics",
    "read_label",
    "read_mask",
    "require_targets",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """A dataset file or folder that cannot be used; the message names it and the reason."""


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (case-insensitive extensions), sorted by name."""
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder does not exist")
    images = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not images:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    stems: dict[str, Path] = {}
    for path in images:
        if path.stem in stems:
            raise DataError(
                f"{folder}: two images share the name {path.stem!r} "
                f"({stems[path.stem].name}, {path.name})"
            )
        stems[path.stem] = path
    return images


def require_targets(
    folder: Path, images: list[Path], found: Sequence[Path | None], extensions: tuple[str, ...]
) -> None:
    """Raise naming the folder and the first images without a target file."""
    missing = [img.stem for img, path in zip(images, found, strict=True) if path is None]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(
            f"{folder}: no file for {len(missing)} of {len(images)} images ({shown}); "
            f"expected <name>{{{','.join(extensions)}}}"
        )


def find_target(folder: Path, stem: str, extensions: tuple[str, ...]) -> Path | None:
    """``folder/<stem><ext>`` for the first extension that exists, else None."""
    for ext in extensions:
        path = folder / f"{stem}{ext}"
        if path.is_file():
            return path
    return None


def read_image(path: Path) -> np.ndarray:
    """8-bit BGR ``[H, W, 3]`` (grey expanded, alpha dropped)."""
    if not path.is_file():
        raise DataError(f"{path}: image file does not exist")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: cannot be decoded as an image")
    return image


def _png_palette(path: Path) -> np.ndarray | None:
    """RGB palette ``[N, 3]`` of an indexed PNG (colour type 3), else None."""
    with open(path, "rb") as handle:
        if handle.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        palette, colour_type = None, None
        while True:
            header = handle.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            data = handle.read(length)
            handle.read(4)  # CRC
            if kind == b"IHDR":
                colour_type = data[9]
            elif kind == b"PLTE":
                palette = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3)
            elif kind in (b"IDAT", b"IEND"):
                return palette if colour_type == 3 else None


def read_label(path: Path) -> np.ndarray:
    """Single-channel 8-bit label map ``[H, W]`` uint8; indexed (palette) PNGs give indices."""
    if not path.is_file():
        raise DataError(f"{path}: label file does not exist")
    palette = _png_palette(path) if path.suffix.lower() == ".png" else None
    if palette is not None:
        rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if rgb is None:
            raise DataError(f"{path}: cannot be decoded as a PNG")
        packed = (
            (rgb[..., 2].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 0]
        )
        keys = (
            (palette[:, 0].astype(np.int32) << 16)
            | (palette[:, 1].astype(np.int32) << 8)
            | palette[:, 2]
        )
        first = {}
        for index, key in enumerate(keys.tolist()):
            first.setdefault(key, index)  # duplicated colours read as their lowest index
        unique, inverse = np.unique(packed, return_inverse=True)
        missing = [u for u in unique.tolist() if u not in first]
        if missing:
            raise DataError(f"{path}: pixel colour {missing[0]:06x} is not in the PNG palette")
        lut = np.array([first[u] for u in unique.tolist()], dtype=np.uint8)
        return lut[inverse.reshape(packed.shape)]
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DataError(f"{path}: cannot be decoded as a label image")
    if label.ndim == 3:
        if (
            label.shape[2] >= 3
            and (label[..., 0] == label[..., 1]).all()
            and (label[..., 1] == label[..., 2]).all()
        ):
            label = label[..., 0]
        else:
            raise DataError(
                f"{path}: label map must have one channel of class ids, "
                f"got {label.shape[2]} channels"
            )
    if label.dtype != np.uint8:
        raise DataError(f"{path}: label map must be 8-bit, got {label.dtype}")
    return label


def read_float_map(path: Path, *, npz_key: str | None = None) -> np.ndarray:
    """Float32 ``[H, W]`` or ``[H, W, C]`` from ``.npy``, ``.npz``, ``.exr`` or ``.png``.

    PNG (8 or 16 bit) is scaled to [0, 1] and converted BGR -> RGB; EXR channels keep their
    stored order (``read_exr``); an ``.npz`` holds ``npz_key`` or exactly one array.
    """
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                key = npz_key if npz_key in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise DataError(
                        f"{path}: .npz needs the key {npz_key!r} or a single array, has {keys}"
                    )
                array = archive[key]
        elif suffix == ".exr":
            array, _ = read_exr(path)
            if array.shape[2] == 1:
                array = array[..., 0]
        elif suffix == ".png":
            raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise DataError(f"{path}: cannot be decoded as a PNG")
            scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(raw.dtype)
            if scale is None:
                raise DataError(f"{path}: PNG must be 8 or 16 bit, got {raw.dtype}")
            array = raw.astype(np.float32) / scale
            if array.ndim == 3:
                array = array[..., :3][..., ::-1]
        else:
            raise DataError(
                f"{path}: unsupported float map format {suffix!r} (.npy, .npz, .exr, .png)"
            )
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read ({err})") from err
    if array.ndim not in (2, 3) or not np.issubdtype(array.dtype, np.number):
        raise DataError(
            f"{path}: expected a numeric H x W or H x W x C array, got {array.dtype} {array.shape}"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def read_mask(path: Path) -> np.ndarray:
    """Boolean ``[H, W]``: image files use channel 0 > 0; ``.npy`` is taken as truthiness."""
    if not path.is_file():
        raise DataError(f"{path}: mask file does not exist")
    if path.suffix.lower() == ".npy":
        mask = np.load(path, allow_pickle=False)
    else:
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if mask is None:
            raise DataError(f"{path}: cannot be decoded as a mask image")
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise DataError(f"{path}: mask must be H x W, got shape {mask.shape}")
    return mask > 0


def read_intrinsics(path: Path) -> np.ndarray:
    """``[3, 3]`` float64 K from ``.json`` (``{"K": 3x3}`` or ``fx, fy, cx, cy``) or ``.txt``."""
    if not path.is_file():
        raise DataError(f"{path}: intrinsics file does not exist")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "K" in data:
                k = np.asarray(data["K"], dtype=np.float64)
            elif isinstance(data, dict) and {"fx", "fy", "cx", "cy"} <= data.keys():
                k = np.array(
                    [[data["fx"], 0, data["cx"]], [0, data["fy"], data["cy"]], [0, 0, 1]],
                    dtype=np.float64,
                )
            else:
                raise DataError(f"{path}: intrinsics JSON needs 'K' (3x3) or fx, fy, cx, cy")
        else:
            k = np.loadtxt(path, dtype=np.float64)
    except DataError:
        raise
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"{path}: cannot be read as intrinsics ({err})") from err
    if k.shape != (3, 3) or not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise DataError(
            f"{path}: intrinsics must be a finite 3x3 matrix with positive fx, fy, got {k.tolist()}"
        )
    return k
