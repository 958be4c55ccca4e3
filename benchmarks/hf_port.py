"""The same weights in Hugging Face transformers' Sapiens2 classes (benchmark-only peer).

``hf_model(ours)`` builds ``transformers``' ``Sapiens2Model`` (backbone) or
``Sapiens2ForSemanticSegmentation`` / ``Sapiens2ForPoseEstimation`` (task models) with a
config that matches our architecture, and copies our tensors onto its keys with the table
below. transformers computes RoPE in float32 and rotates q/k in the activation dtype, where the
official model (and ours) rounds tables and rotation to bfloat16: ``bf16_rope`` patches that
one difference away so a check can show it is the only one.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from sapiens2_cli.models.rope import apply_rope
from sapiens2_cli.models.sapiens2 import Sapiens2Model

# (our key pattern, transformers key template); backbone keys under ``backbone.``, head keys
# under ``decode_head.``. ``ffn.w12`` is split in halves: gate (first) and up (second).
BACKBONE_KEYS: tuple[tuple[str, str], ...] = (
    (r"cls_token", "embeddings.cls_token"),
    (r"storage_tokens", "embeddings.register_tokens"),
    (r"patch_embed\.projection\.(weight|bias)", "embeddings.patch_embeddings.{0}"),
    (r"blocks\.(\d+)\.ln1\.weight", "model.layer.{0}.norm1.weight"),
    (r"blocks\.(\d+)\.ln2\.weight", "model.layer.{0}.norm2.weight"),
    (r"blocks\.(\d+)\.attn\.wq\.(weight|bias)", "model.layer.{0}.attention.q_proj.{1}"),
    (r"blocks\.(\d+)\.attn\.wk\.(weight|bias)", "model.layer.{0}.attention.k_proj.{1}"),
    (r"blocks\.(\d+)\.attn\.wv\.(weight|bias)", "model.layer.{0}.attention.v_proj.{1}"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", "model.layer.{0}.attention.o_proj.{1}"),
    (r"blocks\.(\d+)\.attn\.q_norm\.weight", "model.layer.{0}.attention.q_norm.weight"),
    (r"blocks\.(\d+)\.attn\.k_norm\.weight", "model.layer.{0}.attention.k_norm.weight"),
    (r"blocks\.(\d+)\.attn\.gamma\.weight", "model.layer.{0}.layer_scale1.lambda1"),
    (r"blocks\.(\d+)\.ffn\.w12\.(weight|bias)", "model.layer.{0}.mlp.gate_proj.{1}|model.layer.{0}.mlp.up_proj.{1}"),
    (r"blocks\.(\d+)\.ffn\.w3\.(weight|bias)", "model.layer.{0}.mlp.down_proj.{1}"),
    (r"ln1\.weight", "norm.weight"),
    (r"rope_embed\.periods", ""),  # transformers derives its float32 frequencies from the config
)
# seg / pose heads: deconvolutions at Sequential slots 0, 3, 6, ... and 1x1 convs likewise
HEAD_KEYS: tuple[tuple[str, str], ...] = (
    (r"deconv_layers\.(\d+)\.weight", "upsample_layers.{0/3}.convolution.weight"),
    (r"conv_layers\.(\d+)\.(weight|bias)", "conv_layers.{0/3}.convolution.{1}"),
    (r"conv_(?:seg|pose)\.(weight|bias)", "predictor.{0}"),
)
HF_TASK_CLASSES = {"seg": "Sapiens2ForSemanticSegmentation", "pose": "Sapiens2ForPoseEstimation"}


def _target(table: tuple[tuple[str, str], ...], key: str) -> str:
    for pattern, template in table:
        m = re.fullmatch(pattern, key)
        if m is None:
            continue
        groups = m.groups()
        out = template
        for i, g in enumerate(groups):
            if f"{{{i}/3}}" in out:  # Sequential slot -> layer index (conv, norm, act per layer)
                out = out.replace(f"{{{i}/3}}", str(int(g) // 3))
            out = out.replace(f"{{{i}}}", g)
        return out
    raise KeyError(f"no transformers key for {key!r}: extend the table in benchmarks/hf_port.py")


def hf_state_dict(ours: Sapiens2Model) -> dict[str, torch.Tensor]:
    """Our tensors under transformers' key names (``model.`` prefix for task models)."""
    task_model = ours.decode_head is not None
    out: dict[str, torch.Tensor] = {}
    for key, tensor in ours.state_dict().items():
        if key.startswith("backbone."):
            target = _target(BACKBONE_KEYS, key[len("backbone.") :])
            if not target:
                continue
            if task_model:
                target = "|".join("model." + t for t in target.split("|"))
        else:
            target = "decode_head." + _target(HEAD_KEYS, key[len("decode_head.") :])
        if "|" in target:  # w12: [2F, ...] -> gate [F, ...], up [F, ...]
            gate, up = target.split("|")
            out[gate], out[up] = (t.clone() for t in tensor.chunk(2, dim=0))
        else:
            out[target] = tensor
    return out


def hf_config(ours: Sapiens2Model, image_size: tuple[int, int]):  # noqa: ANN201 - Sapiens2Config
    """A ``Sapiens2Config`` describing our architecture (and head, for seg / pose)."""
    from transformers import Sapiens2Config

    arch = ours.backbone.arch
    if arch.use_tokenizer:
        raise ValueError("transformers' Sapiens2 has no 4K tokenizer; compare the plain sizes")
    kwargs = {}
    if ours.decode_head is not None:
        if ours.task not in HF_TASK_CLASSES:
            raise ValueError(f"no transformers class compared for task {ours.task!r}")
        head = ours.info.head if ours.info is not None else None
        if head is None:
            raise ValueError("the task model has no head description (model.info.head)")
        kwargs = dict(
            num_labels=head.out_channels,
            head_config=dict(
                upsample_out_channels=list(head.deconv_out_channels),
                upsample_kernel_sizes=list(head.deconv_kernel_sizes),
                conv_out_channels=list(head.conv_out_channels),
                conv_kernel_sizes=list(head.conv_kernel_sizes),
            ),
        )
    return Sapiens2Config(
        hidden_size=arch.embed_dims,
        intermediate_size=arch.feedforward_channels,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads_per_layer=list(arch.kv_heads),
        num_register_tokens=arch.n_storage_tokens,
        patch_size=arch.patch_size,
        num_channels=arch.in_channels,
        image_size=list(image_size),
        rope_theta=arch.rope_base,
        use_qk_norm=arch.use_qk_norm,
        query_bias=arch.qkv_bias,
        key_bias=arch.qkv_bias,
        value_bias=arch.qkv_bias,
        use_gated_mlp=True,
        pos_embed_rescale=None,
        **kwargs,
    )


def hf_model(ours: Sapiens2Model, image_size: tuple[int, int], *, attn: str = "sdpa") -> nn.Module:
    """transformers' model holding ``ours``' weights (same dtype and device), in eval mode."""
    import transformers

    config = hf_config(ours, image_size)
    config._attn_implementation = attn
    cls_name = "Sapiens2Model" if ours.decode_head is None else HF_TASK_CLASSES[ours.task]
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(config)
    state = hf_state_dict(ours)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise KeyError(f"key table incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    rope = model.model.rope_embeddings if ours.decode_head is not None else model.rope_embeddings
    device = ours.backbone.cls_token.device
    arch = ours.backbone.arch
    # the non-persistent buffer transformers computes at init (left on meta by the meta build)
    rope.inv_freq = 1 / arch.rope_base ** torch.arange(0, 1, 4 / arch.head_dim, device=device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unset in the transformers model: {left[:5]}")
    return model.eval()


def hf_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tensor comparable with ours: the task output, or the feature map ``[B, D, h, w]``."""
    out = model(pixel_values=x)
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "heatmaps"):
        return out.heatmaps
    config = model.config
    tokens = out.last_hidden_state[:, 1 + config.num_register_tokens :]  # [B, h*w, D]
    b, _, dim = tokens.shape
    h, w = x.shape[-2] // config.patch_size, x.shape[-1] // config.patch_size
    return tokens.transpose(1, 2).reshape(b, dim, h, w)


@contextlib.contextmanager
def bf16_rope(ours: Sapiens2Model) -> Iterator[None]:
    """Make transformers' Sapiens2 rotate q/k exactly as the official model: bf16 tables and math."""
    from transformers.models.sapiens2 import modeling_sapiens2 as hf

    rope_embed = ours.backbone.rope_embed
    stride = ours.backbone.arch.stride
    tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = pixel_values.shape[-2] // stride, pixel_values.shape[-1] // stride
        sin, cos = rope_embed.tables(h, w)
        tables["sin"], tables["cos"] = sin, cos
        return cos, sin

    def rotate(q, k, cos, sin, **_):  # noqa: ANN001, ANN202 - transformers' signature
        sin, cos = tables["sin"], tables["cos"]
        return apply_rope(q, sin, cos), apply_rope(k, sin, cos)

    saved = hf.Sapiens2RopePositionEmbedding.forward, hf.apply_rotary_pos_emb
    hf.Sapiens2RopePositionEmbedding.forward = rope_forward
    hf.apply_rotary_pos_emb = rotate
    try:
        yield
    finally:
        hf.Sapiens2RopePositionEmbedding.forward, hf.apply_rotary_pos_emb = saved
