"""Video decoding (indices, times, stride, ranges, rotation, corrupt stretches) and encoding."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from sapiens2_cli.video import FrameError, VideoError, VideoFrame, VideoWriter, iter_frames, parse_position, probe
from videos import corrupt_middle, frame_value, make_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("v") / "clip.mp4", audio=True)


def test_probe(clip):
    info = probe(clip)
    assert (info.width, info.height, info.fps, info.frames) == (64, 48, Fraction(10), 30)
    assert info.has_audio and info.rotation == 0 and info.codec == "h264"


def test_every_frame_in_order_with_index_and_time(clip):
    frames = list(iter_frames(clip))
    assert [f.index for f in frames] == list(range(30))
    assert all(isinstance(f, VideoFrame) for f in frames)
    assert [round(f.time, 6) for f in frames] == [round(i / 10, 6) for i in range(30)]
    values = [int(np.median(f.image[16:, 16:, 0])) for f in frames]
    assert all(abs(v - frame_value(i)) <= 8 for i, v in enumerate(values))


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(stride=4), list(range(0, 30, 4))),
        (dict(start="5", end="12"), list(range(5, 12))),
        (dict(start="1.5s", end="2s"), list(range(15, 20))),
        (dict(start="00:01.2", stride=5), [15, 20, 25]),
        (dict(start="25f"), list(range(25, 30))),
    ],
)
def test_stride_start_end(clip, kwargs, expected):
    got = list(iter_frames(clip, **kwargs))
    assert [f.index for f in got] == expected
    for f in got:  # the seek lands on the right content, not just the right label
        assert abs(int(np.median(f.image[16:, 16:, 0])) - frame_value(f.index)) <= 8


def test_rotation_metadata_is_applied(tmp_path):
    path = make_video(tmp_path / "rot.mp4", frames=3, rotation=90)
    info = probe(path)
    assert (info.width, info.height, info.rotation) == (48, 64, 270)
    image = next(iter_frames(path)).image
    assert image.shape == (64, 48, 3)
    # the white mark at the top-left of the stored frame is at the bottom-left once displayed
    assert image[-3, 2, 0] > 200 and image[2, 2, 0] < 50


def test_corrupt_stretch_fails_only_its_frames(tmp_path):
    src = make_video(tmp_path / "mj.avi", codec="mjpeg", gop=1)
    bad = corrupt_middle(src, tmp_path / "bad.avi")
    out = list(iter_frames(bad))
    errors = [o for o in out if isinstance(o, FrameError)]
    good = [o for o in out if isinstance(o, VideoFrame)]
    assert errors and len(errors) <= 3
    assert len(good) >= 25
    assert all("undecodable" in e.reason for e in errors)
    assert sorted(f.index for f in good + errors) == sorted({f.index for f in good + errors})


@pytest.mark.parametrize("content", [b"", b"not a video at all"])
def test_unreadable_video(tmp_path, content):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    with pytest.raises(VideoError, match="bad.mp4: cannot open as a video"):
        probe(bad)


@pytest.mark.parametrize("text,expected", [("12", ("frame", 12.0)), ("3.5s", ("time", 3.5)), ("1:02:03", ("time", 3723.0))])
def test_parse_position(text, expected):
    assert parse_position(text) == expected
    with pytest.raises(ValueError):
        parse_position("soon")


def test_writer_keeps_rate_time_base_and_audio(clip, tmp_path):
    info = probe(clip)
    out = tmp_path / "vis" / "clip.mp4"
    writer = VideoWriter(out, info)
    for f in iter_frames(clip, stride=2):
        writer.write(255 - f.image, f.pts)
    assert not out.exists()
    writer.close()
    assert out.exists() and not writer.tmp.exists()
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert v.time_base == info.time_base and v.average_rate is not None
        assert c.streams.audio, "source audio is passed through"
        pts = [fr.pts for fr in c.decode(video=0)]
    src_pts = [f.pts for f in iter_frames(clip, stride=2)]
    assert pts == src_pts


def test_writer_abort_leaves_nothing(clip, tmp_path):
    writer = VideoWriter(tmp_path / "x.mp4", probe(clip))
    writer.write(np.zeros((48, 64, 3), np.uint8), 0)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_frames_outside_the_stride_are_not_reported(tmp_path):
    bad = corrupt_middle(make_video(tmp_path / "mj.avi", codec="mjpeg", gop=1), tmp_path / "bad.avi")
    every = [o.index for o in iter_frames(bad) if isinstance(o, FrameError)]
    sampled = list(iter_frames(bad, stride=2))
    assert every and [o.index for o in sampled if isinstance(o, FrameError)] == [i for i in every if i % 2 == 0]
    assert all(o.index % 2 == 0 for o in sampled)
