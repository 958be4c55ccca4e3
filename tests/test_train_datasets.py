"""Seg and dense folder datasets, augmentations, mixture, sampler (tiny folders in tmp dirs)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from train_folders import dense_folder, image, person_label, seg_folder

from sapiens2_cli.train.config import resolve
from sapiens2_cli.train.datasets import (
    DenseFolder,
    Mixture,
    build_dataset,
    collate,
    to_model_input,
)
from sapiens2_cli.train.files import DataError, read_label
from sapiens2_cli.train.sampler import InfiniteSampler
from sapiens2_cli.train.seg_dataset import SegFolder

H, W = 64, 48  # the tiny recipes' input size
SEG_OFF = [
    "augment.resize_ratio=[1.0, 1.0]",
    "augment.crop.p=0",
    "augment.blur.p=0",
    "augment.noise.p=0",
    "augment.rotate.p=0",
    "augment.photometric.p=0",
]
DENSE_OFF = ["augment.scale.p=0", "augment.crop.p=0"]
NORMAL_OFF = [
    *DENSE_OFF,
    "augment.photometric.p=0",
    "augment.down_up.p=0",
    "augment.blur.p=0",
    "augment.noise.p=0",
    "augment.solarize.p=0",
]


# --------------------------------------------------------------------------- seg
def test_seg_flip_mirrors_and_swaps_classes(tmp_path):
    root = seg_folder(tmp_path / "seg", [person_label()])
    cfg = resolve("seg/tiny", [*SEG_OFF, "augment.flip.p=1"])
    folder = SegFolder(root, augment=cfg.augment, input_size=(H, W))
    out = folder.sample(0, np.random.default_rng(0), train=True)
    image = cv2.imread(str(root / "images" / "im0.png"))
    flipped = person_label()[:, ::-1]
    expected = flipped.copy()
    expected[flipped == 5] = 14  # left foot <-> right foot
    expected[flipped == 14] = 5
    assert torch.equal(out["label"], torch.from_numpy(expected.astype(np.int64)))
    assert torch.equal(out["image"], to_model_input(image[:, ::-1]))
    assert out["name"] == "im0"


def test_seg_val_keeps_label_resolution_and_normalisesimage(tmp_path):
    label = person_label(40, 30)
    root = seg_folder(tmp_path / "seg", [label])
    image = np.zeros((40, 30, 3), np.uint8)
    image[...] = (10, 20, 30)  # BGR
    cv2.imwrite(str(root / "images" / "im0.png"), image)
    cfg = resolve("seg/tiny")
    out = SegFolder(root, augment=cfg.augment, input_size=(H, W)).sample(
        0, np.random.default_rng(0), train=False
    )
    assert out["image"].shape == (3, H, W) and out["label"].shape == (40, 30)
    assert torch.equal(out["label"], torch.from_numpy(label.astype(np.int64)))
    rgb = torch.tensor([(30 - 123.675) / 58.395, (20 - 116.28) / 57.12, (10 - 103.53) / 57.375])
    assert torch.allclose(out["image"][:, 5, 5], rgb)


def test_seg_training_samples_are_deterministic_per_draw(tmp_path):
    root = seg_folder(tmp_path / "seg", [person_label(), person_label(80, 60)])
    cfg = resolve("seg/tiny", [f"data.train={root}"])
    dataset = build_dataset(cfg, split="train")
    first, again, other = dataset[(1, 7)], dataset[(1, 7)], dataset[(1, 8)]
    assert first["image"].shape == (3, H, W) and first["label"].shape == (H, W)
    assert torch.equal(first["image"], again["image"]) and torch.equal(
        first["label"], again["label"]
    )
    assert not torch.equal(first["image"], other["image"])
    assert set(torch.unique(first["label"]).tolist()) <= {0, 3, 5, 14, 255}


def test_rejected_samples_are_redrawn(tmp_path):
    empty = np.zeros((H, W), np.uint8)  # no foreground: rejected at load
    root = seg_folder(tmp_path / "seg", [empty, person_label(), empty])
    cfg = resolve("seg/tiny", [f"data.train={root}"])
    dataset = build_dataset(cfg, split="train")
    assert {dataset[(i % 3, i)]["name"] for i in range(6)} == {"im1"}
    only_empty = seg_folder(tmp_path / "empty", [empty])
    cfg = resolve("seg/tiny", [f"data.train={only_empty}", "data.max_retries=5"])
    with pytest.raises(DataError, match="no sample passed the recipe's filters in 5 redraws"):
        build_dataset(cfg, split="train")[(0, 0)]


def test_seg_file_errors_name_the_file(tmp_path):
    root = seg_folder(tmp_path / "a", [person_label()])
    (root / "labels" / "im0.png").unlink()
    with pytest.raises(DataError, match=r"labels: no file for 1 of 1 images \(im0\)"):
        SegFolder(root, augment=resolve("seg/tiny").augment, input_size=(H, W))
    root = seg_folder(tmp_path / "b", [person_label()])
    cv2.imwrite(str(root / "labels" / "im0.png"), np.zeros((10, 10), np.uint8))
    folder = SegFolder(root, augment=resolve("seg/tiny").augment, input_size=(H, W))
    with pytest.raises(
        DataError, match=r"im0.png: size 10x10 differs from image im0.png \(48x64\)"
    ):
        folder.sample(0, np.random.default_rng(0), train=False)
    bad = person_label()
    bad[0, 0] = 40
    root = seg_folder(tmp_path / "c", [bad])
    folder = SegFolder(root, augment=resolve("seg/tiny").augment, input_size=(H, W))
    with pytest.raises(DataError, match="label value 40 is neither a class id"):
        folder.sample(0, np.random.default_rng(0), train=False)
    (root / "images" / "im0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="im0.png: cannot be decoded as an image"):
        folder.sample(0, np.random.default_rng(0), train=False)


def test_class_map_remaps_and_custom_classes(tmp_path):
    label = np.full((H, W), 7, np.uint8)
    label[:, :10] = 40
    root = seg_folder(tmp_path / "seg", [label])
    (root / "classes.json").write_text(
        json.dumps(
            {
                "classes": ["bg", "left_arm", "right_arm"],
                "remap": {"40": 1, "7": None},
            }
        )
    )
    folder = SegFolder(root, augment=resolve("seg/tiny").augment, input_size=(H, W))
    assert folder.classes.names == ("bg", "left_arm", "right_arm") and folder.classes.weights == (
        1.0,
        1.0,
        1.0,
    )
    assert folder.classes.flip_lut[:3].tolist() == [0, 2, 1]
    out = folder.sample(0, np.random.default_rng(0), train=False)["label"]
    assert set(out[:, :10].unique().tolist()) == {1} and set(out[:, 10:].unique().tolist()) == {255}


def _write_palette_png(path: Path, indices: np.ndarray, palette: np.ndarray) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    h, w = indices.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in indices.astype(np.uint8))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
        + chunk(b"PLTE", palette.astype(np.uint8).tobytes())
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_indexed_png_labels_read_as_indices(tmp_path):
    palette = np.zeros((256, 3), np.uint8)
    palette[:29] = np.random.default_rng(0).integers(0, 256, (29, 3))
    palette[255] = (255, 255, 254)
    indices = np.random.default_rng(1).integers(0, 29, (9, 7)).astype(np.uint8)
    indices[0, 0] = 255
    _write_palette_png(tmp_path / "l.png", indices, palette)
    assert np.array_equal(read_label(tmp_path / "l.png"), indices)


# --------------------------------------------------------------------------- dense tasks


def _normals(h: int = H, w: int = W) -> np.ndarray:
    n = np.random.default_rng(5).normal(size=(h, w, 3)).astype(np.float32)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def test_normal_flip_negates_x(tmp_path):
    mask = np.zeros((H, W), bool)
    mask[5:60, 3:30] = True
    n = _normals()
    root = dense_folder(tmp_path / "n", "normal", n, mask=mask)
    cfg = resolve("normal/tiny", [*NORMAL_OFF, "augment.flip.p=1"])
    folder = DenseFolder(root, task="normal", augment=cfg.augment, input_size=(H, W))
    out = folder.sample(0, np.random.default_rng(0), train=True)
    expected = np.where(mask[..., None], n, 0)[:, ::-1] * np.array([-1, 1, 1], np.float32)
    assert torch.allclose(
        out["normal"], torch.from_numpy(expected.transpose(2, 0, 1).copy()), atol=1e-6
    )
    assert torch.equal(out["mask"], torch.from_numpy(mask[:, ::-1].copy()))
    assert out["pad"].tolist() == [0, 0, 0, 0]


def test_normal_val_pads_image_and_keeps_native_targets(tmp_path):
    n = _normals(40, 24) * 2.5  # not unit length: renormalised at load
    n[0, 0] = np.nan
    root = dense_folder(tmp_path / "n", "normal", n, ext=".npy")
    folder = DenseFolder(
        root, task="normal", augment=resolve("normal/tiny").augment, input_size=(H, W)
    )
    out = folder.sample(0, np.random.default_rng(0), train=False)
    # s = min(48 / 24, 64 / 40) = 1.6 -> 38 x 64, padding 10 columns split 5 / 5
    assert out["image"].shape == (3, H, W) and out["pad"].tolist() == [5, 5, 0, 0]
    assert (
        out["normal"].shape == (3, 40, 24)
        and not out["mask"][0, 0]
        and out["mask"].sum() == 40 * 24 - 1
    )
    assert torch.allclose(out["normal"][:, 1, 1], torch.from_numpy(n[1, 1] / 2.5), atol=1e-6)
    pad_value = (0 - 123.675) / 58.395
    assert torch.allclose(out["image"][0, :, :5], torch.full((H, 5), pad_value))


def test_pointmap_targets_are_canonical_and_follow_the_flip(tmp_path):
    k = {"fx": 40.0, "fy": 42.0, "cx": 23.5, "cy": 31.0}
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    depth = (2.0 + 0.01 * u + 0.02 * v).astype(np.float32)
    mask = np.ones((H, W), bool)
    mask[:8] = False
    root = dense_folder(tmp_path / "p", "pointmap", depth, mask=mask, k=k)
    cfg = resolve("pointmap/tiny", [*DENSE_OFF, "augment.photometric.p=0"])
    folder = DenseFolder(root, task="pointmap", augment=cfg.augment, input_size=(H, W))
    out = folder.sample(0, np.random.default_rng(0), train=False)
    s = 48.0 / 40.0  # canonical focal of the tiny recipe / f_x
    z = depth[20, 7]
    expected = np.array([(7 - 23.5) * z / 40.0, (20 - 31.0) * z / 42.0, z]) * s
    assert out["pointmap"][:, 20, 7].numpy() == pytest.approx(expected, rel=1e-5)
    assert out["scale"].item() == pytest.approx(s) and out["pointmap"][:, 3, 3].abs().sum() == 0
    assert out["mean_depth"].item() == pytest.approx(float(depth[8:].mean()) * s, rel=1e-5)
    assert out["intrinsics"][0, 2].item() == 23.5
    flip_cfg = resolve("pointmap/tiny", [*DENSE_OFF, "augment.photometric.p=0", "augment.flip.p=1"])
    flipped = DenseFolder(
        root, task="pointmap", augment=flip_cfg.augment, input_size=(H, W)
    ).sample(0, np.random.default_rng(0), train=True)
    # c_x = (W - 1) / 2: the mirrored pixel sees X negated, Y and Z unchanged
    assert flipped["pointmap"][:, 20, W - 1 - 7].numpy() == pytest.approx(
        expected * [-1, 1, 1], rel=1e-5
    )
    assert flipped["intrinsics"][0, 2].item() == pytest.approx(W - 1 - 23.5)
    xyz = np.stack([u, v, depth], -1).astype(np.float32)  # a stored H x W x 3 map: Z is used
    root3 = dense_folder(tmp_path / "p3", "pointmap", xyz, mask=mask, k=k)
    again = DenseFolder(root3, task="pointmap", augment=cfg.augment, input_size=(H, W)).sample(
        0, np.random.default_rng(0), train=False
    )
    assert torch.allclose(again["pointmap"], out["pointmap"])


def test_albedo_png_exr_and_rejection(tmp_path):
    rng = np.random.default_rng(2)
    albedo_bgr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    root = dense_folder(tmp_path / "a", "albedo", albedo_bgr, ext=".png")
    folder = DenseFolder(
        root, task="albedo", augment=resolve("albedo/tiny").augment, input_size=(H, W)
    )
    out = folder.sample(0, rng, train=False)
    assert torch.allclose(
        out["albedo"][:, 4, 6], torch.from_numpy(albedo_bgr[4, 6, ::-1] / 255.0).float()
    )
    linear = np.full((H, W, 3), 0.5, np.float32)
    linear[0, 0] = 0.001
    root = dense_folder(tmp_path / "b", "albedo", linear)
    folder = DenseFolder(
        root, task="albedo", augment=resolve("albedo/tiny").augment, input_size=(H, W)
    )
    out = folder.sample(0, rng, train=False)
    assert out["albedo"][0, 1, 1].item() == pytest.approx(
        1.055 * 0.5 ** (1 / 2.4) - 0.055, rel=1e-6
    )
    assert out["albedo"][0, 0, 0].item() == pytest.approx(12.92 * 0.001, rel=1e-5)
    assert folder.sample(0, rng, train=True) is None  # near-constant albedo is rejected


def test_dense_folder_errors(tmp_path):
    root = dense_folder(tmp_path / "n", "normal", _normals(32, 24))
    with pytest.raises(DataError, match=r"a.exr: size 24x32 differs from image a.jpg \(48x64\)"):
        cv2.imwrite(str(root / "images" / "a.jpg"), image(np.random.default_rng(0)))
        DenseFolder(
            root, task="normal", augment=resolve("normal/tiny").augment, input_size=(H, W)
        ).load(0)
    root = dense_folder(tmp_path / "p", "pointmap", np.ones((H, W), np.float32))
    with pytest.raises(DataError, match=r"intrinsics: no file for 1 of 1 images \(a\)"):
        DenseFolder(
            root, task="pointmap", augment=resolve("pointmap/tiny").augment, input_size=(H, W)
        )
    (root / "intrinsics").mkdir()
    (root / "intrinsics" / "a.json").write_text('{"fx": 1}')
    folder = DenseFolder(
        root, task="pointmap", augment=resolve("pointmap/tiny").augment, input_size=(H, W)
    )
    with pytest.raises(DataError, match="a.json: intrinsics JSON needs 'K'"):
        folder.load(0)


# --------------------------------------------------------------------------- mixture / sampler / collate
class _Counting:
    def __init__(self, n: int, tag: str) -> None:
        self.n, self.tag = n, tag

    def __len__(self) -> int:
        return self.n

    def sample(self, index, rng, *, train):
        return {"tag": self.tag, "index": index}


def test_mixture_repeat_and_subsample():
    mix = Mixture([(_Counting(10, "a"), 2, 1), (_Counting(9, "b"), 1, 3)], seed=0, train=True)
    assert len(mix) == 20 + 3
    assert [mix[i]["index"] for i in (0, 9, 10, 19)] == [0, 9, 0, 9]
    picks = [mix[(21, d)]["index"] for d in range(30)]  # b index 1 -> 3 + randint(3)
    assert {mix[(21, d)]["tag"] for d in range(3)} == {"b"} and set(picks) == {3, 4, 5}
    with pytest.raises(IndexError):
        mix[23]


def test_sampler_is_deterministic_sharded_and_resumable():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    one = take(InfiniteSampler(7, seed=3), 14)
    assert sorted(i for i, _ in one[:7]) == list(range(7)) and sorted(
        i for i, _ in one[7:]
    ) == list(range(7))
    assert [d for _, d in one] == list(range(14)) and one[:7] != one[7:]
    r0 = take(InfiniteSampler(7, seed=3, rank=0, world_size=2), 7)
    r1 = take(InfiniteSampler(7, seed=3, rank=1, world_size=2), 7)
    assert sorted(r0 + r1, key=lambda x: x[1]) == one
    assert take(InfiniteSampler(7, seed=3, start=5), 9) == one[5:]


def test_collate_stacks_equal_shapes_and_lists_the_rest():
    batch = collate(
        [
            {"image": torch.zeros(3, 4, 4), "label": torch.zeros(5, 5), "name": "a"},
            {"image": torch.ones(3, 4, 4), "label": torch.zeros(6, 5), "name": "b"},
        ]
    )
    assert (
        batch["image"].shape == (2, 3, 4, 4)
        and isinstance(batch["label"], list)
        and batch["name"] == ["a", "b"]
    )


def test_mixed_folders_must_share_their_classes(tmp_path):
    a = seg_folder(tmp_path / "a", [person_label()])
    b = seg_folder(tmp_path / "b", [person_label()])
    (b / "classes.json").write_text(json.dumps({"classes": ["bg", "person"]}))
    cfg = resolve("seg/tiny", [f"data.train=[{a}, {a}, {b}]"])
    with pytest.raises(DataError, match="b: its classes / keypoints differ from those of"):
        build_dataset(cfg, split="train")
    mix = build_dataset(
        resolve("seg/tiny", [f"data.train=[{a}, {{path: {a}, repeat: 2}}]"]), split="train"
    )
    assert len(mix) == 3 and mix.folders[0].classes.num_classes == 29
