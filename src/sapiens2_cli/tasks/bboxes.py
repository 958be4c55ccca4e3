"""Person boxes: the ``--bboxes FILE`` reader, the demo's greedy NMS and the whole-image fallback.

Accepted ``--bboxes`` JSON shapes (boxes in image pixels):

1. Per-image mapping::

       {"<path relative to the input root>": [[x1, y1, x2, y2], [x1, y1, x2, y2, score], ...], ...}

   ``score`` defaults to 1. An empty list means "no person" (the caller's fallback applies).
2. COCO annotations (ground-truth style)::

       {"images": [{"id": 1, "file_name": "a.jpg"}, ...],
        "annotations": [{"image_id": 1, "bbox": [x, y, w, h], "category_id": 1}, ...],
        "categories": [{"id": 1, "name": "person"}, ...]}          # optional

3. COCO detection results next to an image list, in one dict::

       {"images": [...], "detections": [{"image_id": 1, "bbox": [x, y, w, h], "score": 0.9,
                                         "category_id": 1}, ...]}    # key "results" also accepted

In shapes 2 and 3, ``bbox`` is COCO ``xywh`` (``x2 = x + w``, ``y2 = y + h``); only the person
category is kept (the id of the category named ``person`` when ``categories`` is given, else
1); an entry without ``category_id`` counts as a person; ``iscrowd: 1`` regions are skipped;
``score`` defaults to 1. Images listed without boxes map to an empty array. A bare results list
(no file names) is rejected.

Lookup (:meth:`BoxFile.boxes_for`) is by path relative to the input root, with ``\\`` and
leading ``./`` normalised; when that fails, a file name that is unique in the file is used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

#: Defaults of the official demo (``--bbox-thr``, ``--nms-thr``).
BBOX_SCORE_THRESHOLD = 0.3
NMS_IOU_THRESHOLD = 0.3
_RESULT_KEYS = ("annotations", "detections", "results")


class BoxFileError(ValueError):
    """A ``--bboxes`` file is unreadable or malformed; the message names the file and the reason."""


def _normalise(path: str) -> str:
    p = PurePosixPath(path.replace("\\", "/")).as_posix()
    while p.startswith("./"):
        p = p[2:]
    return p


@dataclass(frozen=True)
class BoxFile:
    """Boxes per image from a ``--bboxes`` file.

    Attributes:
        path: the file read.
        boxes: normalised relative image path -> ``[M, 5]`` float32 ``(x1, y1, x2, y2, score)``.
    """

    path: Path
    boxes: dict[str, np.ndarray]

    def boxes_for(self, relative_path: str) -> np.ndarray | None:
        """``[M, 5]`` boxes of one image, or ``None`` when the file does not list it."""
        key = _normalise(relative_path)
        if key in self.boxes:
            return self.boxes[key]
        name = PurePosixPath(key).name
        matches = [k for k in self.boxes if PurePosixPath(k).name == name]
        if len(matches) > 1:
            raise BoxFileError(
                f"{self.path}: {relative_path!r} is not listed and its file name matches several "
                f"entries ({', '.join(sorted(matches)[:3])}); use paths relative to the input root"
            )
        return self.boxes[matches[0]] if matches else None


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {value!r} is not a finite number")
    return float(value)


def _xyxy_row(values: object, where: str) -> list[float]:
    if not isinstance(values, list) or len(values) not in (4, 5):
        raise ValueError(
            f"{where}: a box must be a list [x1, y1, x2, y2] or [x1, y1, x2, y2, score], "
            f"got {values!r}"
        )
    row = [_number(v, where) for v in values] + ([1.0] if len(values) == 4 else [])
    if row[2] < row[0] or row[3] < row[1]:
        raise ValueError(f"{where}: x2 < x1 or y2 < y1 in {values!r} (boxes are x1, y1, x2, y2)")
    return row


def _stack(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


def _from_mapping(data: dict) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, boxes in data.items():
        if not isinstance(boxes, list):
            raise ValueError(f"entry {key!r}: expected a list of boxes, got {type(boxes).__name__}")
        name = _normalise(key)
        if name in out:
            raise ValueError(f"entry {key!r}: the same image is listed twice")
        out[name] = _stack([_xyxy_row(b, f"entry {key!r} box {i}") for i, b in enumerate(boxes)])
    return out


def _person_category(data: dict) -> int:
    categories = data.get("categories")
    if categories is None:
        return 1
    ids = [c.get("id") for c in categories if isinstance(c, dict) and c.get("name") == "person"]
    if len(ids) != 1:
        raise ValueError(f"'categories' must name exactly one 'person' category, found {len(ids)}")
    return ids[0]


def _from_coco(data: dict) -> dict[str, np.ndarray]:
    keys = [k for k in _RESULT_KEYS if k in data]
    if len(keys) != 1:
        raise ValueError(
            f"a dict with 'images' needs exactly one of {list(_RESULT_KEYS)}, "
            f"found {keys or 'none'}"
        )
    images, entries = data["images"], data[keys[0]]
    if not isinstance(images, list) or not isinstance(entries, list):
        raise ValueError(f"'images' and {keys[0]!r} must be lists")
    names: dict[object, str] = {}
    for i, image in enumerate(images):
        if (
            not isinstance(image, dict)
            or not isinstance(image.get("id"), (int, str))
            or not isinstance(image.get("file_name"), str)
        ):
            raise ValueError(f"images[{i}] needs an 'id' and a 'file_name' string, got {image!r}")
        if image["id"] in names:
            raise ValueError(f"images[{i}]: image id {image['id']!r} appears twice")
        names[image["id"]] = _normalise(image["file_name"])
    if len(set(names.values())) != len(names):
        raise ValueError("two entries of 'images' have the same file_name")
    person = _person_category(data)
    rows: dict[str, list[list[float]]] = {name: [] for name in names.values()}
    for i, entry in enumerate(entries):
        where = f"{keys[0]}[{i}]"
        if not isinstance(entry, dict) or "image_id" not in entry or "bbox" not in entry:
            raise ValueError(f"{where} needs 'image_id' and 'bbox', got {entry!r}")
        if not isinstance(entry["image_id"], (int, str)) or entry["image_id"] not in names:
            raise ValueError(f"{where}: image_id {entry['image_id']!r} is not in 'images'")
        if entry.get("category_id", person) != person or entry.get("iscrowd", 0):
            continue
        box = entry["bbox"]
        if not isinstance(box, list) or len(box) != 4:
            raise ValueError(f"{where}: 'bbox' must be [x, y, w, h], got {box!r}")
        x, y, w, h = (_number(v, where) for v in box)
        if w < 0 or h < 0:
            raise ValueError(
                f"{where}: negative width or height in {box!r} (COCO boxes are x, y, w, h)"
            )
        rows[names[entry["image_id"]]].append(
            [x, y, x + w, y + h, _number(entry.get("score", 1.0), where)]
        )
    return {name: _stack(r) for name, r in rows.items()}


def load_bboxes(path: str | Path) -> BoxFile:
    """Read a ``--bboxes`` file (shapes in the module docstring); raises :class:`BoxFileError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise BoxFileError(f"{path}: cannot read the box file ({err.strerror})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BoxFileError(f"{path}: not valid JSON ({err})") from err
    try:
        if isinstance(data, list):
            raise ValueError(
                "a bare COCO results list has no file names; put it under 'detections' next to an "
                "'images' list of {'id', 'file_name'}"
            )
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        boxes = _from_coco(data) if "images" in data else _from_mapping(data)
    except ValueError as err:
        raise BoxFileError(f"{path}: {err}") from None
    return BoxFile(path=path, boxes=boxes)


def nms_xyxy(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU_THRESHOLD
) -> np.ndarray:
    """Greedy NMS of the official pose demo, float32 with the "+1" pixel convention.

    Boxes are visited by descending score (``argsort()[::-1]``, so ties keep the demo's
    order); ``area = (x2 - x1 + 1) * (y2 - y1 + 1)``, intersection sides ``max(0, min - max + 1)``,
    ``IoU = inter / (area_i + area_j - inter)``; a box survives a kept box when ``IoU <= thr``.

    Args:
        boxes: ``[M, 4]`` ``xyxy`` image pixels.
        scores: ``[M]``.

    Returns:
        int64 indices of the kept boxes, in descending score order.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(b) != len(s):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores")
    one = np.float32(1)
    x1, y1, x2, y2 = b.T
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = s.argsort()[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(
            np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one
        )
        h = np.maximum(
            np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one
        )
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= np.float32(iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def whole_image_box(height: int, width: int) -> np.ndarray:
    """The fallback ``[[0, 0, W-1, H-1]]`` (float32, ``[1, 4]``) used when no person is found."""
    return np.array([[0, 0, width - 1, height - 1]], dtype=np.float32)


def select_person_boxes(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    image_hw: tuple[int, int],
    score_threshold: float = BBOX_SCORE_THRESHOLD,
    iou_threshold: float | None = NMS_IOU_THRESHOLD,
) -> np.ndarray:
    """The demo's box post-processing: ``score > thr``, greedy NMS, whole-image fallback.

    Args:
        boxes: ``[M, 4]`` ``xyxy`` image pixels; scores: ``[M]``.
        image_hw: ``(H, W)`` of the image, for the fallback box.
        iou_threshold: ``None`` skips NMS (boxes given by the user are used as they are).

    Returns:
        ``[M', 4]`` float32 boxes in descending score order (never empty).
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    mask = s > np.float32(score_threshold)
    b, s = b[mask], s[mask]
    if iou_threshold is None:
        b = b[np.argsort(-s, kind="stable")]  # file order among equal scores
    else:
        b = b[nms_xyxy(b, s, iou_threshold)]
    return b if len(b) else whole_image_box(*image_hw)
