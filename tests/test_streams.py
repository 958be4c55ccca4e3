"""Per-video streams: frames finishing in any order are written in decode order, failed frames
are left out, and the file appears only when the video is complete."""

from __future__ import annotations

import json
import random
import threading

import av
import numpy as np
import pytest

from sapiens2_cli.streams import JsonlStream, Mp4Stream
from sapiens2_cli.video import probe
from sapiens2_cli.writers import PART_SUFFIX, FileData
from videos import make_video


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    return probe(make_video(tmp_path_factory.mktemp("s") / "src.mp4", frames=20, audio=True))


def test_lines_follow_decode_order_whatever_order_frames_finish(tmp_path, info):
    stream = JsonlStream(tmp_path / "a.jsonl", info)
    order = list(range(0, 40, 2))
    for index in order:
        stream.expect(index, index)
    finishing = order[:]
    random.Random(1).shuffle(finishing)
    threads = []
    for index in finishing:
        if index == 10:
            threads.append(threading.Thread(target=stream.drop, args=(index,)))
        else:
            threads.append(threading.Thread(target=stream.put, args=(index, FileData("json", {"index": index}))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not (tmp_path / "a.jsonl").exists()  # not before the end of the video
    stream.end()
    assert stream.closed and stream.error is None
    lines = [json.loads(line)["index"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert lines == [i for i in order if i != 10]
    assert not list(tmp_path.glob(f"*{PART_SUFFIX}"))


def test_video_stream_encodes_in_order_with_source_timestamps(tmp_path, info):
    stream = Mp4Stream(tmp_path / "v.mp4", info)
    pts = [1024 * i for i in range(6)]  # frames 0..5 at 10 fps in the source time base (1/10240)
    for i, p in enumerate(pts):
        stream.expect(i, p)
    for i in (3, 1, 0, 5, 2, 4):
        stream.put(i, FileData("jpg", np.full((48, 64, 3), 40 * i, np.uint8)))
    stream.end()
    assert stream.error is None
    with av.open(str(tmp_path / "v.mp4")) as c:
        frames = list(c.decode(video=0))
    assert [f.pts for f in frames] == pts
    assert [round(np.median(f.to_ndarray(format="bgr24")) / 40) for f in frames] == list(range(6))


def test_a_failing_stream_reports_and_leaves_nothing(tmp_path, info):
    stream = JsonlStream(tmp_path / "b.jsonl", info)
    stream.expect(0, 0)
    stream.expect(1, 1)
    stream.put(0, FileData("jpg", np.zeros((2, 2, 3), np.uint8)))  # not a JSON object
    stream.put(1, FileData("json", {}))
    stream.end()
    assert stream.closed and "cannot write" in stream.error and "JSON" in stream.error
    assert list(tmp_path.iterdir()) == []


def test_abort_removes_the_temporary_file(tmp_path, info):
    stream = Mp4Stream(tmp_path / "c.mp4", info)
    for i in range(60):  # enough frames for the encoder to start writing
        stream.expect(i, 1024 * i)
        stream.put(i, FileData("jpg", np.full((48, 64, 3), i, np.uint8)))
    assert (tmp_path / f".c.mp4{PART_SUFFIX}").stat().st_size > 0
    stream.abort()
    assert list(tmp_path.iterdir()) == []
