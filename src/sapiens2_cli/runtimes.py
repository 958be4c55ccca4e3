"""Run exported artifacts (ONNX through onnxruntime, pt2 through ``torch.export.load``) like the model.

``load_artifact(path)`` returns an ``ArtifactModel``: called with a normalised float32
``[B, 3, H, W]`` tensor it returns what ``Sapiens2Model.forward`` returns (a tensor, or
``(pointmap, scale)``), float32, on its device. Everything it needs (task, input size, output
names, normalisation, labels) comes from the artifact's own metadata, so no model code runs:
a render farm can deploy the ``.onnx`` with onnxruntime alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sapiens2_cli.artifact_meta import (
    INPUT_NAME,
    MEAN_RGB,
    PT2_EXTRA_FILE,
    STD_RGB,
    ArtifactFormat,
    ArtifactInfo,
    parse_metadata,
    strip_prefix,
)
from sapiens2_cli.weights import CheckpointError

Output = torch.Tensor | tuple[torch.Tensor, ...]
SUFFIX_FORMAT: dict[str, ArtifactFormat] = {".safetensors": "safetensors", ".pt2": "pt2", ".onnx": "onnx"}


class ArtifactModel:
    """An exported model: ``model(x)`` with ``x`` normalised ``[B, 3, H, W]`` float32.

    ``H, W`` must equal ``info.input_size`` unless the artifact's ``info.dynamic_axes`` lists
    them. ``run(image)`` feeds the graph's own input directly (RGB pixels 0-255 when
    ``info.normalize_in_graph``).
    """

    def __init__(self, info: ArtifactInfo, device: torch.device) -> None:
        self.info = info
        self.task = info.task
        self.device = device
        self._mean = torch.tensor(MEAN_RGB, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(STD_RGB, device=device).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> Output:
        self.check_input(x)
        x = x.to(self.device, torch.float32)
        return self.run(x * self._std + self._mean if self.info.normalize_in_graph else x)

    def check_input(self, x: torch.Tensor) -> None:
        """A clear error for an input the artifact cannot take (before the runtime's own)."""
        h, w = self.info.input_size
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.info.path}: expected an image batch [B, 3, H, W], got {list(x.shape)}")
        dynamic = set(self.info.dynamic_axes)
        stride = self.info.arch.stride if self.info.arch is not None else 16
        for axis, got, want in (("height", x.shape[2], h), ("width", x.shape[3], w)):
            if axis in dynamic:
                if got % stride or got < 2 * stride:
                    raise ValueError(
                        f"{self.info.path}: {axis} {got} is not a multiple of {stride} (>= {2 * stride})"
                    )
            elif got != want:
                raise ValueError(
                    f"{self.info.path}: exported for {h}x{w} inputs (static {axis}), got {x.shape[2]}x{x.shape[3]}"
                )

    def run(self, image: torch.Tensor) -> Output:
        raise NotImplementedError

    def _outputs(self, outs: list[torch.Tensor]) -> Output:
        if len(outs) != len(self.info.output_names):
            raise CheckpointError(
                f"{self.info.path}: the graph returned {len(outs)} outputs, its metadata names "
                f"{list(self.info.output_names)}"
            )
        outs = [o.to(self.device, torch.float32) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


class OnnxArtifact(ArtifactModel):
    """An ONNX graph in an onnxruntime session (CPU, or CUDA with onnxruntime-gpu)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        try:
            import onnxruntime as ort
        except ModuleNotFoundError as err:
            raise CheckpointError(
                f"{path}: running ONNX needs onnxruntime: pip install 'sapiens2[export]'"
            ) from err

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CheckpointError(
                    f"{path}: this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
                )
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(os.fspath(path), providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises several private types
            _diagnose_onnx(path)  # a clearer reason when there is one
            raise CheckpointError(f"{path}: onnxruntime cannot load it ({_first_line(err)})") from err
        meta = strip_prefix(self.session.get_modelmeta().custom_metadata_map)
        super().__init__(parse_metadata(str(path), meta, artifact_format="onnx"), device)
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if [i.name for i in inputs] != [INPUT_NAME] or tuple(outputs) != self.info.output_names:
            raise CheckpointError(
                f"{path}: graph inputs {[i.name for i in inputs]} / outputs {outputs} do not match "
                f"its metadata ({INPUT_NAME!r} -> {list(self.info.output_names)})"
            )
        shape = inputs[0].shape  # e.g. ['batch', 3, 1024, 768]
        if len(shape) != 4 or shape[2:] != list(self.info.input_size):
            raise CheckpointError(
                f"{path}: graph input shape {shape} does not match the metadata input size "
                f"{self.info.input_size[0]}x{self.info.input_size[1]}"
            )

    def run(self, image: torch.Tensor) -> Output:
        feed = {INPUT_NAME: image.detach().to("cpu", torch.float32).contiguous().numpy()}
        return self._outputs([torch.from_numpy(o) for o in self.session.run(None, feed)])


class Pt2Artifact(ArtifactModel):
    """A ``torch.export`` ExportedProgram (``.pt2``) with its metadata in an extra file."""

    def __init__(self, path: Path, device: torch.device) -> None:
        extra = {PT2_EXTRA_FILE: ""}
        try:
            program = torch.export.load(path, extra_files=extra)
        except Exception as err:  # noqa: BLE001 - zip, pickle and schema errors alike
            raise CheckpointError(
                f"{path}: not a readable torch.export program ({_first_line(err)})"
            ) from err
        try:
            meta = strip_prefix(json.loads(extra[PT2_EXTRA_FILE] or "{}"))
        except ValueError as err:
            raise CheckpointError(f"{path}: malformed {PT2_EXTRA_FILE} ({err})") from err
        super().__init__(parse_metadata(str(path), meta, artifact_format="pt2"), device)
        n_out = len(program.graph_signature.user_outputs)
        if n_out != len(self.info.output_names):
            raise CheckpointError(
                f"{path}: the program has {n_out} outputs, its metadata names {list(self.info.output_names)}"
            )
        from torch.export.passes import move_to_device_pass

        # a program keeps the device it was traced on; move it to the one asked for
        self.module = move_to_device_pass(program, device).module()

    def run(self, image: torch.Tensor) -> Output:
        with torch.no_grad():
            out = self.module(image.to(self.device, torch.float32))
        return self._outputs(list(out) if isinstance(out, (tuple, list)) else [out])


class EagerArtifact(ArtifactModel):
    """A safetensors checkpoint, loaded into the eager model (fp32 compute)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        from sapiens2_cli.export import dynamic_axes
        from sapiens2_cli.weights import load_model

        self.model = load_model(path, device=device)
        meta = self.model.info.metadata
        if "artifact_format" in meta:
            info = parse_metadata(str(path), meta, artifact_format="safetensors")
        else:  # a plain checkpoint: describe it from the model
            from sapiens2_cli.artifact_meta import OUTPUT_NAMES, ArtifactInfo

            mi = self.model.info
            info = ArtifactInfo(
                task=mi.task, arch=mi.arch, head=mi.head, input_size=mi.input_size, format="safetensors",
                dtype="fp32", output_names=OUTPUT_NAMES[mi.task], normalize_in_graph=False,
                dynamic_axes=dynamic_axes("safetensors", self.model),
                size=mi.size, source=mi.source, path=str(path), metadata=dict(meta),
            )  # fmt: skip
        super().__init__(info, device)

    def run(self, image: torch.Tensor) -> Output:
        with torch.no_grad():
            out = self.model(image.to(self.device, torch.float32))
        return self._outputs(list(out) if isinstance(out, tuple) else [out])


def artifact_format(path: str | os.PathLike) -> ArtifactFormat | None:
    """The format named by a file's suffix (``.onnx``, ``.pt2``, ``.safetensors``), else None."""
    return SUFFIX_FORMAT.get(Path(path).suffix.lower())


def load_artifact(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", task: str | None = None
) -> ArtifactModel:
    """Open an exported ``.onnx``, ``.pt2`` or ``.safetensors`` file for inference.

    Args:
        path: the artifact (an ONNX graph's ``.data`` file must sit next to it).
        device: ``"cpu"`` or ``"cuda[:i]"`` (ONNX on CUDA needs onnxruntime-gpu).
        task: the expected task; an error if the artifact holds another.

    Raises:
        CheckpointError: unreadable, truncated or foreign files, missing or inconsistent metadata.
    """
    path = Path(path)
    fmt = artifact_format(path)
    if fmt is None:
        raise CheckpointError(f"{path}: unknown artifact type (expected .onnx, .pt2 or .safetensors)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    device = torch.device(device)
    model = {"onnx": OnnxArtifact, "pt2": Pt2Artifact, "safetensors": EagerArtifact}[fmt](path, device)
    if task is not None and task != model.task:
        raise CheckpointError(f"{path}: holds a {model.task} model, not {task}")
    return model


def _diagnose_onnx(path: Path) -> None:
    """Raise a clear error for a file onnxruntime refused: not ONNX, or its ``.data`` file missing."""
    import onnx

    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf DecodeError and friends
        raise CheckpointError(f"{path}: not a readable ONNX file ({_first_line(err)})") from err
    locations = {
        entry.value
        for init in proto.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    missing = sorted(loc for loc in locations if not (path.parent / loc).is_file())
    if missing:
        raise CheckpointError(
            f"{path}: its external weight file {', '.join(missing)} is missing (keep it next to the graph)"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
