"""The model a fine-tuning run trains: architecture, head, label set and initial weights.

* Backbone: ``ARCHS[model.size]`` with any ``model.arch`` field replacing the released value
  (the attention layout is re-derived: full MHSA in the first and last 8 blocks).
* Head: ``official_head(task, size, embed_dims)`` with ``model.head`` widths replacing the
  released ones; output channels from the data (seg: the class list, pose: the keypoint set,
  3 otherwise); the pointmap scale MLP's input width from the feature grid of
  ``model.input_size``.
* Weights, in order: a seeded random initialisation (:func:`init_weights`), then
  ``model.init`` — ``"pretrain"`` = the released pretrained backbone of ``model.size``
  (``pretrain-<size>``), or any zoo name, Hub repo or local file: its backbone is copied
  (strictly; the architectures must agree), its head too when it is a checkpoint of the same
  task with the same head shape, otherwise the head stays freshly initialised and the log says
  so — then ``model.load_from``: every tensor whose name and shape match is copied, the rest
  are listed in the log and keep their value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch
from torch import nn

from sapiens2_cli.models.arch import ARCHS, BackboneArch, official_kv_heads, size_name
from sapiens2_cli.models.heads import HeadConfig, official_head, pointmap_scale_inputs
from sapiens2_cli.models.layers import LayerScale
from sapiens2_cli.models.sapiens2 import ModelInfo, Sapiens2Model
from sapiens2_cli.train.config import Config, ConfigError, ModelConfig

__all__ = [
    "Labels",
    "build_model",
    "init_weights",
    "initialise",
    "labels_of",
    "run_arch",
    "run_head",
]

log = logging.getLogger("sapiens2")

# head override keys each task reads (config.HeadConfig docstring)
_HEAD_KEYS = {
    "seg": ("deconv_channels", "conv_channels"),
    "pose": ("deconv_channels", "conv_channels"),
    "normal": ("upsample_channels", "conv_channels"),
    "albedo": ("upsample_channels", "conv_channels"),
    "pointmap": (
        "upsample_channels",
        "conv_channels",
        "scale_conv_channels",
        "scale_mlp_channels",
    ),
}


@dataclasses.dataclass(frozen=True)
class Labels:
    """What the data says about the outputs: channel count and the names stored with weights.

    ``names``: seg class names or pose keypoint names (empty for dense regression);
    ``class_weights``: seg cross-entropy weights; ``flip_index``: pose left/right partners.
    """

    out_channels: int
    names: tuple[str, ...] = ()
    class_weights: tuple[float, ...] | None = None
    flip_index: tuple[int, ...] | None = None

    def metadata(self, task: str) -> dict[str, str]:
        """``save_model`` metadata: ``class_names`` (seg) or ``keypoint_names`` + ``flip_index`` (pose),
        the keys exported artifacts use too."""
        if task == "seg":
            return {"class_names": json.dumps(list(self.names))}
        if task == "pose":
            return {
                "keypoint_names": json.dumps(list(self.names)),
                "flip_index": json.dumps(list(self.flip_index or ())),
            }
        return {}


def labels_of(task: str, dataset: Any) -> Labels:
    """:class:`Labels` of a training :class:`~sapiens2_cli.train.datasets.Mixture`."""
    folder = dataset.folders[0]
    if task == "seg":
        classes = folder.classes
        return Labels(classes.num_classes, classes.names, tuple(classes.weights))
    if task == "pose":
        kset = folder.keypoint_set
        return Labels(len(kset), kset.names, flip_index=tuple(int(i) for i in kset.flip_index))
    return Labels(3)


def run_arch(cfg: ModelConfig) -> BackboneArch:
    """``ARCHS[cfg.size]`` with the ``cfg.arch`` overrides applied."""
    base = ARCHS[cfg.size]
    over = cfg.arch
    if all(v is None for v in dataclasses.asdict(over).values()):
        return base
    dim = over.embed_dims or base.embed_dims
    layers = over.num_layers or base.num_layers
    heads = over.num_heads or base.num_heads
    ffn = over.ffn or (base.feedforward_channels if dim == base.embed_dims else 4 * dim)
    if dim % heads or (dim // heads) % 4:
        raise ConfigError(
            f"model.arch: embed_dims {dim} must split into {heads} heads of a size divisible by 4"
        )
    for key in ("patch_size", "n_storage_tokens"):
        value = getattr(over, key)
        if value is not None and value < (1 if key == "patch_size" else 0):
            raise ConfigError(f"model.arch.{key} must be positive, got {value}")
    return dataclasses.replace(
        base,
        embed_dims=dim,
        num_layers=layers,
        num_heads=heads,
        feedforward_channels=ffn,
        kv_heads=official_kv_heads(layers, heads),
        tokenizer_ffn=4 * dim if base.use_tokenizer else 0,
        patch_size=over.patch_size or base.patch_size,
        n_storage_tokens=base.n_storage_tokens if over.n_storage_tokens is None else over.n_storage_tokens,
    )


def run_head(cfg: Config, arch: BackboneArch, out_channels: int) -> HeadConfig:
    """The released head of ``cfg.task`` / ``cfg.model.size`` with the overrides applied."""
    task, over = cfg.task, cfg.model.head
    used = _HEAD_KEYS[task]
    stray = [k for k, v in dataclasses.asdict(over).items() if v is not None and k not in used]
    if stray:
        raise ConfigError(
            f"model.head.{stray[0]} is not used by the {task} head (it reads {', '.join(used)})"
        )
    head = official_head(task, cfg.model.size, arch.embed_dims)
    changes: dict[str, Any] = {"out_channels": out_channels, "in_channels": arch.embed_dims}
    if task in ("seg", "pose"):
        if over.deconv_channels is not None:
            changes["deconv_out_channels"] = tuple(over.deconv_channels)
            changes["deconv_kernel_sizes"] = (4,) * len(over.deconv_channels)
        if over.conv_channels is not None:
            changes["conv_out_channels"] = tuple(over.conv_channels)
            changes["conv_kernel_sizes"] = (1,) * len(over.conv_channels)
        return dataclasses.replace(head, **changes)
    changes["input_conv_channels"] = arch.embed_dims
    if over.upsample_channels is not None:
        changes["upsample_channels"] = tuple(over.upsample_channels)
    if over.conv_channels is not None:
        changes["conv_out_channels"] = tuple(over.conv_channels)
        changes["conv_kernel_sizes"] = (3,) * len(over.conv_channels)
    if task == "pointmap":
        scale_convs = tuple(over.scale_conv_channels or head.scale_conv_out_channels)
        hidden = tuple(over.scale_mlp_channels or head.scale_mlp[1:-1])
        grid = (cfg.model.input_size[0] // arch.stride, cfg.model.input_size[1] // arch.stride)
        changes["scale_conv_out_channels"] = scale_convs
        changes["scale_conv_kernel_sizes"] = (1,) * len(scale_convs)
        changes["scale_mlp"] = (pointmap_scale_inputs(scale_convs[-1], grid, len(scale_convs)), *hidden, 1)
    return dataclasses.replace(head, **changes)


def init_weights(model: Sapiens2Model, *, layer_scale: float | None = None) -> None:
    """Random initialisation (uses the global torch RNG; seed it first).

    Backbone: truncated-normal (std 0.02) linear weights, zero biases, ``[cls]`` and storage
    tokens ~ N(0, 0.02) truncated; norms keep 1 and LayerScale ``layer_scale`` (None = its
    constructor value 1e-4). Head: Kaiming-normal (fan-out) convolutions, zero biases.
    """
    for module in model.backbone.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LayerScale) and layer_scale is not None:
            nn.init.constant_(module.weight, layer_scale)
    for name in ("cls_token", "storage_tokens"):
        nn.init.trunc_normal_(getattr(model.backbone, name), std=0.02)
    if model.decode_head is not None:
        init_head(model.decode_head)


def init_head(head: nn.Module) -> None:
    for module in head.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)


def build_model(
    cfg: Config, labels: Labels, *, device: str | torch.device = "cpu"
) -> Sapiens2Model:
    """The run's model with ``.info`` filled; randomly initialised unless on the meta device."""
    arch = run_arch(cfg.model)
    head = run_head(cfg, arch, labels.out_channels)
    device = torch.device(device)
    with device:
        model = Sapiens2Model(cfg.task, arch, head)
    if device.type != "meta":
        init_weights(model, layer_scale=cfg.model.layer_scale_init)
    model.info = ModelInfo(
        task=cfg.task,
        arch=arch,
        head=head,
        input_size=tuple(cfg.model.input_size),
        size=size_name(arch),
        source="finetune",
        metadata=labels.metadata(cfg.task),
    )
    return model


def _describe(arch: BackboneArch) -> str:
    name = size_name(arch)
    shape = f"{arch.embed_dims} dims x {arch.num_layers} layers, {arch.num_heads} heads"
    return f"{name} ({shape})" if name else shape


def initialise(model: Sapiens2Model, cfg: ModelConfig) -> None:
    """Apply ``cfg.init`` then ``cfg.load_from`` to ``model`` (module docstring); logs each step.

    Raises:
        CheckpointError: the reference cannot be resolved or read, or its backbone differs.
    """
    from sapiens2_cli.weights import CheckpointError, load_model

    if cfg.init is not None:
        ref = f"pretrain-{cfg.size}" if cfg.init == "pretrain" else cfg.init
        source = load_model(ref, task="pretrain" if cfg.init == "pretrain" else None)
        if source.backbone.arch != model.backbone.arch:
            raise CheckpointError(
                f"model.init {ref}: its backbone is {_describe(source.backbone.arch)}, this "
                f"run's is {_describe(model.backbone.arch)}; set model.size / model.arch to "
                "match, or model.init=null"
            )
        model.backbone.load_state_dict(source.backbone.state_dict(), strict=True)
        head = source.info.head if source.info is not None else None
        if head is not None and model.info is not None and head == model.info.head:
            model.decode_head.load_state_dict(source.decode_head.state_dict(), strict=True)
            log.info("initialised backbone and %s head from %s", head.task, ref)
        elif head is not None:
            theirs = f"{head.task} head with {head.out_channels} outputs"
            ours = f"{model.task} head with {model.info.head.out_channels} outputs"
            log.info(
                "initialised the backbone from %s; its %s does not fit this run's %s, so the "
                "head is newly initialised",
                ref,
                theirs,
                ours,
            )
        else:
            log.info(
                "initialised the backbone from %s; the %s head is newly initialised",
                ref,
                model.task,
            )
        del source
    else:
        log.info("model.init is null: training from a random initialisation")
    if cfg.load_from is not None:
        _load_matching(model, cfg.load_from)


def _load_matching(model: Sapiens2Model, ref: str) -> None:
    from safetensors import safe_open

    from sapiens2_cli.weights import read_header, resolve

    resolved = resolve(ref)
    header = read_header(resolved.path)
    bare = "cls_token" in header.shapes
    state = model.state_dict()
    loaded, skipped = 0, []
    with safe_open(resolved.path, framework="pt", device="cpu") as f:
        for key, tensor in state.items():
            file_key = key[len("backbone.") :] if bare and key.startswith("backbone.") else key
            shape = header.shapes.get(file_key)
            if shape is None or tuple(shape) != tuple(tensor.shape):
                skipped.append(key)
                continue
            with torch.no_grad():
                tensor.copy_(f.get_tensor(file_key).to(tensor.dtype))
            loaded += 1
    log.info(
        "model.load_from %s: copied %d tensors; kept %d whose name or shape differ%s",
        ref,
        loaded,
        len(skipped),
        f" ({', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''})" if skipped else "",
    )
