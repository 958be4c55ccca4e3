"""``sapiens2 predict`` end to end on tiny models: layout, formats, bad inputs, exit codes,
skip-existing, shards, stdin, batching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from predict_helpers import files_under, predict
from sapiens2_cli import engine
from sapiens2_cli.exr import read_exr
from sapiens2_cli.weights import file_digest

DATA = Path(__file__).parent / "data"
ALL_TASKS = ("seg", "normal", "pointmap", "albedo")


def checkpoints(models, tasks=ALL_TASKS):
    return [a for t in tasks for a in ("--checkpoint", f"{t}={models[t]}")]


@pytest.fixture
def photos(tmp_path):
    """photos/astronaut.png (256x256) and photos/sub/grace hopper ü.JPG (512x600)."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    shutil.copy(DATA / "astronaut.png", root / "astronaut.png")
    shutil.copy(DATA / "grace_hopper.jpg", root / "sub" / "grace hopper ü.JPG")
    return root


def test_layout_of_every_task_with_overlays(photos, tmp_path, tiny_models, monkeypatch):
    decoded = []
    real = engine.read_image
    monkeypatch.setattr(engine, "read_image", lambda p: decoded.append(p) or real(p))
    before = files_under(photos)
    out = tmp_path / "out"
    result = predict(photos, "-r", "-o", out, "--vis", *checkpoints(tiny_models), "-b", "2")
    assert result.exit_code == 0, result.output
    assert len(decoded) == 2  # each image decoded once for the four tasks
    assert files_under(photos) == before  # nothing written into the input tree
    names = ["astronaut", "sub/grace hopper ü"]
    expected = {"run.json", "seg/classes.json"}
    for n in names:
        expected |= {f"seg/{n}.png", f"normal/{n}.exr", f"pointmap/{n}.exr", f"pointmap/{n}.json",
                     f"albedo/{n}.exr", f"albedo/{n}.png"} | {f"vis/{t}/{n}.jpg" for t in ALL_TASKS}  # fmt: skip
    assert files_under(out) == expected

    for n, (h, w) in zip(names, [(256, 256), (600, 512)], strict=True):
        labels = cv2.imread(str(out / "seg" / f"{n}.png"), cv2.IMREAD_UNCHANGED)
        assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < 29
        normals, channels = read_exr(out / "normal" / f"{n}.exr")
        assert channels == ["X", "Y", "Z"] and normals.shape == (h, w, 3) and normals.dtype == np.float32
        assert np.linalg.norm(normals, axis=-1).max() <= 1 + 1e-5
        points, channels = read_exr(out / "pointmap" / f"{n}.exr")
        assert channels == ["X", "Y", "Z"] and points.shape == (h, w, 3)
        meta = json.loads((out / "pointmap" / f"{n}.json").read_text())
        assert meta["units"] == "metres" and meta["image_size_hw"] == [h, w] and meta["input_size_hw"] == [144, 80]
        albedo, channels = read_exr(out / "albedo" / f"{n}.exr")
        assert channels == ["R", "G", "B"] and 0 <= albedo.min() and albedo.max() <= 1
        png = cv2.imread(str(out / "albedo" / f"{n}.png"))
        np.testing.assert_array_equal(png, (albedo * 255).astype(np.uint8)[..., ::-1])
        assert cv2.imread(str(out / "vis" / "seg" / f"{n}.jpg")).shape[0] == h
        assert cv2.imread(str(out / "vis" / "normal" / f"{n}.jpg")).shape == (h, 2 * w, 3)

    classes = json.loads((out / "seg" / "classes.json").read_text())
    assert len(classes["classes"]) == 29 and classes["classes"][3]["name"] == "Face_Neck"
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["counts"] == {"total": 2, "ok": 2, "skipped": 0, "failed": 0}
    assert run["per_task"]["albedo"] == {"ok": 2, "skipped": 0, "failed": 0}
    assert run["models"]["seg"]["digest"] == file_digest(tiny_models["seg"])
    assert run["models"]["seg"]["input_size_hw"] == [128, 96]  # from the checkpoint's metadata
    assert run["command"][:2] == ["sapiens2", "predict"] and run["versions"]["torch"]
    assert run["images_per_second"] > 0 and run["timings_s"]["forward"] > 0
    assert run["failures"] == [] and run["layout_version"] == 1


def test_npy_format(photos, tmp_path, tiny_models):
    out = tmp_path / "out"
    result = predict(photos / "astronaut.png", "-o", out, "--format", "npy", *checkpoints(tiny_models), "-q")
    assert result.exit_code == 0, result.output
    assert files_under(out) == {"run.json", "seg/classes.json", "seg/astronaut.npy", "normal/astronaut.npy",
                                "pointmap/astronaut.npy", "pointmap/astronaut.json", "albedo/astronaut.npy",
                                "albedo/astronaut.png"}  # fmt: skip
    seg = np.load(out / "seg" / "astronaut.npy")
    assert seg.shape == (256, 256) and seg.dtype == np.uint8
    for task in ("normal", "pointmap", "albedo"):
        array = np.load(out / task / "astronaut.npy")
        assert array.shape == (256, 256, 3) and array.dtype == np.float32
    assert result.stderr == ""  # --quiet


def test_bad_inputs_fail_one_by_one(tmp_path, tiny_models):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(DATA / "astronaut.png", folder / "good.png")
    (folder / "empty.jpg").write_bytes(b"")
    data = (DATA / "grace_hopper.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "fake.png").write_text("not a picture")
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((8, 8, 3), np.uint8))
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    out = tmp_path / "out"
    result = predict(folder, tmp_path / "missing.jpg", "-o", out, "-t", "seg", "-t", "albedo",
                     "--checkpoint", f"seg={tiny_models['seg']}", "--checkpoint", f"albedo={tiny_models['albedo']}")  # fmt: skip
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(errors) == sorted([
        f"error: {tmp_path / 'missing.jpg'}: no such file or directory",
        f"error: {folder / 'cut.jpg'}: truncated JPEG (no end-of-image marker after the last scan)",
        f"error: {folder / 'empty.jpg'}: empty file (0 bytes)",
        f"error: {folder / 'fake.png'}: not an image (unrecognised file signature; expected JPEG, PNG, WebP, BMP or TIFF)",
        f"error: {folder / 'gone.jpg'}: no such file",
        f"error: {folder / 'tiny.png'}: image too small (8x8 pixels; at least 16 on each side)",
    ])  # fmt: skip
    assert files_under(out) == {"run.json", "seg/classes.json", "seg/good.png", "albedo/good.exr", "albedo/good.png"}
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"total": 7, "ok": 1, "skipped": 0, "failed": 6}
    assert run["per_task"]["seg"] == {"ok": 1, "skipped": 0, "failed": 5}
    assert {f["input"]: f["reason"] for f in run["failures"]}[str(folder / "empty.jpg")] == "empty file (0 bytes)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{photos}/astronaut.png", "-t", "seg", "--checkpoint", "{tmp}/nope.safetensors"], "no such checkpoint file"),
        (["{photos}/astronaut.png", "--checkpoint", "{seg}", "--input-size", "100x96"], "not a multiple of 16"),
        (["{photos}/astronaut.png", "--checkpoint", "{pointmap}", "--input-size", "128x96"], "scale branch"),
        (["{photos}/astronaut.png"], "choose a task"),
        (["{photos}/astronaut.png", "-t", "seg", "-t", "normal", "--checkpoint", "{seg}"], "name its task"),
        (["{photos}/astronaut.png", "-t", "seg", "--checkpoint", "normal={normal}"], "does not ask for it"),
        (["{photos}/astronaut.png", "-t", "seg", "--size", "0.1b"], "0.1b"),
        (["{photos}/astronaut.png", "-t", "depth"], "depth"),
        (["{photos}/astronaut.png", "-t", "seg", "--shard", "2/2"], "need 0 <= i < N"),
        (["{photos}/astronaut.png", "-t", "seg", "--input-size", "big"], "expected HxW"),
        (["{photos}/astronaut.png", "{tmp}/twin/astronaut.jpg", "-t", "seg"], "same outputs"),
        (["{photos}", "-t", "seg", "-o", "{photos}/out"], "inside the input folder"),
        (["{tmp}/empty", "-t", "seg"], "no image or video found"),
        (["{photos}/astronaut.png", "-t", "seg", "--checkpoint", "{seg}", "--device", "cuda:7"], "cuda"),
    ],
    ids=["missing-ckpt", "bad-size", "pointmap-size", "no-task", "bare-ckpt", "stray-ckpt", "no-such-size",
         "unknown-task", "bad-shard", "bad-size-text", "collision", "out-in-input", "no-images", "no-device"],  # fmt: skip
)
def test_usage_errors_exit_2_before_anything_runs(photos, tmp_path, tiny_models, args, message):
    (tmp_path / "twin").mkdir()
    shutil.copy(DATA / "grace_hopper.jpg", tmp_path / "twin" / "astronaut.jpg")
    (tmp_path / "empty").mkdir()
    fill = {"photos": photos, "tmp": tmp_path, **tiny_models}
    args = [a.format(**fill) for a in args]
    out = tmp_path / "out"
    if "-o" not in args:
        args += ["-o", str(out)]
    result = predict(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_skip_existing_then_overwrite(photos, tmp_path, tiny_models):
    out = tmp_path / "out"
    args = [photos, "-r", "-o", out, "--checkpoint", tiny_models["seg"], "-q"]
    assert predict(*args).exit_code == 0
    first = {p: p.stat().st_mtime_ns for p in (out / "seg").rglob("*.png")}
    result = predict(*args)
    assert result.exit_code == 0
    assert json.loads((out / "run.json").read_text())["counts"] == {"total": 2, "ok": 0, "skipped": 2, "failed": 0}
    assert {p: p.stat().st_mtime_ns for p in first} == first
    (out / "seg" / "astronaut.png").unlink()
    assert predict(*args).exit_code == 0
    assert json.loads((out / "run.json").read_text())["counts"] == {"total": 2, "ok": 1, "skipped": 1, "failed": 0}
    assert predict(*args, "--overwrite").exit_code == 0
    assert json.loads((out / "run.json").read_text())["counts"] == {"total": 2, "ok": 2, "skipped": 0, "failed": 0}


def test_shards_and_slurm_arrays_cover_every_image_once(tmp_path, tiny_models):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(7):
        shutil.copy(DATA / "astronaut.png", folder / f"img{i}.png")
    out = tmp_path / "out"
    seen = []
    for index in range(3):
        result = predict(folder, "-o", out, "--checkpoint", tiny_models["seg"], "--shard", f"{index}/3", "-q")
        assert result.exit_code == 0, result.output
        run = json.loads((out / f"run.shard-{index:04d}-of-0003.json").read_text())
        seen.append(run["counts"]["ok"])
    assert seen == [3, 2, 2]
    assert files_under(out / "seg") == {"classes.json"} | {f"img{i}.png" for i in range(7)}
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    result = predict(folder, "-o", tmp_path / "slurm", "--checkpoint", tiny_models["seg"], "-q", env=env)
    assert result.exit_code == 0
    assert files_under(tmp_path / "slurm" / "seg") == {"classes.json", "img1.png", "img4.png"}


def test_paths_on_stdin_and_task_from_the_checkpoint(photos, tmp_path, tiny_models):
    out = tmp_path / "out"
    stdin = f"{photos / 'astronaut.png'}\n{photos / 'sub' / 'grace hopper ü.JPG'}\n"
    result = predict("-", "-o", out, "--checkpoint", tiny_models["normal"], "--format", "npy", "-q", input=stdin)
    assert result.exit_code == 0, result.output
    assert files_under(out) == {"run.json", "normal/astronaut.npy", "normal/sub/grace hopper ü.npy"}


def test_batches_of_mixed_sizes_match_single_images(tmp_path, tiny_models):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(DATA / "astronaut.png", folder / "a.png")
    shutil.copy(DATA / "grace_hopper.jpg", folder / "b.jpg")
    cv2.imwrite(str(folder / "c.png"), cv2.imread(str(DATA / "grace_hopper.jpg"))[100:300, 50:420])
    for batch in (1, 3):
        result = predict(folder, "-o", tmp_path / f"b{batch}", "-b", batch, "--format", "npy", "-q",
                         *checkpoints(tiny_models, ("seg", "albedo")))  # fmt: skip
        assert result.exit_code == 0, result.output
    for name, shape in [("a", (256, 256)), ("b", (600, 512)), ("c", (200, 370))]:
        one, three = (np.load(tmp_path / f"b{b}" / "albedo" / f"{name}.npy") for b in (1, 3))
        assert one.shape == (*shape, 3)
        np.testing.assert_allclose(three, one, atol=1e-5, rtol=0)
        labels = [np.load(tmp_path / f"b{b}" / "seg" / f"{name}.npy") for b in (1, 3)]
        assert (labels[0] != labels[1]).mean() < 1e-3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_cpu(photos, tmp_path, tiny_models, precision):
    ref, low = tmp_path / "fp32", tmp_path / precision
    for out, p in ((ref, "fp32"), (low, precision)):
        result = predict(photos / "astronaut.png", "-o", out, "--checkpoint", tiny_models["albedo"],
                         "--format", "npy", "--precision", p, "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
    a, b = np.load(ref / "albedo" / "astronaut.npy"), np.load(low / "albedo" / "astronaut.npy")
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert 0 < np.abs(a - b).max() < 0.1
