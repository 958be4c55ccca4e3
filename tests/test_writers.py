"""EXR channels, and atomic writes that never leave a partial file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sapiens2_cli.exr import read_exr, write_exr
from sapiens2_cli.writers import FileData, WriterPool, atomic_write, part_path, write_file


@pytest.mark.parametrize("compression", ["none", "zip"])
@pytest.mark.parametrize("names", [("X", "Y", "Z"), ("R", "G", "B"), ("Z", "A", "m")])
def test_exr_round_trip_keeps_values_and_channel_order(tmp_path, names, compression):
    array = np.random.default_rng(0).standard_normal((7, 5, 3)).astype(np.float32)
    write_exr(tmp_path / "a.exr", array, names, compression=compression)
    back, got = read_exr(tmp_path / "a.exr")
    assert got == list(names) and back.dtype == np.float32
    np.testing.assert_array_equal(back, array)


def test_exr_without_order_attribute_reads_in_conventional_order(tmp_path):
    import OpenEXR

    planes = {n: np.full((2, 2), i, np.float32) for i, n in enumerate("RGB")}
    OpenEXR.File({"type": OpenEXR.scanlineimage}, planes).write(str(tmp_path / "plain.exr"))
    back, names = read_exr(tmp_path / "plain.exr")
    assert names == ["R", "G", "B"] and back[0, 0].tolist() == [0, 1, 2]


def test_exr_rejects_mismatched_channels(tmp_path):
    with pytest.raises(ValueError, match="2 channel names"):
        write_exr(tmp_path / "a.exr", np.zeros((2, 2, 3), np.float32), ("X", "Y"))
    with pytest.raises(ValueError, match="float32 or float16"):
        write_exr(tmp_path / "a.exr", np.zeros((2, 2, 1)), ("X",))


def test_all_kinds_round_trip(tmp_path):
    import cv2

    labels = np.arange(20 * 10, dtype=np.uint8).reshape(20, 10) % 29
    write_file(tmp_path / "s" / "a.png", FileData("png", labels))
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "s" / "a.png"), cv2.IMREAD_UNCHANGED), labels)
    write_file(tmp_path / "a.npy", FileData("npy", labels))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), labels)
    write_file(tmp_path / "a.json", FileData("json", {"é": 1.5}))
    assert json.loads((tmp_path / "a.json").read_text("utf-8")) == {"é": 1.5}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "a.npy", "a.png", "s"]


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "a.exr"

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):  # NaN is not JSON
        write_file(tmp_path / "a.json", FileData("json", {"x": float("nan")}))
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_a_leftover_temporary(tmp_path):
    path = tmp_path / "a.png"
    part_path(path).write_bytes(b"left by a killed run")
    write_file(path, FileData("png", np.zeros((4, 4), np.uint8)))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_writer_pool_bounds_pending_jobs():
    import threading

    gate = threading.Event()
    pool = WriterPool(1, max_pending=2)
    done = []
    for i in range(2):
        done += pool.submit(lambda i=i: (gate.wait(), i)[1])
    assert done == []
    third = threading.Thread(target=lambda: done.extend(pool.submit(lambda: 2)))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # the pool is full: submitting waits for the oldest job
    gate.set()
    third.join()
    done += pool.drain()
    pool.close()
    assert [f.result() for f in done] == [0, 1, 2]
