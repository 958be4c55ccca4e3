"""Streamed pretraining data: walk order, sharding, exact resume, corrupt images, multi-crop."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pretrain_synthetic import single_thread  # noqa: F401 - autouse fixture

from sapiens2_cli.pretrain.augment import MultiCrop
from sapiens2_cli.pretrain.config import PretrainAugment
from sapiens2_cli.pretrain.data import PretrainStream, make_loader
from sapiens2_cli.pretrain.sources import IMAGE_SUFFIXES, detect_kind, walk


def pixel_stats(image: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """A cheap transform: the image mean and one random draw (to check the per-sample RNG)."""
    return {"mean": torch.tensor(float(image.mean())), "draw": torch.tensor(rng.random())}


def png(value: int, size: int = 8) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((size, size, 3), value, np.uint8))
    assert ok
    return buf.tobytes()


def make_folder(root: Path, n: int) -> list[str]:
    """``n`` PNGs spread over nested folders; returns their relative names."""
    names = []
    for i in range(n):
        rel = Path(f"a{i % 3}") / (f"b{i % 2}" if i % 4 else "") / f"img{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png(i))
        names.append(rel.as_posix())
    (root / ".hidden.png").write_bytes(png(1))
    (root / "notes.txt").write_text("not an image")
    return sorted(names)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(root: Path, shards: int, per_shard: int) -> list[str]:
    """WebDataset shards ``part-XX.tar`` holding ``<key>.png`` + ``<key>.json``."""
    keys = []
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"part-{s:02d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"sample{s:02d}_{i:02d}"
                add_member(tar, f"{key}.png", png(10 * s + i))
                add_member(tar, f"{key}.json", b"{}")
                keys.append(f"part-{s:02d}.tar/{key}")
    return sorted(keys)


def stream(root: Path, **kw) -> PretrainStream:
    kw.setdefault("shuffle_window", 3)
    return PretrainStream(root, pixel_stats, seed=0, **kw)


def first_epoch_keys(root: Path, *, rank: int, world: int, workers: int, batches: int) -> list[str]:
    loader = make_loader(stream(root, num_workers=workers, rank=rank, world_size=world), batch_size=1)
    keys = []
    for _, batch in zip(range(batches), loader):
        if batch["position"][1]["epoch"] == 0:
            keys += batch["keys"]
    return keys


def test_walk_is_sorted_lazy_and_resumable(tmp_path):
    names = make_folder(tmp_path, 12)
    walked = ["/".join(p) for p in walk(tmp_path, IMAGE_SUFFIXES)]
    assert walked == sorted(names, key=lambda n: n.split("/"))
    start = tuple(walked[5].split("/"))
    assert ["/".join(p) for p in walk(tmp_path, IMAGE_SUFFIXES, start=start)] == walked[5:]
    assert detect_kind(tmp_path) == "folder"


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_two_ranks_two_workers_are_disjoint_and_complete(tmp_path, kind):
    if kind == "folder":
        expected = make_folder(tmp_path, 23)
        per_consumer = 6
    else:
        expected = make_shards(tmp_path, 6, 4)
        per_consumer = 8  # 6 shards over 4 consumers: 2, 2, 1, 1 shards of 4 samples
    assert detect_kind(tmp_path) == kind
    seen = []
    for rank in range(2):
        keys = first_epoch_keys(tmp_path, rank=rank, world=2, workers=2, batches=2 * (per_consumer + 1))
        assert len(keys) == len(set(keys))
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    assert sorted(seen[0] | seen[1]) == expected


@pytest.mark.parametrize("kind", ["folder", "tar"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_serves_exactly_the_next_sample(tmp_path, kind, workers):
    if kind == "folder":
        make_folder(tmp_path, 11)
    else:
        make_shards(tmp_path, 3, 4)
    reference = stream(tmp_path, num_workers=workers)
    batches = iter(make_loader(reference, batch_size=2))
    for _ in range(5):  # odd: the next batch comes from the second worker, mid-window
        reference.note(next(batches))
    state = reference.state_dict()
    expected = [next(batches) for _ in range(9)]  # runs into the next epoch
    del batches
    resumed = stream(tmp_path, num_workers=workers)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(9), make_loader(resumed, batch_size=2))]
    assert [b["keys"] for b in got] == [b["keys"] for b in expected]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["draw"], b["draw"]) and torch.equal(a["mean"], b["mean"])
    assert max(b["position"][1]["epoch"] for b in got) >= 1


def test_resume_rejects_a_changed_layout(tmp_path):
    make_folder(tmp_path, 4)
    state = stream(tmp_path, num_workers=0).state_dict()
    with pytest.raises(ValueError, match="world_size was 1, now 2"):
        stream(tmp_path, num_workers=0, rank=0, world_size=2).load_state_dict(state)


def test_epochs_reshuffle_windows(tmp_path):
    names = make_folder(tmp_path, 9)
    keys = [b["keys"][0] for _, b in zip(range(18), make_loader(stream(tmp_path, shuffle_window=9), batch_size=1))]
    assert sorted(keys[:9]) == sorted(keys[9:]) == names
    assert keys[:9] != keys[9:]


def test_corrupt_images_and_shards_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "folder"
    make_folder(folder, 6)
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(png(3)[:20])
    s = stream(folder, shuffle_window=4)
    loader = make_loader(s, batch_size=1)
    keys = []
    for _, batch in zip(range(6), loader):
        s.note(batch)
        keys += batch["keys"]
    assert len(set(keys)) == 6 and not any(k.startswith(("garbage", "empty", "truncated")) for k in keys)
    # the corrupt files come after a2/ in walk order, so they are met once the epoch is done
    batch = next(iter(make_loader(s, batch_size=1)))
    assert batch["position"][1]["epoch"] == 1
    assert batch["position"][1]["corrupt"] == 3

    shards = tmp_path / "shards"
    make_shards(shards, 2, 3)
    with tarfile.open(shards / "part-00.tar", "a") as tar:
        add_member(tar, "zz_bad.png", b"not a png at all")
    data = (shards / "part-01.tar").read_bytes()
    (shards / "part-01.tar").write_bytes(data[: 512 * 5 + 40])  # cut inside sample01_01.png
    s = stream(shards, shuffle_window=2)
    served = [b for _, b in zip(range(4), make_loader(s, batch_size=1))]
    keys = [b["keys"][0] for b in served]
    assert sorted(keys) == [
        "part-00.tar/sample00_00",
        "part-00.tar/sample00_01",
        "part-00.tar/sample00_02",
        "part-01.tar/sample01_00",
    ]
    for b in served:
        s.note(b)
    counts = s.counts()
    assert counts["served"] == 4
    following = next(iter(make_loader(s, batch_size=1)))
    assert following["position"][1]["corrupt"] == 1 and following["position"][1]["bad_shards"] == 1


def test_a_consumer_without_shards_fails_loudly(tmp_path):
    make_shards(tmp_path, 1, 2)
    with pytest.raises(RuntimeError, match="consumer 1 of 2 found no readable image"):
        next(iter(make_loader(stream(tmp_path, rank=1, world_size=2), batch_size=1)))


def test_multicrop_views_masks_and_determinism():
    mc = MultiCrop(PretrainAugment(local_size=(32, 32), num_local=3), global_size=(64, 48), grid=(4, 3))
    image = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    a = mc(image, np.random.default_rng(5))
    b = mc(image, np.random.default_rng(5))
    c = mc(image, np.random.default_rng(6))
    assert a["global_crops"].shape == (2, 3, 64, 48) and a["local_crops"].shape == (3, 3, 32, 32)
    assert a["keep"].shape == (2, 3) and a["masked"].shape == (2, 9)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["global_crops"], c["global_crops"])
    # global views are colour-clean: a constant image stays exactly the normalised constant
    flat = np.full((40, 30, 3), (10, 128, 250), np.uint8)
    views = mc(flat, np.random.default_rng(1))
    expected = torch.tensor([(250 - 123.675) / 58.395, (128 - 116.28) / 57.12, (10 - 103.53) / 57.375])
    torch.testing.assert_close(views["global_crops"][:, :, 0, 0], expected.expand(2, 3))
    assert views["global_crops"].amax(dim=(2, 3)).sub(views["global_crops"].amin(dim=(2, 3))).abs().max() < 1e-6
