"""The three pretraining objectives: norm-pix reconstruction, DINO self-distillation, KoLeo.

Total (spec/training.md §5.1): ``L = w_mae * L_MAE + w_dino * L_DINO + w_koleo * L_KoLeo`` with
weights 1.0 / 0.4 / 0.04. Every loss is computed in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def norm_pix_loss(
    pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """Mean squared error against per-cell standardised pixels, over masked cells only.

    ``pred`` ``[B, M, P]`` (decoder output for the masked cells), ``target`` ``[B, N, P]`` (all
    cells, ``reconstruction_target``), ``masked`` ``[B, M]`` cell indices. With
    ``t = target[b, masked[b, m]]``, ``mu = mean(t)``, ``var = sum((t - mu)^2) / (P - 1)``
    (unbiased, as MAE), ``t_hat = (t - mu) / sqrt(var + eps)``:

        L_MAE = 1/(B*M) * sum_{b,m} 1/P * sum_p (pred[b,m,p] - t_hat[p])^2

    Every sample masks the same ``M`` cells, so this also equals the mean over views of the
    per-view mean over masked cells.
    """
    t = target.gather(1, masked[..., None].expand(-1, -1, target.shape[-1])).float()  # [B, M, P]
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True)
    t = (t - mean) / torch.sqrt(var + eps)
    return (pred.float() - t).pow(2).mean(dim=-1).mean()


class DINOLoss(nn.Module):
    """DINO cross-entropy between student and centred, sharpened teacher distributions.

    Student views ``s_i`` (``i < S``: the ``T`` global views first, in the teacher's order,
    then the local views), teacher views ``t_j`` (``j < T``, the global views). With
    ``p_i = softmax(s_i / tau_s)`` and ``q_j = softmax((t_j - c) / tau_t)``:

        L_DINO = 1/|pairs| * sum_{(i, j) in pairs} mean_b( -sum_k q_j[b,k] log p_i[b,k] )

    over every pair with ``i != j``: global-global across views (never a view with itself)
    and every local with every global; local-local pairs do not exist (teachers are global).
    The centre ``c`` ``[K]`` is an EMA of the teacher's mean logits over one optimizer step's
    whole batch: ``c <- m * c + (1 - m) * mean_{j,b} t_j[b]``, the mean taken over every
    micro-batch (``accumulate``) and every rank (``update_center``). Every micro-batch of a
    step is therefore centred with the same ``c``, and an accumulated or multi-rank step sees
    the same centre as one process with the whole batch.
    """

    center: torch.Tensor

    def __init__(self, prototypes: int, *, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(prototypes))
        # pending sum of micro-batch means, zero between optimizer steps; a plain attribute (not
        # a buffer) so that no state dict carries it and DDP does not broadcast it
        self._pending: torch.Tensor | None = None
        self._pending_count = 0

    def teacher_probs(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """``[T, B, K]`` logits -> ``[T, B, K]`` probabilities ``softmax((t - c) / temp)``."""
        return F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """``student_logits`` ``[S, B, K]``, ``teacher_probs`` ``[T, B, K]`` -> scalar."""
        s, t = student_logits.shape[0], teacher_probs.shape[0]
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        cross = -torch.einsum("tbk,sbk->ts", teacher_probs, log_p) / log_p.shape[1]  # [T, S]
        pairs = ~torch.eye(t, s, dtype=torch.bool, device=cross.device)  # i != j
        return cross[pairs].mean()

    @torch.no_grad()
    def accumulate(self, teacher_logits: torch.Tensor) -> None:
        """Add the mean of this micro-batch's ``[T, B, K]`` teacher logits to the pending update."""
        mean = teacher_logits.float().mean(dim=(0, 1))  # [K]
        self._pending = mean if self._pending is None else self._pending + mean
        self._pending_count += 1

    @torch.no_grad()
    def update_center(self) -> None:
        """Apply the pending update (once per optimizer step; collective when distributed).

        Every rank must have accumulated the same number of micro-batches (all ranks run the
        same steps); a step without any is a no-op everywhere.
        """
        if self._pending is None:
            return
        batch_center = self._pending / self._pending_count
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            batch_center /= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
        self._pending, self._pending_count = None, 0


def koleo_loss(x: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser (DINOv2) over a batch ``[B, D]``, ``B >= 2``.

    With ``z_b = x_b / |x_b|`` and ``n(b) = argmax_{a != b} <z_a, z_b>`` (nearest neighbour):

        L_KoLeo = -1/B * sum_b log(|z_b - z_n(b) + eps|_2 + eps)

    (``eps`` inside the norm is ``F.pairwise_distance``'s). Spreads the embeddings apart.
    """
    if x.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 samples per batch, got {x.shape[0]}")
    z = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = z @ z.t()
        dots.fill_diagonal_(-2.0)  # below any cosine: never its own neighbour
        nearest = dots.argmax(dim=1)
    dist_nn = F.pairwise_distance(z, z[nearest], p=2, eps=eps)
    return -torch.log(dist_nn + eps).mean()


def weighted_total(
    terms: dict[str, torch.Tensor], *, mae: float = 1.0, dino: float = 0.4, koleo: float = 0.04
) -> torch.Tensor:
    """``mae * terms["mae"] + dino * terms["dino"] + koleo * terms["koleo"]``."""
    return mae * terms["mae"] + dino * terms["dino"] + koleo * terms["koleo"]
