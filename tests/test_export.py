"""`export_model`: round trips on the tiny fixture models for every format and dtype.

Each export is loaded back with `load_artifact` and compared with the stored official outputs
(`io.safetensors`), independently of the check the export itself ran.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sapiens2_cli.models.backbone as backbone
import sapiens2_cli.models.rope as rope
from conftest import FIXTURES, fixture_cases
from sapiens2_cli import load_model
from sapiens2_cli.artifact_meta import default_labels
from sapiens2_cli.export import ExportCheckError, ExportError, export_model, sidecar_path
from sapiens2_cli.export_check import BASE_TOLERANCES, check_inputs, normalise, perturb_ulp, read_pixels
from sapiens2_cli.models.rope import RopePositionEmbedding, apply_rope
from sapiens2_cli.runtimes import load_artifact
from sapiens2_cli.weights import file_digest

PARITY = FIXTURES / "parity"
SEG = PARITY / "seg" / "model.safetensors"
SIZE = {"seg": (64, 48), "pose": (64, 48), "pointmap": (144, 80), "backbone_tokenizer": (192, 128)}
CASES = [
    (f, d)
    for f in ("safetensors", "pt2", "onnx")
    for d in ("fp32", "bf16", "fp16")
    if (f, d) != ("onnx", "bf16")
]
SUFFIX = {"safetensors": ".safetensors", "pt2": ".pt2", "onnx": ".onnx"}


def _io(case: str) -> dict[str, torch.Tensor]:
    return load_file(PARITY / case / "io.safetensors")


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module")
def seg_exports(tmp_path_factory):
    """Every (format, dtype) export of the seg fixture, made once."""
    out = tmp_path_factory.mktemp("seg_exports")
    return {
        (fmt, dtype): export_model(
            SEG, out / f"seg_{dtype}{SUFFIX[fmt]}", dtype=dtype, input_size=SIZE["seg"]
        )
        for fmt, dtype in CASES
    }


def test_rounded_rope_formulation_is_bit_identical_to_bf16():
    sin, cos = RopePositionEmbedding(16)(6, 5)
    for scale in (1e-3, 1.0, 300.0):
        q = torch.randn(2, 4, 9 + 30, 16, generator=torch.Generator().manual_seed(1)) * scale
        for dtype in (torch.float32, torch.float16):
            x = q.to(dtype)
            assert torch.equal(apply_rope(x, sin, cos), apply_rope(x, sin.float(), cos.float()))
    # the roundings matter: the same rotation in plain float32 differs
    first, second = q[:, :, 9:].chunk(2, dim=-1)
    plain = q[:, :, 9:] * cos.float() + torch.cat([-second, first], dim=-1) * sin.float()
    assert not torch.equal(apply_rope(q, sin, cos)[:, :, 9:], plain)
    torch.testing.assert_close(apply_rope(q, sin, cos)[:, :, 9:], plain, atol=0.02 * scale, rtol=0.02)


@pytest.mark.parametrize("fmt,dtype", CASES, ids=lambda v: v)
def test_round_trip_matches_the_official_outputs(seg_exports, fmt, dtype):
    result = seg_exports[fmt, dtype]
    assert result.path.is_file() and result.files == (result.path,)
    assert not list(result.path.parent.glob(".*export-*")), "scratch folder left behind"
    report = json.loads(sidecar_path(result.path).read_text())
    assert report["passed"] and report["format"] == fmt and report["dtype"] == dtype
    assert report["source_digest"] == file_digest(SEG)
    assert report["artifact_digest"] == file_digest(result.path)
    assert [c["input"] for c in report["checks"]] == ["random", "real"]
    assert report["tolerance"] >= BASE_TOLERANCES[dtype]
    assert report["max_rel_diff"] == pytest.approx(result.max_rel) and result.max_rel <= report["tolerance"]

    artifact = load_artifact(result.path)
    assert artifact.task == "seg" and artifact.info.input_size == (64, 48)
    assert artifact.info.format == fmt and artifact.info.dtype == dtype
    assert artifact.info.labels[:2] == ("Background", "Apparel") and len(artifact.info.labels) == 29
    io = _io("seg")
    got = artifact(io["input"])
    assert got.dtype == torch.float32 and got.shape == io["output"].shape
    err = _max_rel(got, io["output"])
    if dtype == "fp32":
        assert err < BASE_TOLERANCES["fp32"]
        if fmt != "onnx":  # the same kernels as eager: within the parity tolerance
            torch.testing.assert_close(got, io["output"], atol=5e-5, rtol=1e-4)
    else:
        assert 1e-5 < err < BASE_TOLERANCES[dtype]  # rounded, but not broken


def test_bf16_safetensors_is_release_layout_and_loads_back(seg_exports):
    path = seg_exports["safetensors", "bf16"].path
    source = load_file(SEG)
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    assert keys == set(source)  # the official loader's strict load_state_dict takes it
    assert {d for k, d in dtypes.items()} == {"BF16"}
    assert meta["sapiens2.task"] == "seg" and meta["sapiens2.input_size"] == "64x48"
    assert meta["sapiens2.source_digest"] == file_digest(SEG)
    assert tuple(json.loads(meta["sapiens2.class_names"])) == default_labels("seg", 29)
    assert len(default_labels("seg", 29)) == 29 and default_labels("seg", 30) == ()
    model = load_model(path)
    for key, tensor in load_file(path).items():
        assert torch.equal(model.state_dict()[key].to(tensor.dtype), tensor), key
    io = _io("seg")
    with torch.no_grad():
        err = _max_rel(model(io["input"]), io["output"])
    assert 1e-4 < err < BASE_TOLERANCES["bf16"]


def test_pt2_has_dynamic_batch_and_size(seg_exports):
    artifact = load_artifact(seg_exports["pt2", "fp32"].path)
    assert artifact.info.dynamic_axes == ("batch", "height", "width")
    eager = load_model(SEG)
    x = torch.randn(3, 3, 96, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(artifact(x), eager(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        artifact(torch.zeros(1, 3, 72, 48))


def test_onnx_graph_has_precomputed_rope_and_bf16_casts(seg_exports):
    import onnx

    path = seg_exports["onnx", "fp32"].path
    model = onnx.load(path)
    assert model.opset_import[0].version >= 18
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Sin", "Cos", "Range", "Trilu"}, "RoPE must be baked in for the export size"
    casts_to_bf16 = [
        n for n in model.graph.node
        if n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.BFLOAT16 for a in n.attribute)
    ]  # fmt: skip
    assert len(casts_to_bf16) == 2 * 2 * 4  # 2 layers x (q, k) x (input, cos term, sin term, sum)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 48]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["sapiens2.task"] == "seg" and json.loads(meta["sapiens2.output_names"]) == ["logits"]
    assert meta["sapiens2.source_digest"] == file_digest(SEG)


def test_onnx_pointmap_normalised_in_graph(tmp_path):
    src = PARITY / "pointmap" / "model.safetensors"
    result = export_model(src, tmp_path / "pm.onnx", input_size=SIZE["pointmap"], normalize_in_graph=True)
    artifact = load_artifact(result.path)
    assert artifact.info.normalize_in_graph and artifact.info.output_names == ("pointmap", "scale")
    io = _io("pointmap")
    pointmap, scale = artifact(io["input"])
    torch.testing.assert_close(scale, io["scale"], atol=1e-4, rtol=1e-4)
    assert _max_rel(pointmap, io["output"]) < 1e-4
    pixels = read_pixels(FIXTURES / "e2e" / "seg" / "image.png", SIZE["pointmap"])
    with torch.no_grad():
        want = load_model(src)(normalise(pixels))
    got = artifact.run(pixels)  # the graph's own input: RGB 0-255
    assert _max_rel(got[0], want[0]) < 1e-4 and _max_rel(got[1], want[1]) < 1e-4


def test_pointmap_is_size_locked(tmp_path):
    with pytest.raises(ExportError, match="runs only at the input size it was trained for"):
        export_model(PARITY / "pointmap" / "model.safetensors", tmp_path / "pm.pt2", input_size=(128, 96))
    assert not list(tmp_path.iterdir())


def test_tokenizer_pt2_exports_with_dynamic_batch(tmp_path, monkeypatch):
    # 6 windows per image in passes of 4: the chunk loop runs twice in the traced program
    monkeypatch.setattr(backbone, "TOKENIZER_CHUNK", 4)
    src = PARITY / "backbone_tokenizer" / "model.safetensors"
    result = export_model(src, tmp_path / "tok.pt2", input_size=SIZE["backbone_tokenizer"])
    artifact = load_artifact(result.path)
    assert artifact.task == "pretrain" and artifact.info.dynamic_axes == ("batch",)
    io = _io("backbone_tokenizer")
    torch.testing.assert_close(artifact(io["input"]), io["output"], atol=2e-5, rtol=1e-4)
    x = io["input"][:1].expand(3, -1, -1, -1)
    torch.testing.assert_close(artifact(x), io["output"][:1].expand(3, -1, -1, -1), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="exported for 192x128 inputs"):
        artifact(torch.zeros(1, 3, 256, 128))


def test_onnx_external_data(tmp_path):
    import onnx

    result = export_model(SEG, tmp_path / "seg.onnx", input_size=SIZE["seg"], external_data_bytes=1)
    data = tmp_path / "seg.onnx.data"
    assert result.files == (tmp_path / "seg.onnx", data)
    graph = onnx.load(result.path, load_external_data=False)
    big = [
        t
        for t in graph.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) > 1024
    ]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert data.stat().st_size > 0.9 * sum(v.numel() * 4 for v in load_file(SEG).values() if v.numel() > 256)
    io = _io("seg")
    assert _max_rel(load_artifact(result.path)(io["input"]), io["output"]) < 1e-5


def test_rope_in_float32_graph_fails_and_is_removed(tmp_path, monkeypatch):
    # without the bf16 roundings the exported graph computes RoPE in float32 (eager is unaffected)
    monkeypatch.setattr(rope, "round_bf16", lambda x: x)
    out = tmp_path / "wrong.onnx"
    with pytest.raises(ExportCheckError, match="does not reproduce the eager model") as err:
        export_model(SEG, out, input_size=SIZE["seg"])
    assert "FAILED" in str(err.value) and "logits max|diff|" in str(err.value)
    assert not list(tmp_path.iterdir()), "a failed export must leave nothing behind"


def test_check_inputs_and_ulp_noise():
    inputs = check_inputs((64, 48))
    assert inputs["random"][0].shape == (2, 3, 64, 48) and inputs["real"][0].shape == (1, 3, 64, 48)
    pixels = inputs["real"][1]
    assert pixels.min() >= 0 and pixels.max() <= 255 and pixels.std() > 20  # a photo, not a blank
    x = inputs["random"][0]
    y = perturb_ulp(x)
    assert (y != x).all() and ((y - x).abs() <= x.abs() * 2**-23 + 2e-45).all()


def test_refusals(tmp_path):
    (tmp_path / "taken.pt2").write_bytes(b"x")
    with pytest.raises(ExportError, match="already exists"):
        export_model(SEG, tmp_path / "taken.pt2", input_size=SIZE["seg"])
    with pytest.raises(ExportError, match="bfloat16"):
        export_model(SEG, tmp_path / "a.onnx", dtype="bf16")
    with pytest.raises(ExportError, match="must end in .pt2"):
        export_model(SEG, tmp_path / "a.onnx", fmt="pt2")
    with pytest.raises(ExportError, match="opset 17 is too old"):
        export_model(SEG, tmp_path / "a.onnx", opset=17)
    with pytest.raises(ExportError, match="multiples of 16"):
        export_model(SEG, tmp_path / "a.pt2", input_size=(60, 48))
    with pytest.raises(ExportError, match="not to safetensors"):
        export_model(SEG, tmp_path / "a.safetensors", normalize_in_graph=True)
    assert [p.name for p in tmp_path.iterdir()] == ["taken.pt2"]


TINY_CASES = [
    c for c in fixture_cases("parity")
    if (c / "model.safetensors").is_file() and json.loads((c / "config.json").read_text())["arch"]["num_layers"] <= 4
]  # fmt: skip


@pytest.mark.parametrize("case", TINY_CASES, ids=lambda p: p.name)
def test_onnx_reproduces_every_tiny_case(case, tmp_path):
    cfg = json.loads((case / "config.json").read_text())
    io = load_file(case / "io.safetensors")
    size = tuple(io["input"].shape[-2:])
    artifact = load_artifact(
        export_model(case / "model.safetensors", tmp_path / "m.onnx", input_size=size).path
    )
    assert artifact.task == cfg["task"]
    if cfg["task"] in ("seg", "pose"):  # the released channel counts get the packaged names
        assert len(artifact.info.labels) == artifact.info.head.out_channels == {"seg": 29, "pose": 308}[cfg["task"]]
        assert artifact.info.labels[0] == {"seg": "Background", "pose": "nose"}[cfg["task"]]
    got = artifact(io["input"])
    got, want = (got, (io["output"], io["scale"])) if cfg["task"] == "pointmap" else ((got,), (io["output"],))
    for g, w in zip(got, want, strict=True):
        assert _max_rel(g, w) < BASE_TOLERANCES["fp32"]
