"""RTMDet-m person detector: parity with mmdet (fixture made by running it), loading, caching."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import FIXTURES
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sapiens2_cli
from sapiens2_cli.detector_weights import (
    DEFAULT_FILENAME,
    DEFAULT_REPO,
    DetectorWeightsError,
    cache_dir,
    check_state_dict,
    load_detector,
    resolve_detector_file,
)
from sapiens2_cli.hub import HubError
from sapiens2_cli.models.detector import FALLBACK_SCORE, Detector
from sapiens2_cli.tasks.bboxes import nms_xyxy
from sapiens2_cli.models.rtmdet_boxes import (
    decode_detections,
    letterbox,
    normalize,
    kept_person_rows,
)

CASE = FIXTURES / "parity" / "detector"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((CASE / "config.json").read_text())


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(CASE / "io.safetensors")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img = cv2.imread(str(CASE / "image.png"))
    assert img is not None, f"cannot read {CASE / 'image.png'}"
    return img


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    """model.pth read the way the loader reads it: weights only, no custom unpickling."""
    return torch.load(CASE / "model.pth", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SAPIENS2_CACHE shared by this module's loads (filled by the first one)."""
    return tmp_path_factory.mktemp("sapiens2-cache")


@pytest.fixture(scope="module")
def model(module_cache: Path) -> Detector:
    """The fixture weights, loaded once from model.pth (weights-only, empty cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAPIENS2_CACHE", str(module_cache))
        return load_detector(CASE / "model.pth")


@pytest.fixture(scope="module")
def single_dets(model: Detector, image: np.ndarray) -> np.ndarray:
    return model.detect(image)


@pytest.fixture(scope="module")
def outputs(model: Detector, io: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every intermediate tensor of the port on the fixture input, named like io.safetensors."""
    return _intermediates(model, io["input"])


def _intermediates(model: Detector, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        backbone = model.backbone(x)
        neck = model.neck(backbone)
        cls_scores, bbox_preds = model.bbox_head(neck)
    out = {}
    for level in range(3):
        out[f"backbone_out{level}"] = backbone[level]
        out[f"neck_out{level}"] = neck[level]
        out[f"cls_score{level}"] = cls_scores[level]
        out[f"bbox_pred{level}"] = bbox_preds[level]
    return out


def _group(key: str) -> str:
    return key.rstrip("0123456789").removesuffix("_out")


def _assert_tensor_parity(actual: dict, io: dict, config: dict) -> None:
    for key, value in actual.items():
        tol = config["tolerance"][_group(key)]
        torch.testing.assert_close(
            value, io[key], atol=tol["atol"], rtol=tol["rtol"], msg=lambda m, k=key: f"{k}: {m}"
        )


# ---------------------------------------------------------------- architecture and parity


def test_state_dict_keys_and_shapes_match_checkpoint(model: Detector, checkpoint: dict) -> None:
    reference = checkpoint["state_dict"]
    with torch.device("meta"):
        fresh = Detector()
    assert list(fresh.state_dict()) == list(reference)  # same names, same order
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())
    head = model.bbox_head
    assert head.cls_convs[2][1].conv is head.cls_convs[0][1].conv
    assert head.reg_convs[1][0].conv is head.reg_convs[0][0].conv
    assert head.cls_convs[1][0].bn is not head.cls_convs[0][0].bn
    assert (
        sum(isinstance(m, torch.nn.BatchNorm2d) and m.eps == 1e-5 for m in model.modules()) == 112
    )


def test_loaded_model_is_eval_float32(model: Detector) -> None:
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device for p in model.parameters()} == {CPU}


@pytest.mark.parametrize("group", ["backbone", "neck", "cls_score", "bbox_pred"])
def test_forward_parity(group: str, outputs: dict, io: dict, config: dict) -> None:
    _assert_tensor_parity({k: v for k, v in outputs.items() if _group(k) == group}, io, config)


def test_preprocessing_matches_input(image: np.ndarray, io: dict, config: dict) -> None:
    boxed = letterbox(image)
    pre = config["preprocess"]
    assert boxed.image_hw == tuple(pre["ori_shape_hw"])
    assert boxed.scale_wh == pytest.approx(pre["scale_factor_wh"], rel=1e-12)
    new_h, new_w = pre["resized_shape_hw"]
    assert (boxed.canvas[new_h:] == 114).all() and (boxed.canvas[:, new_w:] == 114).all()
    x = normalize(boxed.canvas[None], device=CPU, dtype=torch.float32)
    tol = config["tolerance"]["input"]
    torch.testing.assert_close(x, io["input"], atol=tol["atol"], rtol=tol["rtol"])


def _assert_detections(raw, io: dict, config: dict) -> None:
    tol = config["tolerance"]
    assert raw.bboxes.shape == io["det_bboxes"].shape
    for name, key in [
        ("bboxes", "det_bboxes"),
        ("scores", "det_scores"),
        ("bboxes_canvas", "det_bboxes_canvas"),
    ]:
        torch.testing.assert_close(getattr(raw, name), io[key], atol=tol[key]["atol"], rtol=0)


def test_decoding_of_reference_head_outputs(io: dict, config: dict) -> None:
    raw = decode_detections(
        [io[f"cls_score{i}"][0] for i in range(3)],
        [io[f"bbox_pred{i}"][0] for i in range(3)],
        (8, 16, 32),
        scale_wh=tuple(config["preprocess"]["scale_factor_wh"]),
    )
    _assert_detections(raw, io, config)


def test_predict_end_to_end(model: Detector, image: np.ndarray, io: dict, config: dict) -> None:
    (raw,) = model.predict([image])
    _assert_detections(raw, io, config)


def test_demo_filter_keeps_reference_rows(io: dict, config: dict) -> None:
    vis = config["vis_pose"]
    keep = kept_person_rows(
        io["det_bboxes"].numpy(),
        io["det_scores"].numpy(),
        score_thr=vis["bbox_thr"],
        nms_thr=vis["nms_thr"],
    )
    np.testing.assert_array_equal(keep, io["vis_keep_idx"].numpy())


def test_detect_gives_pose_boxes(single_dets: np.ndarray, io: dict, config: dict) -> None:
    dets = single_dets
    assert dets.dtype == np.float32 and dets.shape == (len(io["vis_bboxes"]), 5)
    atol = config["tolerance"]["vis_bboxes"]["atol"]
    np.testing.assert_allclose(dets[:, :4], io["vis_bboxes"].numpy(), atol=atol, rtol=0)
    if config["vis_pose"]["fallback_used"]:
        assert dets[:, 4].tolist() == [FALLBACK_SCORE]
        return
    expected_scores = io["det_scores"][io["vis_keep_idx"]].numpy()
    np.testing.assert_allclose(
        dets[:, 4], expected_scores, atol=config["tolerance"]["det_scores"]["atol"], rtol=0
    )
    assert (np.diff(dets[:, 4]) <= 0).all()


def test_greedy_nms_plus_one_convention() -> None:
    # [0,0,9,9] vs [5,0,14,9]: inclusive areas give IoU 50/150 = 0.333 > 0.3 (suppressed),
    # continuous ones 36/126 = 0.286 (kept). [6,0,15,9]: inclusive 40/160 = 0.25 (kept).
    boxes = np.array([[0, 0, 9, 9], [5, 0, 14, 9], [6, 0, 15, 9]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7], dtype=np.float32)
    np.testing.assert_array_equal(nms_xyxy(boxes, scores, 0.3), [0, 2])
    # Visiting order follows the scores, not the row order.
    np.testing.assert_array_equal(
        nms_xyxy(boxes, scores[::-1].copy(), 0.3), [2, 0]
    )


# ---------------------------------------------------------------- detect API behaviour


def test_detect_batch_equals_single(
    model: Detector, image: np.ndarray, single_dets: np.ndarray, config: dict
) -> None:
    # Different sizes, so the two canvases have different scales and padding.
    crop = np.ascontiguousarray(image[30:230, 40:140])
    batched = model.detect_batch([image, crop])
    tol_box = config["tolerance"]["vis_bboxes"]["atol"]
    tol_score = config["tolerance"]["det_scores"]["atol"]
    assert len(batched) == 2
    for single, got in zip([single_dets, model.detect(crop)], batched, strict=True):
        assert got.shape == single.shape
        np.testing.assert_allclose(got[:, :4], single[:, :4], atol=tol_box, rtol=0)
        np.testing.assert_allclose(got[:, 4], single[:, 4], atol=tol_score, rtol=0)
    assert model.detect_batch([]) == []


def test_whole_image_fallback(model: Detector) -> None:
    blank = np.zeros((50, 90, 3), dtype=np.uint8)
    # Sigmoid scores never exceed 1, so nothing passes a threshold of 1.0.
    dets = model.detect(blank, score_thr=1.0)
    np.testing.assert_array_equal(dets, np.array([[0, 0, 89, 49, FALLBACK_SCORE]], np.float32))
    assert dets.dtype == np.float32
    none = model.detect(blank, score_thr=1.0, whole_image_fallback=False)
    assert none.shape == (0, 5) and none.dtype == np.float32


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((0, 10, 3), np.uint8),
    ],
)
def test_detect_rejects_non_bgr_uint8(model: Detector, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"BGR uint8 array of shape \(H, W, 3\)"):
        model.detect(bad)


def test_fuse_bn_within_tolerance(
    model: Detector, image: np.ndarray, io: dict, config: dict
) -> None:
    fused = copy.deepcopy(model).fuse_bn()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    _assert_tensor_parity(_intermediates(fused, io["input"]), io, config)
    dets = fused.detect(image)
    atol = config["tolerance"]["vis_bboxes"]["atol"]
    np.testing.assert_allclose(dets[:, :4], io["vis_bboxes"].numpy(), atol=atol, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(model: Detector, image: np.ndarray, io: dict, config: dict) -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = copy.deepcopy(model).to("cuda")
    (raw,) = gpu.predict([image])
    assert raw.bboxes.device.type == "cuda"
    _assert_detections(
        type(raw)(raw.bboxes.cpu(), raw.scores.cpu(), raw.bboxes_canvas.cpu()), io, config
    )


# ---------------------------------------------------------------- loading and caching


def test_lazy_public_api() -> None:
    assert sapiens2_cli.load_detector is load_detector


def test_conversion_cache_round_trip(
    model: Detector,
    outputs: dict,
    io: dict,
    config: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAPIENS2_CACHE", str(tmp_path / "cache"))
    sha = config["checkpoint"]["sha256"]
    cached = tmp_path / "cache" / "detector" / f"{sha[:16]}.safetensors"
    assert cache_dir() == cached.parent

    first = load_detector(CASE / "model.pth")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in first.state_dict().items())
    assert cached.is_file()
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temp file left
    with safe_open(str(cached), framework="pt") as f:
        assert f.metadata()["source_sha256"] == sha

    def no_torch_load(*args, **kwargs):
        raise AssertionError("the .pth was read again instead of its cached conversion")

    monkeypatch.setattr(torch, "load", no_torch_load)
    second = load_detector(CASE / "model.pth")
    direct = load_detector(cached)
    for other in (second, direct):
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())
    # `outputs` come from the model loaded from the .pth itself: bit-identical, not just close.
    actual = _intermediates(second, io["input"])
    assert all(torch.equal(actual[k], outputs[k]) for k in outputs)


def test_unreadable_cache_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict
) -> None:
    monkeypatch.setenv("SAPIENS2_CACHE", str(tmp_path))
    cached = cache_dir() / f"{config['checkpoint']['sha256'][:16]}.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        load_detector(CASE / "model.pth")
    with safe_open(str(cached), framework="pt") as f:
        assert len(list(f.keys())) == config["num_state_dict_keys"]


def _fake_hub_cache(
    root: Path, *, revision: str = "0123456789abcdef0123456789abcdef01234567"
) -> str:
    repo_dir = root / ("models--" + DEFAULT_REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / DEFAULT_FILENAME).symlink_to((CASE / "model.pth").resolve())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return revision


@pytest.fixture
def hub_cache(tmp_path: Path, module_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as hf_constants

    root = tmp_path / "hf-hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("SAPIENS2_CACHE", str(module_cache))
    return root


def test_hub_resolution_from_local_cache(hub_cache: Path, model: Detector) -> None:
    revision = _fake_hub_cache(hub_cache)
    snapshot_file = (
        hub_cache
        / f"models--{DEFAULT_REPO.replace('/', '--')}"
        / "snapshots"
        / revision
        / DEFAULT_FILENAME
    )
    for ref in ("default", "rtmdet-m", DEFAULT_REPO, f"{DEFAULT_REPO}@{revision}"):
        assert resolve_detector_file(ref) == snapshot_file, ref
    loaded = load_detector("default")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_hub_not_cached_is_one_sentence(hub_cache: Path) -> None:
    with pytest.raises(HubError) as info:
        load_detector("default")
    message = str(info.value)
    assert DEFAULT_REPO in message and "not in the local Hugging Face cache" in message
    assert "\n" not in message


def _state_dict(model: Detector) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def _expected(model: Detector) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_strict_check_names_missing_unexpected_misshaped(model: Detector) -> None:
    expected = _expected(model)
    sd = _state_dict(model)
    del sd["neck.out_convs.2.bn.weight"]
    sd["bbox_head.extra.weight"] = torch.zeros(3)
    sd["bbox_head.rtm_cls.1.weight"] = torch.zeros(2, 192, 1, 1)
    with pytest.raises(DetectorWeightsError) as info:
        check_state_dict(sd, expected, source="weights.pth")
    message = str(info.value)
    assert message.startswith("weights.pth ")
    assert "missing keys neck.out_convs.2.bn.weight" in message
    assert "unexpected keys bbox_head.extra.weight" in message
    assert "bbox_head.rtm_cls.1.weight (2, 192, 1, 1) (expected (1, 192, 1, 1))" in message


def test_strict_check_shared_convs_must_agree(model: Detector) -> None:
    sd = _state_dict(model)
    sd["bbox_head.reg_convs.2.1.conv.weight"] = sd["bbox_head.reg_convs.2.1.conv.weight"] + 1
    with pytest.raises(DetectorWeightsError, match=r"reg_convs\.2\.1\.conv\.weight should equal"):
        check_state_dict(sd, _expected(model), source="w.pth")


def test_strict_check_accepts_module_prefix_and_missing_counters(model: Detector) -> None:
    sd = {"module." + k: v for k, v in _state_dict(model).items() if "num_batches_tracked" not in k}
    checked = check_state_dict(sd, _expected(model), source="w.pth")
    assert set(checked) == set(_expected(model))
    assert int(checked["neck.out_convs.0.bn.num_batches_tracked"]) == 0


def test_file_with_missing_key_names_key_and_file(model: Detector, tmp_path: Path) -> None:
    sd = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k != "backbone.stage3.1.attention.fc.bias"
    }
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(
        DetectorWeightsError,
        match=rf"{path}.*missing keys backbone\.stage3\.1\.attention\.fc\.bias",
    ):
        load_detector(path)


def test_foreign_safetensors_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(
        DetectorWeightsError, match=rf"{path} is not an RTMDet-m person-detector checkpoint"
    ):
        load_detector(path)


def test_truncated_pth_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAPIENS2_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "truncated.pth"
    with open(CASE / "model.pth", "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(DetectorWeightsError, match=rf"{path} is not a readable PyTorch checkpoint"):
        load_detector(path)
    assert not (tmp_path / "cache").exists()  # nothing cached from a broken file


def test_text_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not weights")
    with pytest.raises(DetectorWeightsError, match=rf"{path} is neither a PyTorch checkpoint"):
        load_detector(path)


def test_pickled_objects_are_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "training.pth"
    torch.save({"meta": {"seed": np.float64(1.0)}, "state_dict": {}}, path)
    with pytest.raises(DetectorWeightsError, match=rf"{path} holds objects other than tensors"):
        load_detector(path)


def test_bad_references(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_detector(tmp_path / "missing.pth")
    with pytest.raises(DetectorWeightsError, match="cannot understand detector reference"):
        load_detector("not a reference!")
    with pytest.raises(DetectorWeightsError, match="is a folder without rtmdet_m.pth"):
        load_detector(tmp_path)


def test_folder_reference(tmp_path: Path) -> None:
    (tmp_path / "rtmdet_m.pth").symlink_to((CASE / "model.pth").resolve())
    assert resolve_detector_file(tmp_path) == tmp_path / "rtmdet_m.pth"


def test_fixture_checkpoint_container(checkpoint: dict, config: dict) -> None:
    """The weights-only read sees the published container described by the fixture."""
    assert sorted(checkpoint) == sorted(config["checkpoint"]["top_level_keys"])
    assert len(checkpoint["state_dict"]) == config["num_state_dict_keys"]
    assert os.path.getsize(CASE / "model.pth") == config["checkpoint"]["size_bytes"]
