"""Student and EMA teacher: one ``step`` computes every pretraining loss term for a batch.

Who sees what (spec/training.md §5.1; the choices marked [I] there):

- the student encodes each **masked** global view once (visible cells only); that single pass
  feeds both the MAE decoder (reconstructing the masked cells) and the DINO head (its
  ``[cls]`` token), so the contrastive branch costs no extra global pass;
- the student encodes the local crops **unmasked** (they have no reconstruction target, and
  masking a 28x21-cell crop further would starve the class token);
- the teacher encodes the **unmasked** global views, without gradients;
- KoLeo acts on the student's global ``[cls]`` tokens (backbone output, before the head),
  per global view, averaged over the views.

The teacher (backbone + DINO head) starts as an exact copy of the student and follows it by
EMA after every optimizer step (``update_teacher``); its backbone is what pretraining
releases (``export_teacher``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from sapiens2_cli.models.backbone import Sapiens2Backbone
from sapiens2_cli.models.layers import LayerScale
from sapiens2_cli.models.sapiens2 import ModelInfo, Sapiens2Model
from sapiens2_cli.pretrain.config import PretrainConfig
from sapiens2_cli.pretrain.heads import DINOHead, MAEDecoder, reconstruction_target
from sapiens2_cli.pretrain.losses import (
    DINOLoss,
    koleo_loss,
    norm_pix_loss,
    weighted_total,
)
from sapiens2_cli.pretrain.schedules import teacher_momentum, teacher_temperature

NO_DECAY_NAMES = ("cls_token", "storage_tokens", "mask_token", "pos_embed", "w_cls")


def init_weights(module: nn.Module, *, layer_scale: float = 1e-4) -> None:
    """From-scratch init: linear weights truncated-normal (std 0.02), biases 0, tokens N(0, 0.02).

    Convolutions keep PyTorch's default (fan-in uniform), norms 1, LayerScale ``layer_scale``.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, LayerScale):
            nn.init.constant_(m.weight, layer_scale)
    for name, p in module.named_parameters():
        if name.rsplit(".", 1)[-1] in ("cls_token", "storage_tokens", "w_cls", "local_pos_embed", "mask_token"):
            nn.init.normal_(p, std=0.02)


class PretrainModel(nn.Module):
    """``student`` (backbone, DINO head), ``decoder`` (MAE), ``teacher`` (EMA copy), ``dino_loss``.

    Batch (from ``data.collate``): ``global_crops`` ``[B, G, 3, H, W]``, ``local_crops``
    ``[B, L, 3, h, w]`` (``L`` may be 0), ``keep`` ``[B, G, K]`` and ``masked`` ``[B, G, M]``
    (cell indices per global view, ``masking.Masks``). Images are ImageNet-normalised RGB.
    """

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.arch = cfg.model.build_arch()
        dim = self.arch.embed_dims
        backbone = Sapiens2Backbone(self.arch)
        backbone.grad_checkpointing = cfg.model.grad_checkpointing
        unit = self.arch.stride // cfg.decoder.target_downsample
        self.student = nn.ModuleDict(
            {
                "backbone": backbone,
                "dino_head": DINOHead(
                    dim,
                    prototypes=cfg.dino.prototypes,
                    hidden_dims=cfg.dino.hidden_dims,
                    bottleneck_dims=cfg.dino.bottleneck_dims,
                ),
            }
        )
        self.decoder = MAEDecoder(
            dim,
            unit * unit * self.arch.in_channels,
            num_prefix=backbone.num_prefix,
            dims=cfg.decoder.dims,
            layers=cfg.decoder.layers,
            heads=cfg.decoder.heads,
        )
        init_weights(self.student, layer_scale=cfg.model.layer_scale_init)
        init_weights(self.decoder)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.dino_loss = DINOLoss(
            cfg.dino.prototypes,
            student_temp=cfg.dino.student_temp,
            center_momentum=cfg.dino.center_momentum,
        )

    def train(self, mode: bool = True) -> PretrainModel:
        super().train(mode)
        self.teacher.eval()  # never trained by gradients
        return self

    def forward(self, batch: dict[str, torch.Tensor], it: int) -> dict[str, torch.Tensor]:
        return self.step(batch, it)

    def step(self, batch: dict[str, torch.Tensor], it: int) -> dict[str, torch.Tensor]:
        """All loss terms for one batch at optimizer step ``it``.

        Returns scalars ``loss`` (weighted total, the one to back-propagate), ``mae``,
        ``dino``, ``koleo`` and ``teacher_temp``. In training mode the DINO centre is
        updated with this batch's teacher logits (after the loss has used the old centre).
        """
        cfg = self.cfg
        glob = batch["global_crops"]
        b, g = glob.shape[:2]
        views = glob.transpose(0, 1).flatten(0, 1)  # [G*B, 3, H, W], view-major
        keep = batch["keep"].transpose(0, 1).flatten(0, 1)  # [G*B, K]
        masked = batch["masked"].transpose(0, 1).flatten(0, 1)  # [G*B, M]
        backbone, head = self.student["backbone"], self.student["dino_head"]

        tokens, grid = backbone.forward_tokens(views, keep)  # [G*B, P+K, D]
        pred = self.decoder(tokens, keep, masked, grid)  # [G*B, M, unit^2*3]
        target = reconstruction_target(views, self.arch.stride, cfg.decoder.target_downsample)
        mae = norm_pix_loss(pred, target, masked, eps=cfg.decoder.norm_pix_eps)

        cls = [tokens[:, 0]]  # [G*B, D]
        local = batch.get("local_crops")
        if local is not None and local.shape[1] > 0:
            local_tokens, _ = backbone.forward_tokens(local.transpose(0, 1).flatten(0, 1))
            cls.append(local_tokens[:, 0])  # [L*B, D]
        student_logits = head(torch.cat(cls)).unflatten(0, (-1, b))  # [G+L, B, K]

        with torch.no_grad():
            t_tokens, _ = self.teacher["backbone"].forward_tokens(views)
            teacher_logits = self.teacher["dino_head"](t_tokens[:, 0]).unflatten(0, (g, b))  # [G, B, K]
        temp = teacher_temperature(
            it,
            start=cfg.dino.teacher_temp_start,
            end=cfg.dino.teacher_temp,
            warmup=cfg.dino.teacher_temp_warmup_iters,
        )
        dino = self.dino_loss(student_logits, self.dino_loss.teacher_probs(teacher_logits, temp))
        koleo = torch.stack([koleo_loss(c) for c in tokens[:, 0].unflatten(0, (g, b))]).mean()
        if self.training:
            self.dino_loss.update_center(teacher_logits)

        terms = {"mae": mae, "dino": dino, "koleo": koleo}
        total = weighted_total(terms, mae=cfg.loss.mae, dino=cfg.loss.dino, koleo=cfg.loss.koleo)
        return {"loss": total, **terms, "teacher_temp": torch.tensor(temp)}

    def momentum(self, it: int) -> float:
        """Teacher EMA momentum after optimizer step ``it`` (cosine 0.992 -> 1 over the run)."""
        d = self.cfg.dino
        return teacher_momentum(it, start=d.momentum_start, end=d.momentum_end, total=self.cfg.optim.iters)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter-wise."""
        t_params = list(self.teacher.parameters())
        s_params = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters split into decayed and not decayed.

        No decay for 1-D tensors (norm weights, biases, LayerScale), any ``.bias``, and the
        position / special tokens (cls, storage, mask, window cls, position embeddings).
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or name.endswith(".bias") or any(t in name for t in NO_DECAY_NAMES)
            (no_decay if skip else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def export_teacher(
        self, path: str | os.PathLike, *, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
    ) -> Path:
        """Write the teacher backbone as a release-layout pretrain checkpoint (bare keys)."""
        with torch.device("meta"):
            model = Sapiens2Model("pretrain", self.arch, None)
        model.backbone.load_state_dict(self.teacher["backbone"].state_dict(), assign=True)
        model.info = ModelInfo(
            task="pretrain", arch=self.arch, head=None, input_size=tuple(self.cfg.crops.global_size)
        )
        from sapiens2_cli.weights import save_model

        return save_model(model, path, dtype=dtype, metadata=metadata)
