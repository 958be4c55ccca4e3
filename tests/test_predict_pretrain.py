"""``--task pretrain`` features (npy / safetensors), the 4K tokenizer backbone at 4096x3072, and
task checkpoints built on it predicting at their native size."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES
from predict_helpers import predict
from sapiens2_cli import load_model, transforms
from sapiens2_cli.models import backbone as backbone_module
from sapiens2_cli.models.sapiens2 import ModelInfo, Sapiens2Model
from sapiens2_cli.tasks.normal import unit
from sapiens2_cli.tasks.seg import logits_to_labels
from sapiens2_cli.transforms import normalize
from sapiens2_cli.weights import save_model

PHOTO = Path(__file__).parent / "data" / "grace_hopper.jpg"
TOKENIZER = FIXTURES / "parity" / "backbone_tokenizer" / "model.safetensors"


def backbone_tokens(model, image: np.ndarray, input_hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    pixels, _ = transforms.resize_pad(image, input_hw)
    with torch.inference_mode():
        return model.backbone.forward_tokens(normalize(torch.from_numpy(pixels[None])))


def test_features_as_npy_with_their_geometry(tmp_path, tiny_models):
    image = cv2.imread(str(PHOTO))[:300, :150]  # narrower than the 192x128 input: padded left and right
    cv2.imwrite(str(tmp_path / "p.png"), image)
    out = tmp_path / "out"
    result = predict(tmp_path / "p.png", "-t", "pretrain", "--checkpoint", tiny_models["pretrain"], "-o", out, "--vis", "-q")
    assert result.exit_code == 0, result.output
    features = np.load(out / "pretrain" / "p.npy")
    tokens, (h, w) = backbone_tokens(load_model(tiny_models["pretrain"]), image, (192, 128))
    assert features.dtype == np.float32 and features.shape == (64, 3, 2) == (64, h, w)
    np.testing.assert_array_equal(features, tokens[0, 9:].T.reshape(64, h, w).numpy())
    meta = json.loads((out / "pretrain" / "p.json").read_text())
    assert meta["stride"] == 64 and meta["grid_hw"] == [3, 2] and meta["image_size_hw"] == [300, 150]
    assert meta["content_box_input_px"] == {"top": 0, "left": 16, "height": 192, "width": 96}
    assert meta["resize_factor"] == pytest.approx(0.64)
    assert cv2.imread(str(out / "vis" / "pretrain" / "p.jpg")).shape == (300, 300, 3)


def test_features_and_class_token_as_safetensors(tmp_path, tiny_models):
    out = tmp_path / "out"
    result = predict(PHOTO, "-t", "pretrain", "--checkpoint", tiny_models["pretrain"], "-o", out, "--format", "safetensors", "-q")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (out / "pretrain").iterdir()} == {"grace_hopper.safetensors"}
    tensors = load_file(out / "pretrain" / "grace_hopper.safetensors")
    tokens, _ = backbone_tokens(load_model(tiny_models["pretrain"]), cv2.imread(str(PHOTO)), (192, 128))
    assert set(tensors) == {"features", "cls"} and tensors["features"].shape == (64, 3, 2)
    torch.testing.assert_close(tensors["cls"], tokens[0, 0], rtol=0, atol=0)
    with safe_open(out / "pretrain" / "grace_hopper.safetensors", "pt") as f:
        assert json.loads(f.metadata()["geometry"])["image_size_hw"] == [600, 512]


def test_4k_backbone_runs_natively_at_4096x3072(tmp_path, tiny_models, monkeypatch):
    rng = np.random.default_rng(0)
    image = cv2.resize(cv2.imread(str(PHOTO)), (3072, 4096), interpolation=cv2.INTER_LINEAR)
    image = cv2.add(image, rng.integers(0, 8, image.shape, dtype=np.uint8))  # fine detail at 4K
    cv2.imwrite(str(tmp_path / "big.jpg"), image)
    out = tmp_path / "out"
    result = predict(tmp_path / "big.jpg", "-t", "pretrain", "--checkpoint", TOKENIZER, "--input-size", "4096x3072", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    features = np.load(out / "pretrain" / "big.npy")
    assert features.shape == (64, 64, 48)  # 4096 / 64 x 3072 / 64: one cell per 4x4 window of patches
    image = cv2.imread(str(tmp_path / "big.jpg"))
    model = load_model(TOKENIZER)
    # the tokenizer pools its 3072 windows in chunks; all at once gives the same features
    monkeypatch.setattr(backbone_module, "TOKENIZER_CHUNK", 1 << 20)
    tokens, (h, w) = backbone_tokens(model, image, (4096, 3072))
    np.testing.assert_allclose(features, tokens[0, 9:].T.reshape(64, h, w).numpy(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def on_4k_backbone(tmp_path_factory) -> dict[str, Path]:
    """seg and normal checkpoints on the tokenizer backbone, as ``sapiens2 finetune`` saves them
    (the fixtures' tokenizer backbone and the fixtures' seg / normal heads, input 192x128)."""
    folder = tmp_path_factory.mktemp("on4k")
    backbone = load_file(TOKENIZER)
    arch = load_model(TOKENIZER).backbone.arch
    out = {}
    for task in ("seg", "normal"):
        head_model = load_model(FIXTURES / "parity" / task / "model.safetensors")
        model = Sapiens2Model(task, arch, head_model.info.head)
        state = {f"backbone.{k}": v for k, v in backbone.items()}
        state |= {k: v for k, v in head_model.state_dict().items() if k.startswith("decode_head.")}
        model.load_state_dict(state, strict=True)
        model.info = ModelInfo(task=task, arch=arch, head=head_model.info.head, input_size=(192, 128))
        out[task] = save_model(model, folder / f"{task}.safetensors")
    return out


def test_task_checkpoints_on_the_4k_backbone_predict_natively(tmp_path, on_4k_backbone):
    image = cv2.imread(str(PHOTO))[:300, :170]  # padded by 10 input pixels left: 2.5 cells of the coarse map
    cv2.imwrite(str(tmp_path / "p.png"), image)
    out = tmp_path / "out"
    result = predict(tmp_path / "p.png", "-o", out, "--format", "npy", "-q",
                     *[a for t, p in on_4k_backbone.items() for a in ("--checkpoint", f"{t}={p}")])  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["models"]["seg"]["input_size_hw"] == [192, 128]
    seg, normal = (load_model(on_4k_backbone[t]) for t in ("seg", "normal"))
    with torch.inference_mode():
        pixels, _ = transforms.stretch(image, (192, 128))
        logits = seg(normalize(torch.from_numpy(pixels[None])))[0]
        pixels, placement = transforms.resize_pad(image, (192, 128))
        raw = normal(normalize(torch.from_numpy(pixels[None])))[0]
    assert logits.shape[-2:] == raw.shape[-2:] == (48, 32)  # the heads upsample 16x from a 64-pixel grid
    np.testing.assert_array_equal(np.load(out / "seg" / "p.npy"), logits_to_labels(logits, (300, 170)).numpy())
    assert placement.left == 10
    up = transforms.resize_bilinear(unit(raw)[None], (192, 128))[0]  # [3, 192, 128]
    expected = transforms.resize_bilinear(up[None, :, :, 10 : 10 + 108], (300, 170))[0]
    np.testing.assert_allclose(np.load(out / "normal" / "p.npy"), expected.permute(1, 2, 0).numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--format", "exr"], "pretrain writes npy or safetensors"), (["--tile", "192x128"], "pretrain cannot be tiled")],
)
def test_pretrain_usage_errors(tmp_path, tiny_models, args, message):
    result = predict(PHOTO, "-t", "pretrain", "--checkpoint", tiny_models["pretrain"], "-o", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output


def test_placement_is_kept_on_coarse_maps():
    """A map at a quarter of the input is brought to the input before the content crop."""
    placement = transforms.Placement((300, 200), (192, 128), (192, 128), 0, 0)
    coarse = torch.arange(48 * 32, dtype=torch.float32).reshape(1, 48, 32)
    fine = transforms.crop_content(coarse, dataclasses.replace(placement, content_hw=(180, 120), top=6, left=4))
    assert fine.shape == (1, 180, 120)
    up = transforms.resize_bilinear(coarse[None], (192, 128))[0]
    torch.testing.assert_close(fine, up[:, 6:186, 4:124])
    with pytest.raises(ValueError, match="does not match"):
        transforms.crop_content(coarse[:, :47], placement)
