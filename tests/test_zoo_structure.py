"""Every released architecture, built on the meta device, has exactly the official keys and shapes."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SPEC
from sapiens2_cli.models.arch import ARCHS, infer_arch
from sapiens2_cli.models.heads import infer_head, official_head
from sapiens2_cli.models.rope import rope_periods
from sapiens2_cli.models.sapiens2 import Sapiens2Model
from sapiens2_cli.models.zoo import ZOO

BACKBONES = json.loads((SPEC / "data" / "backbone_state_dict.json").read_text())["archs"]
HEADS = json.loads((SPEC / "data" / "task_heads_state_dict.json").read_text())["tasks"]
PERIODS = json.loads((SPEC / "data" / "rope_periods_bf16.json").read_text())["periods_by_head_dim"]


def _meta_state(task, size):
    arch = ARCHS[size]
    head = None if task == "pretrain" else official_head(task, size, arch.embed_dims)
    with torch.device("meta"):
        model = Sapiens2Model(task, arch, head)
    return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("size", list(ARCHS))
def test_backbone_keys_match_release(size):
    spec = BACKBONES["sapiens2_" + size.replace("-", "_")]
    expected = {k: (shape, dtype) for k, shape, dtype in spec["state_dict"]}
    got = {k.removeprefix("backbone."): v for k, v in _meta_state("pretrain", size).items()}
    assert got == expected
    assert len(got) == spec["num_tensors"]
    assert infer_arch({k: s for k, (s, _) in expected.items()}) == ARCHS[size]


@pytest.mark.parametrize(
    "task,size", [(t, s) for t, sizes in HEADS.items() for s in sizes], ids=lambda v: str(v)
)
def test_head_keys_match_release(task, size):
    spec = HEADS[task][size]
    expected = {k: shape for k, shape in spec["decode_head_state_dict"]}
    state = _meta_state(task, size)
    got = {k: shape for k, (shape, _) in state.items() if k.startswith("decode_head.")}
    assert got == expected
    assert sum(k.startswith("backbone.") for k in state) == spec["num_backbone_tensors"]
    inferred = infer_head({k.removeprefix("decode_head."): s for k, s in expected.items()})
    assert inferred == official_head(task, size, ARCHS[size].embed_dims)


def test_every_zoo_record_builds():
    for record in ZOO.values():
        state = _meta_state(record.task, record.size)
        assert ("backbone.cls_token" in state) and (record.task == "pretrain") == (
            not any(k.startswith("decode_head.") for k in state)
        )


@pytest.mark.parametrize("head_dim", sorted(PERIODS, key=int))
def test_rope_periods_are_the_official_bf16_values(head_dim):
    periods = rope_periods(int(head_dim))
    assert periods.dtype == torch.bfloat16
    assert periods.float().tolist() == PERIODS[head_dim]
