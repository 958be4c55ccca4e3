"""RTMDet "SepBN" detection head: conv towers shared across levels, BatchNorms per level.

Attribute names reproduce the ``bbox_head.*`` keys of the published mmdet checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from sapiens2_cli.models.cspnext import ConvBNAct

STRIDES = (8, 16, 32)


class RTMDetSepBNHead(nn.Module):
    """One-class RTMDet head (``share_conv=True``, ``exp_on_reg=True``, 1x1 predictors).

    For each level ``l`` (stride ``s = 8, 16, 32``) and input ``P_l [B, 192, H_l, W_l]``:

    * ``cls_logit_l = rtm_cls[l](cls_convs[l](P_l))``: ``[B, 1, H_l, W_l]`` raw person logit;
    * ``dist_l = exp(rtm_reg[l](reg_convs[l](P_l))) * s``: ``[B, 4, H_l, W_l]`` distances
      (left, top, right, bottom) from the prior point to the box sides, in input pixels.

    ``cls_convs[l][i].conv`` is *one* module for all three levels (the checkpoint lists its
    weight under the three level keys, which alias one storage); each level keeps its own
    ``bn``. ``rtm_cls`` / ``rtm_reg`` are separate per level.
    """

    def __init__(self, *, channels: int = 192, stacked_convs: int = 2) -> None:
        super().__init__()
        self.strides = STRIDES
        self.cls_convs = self._towers(channels, stacked_convs)
        self.reg_convs = self._towers(channels, stacked_convs)
        self.rtm_cls = nn.ModuleList(nn.Conv2d(channels, 1, 1) for _ in STRIDES)
        self.rtm_reg = nn.ModuleList(nn.Conv2d(channels, 4, 1) for _ in STRIDES)

    @staticmethod
    def _towers(channels: int, depth: int) -> nn.ModuleList:
        towers = nn.ModuleList(
            nn.Sequential(*(ConvBNAct(channels, channels, 3) for _ in range(depth)))
            for _ in STRIDES
        )
        for tower in towers[1:]:
            for layer, first in zip(tower, towers[0], strict=True):
                layer.conv = first.conv  # shared conv weight, per-level BatchNorm
        return towers

    def forward(
        self, feats: tuple[torch.Tensor, ...]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``feats`` (P3, P4, P5) -> (cls logits per level, box distances per level)."""
        cls_scores: list[torch.Tensor] = []
        bbox_preds: list[torch.Tensor] = []
        for level, (feat, stride) in enumerate(zip(feats, self.strides, strict=True)):
            cls_scores.append(self.rtm_cls[level](self.cls_convs[level](feat)))
            reg = self.rtm_reg[level](self.reg_convs[level](feat))
            bbox_preds.append(reg.exp() * stride)
        return cls_scores, bbox_preds
