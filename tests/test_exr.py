"""EXR read / write helper: float32 channels, order kept, atomic writes, clear errors."""

from __future__ import annotations

import numpy as np
import OpenEXR
import pytest

from sapiens2_cli.exr import read_exr, write_exr


def test_round_trip_keeps_values_and_channel_order(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    path = write_exr(tmp_path / "p.exr", data, ["Z", "X", "Y"])  # not alphabetical on purpose
    array, names = read_exr(path)
    assert names == ["Z", "X", "Y"]
    assert array.dtype == np.float32 and np.array_equal(array, data)
    single, names = read_exr(write_exr(tmp_path / "d.exr", data[..., 0], ["depth"]))
    assert names == ["depth"] and np.array_equal(single[..., 0], data[..., 0])


def test_overwrite_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "n.exr"
    write_exr(path, np.zeros((2, 2, 3), np.float32), ["X", "Y", "Z"])
    write_exr(path, np.ones((2, 2, 3), np.float32), ["X", "Y", "Z"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.exr"]
    assert np.array_equal(read_exr(path)[0], np.ones((2, 2, 3), np.float32))


def test_foreign_files_use_conventional_order(tmp_path):
    path = tmp_path / "rgb.exr"
    half = np.arange(6, dtype=np.float16).reshape(2, 3)
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, {"B": half + 2, "R": half, "G": half + 1}) as exr_file:
        exr_file.write(str(path))
    array, names = read_exr(path)
    assert names == ["R", "G", "B"] and array.dtype == np.float32
    assert np.array_equal(array[..., 2], (half + 2).astype(np.float32))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(
        ValueError, match=r"x.exr: 2 channel names \['A', 'B'\] for an array with 3 channels"
    ):
        write_exr(tmp_path / "x.exr", np.zeros((2, 2, 3)), ["A", "B"])
    with pytest.raises(ValueError, match="distinct"):
        write_exr(tmp_path / "x.exr", np.zeros((2, 2, 2)), ["A", "A"])
    with pytest.raises(ValueError, match="H x W x C"):
        write_exr(tmp_path / "x.exr", np.zeros(4), ["A"])
    bad = tmp_path / "bad.exr"
    bad.write_bytes(b"not an exr at all")
    with pytest.raises(ValueError, match="bad.exr: not a readable EXR file"):
        read_exr(bad)
    with pytest.raises(FileNotFoundError, match="missing.exr"):
        read_exr(tmp_path / "missing.exr")
    assert not list(tmp_path.glob(".*tmp*"))
