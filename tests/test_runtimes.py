"""`load_artifact`: running exported files, and clear errors for corrupt or mismatched ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from sapiens2_cli import load_model
from sapiens2_cli.artifact_meta import PT2_EXTRA_FILE
from sapiens2_cli.export import export_model
from sapiens2_cli.runtimes import EagerArtifact, load_artifact
from sapiens2_cli.weights import CheckpointError

SEG = FIXTURES / "parity" / "seg" / "model.safetensors"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    return {fmt: export_model(SEG, out / f"seg.{fmt}", input_size=(64, 48)).path for fmt in ("onnx", "pt2")}


def _copy(src, tmp_path, name=None):
    dst = tmp_path / (name or src.name)
    shutil.copyfile(src, dst)
    return dst


def _rewrite_onnx_metadata(src, dst, **changes):
    import onnx

    model = onnx.load(src)
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in changes.items():
        if value is None:
            props.pop("sapiens2." + key, None)
        else:
            props["sapiens2." + key] = value
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, dst)
    return dst


def test_artifacts_run_like_the_model(exported):
    io = load_file(FIXTURES / "parity" / "seg" / "io.safetensors")
    for fmt, path in exported.items():
        artifact = load_artifact(path, task="seg")
        assert artifact.task == "seg" and artifact.info.path == str(path)
        assert artifact.info.arch.embed_dims == 64 and artifact.info.head.out_channels == 29
        assert artifact.info.source_digest.startswith("sha256:")
        got = artifact(io["input"])
        assert ((got - io["output"]).abs().max() / io["output"].abs().max()) < 1e-4, fmt


def test_plain_checkpoint_as_artifact():
    artifact = load_artifact(SEG)
    assert isinstance(artifact, EagerArtifact) and artifact.info.format == "safetensors"
    assert artifact.info.dynamic_axes == ("batch", "height", "width") and not artifact.info.normalize_in_graph
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(artifact(x), load_model(SEG)(x))


def test_wrong_task_and_input(exported):
    with pytest.raises(CheckpointError, match=r"seg\.onnx: holds a seg model, not pose"):
        load_artifact(exported["onnx"], task="pose")
    artifact = load_artifact(exported["onnx"])
    with pytest.raises(ValueError, match=r"exported for 64x48 inputs \(static height\), got 128x96"):
        artifact(torch.zeros(1, 3, 128, 96))
    with pytest.raises(ValueError, match=r"expected an image batch \[B, 3, H, W\]"):
        artifact(torch.zeros(3, 64, 48))


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_artifact(tmp_path / "absent.onnx")
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown artifact type"):
        load_artifact(tmp_path / "model.bin")


def test_truncated_onnx(exported, tmp_path):
    data = exported["onnx"].read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(
        CheckpointError, match=r"bad\.onnx: (not a readable ONNX file|onnxruntime cannot load it)"
    ):
        load_artifact(bad)


def test_garbage_pt2(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"bad\.pt2: not a readable torch.export program"):
        load_artifact(bad)


def test_onnx_without_metadata(exported, tmp_path):
    path = _rewrite_onnx_metadata(exported["onnx"], tmp_path / "plain.onnx", task=None, input_size=None)
    with pytest.raises(
        CheckpointError,
        match=r"plain\.onnx: no sapiens2 metadata \(sapiens2\.task, sapiens2\.input_size missing\)",
    ):
        load_artifact(path)


def test_onnx_metadata_that_contradicts_the_graph(exported, tmp_path):
    path = _rewrite_onnx_metadata(exported["onnx"], tmp_path / "a.onnx", input_size="128x96")
    with pytest.raises(
        CheckpointError,
        match=r"graph input shape \['batch', 3, 64, 48\] does not match the metadata input size 128x96",
    ):
        load_artifact(path)
    path = _rewrite_onnx_metadata(exported["onnx"], tmp_path / "b.onnx", artifact_format="pt2")
    with pytest.raises(CheckpointError, match="metadata says it is a pt2 artifact but the file is onnx"):
        load_artifact(path)
    path = _rewrite_onnx_metadata(exported["onnx"], tmp_path / "c.onnx", task="pose")
    with pytest.raises(CheckpointError, match=r"metadata task 'pose' does not go with outputs \['logits'\]"):
        load_artifact(path)
    path = _rewrite_onnx_metadata(exported["onnx"], tmp_path / "d.onnx", arch="{not json")
    with pytest.raises(CheckpointError, match="malformed sapiens2 metadata"):
        load_artifact(path)


def test_onnx_missing_external_data(tmp_path):
    result = export_model(SEG, tmp_path / "ext.onnx", input_size=(64, 48), external_data_bytes=1)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(
        CheckpointError, match=r"ext\.onnx: its external weight file ext\.onnx\.data is missing"
    ):
        load_artifact(result.path)


def test_pt2_metadata_problems(exported, tmp_path):
    program = torch.export.load(exported["pt2"])
    torch.export.save(program, tmp_path / "bare.pt2")
    with pytest.raises(CheckpointError, match=r"bare\.pt2: no sapiens2 metadata"):
        load_artifact(tmp_path / "bare.pt2")
    extra = {PT2_EXTRA_FILE: ""}
    torch.export.load(exported["pt2"], extra_files=extra)
    meta = json.loads(extra[PT2_EXTRA_FILE])
    meta.update({"sapiens2.task": "pointmap", "sapiens2.output_names": '["pointmap", "scale"]'})
    torch.export.save(program, tmp_path / "liar.pt2", extra_files={PT2_EXTRA_FILE: json.dumps(meta)})
    with pytest.raises(
        CheckpointError,
        match=r"liar\.pt2: the program has 1 outputs, its metadata names \['pointmap', 'scale'\]",
    ):
        load_artifact(tmp_path / "liar.pt2")
