"""The module an exported graph computes, and the pt2 / ONNX writers.

``GraphModule`` wraps a loaded model so every artifact has the same interface: a float32
``image [B, 3, H, W]`` (normalised, or RGB pixels 0-255 with ``normalize_in_graph``) in,
float32 outputs out, whatever dtype the weights are in.

ONNX graphs get RoPE tables precomputed for the export size (``FixedRope``): constant float32
tensors holding bf16 values, which switch ``apply_rope`` to its float32-with-bf16-rounding
formulation (bit-identical to bf16 arithmetic). The graph then holds only float32 arithmetic
plus ``Cast`` float32 -> bfloat16 -> float32 pairs, which onnxruntime runs on CPU (it has no
bf16 ``Mul``) and TensorRT parses; no ``sin``/``cos``/``Range`` of the grid is left in it.
pt2 programs keep the eager bf16 RoPE, computed from the actual grid, so H and W can stay
dynamic.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from sapiens2_cli.artifact_meta import (
    INPUT_NAME,
    MEAN_RGB,
    OUTPUT_NAMES,
    PT2_EXTRA_FILE,
    STD_RGB,
    with_prefix,
)
from sapiens2_cli.models.sapiens2 import Sapiens2Model

# 18: the oldest the torch.export-based exporter emits natively (its conversion down to 17 fails
# on the RMSNorm reductions, and the TorchScript exporter has no rms_norm at 17), and one that
# TensorRT 8.6+ parses; RMSNorm and attention are decomposed into elementary ops there.
ONNX_DEFAULT_OPSET = 18
ONNX_MIN_OPSET = 18
# protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself
ONNX_EXTERNAL_DATA_BYTES = 2**31 - 2**26


class GraphModule(nn.Module):
    """``float32 image [B, 3, H, W] -> float32 outputs`` around a model of any dtype.

    With ``normalize_in_graph`` the image is RGB 0-255 and ``(x - mean) / std`` is the graph's
    first step. Outputs are a tensor, or ``(pointmap, scale)`` for pointmap models.
    """

    def __init__(self, model: Sapiens2Model, *, normalize_in_graph: bool) -> None:
        super().__init__()
        self.model = model
        self.dtype = model.backbone.cls_token.dtype
        self.normalize_in_graph = normalize_in_graph
        self.register_buffer("mean", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD_RGB).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = (image - self.mean) / self.std if self.normalize_in_graph else image
        out = self.model(x.to(self.dtype))
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()


class FixedRope(nn.Module):
    """RoPE tables for one patch grid, float32 tensors holding bf16 values ``[h*w, head_dim]``."""

    def __init__(self, sin: torch.Tensor, cos: torch.Tensor, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("sin", sin.float(), persistent=False)
        self.register_buffer("cos", cos.float(), persistent=False)

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (h, w) != self.grid:
            raise ValueError(f"RoPE was precomputed for a {self.grid} patch grid, got {(h, w)}")
        return self.sin, self.cos


@contextlib.contextmanager
def fixed_rope(model: Sapiens2Model, input_size: tuple[int, int]) -> Iterator[None]:
    """Swap the model's RoPE for tables precomputed at ``input_size`` (H, W pixels), then restore."""
    backbone = model.backbone
    stride = backbone.arch.stride
    grid = (input_size[0] // stride, input_size[1] // stride)
    original = backbone.rope_embed
    with torch.no_grad():
        sin, cos = original.tables(*grid)
    backbone.rope_embed = FixedRope(sin, cos, grid)
    try:
        yield
    finally:
        backbone.rope_embed = original


def dynamic_spatial(model: Sapiens2Model) -> bool:
    """Whether H and W may vary in a traced program.

    Not for pointmap (the scale MLP's width fixes the feature grid) nor for the 4K tokenizer
    (its window chunking is sized from the grid).
    """
    return model.task != "pointmap" and not model.backbone.arch.use_tokenizer


def _dynamic_shapes(model: Sapiens2Model, spatial: bool) -> tuple[dict[int, object]]:
    dim = torch.export.Dim
    shapes: dict[int, object] = {0: dim("batch")}
    if spatial:
        stride = model.backbone.arch.stride
        shapes[2] = stride * dim("cells_h", min=2)
        shapes[3] = stride * dim("cells_w", min=2)
    return (shapes,)


def write_pt2(graph: GraphModule, example: torch.Tensor, path: Path, *, metadata: dict[str, str]) -> None:
    """``torch.export`` the graph (dynamic batch, dynamic H/W where allowed) and save it."""
    spatial = "height" in json.loads(metadata["dynamic_axes"])
    with torch.no_grad():
        program = torch.export.export(
            graph, (example,), dynamic_shapes=_dynamic_shapes(graph.model, spatial), strict=False
        )
    torch.export.save(program, path, extra_files={PT2_EXTRA_FILE: json.dumps(with_prefix(metadata))})


def write_onnx(
    graph: GraphModule,
    example: torch.Tensor,
    path: Path,
    *,
    metadata: dict[str, str],
    opset: int = ONNX_DEFAULT_OPSET,
    external_data_bytes: int = ONNX_EXTERNAL_DATA_BYTES,
) -> list[Path]:
    """Export with the ``torch.export``-based ONNX exporter (dynamic batch, static H/W).

    Weights go to ``<name>.data`` next to the graph when they total ``external_data_bytes`` or
    more (protobuf's 2 GiB limit). Returns the files written.
    """
    import onnx

    task = graph.model.task
    names = list(OUTPUT_NAMES[task])
    weight_bytes = sum(t.numel() * t.element_size() for t in graph.model.state_dict().values())
    external = weight_bytes >= external_data_bytes
    input_size = tuple(example.shape[-2:])
    with fixed_rope(graph.model, input_size), torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_shapes=_dynamic_shapes(graph.model, spatial=False),
            optimize=True,
            verbose=False,
        )
    got = program.model.opset_imports.get("", None)
    if got != opset:
        raise ValueError(f"the ONNX exporter produced opset {got}, not the requested {opset}")
    program.model.metadata_props.update(with_prefix(metadata))
    program.save(os.fspath(path), external_data=external)
    onnx.checker.check_model(os.fspath(path))  # the path form also checks external data
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.is_file():
        files.append(data)
    return files


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the ONNX exporter's progress lines and torch-internal warnings off our output.

    Its errors still propagate as exceptions; the torchvision-operator notices do not apply.
    """
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        registration.setLevel(level)
