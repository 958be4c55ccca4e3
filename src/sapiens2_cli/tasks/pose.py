"""Top-down pose: person boxes -> UDP crops -> heatmaps with flip test -> 308 keypoints a person.

The official demo's pipeline (spec ``models.md`` §4.7), every step a function of its own:

1. boxes (:mod:`~sapiens2_cli.tasks.pose_options` says from where): a box file, the whole
   image, or the RTMDet-m detector batched over the images of a batch on the model's device;
   nothing left gives one whole-image box with score 0;
2. one UDP affine crop per box (:func:`~sapiens2_cli.tasks.pose_geometry.crop_people`,
   float32 geometry, ``cv2.warpAffine``); the crops of an image run in one model batch;
3. flip test: the mirrored crops run too, their heatmaps are mirrored back, their channels
   swapped left <-> right and averaged with the plain ones (float32, also under autocast);
4. UDP + DARK decoding (:func:`~sapiens2_cli.tasks.pose_decode.decode_heatmaps`: the exact
   NumPy/OpenCV path on CPU, the batched torch path on accelerators) and back to image pixels
   (:func:`~sapiens2_cli.tasks.pose_geometry.heatmap_to_image`), on the writer threads;
5. conversion to ``--keypoint-format`` by keypoint name.

Output ``OUT/pose/<rel>.json``::

    {"version": 1, "model": REF, "keypoint_format": NAME,
     "image": {"path": PATH, "width": W, "height": H},
     "instances": [{"bbox": [x1, y1, x2, y2], "bbox_score": S,
                    "keypoints": [[x, y] | null, ...], "keypoint_scores": [s, ...]}, ...]}

in image pixels (the centre of the top-left pixel is ``(0, 0)``); ``null`` marks a point the
format has no source for (its score is 0). Scores are the flip-averaged heatmap maxima, never
thresholded. Names, sources, skeleton and colours are in ``OUT/pose/keypoints.json``.

A video gives one file, ``OUT/pose/<video rel>.jsonl``, with one line per frame in frame order::

    {"index": I, "time": SECONDS, "instances": [...]}

(``instances`` as above; the model and keypoint format are those of ``run.json`` and
``keypoints.json``); ``--vis`` encodes the overlays as ``OUT/vis/pose/<video rel>.mp4``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapiens2_cli.plan import PlanError, PredictOptions
from sapiens2_cli.sources import Item
from sapiens2_cli.tasks.base import (
    VIS_FILE,
    VIS_VIDEO,
    FileSpec,
    ModelInput,
    OutputFormat,
    Prediction,
    Raw,
    Task,
)
from sapiens2_cli.tasks.bboxes import BoxFile, BoxFileError, load_bboxes, whole_image_box
from sapiens2_cli.tasks.keypoint_formats import KeypointFormat, convert_keypoints, get_keypoint_format, goliath_names
from sapiens2_cli.tasks.pose_decode import decode_heatmaps, flip_merge
from sapiens2_cli.tasks.pose_draw import SkeletonStyle, draw_pose, style_for
from sapiens2_cli.tasks.pose_geometry import CropGeometry, crop_people, heatmap_to_image
from sapiens2_cli.tasks.pose_options import PoseOptions
from sapiens2_cli.writers import FileData

FORMAT_VERSION = 1
KEYPOINTS_FILE = "keypoints.json"
JSON_FILE = FileSpec(".json", "json")
JSONL_FILE = FileSpec(".jsonl", "jsonl", stream=True)  # a video's records, one line per frame
#: Score of a whole-image box: no detector or file found anybody (``models.detector.FALLBACK_SCORE``).
WHOLE_IMAGE_SCORE = 0.0


@dataclasses.dataclass(frozen=True)
class PersonCrop:
    """Where one pose model input came from: its person box and the crop's affine geometry."""

    box: np.ndarray  # (4,) float32 x1, y1, x2, y2, image pixels
    score: float  # of the box (0: a whole-image box)
    crop: CropGeometry


def whole_image_rows(image_hw: tuple[int, int]) -> np.ndarray:
    """``[[0, 0, W-1, H-1, 0]]`` float32: the box used when no person box is left."""
    return np.concatenate([whole_image_box(*image_hw), [[WHOLE_IMAGE_SCORE]]], axis=1).astype(np.float32)


def keypoint_table(fmt: KeypointFormat, style: SkeletonStyle) -> dict[str, Any]:
    """Content of ``OUT/pose/keypoints.json``: the layout, where each point comes from, colours."""
    goliath = goliath_names()
    return {
        "format_version": FORMAT_VERSION,
        "keypoint_format": fmt.name,
        "num_keypoints": fmt.num_keypoints,
        "keypoints": [
            {
                "id": i,
                "name": name,
                "color_rgb": list(style.keypoint_colors[i]),
                "flip_id": fmt.flip_indices[i],
                "from_goliath": [goliath[s] for s in fmt.sources[i]],  # one: copied, two: midpoint, none: missing
            }
            for i, name in enumerate(fmt.names)
        ],
        "skeleton": [{"ids": [a, b], "color_rgb": list(c)} for (a, b), c in zip(style.links, style.link_colors)],
    }


def instance_json(box: np.ndarray, score: float, keypoints: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """One person: ``box (4,)``, ``keypoints [K, 2]`` (NaN -> ``null``), ``scores [K]``."""
    points = [None if math.isnan(x) or math.isnan(y) else [x, y] for x, y in keypoints.tolist()]
    return {"bbox": box.tolist(), "bbox_score": score, "keypoints": points, "keypoint_scores": scores.tolist()}


def item_key(item: Item) -> str:
    """The name a box file lists an item by: its path relative to its root, extension kept."""
    return item.rel + Path(item.path).suffix


class PoseTask(Task):
    name = "pose"

    def __init__(
        self, options: PoseOptions | None = None, *, model_ref: str | None = None, box_file: BoxFile | None = None
    ) -> None:
        self.options = options or PoseOptions()
        self.model_ref = model_ref
        self.box_file = box_file
        self.detector: torch.nn.Module | None = None
        self.format = get_keypoint_format(self.options.keypoint_format)
        self.style = style_for(self.format)
        self.flip_indices = get_keypoint_format("goliath308").flip_indices

    # ----------------------------------------------------------------- run set-up

    def configure(self, options: PredictOptions, *, model_ref: str) -> PoseTask:
        box_file = None
        if options.pose.bboxes is not None:
            try:
                box_file = load_bboxes(options.pose.bboxes)
            except BoxFileError as err:
                raise PlanError(f"--bboxes {err}") from None
        return PoseTask(options.pose, model_ref=model_ref, box_file=box_file)

    def load_helpers(self, device: torch.device) -> None:
        if not self.options.uses_detector:
            return
        from sapiens2_cli.detector_weights import DetectorWeightsError, load_detector

        ref = self.options.detector_ref
        try:
            self.detector = load_detector(ref, device=device)
        except (DetectorWeightsError, FileNotFoundError) as err:
            raise PlanError(f"--detector {ref}: {err}") from None

    def files(self, fmt: OutputFormat, vis: bool) -> list[FileSpec]:
        return [JSON_FILE, VIS_FILE] if vis else [JSON_FILE]

    def video_files(self, fmt: OutputFormat, vis: bool) -> list[FileSpec]:
        return [JSONL_FILE, VIS_VIDEO] if vis else [JSONL_FILE]

    def frame_outputs(self, files: dict[FileSpec, FileData], item: Item) -> dict[FileSpec, FileData]:
        """The frame's line of the video's ``.jsonl`` (and its overlay for the ``.mp4``)."""
        line = {"index": item.frame, "time": item.time, "instances": files[JSON_FILE].data["instances"]}
        out = {JSONL_FILE: FileData("json", line)}
        if VIS_FILE in files:
            out[VIS_VIDEO] = files[VIS_FILE]
        return out

    def run_files(self) -> dict[str, FileData]:
        return {KEYPOINTS_FILE: FileData("json", keypoint_table(self.format, self.style))}

    # ----------------------------------------------------------------- boxes and crops

    def prepare(self, image: np.ndarray, input_hw: tuple[int, int]) -> list[ModelInput]:
        """One crop of the whole image."""
        return self.crops(image, whole_image_rows(image.shape[:2]), input_hw)

    def prepare_item(self, image: np.ndarray, input_hw: tuple[int, int], item: Item) -> list[ModelInput] | None:
        """Crops of the boxes the box file lists for ``item`` (``score > bbox_thr``, file order),
        of the whole image with ``--detector none``; ``None``: the detector decides."""
        if self.box_file is not None:
            key = item_key(item)
            rows = self.box_file.boxes_for(key)
            if rows is None:
                raise ValueError(f"{key!r} is not listed in the box file {self.box_file.path}")
            rows = rows[rows[:, 4] > np.float32(self.options.bbox_thr)]
            return self.crops(image, rows if len(rows) else whole_image_rows(image.shape[:2]), input_hw)
        if not self.options.uses_detector:
            return self.prepare(image, input_hw)
        return None

    def detect(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """The demo's person boxes ``[N_i, 5]`` (x1, y1, x2, y2, score; a whole-image row when
        nobody is found) of each BGR image, one detector batch on the model's device."""
        if self.detector is None:
            raise RuntimeError("the person detector is not loaded (load_helpers was not called)")
        return self.detector.detect_batch(images, score_thr=self.options.bbox_thr, nms_thr=self.options.nms_thr)

    def prepare_detected(self, image: np.ndarray, input_hw: tuple[int, int], found: np.ndarray) -> list[ModelInput]:
        return self.crops(image, found, input_hw)

    @staticmethod
    def crops(image: np.ndarray, rows: np.ndarray, input_hw: tuple[int, int]) -> list[ModelInput]:
        """One UDP crop ``[H_in, W_in, 3]`` uint8 per box row ``(x1, y1, x2, y2, score)``."""
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, 5)
        sides = rows[:, 2:4] - rows[:, :2]
        flat = (sides <= 0).all(axis=1)
        if flat.any():
            raise ValueError(f"person box {rows[np.argmax(flat), :4].tolist()} has no width and no height")
        pixels, geometries = crop_people(image, rows[:, :4], input_size=input_hw)  # [N, H_in, W_in, 3]
        return [
            ModelInput(pixels[i], PersonCrop(rows[i, :4].copy(), float(rows[i, 4]), geometries[i]))
            for i in range(len(rows))
        ]

    # ----------------------------------------------------------------- model and decoding

    def forward(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        """Heatmaps ``[B, 308, H_in/4, W_in/4]`` float32, flip-averaged unless ``--no-flip-test``."""
        if not self.options.flip_test:
            return model(x).float()
        return flip_merge(model(x).float(), model(x.flip(-1)).float(), self.flip_indices)

    def postprocess(self, raws: list[Raw], inputs: list[ModelInput], image_hw: tuple[int, int]) -> Prediction:
        """``boxes [N, 4]``, ``box_scores [N]``, ``keypoints [N, K, 2]`` image pixels, ``scores [N, K]``."""
        crops: list[PersonCrop] = [i.geometry for i in inputs]
        k = self.format.num_keypoints
        pred = {
            "boxes": np.array([c.box for c in crops], dtype=np.float32).reshape(-1, 4),
            "box_scores": np.array([c.score for c in crops], dtype=np.float32),
            "keypoints": np.zeros((0, k, 2)),
            "scores": np.zeros((0, k)),
        }
        if not raws:
            return pred
        heatmaps = torch.stack(raws)  # [N, 308, h, w]
        located, scores = decode_heatmaps(heatmaps)  # [N, 308, 2] heatmap px, [N, 308]
        size = (heatmaps.shape[-2], heatmaps.shape[-1])
        points = heatmap_to_image(located, [c.crop for c in crops], heatmap_size=size)  # [N, 308, 2] image px
        pred["keypoints"], pred["scores"] = convert_keypoints(points, scores, self.format)
        return pred

    # ----------------------------------------------------------------- files

    def render(self, pred: Prediction, image: np.ndarray, fmt: OutputFormat, vis: bool) -> dict[FileSpec, FileData]:
        return self.render_item(pred, image, None, fmt, vis)

    def render_item(
        self, pred: Prediction, image: np.ndarray, item: Item | None, fmt: OutputFormat, vis: bool
    ) -> dict[FileSpec, FileData]:
        height, width = image.shape[:2]
        doc = {
            "version": FORMAT_VERSION,
            "model": self.model_ref,
            "keypoint_format": self.format.name,
            "image": {"path": str(item.path) if item is not None else None, "width": width, "height": height},
            "instances": [
                instance_json(*person)
                for person in zip(pred["boxes"], pred["box_scores"].tolist(), pred["keypoints"], pred["scores"])
            ],
        }
        out = {JSON_FILE: FileData("json", doc)}
        if vis:
            radius, thickness = self.options.draw_sizes((height, width))
            canvas = draw_pose(
                image, pred["keypoints"], pred["scores"], style=self.style,
                kpt_thr=self.options.kpt_thr, radius=radius, thickness=thickness,
            )  # fmt: skip
            out[VIS_FILE] = FileData("jpg", canvas)
        return out
