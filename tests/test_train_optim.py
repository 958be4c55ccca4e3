"""Parameter groups (weight decay, layer-wise LR decay) and the LR schedule (spec §1.2, §1.3)."""

from __future__ import annotations

import pytest
import torch

from sapiens2_cli.train.config import OptimConfig, ScheduleConfig
from sapiens2_cli.train.optim import (
    build_optimizer,
    build_scheduler,
    clean_name,
    layer_depth,
    lr_factor,
    param_groups,
)


class _Fake(torch.nn.Module):
    """Parameters named like a Sapiens2 estimator with L blocks (shapes are irrelevant)."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
        self.backbone.storage_tokens = torch.nn.Parameter(torch.zeros(1, 8, 4))
        self.backbone.patch_embed = torch.nn.Module()
        self.backbone.patch_embed.projection = torch.nn.Conv2d(3, 4, 1)
        self.backbone.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(num_layers))
        self.backbone.ln1 = torch.nn.RMSNorm(4)
        self.decode_head = torch.nn.Conv2d(4, 2, 1)


def test_layer_depth_rules():
    assert layer_depth("backbone.cls_token", 40) == 0
    assert layer_depth("backbone.patch_embed.projection.weight", 40) == 0
    assert layer_depth("backbone.tokenizer.blocks.1.ffn.w3.weight", 40) == 0
    assert layer_depth("backbone.blocks.0.attn.wq.weight", 40) == 1
    assert layer_depth("backbone.blocks.39.ffn.w12.bias", 40) == 40
    assert layer_depth("backbone.ln1.weight", 40) == 41
    assert layer_depth("decode_head.conv_seg.weight", 40) == 41
    assert layer_depth("module._orig_mod.backbone.blocks.3.ln1.weight", 40) == 4
    assert (
        clean_name("_fsdp_wrapped_module.backbone._fsdp_wrapped_module.blocks.2.x")
        == "backbone.blocks.2.x"
    )


def test_param_groups_match_the_spec_examples():
    # 1B: L = 40, r = 0.9, lr 5e-4 -> embeddings 6.65e-6, block 0 7.39e-6, last block 4.5e-4
    groups = param_groups(
        _Fake(40).named_parameters(), lr=5e-4, weight_decay=0.1, layer_decay=0.9, num_layers=40
    )
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.cls_token"]["lr"] == pytest.approx(6.65e-6, rel=1e-3)
    assert by_name["backbone.blocks.0.weight"]["lr"] == pytest.approx(7.39e-6, rel=1e-3)
    assert by_name["backbone.blocks.39.weight"]["lr"] == pytest.approx(4.5e-4)
    assert by_name["decode_head.weight"]["lr"] == pytest.approx(5e-4)
    assert by_name["backbone.ln1.weight"]["lr"] == pytest.approx(5e-4)
    # weight decay: 0 for 1-D tensors and biases, full for matrices and the 3-D tokens
    assert by_name["backbone.cls_token"]["weight_decay"] == 0.1
    assert by_name["backbone.storage_tokens"]["weight_decay"] == 0.1
    assert by_name["backbone.blocks.5.weight"]["weight_decay"] == 0.1
    assert by_name["backbone.blocks.5.bias"]["weight_decay"] == 0.0
    assert by_name["backbone.ln1.weight"]["weight_decay"] == 0.0
    assert by_name["decode_head.bias"]["weight_decay"] == 0.0
    # 0.4B (L = 24, r = 0.8): embeddings 1.89e-6;  5B (L = 56, r = 0.94, 1e-4): 2.94e-6
    small = param_groups(
        _Fake(24).named_parameters(), lr=5e-4, weight_decay=0.1, layer_decay=0.8, num_layers=24
    )
    assert small[0]["lr"] == pytest.approx(1.89e-6, rel=2e-3)
    big = param_groups(
        _Fake(56).named_parameters(), lr=1e-4, weight_decay=0.1, layer_decay=0.94, num_layers=56
    )
    assert big[0]["lr"] == pytest.approx(2.94e-6, rel=2e-3)
    flat = param_groups(
        _Fake(2).named_parameters(), lr=1e-3, weight_decay=0.1, layer_decay=None, num_layers=2
    )
    assert {g["lr"] for g in flat} == {1e-3}


def test_lr_schedule_linear_and_cosine():
    cfg = ScheduleConfig()  # 500 warm-up iterations from 1e-3, linear decay to 0
    assert lr_factor(0, iterations=20000, base_lr=5e-4, cfg=cfg) == pytest.approx(1e-3)
    assert lr_factor(250, iterations=20000, base_lr=5e-4, cfg=cfg) == pytest.approx(
        1e-3 + 0.999 * 0.5
    )
    assert lr_factor(500, iterations=20000, base_lr=5e-4, cfg=cfg) == 1.0
    assert lr_factor(10250, iterations=20000, base_lr=5e-4, cfg=cfg) == pytest.approx(0.5)
    assert lr_factor(20000, iterations=20000, base_lr=5e-4, cfg=cfg) == 0.0
    cosine = ScheduleConfig(warmup_iters=1000, decay="cosine", final_lr=1e-7)
    assert lr_factor(1000 + 249500, iterations=500000, base_lr=1e-4, cfg=cosine) == pytest.approx(
        0.5 + 0.5e-3
    )
    assert lr_factor(500000, iterations=500000, base_lr=1e-4, cfg=cosine) == pytest.approx(1e-3)


def test_optimizer_and_scheduler_drive_group_lrs():
    model = _Fake(2)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, layer_decay=0.5), num_layers=2)
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    scheduler = build_scheduler(
        optimizer, ScheduleConfig(warmup_iters=2), iterations=4, base_lr=1e-3
    )
    lrs = []
    for _ in range(4):
        lrs.append(sorted(g["lr"] for g in optimizer.param_groups))
        optimizer.step()
        scheduler.step()
    # depth scales r^3 (embeddings), r^2 (block 0), r (block 1), 1 (head); factors per step
    scales = (1 / 8, 1 / 4, 1 / 2, 1.0)
    for got, factor in zip(lrs, (1e-3, 0.5005, 1.0, 0.5), strict=True):
        assert sorted(set(got)) == pytest.approx(sorted(1e-3 * factor * s for s in scales))
