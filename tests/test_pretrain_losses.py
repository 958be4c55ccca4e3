"""Each pretraining loss term and schedule against a hand computation on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
from pretrain_synthetic import single_thread  # noqa: F401 - autouse fixture

from sapiens2_cli.pretrain.config import PretrainLoss
from sapiens2_cli.pretrain.losses import (
    DINOLoss,
    koleo_loss,
    norm_pix_loss,
    weighted_total,
)
from sapiens2_cli.pretrain.schedules import (
    teacher_momentum,
    teacher_temperature,
)
from sapiens2_cli.train.config import resolve
from sapiens2_cli.train.optim import lr_factor


def test_norm_pix_loss_by_hand():
    # one sample, three cells of four values; cells 0 and 2 are masked
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0], [0.0, 0.0, 2.0, 2.0]]])
    masked = torch.tensor([[0, 2]])
    pred = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0]]])
    eps = 1e-6
    # cell 0: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    t0 = [(v - 2.5) / math.sqrt(5 / 3 + eps) for v in (1, 2, 3, 4)]
    # cell 2: mean 1, unbiased var 4 / 3
    t2 = [(v - 1.0) / math.sqrt(4 / 3 + eps) for v in (0, 0, 2, 2)]
    e0 = sum((0.0 - t) ** 2 for t in t0) / 4
    e2 = sum((p - t) ** 2 for p, t in zip((1, -1, 1, -1), t2)) / 4
    expected = (e0 + e2) / 2
    got = norm_pix_loss(pred, target, masked, eps=eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert e0 == pytest.approx(0.75, rel=1e-5)  # zero prediction: (P - 1) / P
    # the unmasked cell never enters the loss
    target2 = target.clone()
    target2[0, 1] = torch.tensor([5.0, -3.0, 8.0, 1.0])
    assert norm_pix_loss(pred, target2, masked, eps=eps).item() == got.item()


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_dino_cross_entropy_pairs_and_centering_by_hand():
    loss = DINOLoss(3, student_temp=0.1, center_momentum=0.9)
    loss.center.copy_(torch.tensor([0.1, -0.2, 0.0]))
    # S = 3 student views (2 global + 1 local), T = 2 teacher views, B = 1, K = 3
    s = [[0.2, -0.1, 0.4], [0.0, 0.3, -0.3], [0.5, 0.5, -0.2]]
    t = [[0.3, 0.1, -0.2], [-0.4, 0.2, 0.1]]
    tau_t = 0.065
    q = [_softmax([(tj[k] - c) / tau_t for k, c in enumerate((0.1, -0.2, 0.0))]) for tj in t]
    logp = [[math.log(p) for p in _softmax([v / 0.1 for v in si])] for si in s]

    def ce(j: int, i: int) -> float:
        return -sum(q[j][k] * logp[i][k] for k in range(3))

    pairs = [(1, 0), (0, 1), (0, 2), (1, 2)]  # (teacher j, student i): no view with itself
    expected = sum(ce(j, i) for j, i in pairs) / 4
    teacher_logits = torch.tensor(t)[:, None]  # [T, B=1, K]
    probs = loss.teacher_probs(teacher_logits, tau_t)
    for j in range(2):
        assert probs[j, 0].tolist() == pytest.approx(q[j], rel=1e-5, abs=1e-9)
    got = loss(torch.tensor(s)[:, None], probs)
    assert got.item() == pytest.approx(expected, rel=1e-6)

    loss.accumulate(teacher_logits)
    assert loss.center.tolist() == pytest.approx([0.1, -0.2, 0.0])  # moves once per step
    loss.update_center()
    mean_t = [(a + b) / 2 for a, b in zip(*t)]
    expected_center = [0.9 * c + 0.1 * m for c, m in zip((0.1, -0.2, 0.0), mean_t)]
    assert loss.center.tolist() == pytest.approx(expected_center, rel=1e-6)


def test_centre_moves_once_per_step_with_the_mean_of_its_micro_batches():
    """Two accumulated micro-batches move the centre like one batch holding both."""
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    split, whole = DINOLoss(5, center_momentum=0.8), DINOLoss(5, center_momentum=0.8)
    split.accumulate(a)
    split.accumulate(b)
    split.update_center()
    whole.accumulate(torch.cat([a, b], dim=1))
    whole.update_center()
    torch.testing.assert_close(split.center, whole.center)
    torch.testing.assert_close(split.center, 0.2 * torch.cat([a, b], dim=1).mean(dim=(0, 1)))
    before = split.center.clone()
    split.update_center()  # nothing pending: no change
    assert torch.equal(split.center, before)


def test_dino_averages_over_the_batch():
    loss = DINOLoss(4)
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 4), torch.randn(2, 5, 4)
    probs = loss.teacher_probs(t, 0.07)
    per_sample = [loss(s[:, b : b + 1], probs[:, b : b + 1]) for b in range(5)]
    assert loss(s, probs).item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-6)


def test_koleo_by_hand():
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 2.0]])
    eps = 1e-8
    z = [[1.0, 0.0], [0.0, 1.0], [1 / math.sqrt(5), 2 / math.sqrt(5)]]
    # nearest neighbours by cosine: 0 -> 2 (0.447 > 0), 1 -> 2 (0.894), 2 -> 1 (0.894 > 0.447)
    nn = [2, 2, 1]

    def dist(a, b):
        return math.sqrt(sum((ai - bi + eps) ** 2 for ai, bi in zip(a, b)))

    expected = -sum(math.log(dist(z[i], z[nn[i]]) + eps) for i in range(3)) / 3
    assert koleo_loss(x, eps=eps).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(x[:1])


def test_weighted_total_uses_the_paper_weights():
    w = PretrainLoss()
    assert (w.mae.weight, w.dino.weight, w.koleo.weight) == (1.0, 0.4, 0.04)
    terms = {"mae": torch.tensor(0.5), "dino": torch.tensor(2.0), "koleo": torch.tensor(-1.0)}
    got = weighted_total(terms, mae=w.mae.weight, dino=w.dino.weight, koleo=w.koleo.weight)
    assert got.item() == pytest.approx(0.5 + 0.8 - 0.04)


def test_schedules_by_hand():
    assert teacher_temperature(0, start=0.065, end=0.07, warmup=1000) == pytest.approx(0.065)
    assert teacher_temperature(500, start=0.065, end=0.07, warmup=1000) == pytest.approx(0.0675)
    assert teacher_temperature(1000, start=0.065, end=0.07, warmup=1000) == pytest.approx(0.07)
    assert teacher_temperature(10**6, start=0.065, end=0.07, warmup=1000) == pytest.approx(0.07)
    assert teacher_momentum(0, start=0.992, end=1.0, total=100) == pytest.approx(0.992)
    assert teacher_momentum(50, start=0.992, end=1.0, total=100) == pytest.approx(0.996)
    assert teacher_momentum(100, start=0.992, end=1.0, total=100) == pytest.approx(1.0)


def test_pretrain_learning_rate_is_the_papers_warm_up_and_cosine():
    """The shared schedule with the base recipe: linear warm-up over 1k steps, cosine to 1e-7."""
    cfg = resolve("pretrain/1b", ["train.iterations=3000"])
    kw = {"iterations": 3000, "base_lr": cfg.optim.lr, "cfg": cfg.schedule}
    lr = [cfg.optim.lr * lr_factor(s, **kw) for s in (0, 500, 1000, 2000, 3000)]
    assert lr == pytest.approx([1e-7, 0.5 * (1e-4 + 1e-7), 1e-4, (1e-4 + 1e-7) / 2, 1e-7], rel=1e-3)
