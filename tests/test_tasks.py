"""Every registered task: the files it renders are exactly the files it declares (skip-existing
relies on it), in every format, with and without overlays."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import TINY_INPUT_SIZES
from sapiens2_cli import load_model
from sapiens2_cli.engine import unbatch
from sapiens2_cli.sources import Item
from sapiens2_cli.tasks import TASK_NAMES, TASKS
from sapiens2_cli.transforms import normalize

PHOTO = Path(__file__).parent / "data" / "grace_hopper.jpg"


def test_registry_names():
    assert tuple(TASKS) == TASK_NAMES
    assert all(task.name == name for name, task in TASKS.items())
    assert set(TINY_INPUT_SIZES) == set(TASKS)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_rendered_files_are_the_declared_files(name, tiny_models):
    task = TASKS[name]
    image = cv2.imread(str(PHOTO))[:300, :200]
    inputs = task.prepare(image, TINY_INPUT_SIZES[name])
    model = load_model(tiny_models[name])
    with torch.inference_mode():
        raw = task.forward(model, normalize(torch.from_numpy(np.stack([i.pixels for i in inputs]))))
        pred = task.postprocess([unbatch(raw, i) for i in range(len(inputs))], inputs, image.shape[:2])
    item = Item(PHOTO, "sub/photo")
    for fmt in task.formats:
        for vis in (False, True):
            files = task.render(pred, image, fmt, vis)
            assert list(files) == task.files(fmt, vis)
            paths = [spec.path(Path("OUT"), name, item) for spec in files]
            assert len(set(paths)) == len(paths)
            assert all(p.parts[:2] == ("OUT", "vis") if s.vis else p.parts[:2] == ("OUT", name)
                       for p, s in zip(paths, files, strict=True))  # fmt: skip
            for content in files.values():
                if content.kind in ("png", "jpg", "exr") or content.kind == "npy" and name != "pretrain":
                    assert content.data.shape[0] == 300
