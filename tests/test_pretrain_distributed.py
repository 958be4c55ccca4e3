"""Two gloo processes: DDP over the student, rank-sharded data, one shared DINO centre."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pretrain_synthetic import make_images, write_folder

from sapiens2_cli.pretrain.config import load_recipe
from sapiens2_cli.pretrain.data import make_loader
from sapiens2_cli.pretrain.model import PretrainModel
from sapiens2_cli.pretrain.run import build_stream


def _worker(rank: int, tmp: str, data: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    try:
        cfg = load_recipe("tiny")
        cfg.data = dataclasses.replace(cfg.data, batch_size=4, shuffle_window=4)
        stream = build_stream(cfg, data)  # rank and world size from the process group
        torch.manual_seed(cfg.seed)
        model = PretrainModel(cfg).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3)
        keys = []
        for it, batch in zip(range(3), make_loader(stream, batch_size=4)):
            keys += batch["keys"]
            terms = ddp(batch, it)
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
            model.update_teacher(model.momentum(it))
        checksum = {
            "student": float(sum(p.double().sum() for p in model.student.parameters())),
            "teacher": float(sum(p.double().sum() for p in model.teacher.parameters())),
            "center": model.dino_loss.center.tolist(),
        }
        Path(tmp, f"rank{rank}.json").write_text(json.dumps({"keys": keys, **checksum}))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_run(tmp_path):
    data = tmp_path / "data"
    write_folder(data, make_images(8, seed=5, size=72)[0])
    os.environ.pop("RANK", None)
    mp.spawn(_worker, args=(str(tmp_path), str(data)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert len(r0["keys"]) == len(r1["keys"]) == 12
    assert not set(r0["keys"]) & set(r1["keys"])  # each rank streams its own shard
    assert r0["student"] == r1["student"] and r0["teacher"] == r1["teacher"]  # DDP kept them equal
    assert r0["center"] == r1["center"] and any(c != 0 for c in r0["center"])  # centre all-reduced
