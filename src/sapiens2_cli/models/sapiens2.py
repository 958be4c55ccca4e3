"""A Sapiens2 model: the backbone plus the head of one task (or no head, for pretrain)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from sapiens2_cli.models.arch import BackboneArch
from sapiens2_cli.models.attention import fuse_qkv
from sapiens2_cli.models.backbone import Sapiens2Backbone
from sapiens2_cli.models.heads import HeadConfig, build_head

TaskName = Literal["pretrain", "seg", "pose", "normal", "albedo", "pointmap"]
TASK_NAMES: tuple[str, ...] = ("pretrain", "seg", "pose", "normal", "albedo", "pointmap")
DEFAULT_INPUT_SIZE = (1024, 768)  # H, W: what every released model was trained at


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is and where it came from."""

    task: TaskName
    arch: BackboneArch
    head: HeadConfig | None
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE  # H, W pixels
    size: str | None = None  # released size name when the architecture is one ("0.4b", ...)
    source: str = ""  # the reference it was loaded from
    path: str = ""  # the local file
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


class Sapiens2Model(nn.Module):
    """``decode_head(backbone(x))``.

    ``forward`` takes a normalised ``[B, 3, H, W]`` float tensor and returns the raw head
    output: seg logits ``[B, 29, H, W]``, pose heatmaps ``[B, 308, H/4, W/4]``, normals
    ``[B, 3, H, W]``, albedo ``[B, 3, H, W]``, pointmap ``([B, 3, H, W], scale [B, 1])``, or
    for ``pretrain`` the backbone feature map ``[B, D, H/16, W/16]``.
    """

    def __init__(self, task: TaskName, arch: BackboneArch, head: HeadConfig | None) -> None:
        super().__init__()
        if (task == "pretrain") != (head is None):
            raise ValueError(f"task {task!r} and head {head!r} do not go together")
        self.task = task
        self.backbone = Sapiens2Backbone(arch)
        self.decode_head = build_head(head) if head is not None else None
        self.info: ModelInfo | None = None

    def fuse_qkv(self) -> Sapiens2Model:
        """One q/k/v projection per attention layer, for inference; returns ``self``.

        ``state_dict()``, ``save_model`` and ``load_state_dict`` keep the released
        ``wq``/``wk``/``wv`` keys. Idempotent.
        """
        fuse_qkv(self)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)  # [B, D, h, w]
        if self.decode_head is None:
            return features
        return self.decode_head(features)
