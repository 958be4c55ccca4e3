"""``sapiens2 predict -t pose`` end to end: the official e2e case, the built-in detector on a
photo of several people, keypoint formats, overlays, and pose beside a dense task."""

from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from predict_helpers import files_under, predict, read_json
from sapiens2_cli.detector_weights import load_detector
from sapiens2_cli.engine import Runner
from sapiens2_cli.readers import read_image
from sapiens2_cli.tasks import TASKS
from sapiens2_cli.tasks.keypoint_formats import get_keypoint_format, goliath_names
from sapiens2_cli.transforms import normalize

DATA = Path(__file__).parent / "data"
E2E = FIXTURES / "e2e" / "pose"
DETECTOR = FIXTURES / "parity" / "detector" / "model.pth"


@pytest.fixture(scope="module")
def e2e() -> tuple[dict, dict]:
    return read_json(E2E / "config.json"), read_json(E2E / "pose.json")


def test_e2e_case_through_the_cli_with_a_box_file(e2e, tmp_path):
    cfg, expected = e2e
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"image.png": [cfg["bbox_xyxy"]]}))
    model = (E2E / cfg["model_file"]).resolve()
    h, w = cfg["model_input_hw"]
    out = tmp_path / "out"
    result = predict(E2E / "image.png", "-t", "pose", "--checkpoint", model, "--input-size", f"{h}x{w}",
                     "--bboxes", boxes, "-o", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert files_under(out) == {"run.json", "pose/keypoints.json", "pose/image.json"}
    doc = read_json(out / "pose" / "image.json")
    assert doc["version"] == 1 and doc["model"] == str(model) and doc["keypoint_format"] == "goliath308"
    assert doc["image"] == {"path": str(E2E / "image.png"), "width": 224, "height": 256}
    (person,) = doc["instances"]
    assert person["bbox"] == expected["bbox_xyxy"] and person["bbox_score"] == 1.0
    keypoints, scores = np.array(person["keypoints"]), np.array(person["keypoint_scores"])
    stable = np.array(expected["keypoints_stable"], dtype=bool)
    assert keypoints.shape == (308, 2) and scores.shape == (308,) and stable.mean() > 0.95
    tol = cfg["tolerance"]  # measured: 0 px and 0 score difference (bit-identical on CPU)
    np.testing.assert_allclose(keypoints[stable], np.array(expected["keypoints"])[stable],
                               atol=tol["keypoints_atol_px"], rtol=0)  # fmt: skip
    np.testing.assert_allclose(scores, expected["keypoint_scores"], atol=tol["scores_atol"], rtol=0)
    table = read_json(out / "pose" / "keypoints.json")
    assert table["keypoint_format"] == "goliath308" and table["num_keypoints"] == 308
    assert [k["name"] for k in table["keypoints"]] == list(goliath_names())
    assert len(table["skeleton"]) == 65 and all(len(k["color_rgb"]) == 3 for k in table["keypoints"])


def test_crop_and_decoding_reproduce_the_official_intermediates(e2e):
    """The crops equal the official model input, and decoding the official flip-averaged
    heatmaps gives the official keypoints exactly."""
    cfg, expected = e2e
    task = TASKS["pose"]
    image = read_image(E2E / "image.png")
    inputs = task.crops(image, np.array([[*cfg["bbox_xyxy"], 1.0]]), tuple(cfg["model_input_hw"]))
    inter = load_file(E2E / "intermediates.safetensors")
    x = normalize(torch.from_numpy(np.stack([i.pixels for i in inputs])))
    torch.testing.assert_close(x, inter["input"], atol=1e-6, rtol=0)
    pred = task.postprocess([inter["heatmaps_flip_avg"][0]], inputs, image.shape[:2])
    np.testing.assert_array_equal(pred["keypoints"][0], np.array(expected["keypoints"]))
    np.testing.assert_array_equal(pred["scores"][0], np.array(expected["keypoint_scores"], dtype=np.float32))
    crop = inputs[0].geometry.crop
    assert crop.center.tolist() == expected["crop"]["bbox_center"]
    assert crop.scale.tolist() == expected["crop"]["bbox_scale_after_padding_and_aspect"]


@pytest.fixture(scope="module")
def crowd(tmp_path_factory) -> Path:
    """in/crowd.png: the astronaut (resized to 600x600) beside Grace Hopper (600x512)."""
    folder = tmp_path_factory.mktemp("in")
    left = cv2.resize(cv2.imread(str(DATA / "astronaut.png")), (600, 600), interpolation=cv2.INTER_AREA)
    right = cv2.imread(str(DATA / "grace_hopper.jpg"))
    cv2.imwrite(str(folder / "crowd.png"), np.concatenate([left, right], axis=1))
    return folder / "crowd.png"


def test_one_instance_per_detected_person_beside_seg(crowd, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("SAPIENS2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = predict(crowd, "-t", "seg", "-t", "pose", "--checkpoint", f"seg={tiny_models['seg']}",
                     "--checkpoint", f"pose={tiny_models['pose']}", "--detector", DETECTOR, "--vis", "-o", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert files_under(out) == {"run.json", "seg/classes.json", "seg/crowd.png", "vis/seg/crowd.jpg",
                                "pose/keypoints.json", "pose/crowd.json", "vis/pose/crowd.jpg"}  # fmt: skip
    detected = load_detector(DETECTOR).detect(read_image(crowd))  # [N, 5]
    instances = read_json(out / "pose" / "crowd.json")["instances"]
    assert len(instances) == len(detected) >= 2  # the random fixture detector finds 4 boxes here
    np.testing.assert_array_equal(np.array([i["bbox"] for i in instances], dtype=np.float32), detected[:, :4])
    assert [i["bbox_score"] for i in instances] == detected[:, 4].tolist()
    assert all(len(i["keypoints"]) == len(i["keypoint_scores"]) == 308 for i in instances)
    assert cv2.imread(str(out / "vis" / "pose" / "crowd.jpg")).shape == (600, 1112, 3)
    run = read_json(out / "run.json")
    assert run["per_task"] == {"seg": {"ok": 1, "skipped": 0, "failed": 0}, "pose": {"ok": 1, "skipped": 0, "failed": 0}}
    assert run["timings_s"]["detect"] > 0 and run["options"]["pose"]["detector"] == str(DETECTOR)

    # The same boxes from a file give the same people: the detector path crops like the file path.
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"crowd.png": detected.tolist()}))
    again = tmp_path / "again"
    result = predict(crowd, "-t", "pose", "--checkpoint", tiny_models["pose"], "--bboxes", boxes, "-o", again, "-q")
    assert result.exit_code == 0, result.output
    assert read_json(again / "pose" / "crowd.json")["instances"] == instances


@pytest.fixture(scope="module")
def goliath_run(tmp_path_factory, tiny_models) -> dict:
    out = tmp_path_factory.mktemp("goliath")
    result = predict(DATA / "astronaut.png", "-t", "pose", "--checkpoint", tiny_models["pose"], "--detector", "none",
                     "-o", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    return read_json(out / "pose" / "astronaut.json")


def test_detector_none_uses_the_whole_image(goliath_run):
    (person,) = goliath_run["instances"]
    assert person["bbox"] == [0, 0, 255, 255] and person["bbox_score"] == 0.0
    assert goliath_run["image"]["width"] == goliath_run["image"]["height"] == 256


@pytest.mark.parametrize("name", ["coco17", "coco133", "openpose25"])
def test_keypoint_formats_write_the_goliath_points_by_name(name, goliath_run, tmp_path, tiny_models):
    fmt = get_keypoint_format(name)
    out = tmp_path / "out"
    result = predict(DATA / "astronaut.png", "-t", "pose", "--checkpoint", tiny_models["pose"], "--detector", "none",
                     "--keypoint-format", name, "-o", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = read_json(out / "pose" / "astronaut.json")
    assert doc["keypoint_format"] == name
    (person,), (base,) = doc["instances"], goliath_run["instances"]
    assert len(person["keypoints"]) == len(person["keypoint_scores"]) == fmt.num_keypoints
    for target, source in fmt.copied():
        assert person["keypoints"][target] == base["keypoints"][source]
        assert person["keypoint_scores"][target] == base["keypoint_scores"][source]
    for target in fmt.derived():
        a, b = fmt.sources[target]
        midpoint = (np.array(base["keypoints"][a]) + np.array(base["keypoints"][b])) / 2
        np.testing.assert_allclose(person["keypoints"][target], midpoint, rtol=0, atol=1e-9)
    missing = [i for i, p in enumerate(person["keypoints"]) if p is None]
    assert missing == fmt.missing() and all(person["keypoint_scores"][i] == 0 for i in missing)
    assert len(missing) == {"coco17": 0, "coco133": 52, "openpose25": 0}[name]
    table = read_json(out / "pose" / "keypoints.json")
    assert [k["name"] for k in table["keypoints"]] == list(fmt.names)
    assert [k["ids"] for k in table["skeleton"]] == [list(link) for link in fmt.skeleton]
    assert [len(k["from_goliath"]) for k in table["keypoints"]] == [len(s) for s in fmt.sources]


def test_persons_of_an_image_share_a_batch(tmp_path, tiny_models, monkeypatch):
    """Crops of one image are never split over batches; batching does not change the results
    beyond float rounding of the model."""
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), cv2.imread(str(DATA / "grace_hopper.jpg")))
    cv2.imwrite(str(folder / "b.png"), cv2.imread(str(DATA / "astronaut.png")))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.png": [[10, 10, 300, 500], [100, 50, 400, 590], [0, 0, 511, 599]],
                                 "b.png": [[20, 30, 200, 250]]}))  # fmt: skip
    sizes: list[list[str]] = []
    real = Runner.run_batch
    monkeypatch.setattr(Runner, "run_batch", lambda self, name, batch: sizes.append(
        [s.work.item.rel for s, _ in batch]) or real(self, name, batch))  # fmt: skip
    docs = {}
    for batch in (1, 2):
        sizes.clear()
        out = tmp_path / f"b{batch}"
        result = predict(folder, "-t", "pose", "--checkpoint", tiny_models["pose"], "--bboxes", boxes,
                         "-b", batch, "--workers", 1, "-o", out, "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        assert sizes == [["a", "a", "a"], ["b"]]
        docs[batch] = [read_json(out / "pose" / f"{n}.json")["instances"] for n in "ab"]
    for one, two in zip(docs[1], docs[2], strict=True):
        assert [p["bbox"] for p in one] == [p["bbox"] for p in two]
        np.testing.assert_allclose([p["keypoint_scores"] for p in one], [p["keypoint_scores"] for p in two], atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_detector_batches_images_and_a_failure_stays_with_its_image(tmp_path, tiny_models, monkeypatch, workers):
    """The detector sees the images -b at a time; when a batch fails it is retried image by
    image, and only the image it fails on fails (for pose only)."""
    from sapiens2_cli.tasks.pose import PoseTask

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        cv2.imwrite(str(folder / f"{name}.png"), cv2.imread(str(DATA / "astronaut.png")))
    cv2.imwrite(str(folder / "b.png"), np.full((40, 30, 3), 7, np.uint8))  # the detector fails on this one
    seen: list[list[tuple[int, int]]] = []

    def detect(self, images):
        seen.append([i.shape[:2] for i in images])
        if any(i.shape[:2] == (40, 30) for i in images):
            raise RuntimeError("simulated failure")
        return [np.array([[10, 20, 110, 220, 0.9], [0, 0, 50, 60, 0.5]], np.float32) for _ in images]

    monkeypatch.setattr(PoseTask, "load_helpers", lambda self, device: None)
    monkeypatch.setattr(PoseTask, "detect", detect)
    out = tmp_path / "out"
    result = predict(folder, "-t", "seg", "-t", "pose", "--checkpoint", f"seg={tiny_models['seg']}",
                     "--checkpoint", f"pose={tiny_models['pose']}", "-b", 2, "--workers", workers, "-o", out)  # fmt: skip
    assert result.exit_code == 1, result.output
    assert seen == [[(256, 256), (40, 30)], [(256, 256)], [(40, 30)], [(256, 256)]]
    assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [
        f"error: {folder / 'b.png'}: pose: person detector failed (simulated failure)"
    ]
    assert files_under(out / "pose") == {"keypoints.json", "a.json", "c.json"}
    assert files_under(out / "seg") == {"classes.json", "a.png", "b.png", "c.png"}
    boxes = [[p["bbox"] for p in read_json(out / "pose" / f"{n}.json")["instances"]] for n in "ac"]
    assert boxes == [[[10, 20, 110, 220], [0, 0, 50, 60]]] * 2


def test_video_frames_go_through_the_detector(tmp_path, tiny_models):
    """Pose on a video beside seg: each kept frame is detected (frames batched -b at a time) and
    gets one line of OUT/pose/<video>.jsonl, in frame order, with its index, its presentation
    time and one instance per detected person; seg still writes one image per frame."""
    from sapiens2_cli.video import VideoFrame, iter_frames
    from videos import make_video

    clip = make_video(tmp_path / "clip.mp4", frames=8, size=(96, 64))
    out = tmp_path / "out"
    result = predict(clip, "-t", "seg", "-t", "pose", "--checkpoint", f"seg={tiny_models['seg']}",
                     "--checkpoint", f"pose={tiny_models['pose']}", "--detector", DETECTOR, "--stride", 3,
                     "-b", 2, "-o", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    kept = [0, 3, 6]
    assert files_under(out) == {"run.json", "seg/classes.json", "pose/keypoints.json", "pose/clip.jsonl"} | {
        f"seg/clip/{i:06d}.png" for i in kept
    }
    run = read_json(out / "run.json")
    assert run["counts"] == {"total": 3, "ok": 3, "skipped": 0, "failed": 0}
    assert run["per_task"]["pose"] == {"ok": 3, "skipped": 0, "failed": 0}
    assert run["timings_s"]["detect"] > 0
    detector = load_detector(DETECTOR)
    decoded = {f.index: f for f in iter_frames(clip) if isinstance(f, VideoFrame)}
    text = (out / "pose" / "clip.jsonl").read_text()
    assert text.endswith("\n") and text.count("\n") == len(kept)
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(line["index"], line["time"]) for line in lines] == [(i, decoded[i].time) for i in kept]
    assert [line["time"] for line in lines] == [0.0, 0.3, 0.6]  # 10 fps
    for line in lines:
        assert set(line) == {"index", "time", "instances"}
        detected = detector.detect(decoded[line["index"]].image)
        assert len(line["instances"]) == len(detected) >= 1
        boxes = np.array([p["bbox"] for p in line["instances"]], np.float32)
        np.testing.assert_allclose(boxes, detected[:, :4], atol=1e-3)  # batched by 2 vs alone: float rounding
        assert all(len(p["keypoints"]) == len(p["keypoint_scores"]) == 308 for p in line["instances"])


def test_a_video_line_is_the_record_of_the_same_picture_and_resumes_whole(tmp_path, tiny_models):
    """A frame's line holds the instances its picture gets as an image; --vis encodes the
    overlays as one video; a finished .jsonl is skipped on the next run, a missing one is rebuilt
    from every frame, and a killed run's temporary file is never taken for it."""
    from sapiens2_cli.video import VideoFrame, iter_frames
    from sapiens2_cli.writers import PART_SUFFIX
    from videos import make_video

    clip = make_video(tmp_path / "clip.mp4", frames=5, size=(96, 64))
    out = tmp_path / "out"
    args = (clip, "-t", "pose", "--checkpoint", tiny_models["pose"], "--detector", "none", "-o", out, "-q")
    result = predict(*args, "--vis")
    assert result.exit_code == 0, result.output
    assert files_under(out) == {"run.json", "pose/keypoints.json", "pose/clip.jsonl", "vis/pose/clip.mp4"}
    with av.open(str(out / "vis" / "pose" / "clip.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    lines = [json.loads(line) for line in (out / "pose" / "clip.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4]

    frame = next(f for f in iter_frames(clip) if isinstance(f, VideoFrame) and f.index == 2)
    cv2.imwrite(str(tmp_path / "frame.png"), frame.image)
    single = tmp_path / "single"
    result = predict(tmp_path / "frame.png", "-t", "pose", "--checkpoint", tiny_models["pose"], "--detector", "none",
                     "-o", single, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert lines[2]["instances"] == read_json(single / "pose" / "frame.json")["instances"]

    before = (out / "pose" / "clip.jsonl").read_bytes()
    assert predict(*args).exit_code == 0
    assert read_json(out / "run.json")["counts"] == {"total": 5, "ok": 0, "skipped": 5, "failed": 0}

    (out / "pose" / "clip.jsonl").unlink()
    (out / "pose" / f".clip.jsonl{PART_SUFFIX}").write_text('{"index": 0}\n')  # what a killed run leaves
    assert predict(*args).exit_code == 0
    assert read_json(out / "run.json")["counts"] == {"total": 5, "ok": 5, "skipped": 0, "failed": 0}
    assert (out / "pose" / "clip.jsonl").read_bytes() == before
    assert files_under(out / "pose") == {"keypoints.json", "clip.jsonl"}
