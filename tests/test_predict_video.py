"""Videos through ``sapiens2 predict``: frames out as image sequences, overlays as a video with
the source's timing and audio, mixed with images, resumable, corrupt stretches failing alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from conftest import FIXTURES, REPO
from predict_helpers import files_under, predict
from sapiens2_cli.tasks import TASKS
from sapiens2_cli.tasks.albedo import AlbedoTask
from sapiens2_cli.tasks.base import FileSpec
from sapiens2_cli.video import VideoFrame, iter_frames, probe
from sapiens2_cli.writers import PART_SUFFIX, FileData
from videos import corrupt_middle, make_video

DATA = Path(__file__).parent / "data"


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """12 frames at 10 fps, 64x48, with an audio track."""
    return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=12, audio=True)


def test_video_and_image_in_one_run(clip, tmp_path, tiny_models):
    out = tmp_path / "out"
    result = predict(clip, DATA / "astronaut.png", "-o", out, "--vis", "--stride", 2, "--start", 2, "--end", "1.0s",
                     "--checkpoint", f"seg={tiny_models['seg']}", "--checkpoint", f"albedo={tiny_models['albedo']}",
                     "-b", 3, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    frames = [2, 4, 6, 8]
    expected = {"run.json", "seg/classes.json", "seg/astronaut.png", "albedo/astronaut.exr", "albedo/astronaut.png",
                "vis/seg/astronaut.jpg", "vis/albedo/astronaut.jpg", "vis/seg/clip.mp4", "vis/albedo/clip.mp4"}  # fmt: skip
    for i in frames:
        expected |= {f"seg/clip/{i:06d}.png", f"albedo/clip/{i:06d}.exr", f"albedo/clip/{i:06d}.png"}
    assert files_under(out) == expected
    run = run_json(out)
    assert run["counts"] == {"total": 5, "ok": 5, "skipped": 0, "failed": 0}
    assert run["per_task"]["seg"] == {"ok": 5, "skipped": 0, "failed": 0}
    assert run["options"]["stride"] == 2 and run["options"]["start"] == "2"

    # a frame's outputs are those of the same picture given as an image
    decoded = {f.index: f for f in iter_frames(clip) if isinstance(f, VideoFrame)}
    cv2.imwrite(str(tmp_path / "frame.png"), decoded[6].image)
    assert predict(tmp_path / "frame.png", "-o", tmp_path / "single", "--checkpoint", tiny_models["seg"], "-q").exit_code == 0
    np.testing.assert_array_equal(cv2.imread(str(out / "seg" / "clip" / "000006.png"), cv2.IMREAD_UNCHANGED),
                                  cv2.imread(str(tmp_path / "single" / "seg" / "frame.png"), cv2.IMREAD_UNCHANGED))  # fmt: skip

    # the overlay video: the source's time base, each frame at its source timestamp, the audio of that span
    info = probe(clip)
    with av.open(str(out / "vis" / "seg" / "clip.mp4")) as container:
        video = container.streams.video[0]
        assert video.time_base == info.time_base
        got = [(frame.pts, frame.width, frame.height) for frame in container.decode(video=0)]
    with av.open(str(out / "vis" / "seg" / "clip.mp4")) as container:
        audio = container.streams.audio[0]
        audio_times = [float(p.pts * audio.time_base) for p in container.demux(audio) if p.pts is not None]
    assert [pts for pts, _, _ in got] == [decoded[i].pts for i in frames]
    assert got[0][2] == 48 and {(w, h) for _, w, h in got} == {tuple(got[0][1:])}
    assert audio_times and 0.15 <= min(audio_times) and max(audio_times) < 1.0


def test_resume_skips_written_frames(clip, tmp_path, tiny_models):
    out = tmp_path / "out"
    args = [clip, "-o", out, "--checkpoint", tiny_models["seg"], "-q"]
    assert predict(*args, "--end", 5).exit_code == 0
    assert run_json(out)["counts"] == {"total": 5, "ok": 5, "skipped": 0, "failed": 0}
    (out / "seg" / "clip" / f".000007.png{PART_SUFFIX}").write_bytes(b"half a file from a killed run")
    assert predict(*args).exit_code == 0
    assert run_json(out)["counts"] == {"total": 12, "ok": 7, "skipped": 5, "failed": 0}
    assert files_under(out / "seg" / "clip") == {f"{i:06d}.png" for i in range(12)}
    (out / "seg" / "clip" / "000003.png").unlink()
    assert predict(*args).exit_code == 0
    assert run_json(out)["counts"] == {"total": 12, "ok": 1, "skipped": 11, "failed": 0}
    # the overlay video is written in one pass: asking for it runs every frame once
    assert predict(*args, "--vis").exit_code == 0
    assert run_json(out)["counts"] == {"total": 12, "ok": 12, "skipped": 0, "failed": 0}
    assert predict(*args, "--vis").exit_code == 0
    assert run_json(out)["counts"] == {"total": 12, "ok": 0, "skipped": 12, "failed": 0}


def test_run_json_times_the_video_decoding(clip, tmp_path, tiny_models, monkeypatch):
    """Frames are decoded on the video's own thread; that time is the run's ``decode`` stage."""
    import sapiens2_cli.frames as frames_module

    real = frames_module.iter_frames

    def slow(*args, **kwargs):
        for frame in real(*args, **kwargs):  # the frames --stride keeps
            time.sleep(0.05)  # 50 ms more decoding each
            yield frame

    monkeypatch.setattr(frames_module, "iter_frames", slow)
    out = tmp_path / "out"
    assert predict(clip, "-o", out, "--checkpoint", tiny_models["seg"], "--stride", 3, "-q").exit_code == 0
    run = run_json(out)
    assert run["counts"]["ok"] == 4  # frames 0, 3, 6, 9
    assert run["timings_s"]["decode"] >= 4 * 0.05


def test_killed_run_leaves_no_overlay_video_and_resumes(tmp_path, tiny_models):
    video = make_video(tmp_path / "long.mp4", frames=60, audio=True)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SAPIENS2_FIXTURES": str(FIXTURES), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sapiens2_cli", "predict", str(video), "-o", str(out), "--checkpoint",
           str(tiny_models["seg"]), "--vis", "--workers", "1", "-q"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list((out / "seg" / "long").glob("*.png"))) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    done = len(list((out / "seg" / "long").glob("*.png")))
    assert 3 <= done < 60
    assert not (out / "vis" / "seg" / "long.mp4").exists()  # only ever renamed into place when complete

    result = predict(*cmd[4:])
    assert result.exit_code == 0, result.output
    assert run_json(out)["counts"]["ok"] == 60
    assert not [p for p in out.rglob("*") if PART_SUFFIX in p.name]
    with av.open(str(out / "vis" / "seg" / "long.mp4")) as container:
        assert len(list(container.decode(video=0))) == 60 and container.streams.audio


def test_corrupt_stretch_fails_only_its_frames(tmp_path, tiny_models):
    bad = corrupt_middle(make_video(tmp_path / "mj.avi", codec="mjpeg", gop=1), tmp_path / "bad.avi")
    out = tmp_path / "out"
    result = predict(bad, "-o", out, "--checkpoint", tiny_models["seg"], "--vis", "-q")
    assert result.exit_code == 1
    run = run_json(out)
    failed = {f["frame"] for f in run["failures"]}
    assert run["counts"]["failed"] == len(failed) and 1 <= len(failed) <= 3
    assert all("undecodable" in f["reason"] and f["input"] == str(bad) for f in run["failures"])
    assert all(f"error: {bad} frame " in line for line in result.stderr.splitlines())
    written = {int(p.stem) for p in (out / "seg" / "bad").glob("*.png")}
    assert run["counts"]["ok"] == len(written) >= 25 and not written & failed
    assert run["counts"]["total"] == len(written) + len(failed)
    with av.open(str(out / "vis" / "seg" / "bad.mp4")) as container:  # the overlay skips the bad frames
        assert len(list(container.decode(video=0))) == len(written)


def test_unreadable_video_is_one_failure(tmp_path, tiny_models):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "junk.mp4").write_bytes(b"not a video")
    shutil.copy(DATA / "astronaut.png", folder / "a.png")
    out = tmp_path / "out"
    result = predict(folder, "-o", out, "--checkpoint", tiny_models["seg"], "-q")
    assert result.exit_code == 1
    run = run_json(out)
    assert run["counts"] == {"total": 2, "ok": 1, "skipped": 0, "failed": 1}
    assert run["failures"][0]["input"] == str(folder / "junk.mp4")
    assert run["failures"][0]["reason"].startswith("cannot open as a video")


def test_rotation_metadata_is_honoured(tmp_path, tiny_models):
    video = make_video(tmp_path / "rot.mp4", frames=2, rotation=90)
    out = tmp_path / "out"
    assert predict(video, "-o", out, "--checkpoint", tiny_models["seg"], "-q").exit_code == 0
    assert cv2.imread(str(out / "seg" / "rot" / "000001.png"), cv2.IMREAD_UNCHANGED).shape == (64, 48)


class RecordsTask(AlbedoTask):
    """A task that writes one JSON line per video frame: the hook a pose task uses."""

    RECORDS = FileSpec(".jsonl", "jsonl", stream=True)

    def video_files(self, fmt, vis):
        return [self.RECORDS]

    def frame_outputs(self, files, item):
        albedo = next(d for s, d in files.items() if s.kind in ("exr", "npy")).data
        return {self.RECORDS: FileData("json", {"index": item.frame, "time": item.time, "mean": float(albedo.mean())})}


def test_per_frame_records_in_one_jsonl_per_video(clip, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setitem(TASKS, "albedo", RecordsTask())
    out = tmp_path / "out"
    result = predict(clip, "-o", out, "--checkpoint", tiny_models["albedo"], "--stride", 3, "-b", 2, "--workers", 3, "-q")
    assert result.exit_code == 0, result.output
    assert files_under(out) == {"run.json", "albedo/clip.jsonl"}
    lines = [json.loads(line) for line in (out / "albedo" / "clip.jsonl").read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 3, 6, 9]
    assert [r["time"] for r in lines] == pytest.approx([float(Fraction(i, 10)) for i in (0, 3, 6, 9)])
    assert len({r["mean"] for r in lines}) == 4  # each line holds its own frame's result
    assert predict(clip, "-o", out, "--checkpoint", tiny_models["albedo"], "--stride", 3, "-q").exit_code == 0
    assert run_json(out)["counts"] == {"total": 4, "ok": 0, "skipped": 4, "failed": 0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--start", "soon"], "--start: cannot read position"),
        (["--start", "10", "--end", "5"], "is not after --start"),
        (["--format", "safetensors"], "seg writes exr or npy"),
        (["--tile", "big"], "expected auto, off or HxW"),
    ],
)
def test_video_and_format_usage_errors(clip, tmp_path, tiny_models, args, message):
    result = predict(clip, "-o", tmp_path / "out", "--checkpoint", tiny_models["seg"], *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
