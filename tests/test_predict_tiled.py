"""``--tile``: tiles at native scale through the real pipeline, blended without seams, with
memory bounded by the overlaps."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import FIXTURES
from predict_helpers import predict
from sapiens2_cli import load_model
from sapiens2_cli.tasks import TASKS
from sapiens2_cli.tasks.normal import unit
from sapiens2_cli.tasks.seg import logits_to_labels
from sapiens2_cli.tasks.tiled import AUTO_FACTOR, TiledAccumulator, make_tiler
from sapiens2_cli.tiling import TileBlender, tile_grid, tiled_apply
from sapiens2_cli.transforms import normalize
from sapiens2_cli.weights import save_model

PHOTO = Path(__file__).parent / "data" / "grace_hopper.jpg"  # 600x512


@pytest.mark.parametrize("task", ["albedo", "normal", "seg"])
@pytest.mark.parametrize("size", [(300, 256), (40, 150)])  # the second is padded on its short axis
def test_identity_head_reconstructs_the_image_through_the_task_tiles(task, size):
    rule = TASKS[task].tile_rule
    image = cv2.resize(cv2.imread(str(PHOTO)), size[::-1], interpolation=cv2.INTER_AREA)
    truth = torch.from_numpy(image[..., ::-1].copy()).permute(2, 0, 1).float() / 255 + 0.01  # [3, H, W] in (0, 1.01]
    if task == "seg":  # logits whose argmax is a known label
        truth = torch.nn.functional.one_hot((truth[0] * 28).round().long(), 29).permute(2, 0, 1).float()
    tiler = make_tiler(rule, (64, 48), 16, (64, 48))
    inputs = tiler.prepare(image)
    assert all(i.pixels.shape == (64, 48, 3) for i in inputs)
    acc = TiledAccumulator.of(rule, inputs)
    grid = inputs[0].geometry.grid
    order = list(range(len(inputs)))
    random.Random(0).shuffle(order)  # any arrival order
    for index in order:
        y, x = grid.ys[index // len(grid.xs)], grid.xs[index % len(grid.xs)]
        # the identity head: each tile's output is its own crop of the truth (zeros where padded)
        out = torch.zeros(truth.shape[0], 64, 48)
        crop = truth[:, y : y + 64, x : x + 48]
        out[:, : crop.shape[1], : crop.shape[2]] = crop
        np.testing.assert_array_equal(inputs[index].pixels[: crop.shape[1], : crop.shape[2]],
                                      image[y : y + 64, x : x + 48])  # fmt: skip
        acc.add(index, out)
    got = torch.from_numpy(acc.result()[rule.key])
    if task == "seg":
        torch.testing.assert_close(got.long(), truth.argmax(0), rtol=0, atol=0)
    elif task == "normal":
        torch.testing.assert_close(got, unit(truth).permute(1, 2, 0), rtol=0, atol=2e-6)
    else:
        torch.testing.assert_close(got, truth.clamp(0, 1).permute(1, 2, 0), rtol=0, atol=2e-6)


def test_pending_memory_is_the_overlaps_not_the_frame():
    height, width, tile, overlap, channels = 1024, 768, (128, 96), 24, 4
    grid = tile_grid(height, width, tile, overlap)
    blender = TileBlender(grid)
    for index in range(len(grid)):
        blender.add(index, torch.ones(channels, *tile))
    assert blender.result().shape == (height, width, channels)
    row_overlap = max(tile[0] - (b - a) for a, b in itertools.pairwise(grid.ys))
    col_overlap = max(tile[1] - (b - a) for a, b in itertools.pairwise(grid.xs))
    # (sum + weight) per pending pixel: one overlap strip across the frame and one overlap column
    bound = (channels + 1) * 4 * (row_overlap * width + tile[0] * col_overlap)
    assert 0 < blender.peak_pending_bytes <= bound
    assert blender.peak_pending_bytes < 0.1 * channels * 4 * height * width


def test_auto_threshold_and_overlap_default():
    rule = TASKS["seg"].tile_rule
    tiler = make_tiler(rule, "auto", None, (128, 96))
    assert (tiler.tile_hw, tiler.overlap, tiler.threshold) == ((128, 96), 24, AUTO_FACTOR)
    assert not tiler.applies((192, 144)) and tiler.applies((193, 100)) and tiler.applies((100, 145))
    assert make_tiler(rule, (64, 48), 0, (128, 96)).applies((65, 10))
    assert make_tiler(rule, "off", None, (128, 96)) is None
    assert make_tiler(TASKS["pointmap"].tile_rule, "auto", None, (128, 96)) is None
    with pytest.raises(ValueError, match="shorter side"):
        make_tiler(rule, (64, 48), 48, (128, 96))


def test_cli_tiles_match_the_reference_blend(tmp_path, tiny_models):
    """What the command writes is the blend of the model's tiles: the seg argmax of the blended
    logits, and normals normalised per tile, blended and normalised again."""
    image = cv2.imread(str(PHOTO))[:300, :256]
    cv2.imwrite(str(tmp_path / "photo.png"), image)
    out = tmp_path / "out"
    result = predict(tmp_path / "photo.png", "-o", out, "-t", "seg", "-t", "normal", "--checkpoint", f"seg={tiny_models['seg']}",
                     "--checkpoint", f"normal={tiny_models['normal']}", "--tile", "auto", "--format", "npy", "-b", "3", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["models"]["seg"]["tiling"] == {"tile_hw": [128, 96], "overlap": 24, "threshold": AUTO_FACTOR}
    assert run["timings_s"]["tile_blend"] > 0
    x = normalize(torch.from_numpy(image[None]))[0]
    seg, normal = load_model(tiny_models["seg"]), load_model(tiny_models["normal"])
    with torch.inference_mode():
        logits = tiled_apply(seg, x, tile=(128, 96), overlap=24, batch=3)
        normals = unit(tiled_apply(lambda t: unit(normal(t).transpose(0, 1)).transpose(0, 1), x,
                                   tile=(128, 96), overlap=24, batch=3)).permute(1, 2, 0)  # fmt: skip
    labels = np.load(out / "seg" / "photo.npy")
    assert labels.shape == image.shape[:2]
    assert (labels != logits_to_labels(logits, image.shape[:2]).numpy()).mean() < 1e-4
    got = np.load(out / "normal" / "photo.npy")
    np.testing.assert_allclose(got, normals.numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def smooth_seg(tmp_path_factory):
    """The tiny seg model with bilinear upsampling kernels in its deconvolutions.

    With random kernels the tiny model's maps are rough at the pixel level, which hides any
    seam; bilinear kernels (what trained upsampling heads come close to) give maps that are
    smooth between patch centres, while the backbone's attention and the instance norms of the
    head still make every tile's output depend on the whole tile, as in a released model.
    """
    model = load_model(FIXTURES / "parity" / "seg" / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    k1 = torch.tensor([0.25, 0.75, 0.75, 0.25])
    with torch.no_grad():
        for layer in model.decode_head.deconv_layers:
            if isinstance(layer, torch.nn.ConvTranspose2d):
                cin, cout = layer.weight.shape[:2]
                mix = torch.randn(cin, cout, generator=gen) / cin**0.5
                layer.weight.copy_(mix[:, :, None, None] * (k1[:, None] * k1[None, :]))
    return save_model(model, tmp_path_factory.mktemp("smooth") / "seg.safetensors")


def border_ratio(labels: np.ndarray, tile: tuple[int, int], overlap: int) -> float:
    """How often the label changes across tile borders, relative to everywhere else: the mean
    rate of label changes between neighbouring rows (columns) on the rows (columns) where a
    tile starts or ends, over the same rate on all other rows (columns)."""
    grid = tile_grid(*labels.shape, tile, overlap)
    border, interior = [], []
    for axis, starts, size in ((0, grid.ys, tile[0]), (1, grid.xs, tile[1])):
        rate = (np.diff(labels, axis=axis) != 0).mean(axis=1 - axis)  # change rate between line i and i + 1
        lines = {s - 1 for s in starts[1:]} | {s + size - 1 for s in starts[:-1]}
        border += [rate[i] for i in sorted(lines)]
        interior += [r for i, r in enumerate(rate) if i not in lines]
    return float(np.mean(border) / np.mean(interior))


def test_no_visible_seams_in_a_real_output(tmp_path, smooth_seg):
    image = cv2.imread(str(PHOTO))[:512, :384]  # 4 x 4 tiles of 128x96 abut exactly without overlap
    cv2.imwrite(str(tmp_path / "photo.png"), image)
    ratios = {}
    for overlap in (0, 24):
        out = tmp_path / f"ov{overlap}"
        result = predict(tmp_path / "photo.png", "-o", out, "--checkpoint", smooth_seg, "--input-size", "128x96",
                         "--tile", "128x96", "--tile-overlap", overlap, "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        labels = cv2.imread(str(out / "seg" / "photo.png"), cv2.IMREAD_UNCHANGED)
        assert labels.shape == image.shape[:2]
        ratios[overlap] = border_ratio(labels, (128, 96), overlap)
    print(f"label-change rate on tile borders / elsewhere: {ratios}")
    assert ratios[0] > 2.5  # hard tile borders: the labels jump there (the check can fail)
    assert ratios[24] < 1.5  # blended: tile borders look like anywhere else


def test_pointmap_is_not_tiled(tmp_path, tiny_models):
    args = [PHOTO, "-o", tmp_path / "out", "--checkpoint", tiny_models["pointmap"], "-q"]
    result = predict(*args, "--tile", "128x96")
    assert result.exit_code == 2 and "pointmap cannot be tiled" in result.output and "own" in result.output
    assert not (tmp_path / "out").exists()
    result = predict(*args, "--tile", "auto", "--format", "npy")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "run.json").read_text())["models"]["pointmap"]["tiling"] is None
    assert np.load(tmp_path / "out" / "pointmap" / "grace_hopper.npy").shape == (600, 512, 3)
