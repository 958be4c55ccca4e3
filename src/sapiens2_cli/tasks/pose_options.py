"""What ``sapiens2 predict -t pose`` can be asked, importable without torch or NumPy.

Where the person boxes come from (in this order):

* ``bboxes``: a box file (:mod:`sapiens2_cli.tasks.bboxes`); boxes with ``score > bbox_thr``
  are used in the file's order, no NMS; an image the file does not list fails for pose;
* ``detector == "none"``: one whole-image box per image;
* otherwise the built-in RTMDet-m detector (``detector``: ``None`` for the released weights,
  or any reference :func:`sapiens2_cli.load_detector` takes), filtered as the official demo
  does (``score > bbox_thr``, greedy NMS at ``nms_thr``).

When no box is left, one whole-image box with score 0 is used, as in the demo.
"""

from __future__ import annotations

import dataclasses

#: ``--keypoint-format`` choices (the keys of ``keypoint_formats.KEYPOINT_FORMATS``).
KEYPOINT_FORMAT_NAMES: tuple[str, ...] = ("goliath308", "coco17", "coco133", "openpose25")
NO_DETECTOR = "none"
DEFAULT_DETECTOR = "default"  # facebook/sapiens-pose-bbox-detector, rtmdet_m.pth
#: Keypoint radius and link thickness of the official demo at :data:`DRAW_REFERENCE_SIDE`.
DEMO_RADIUS = DEMO_THICKNESS = 8
DRAW_REFERENCE_SIDE = 1920


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoseOptions:
    """The pose settings of one predict run (defaults: the official demo's)."""

    bboxes: str | None = None  # box file; None: detector
    detector: str | None = None  # None: the released detector; "none": whole image
    bbox_thr: float = 0.3  # keep boxes with a score above this
    nms_thr: float = 0.3  # detector boxes only
    keypoint_format: str = "goliath308"
    kpt_thr: float = 0.3  # drawing only: the JSON keeps every keypoint and its score
    radius: int | None = None  # None: scaled to the image (see draw_sizes)
    thickness: int | None = None
    flip_test: bool = True

    def __post_init__(self) -> None:
        if self.bboxes is not None and self.detector is not None:
            raise ValueError("--bboxes and --detector exclude each other: boxes come from the file")
        if self.keypoint_format not in KEYPOINT_FORMAT_NAMES:
            raise ValueError(
                f"--keypoint-format {self.keypoint_format!r}: choose one of {', '.join(KEYPOINT_FORMAT_NAMES)}"
            )
        for name in ("bbox_thr", "nms_thr"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("radius", "thickness"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1 pixel, got {value}")

    @property
    def uses_detector(self) -> bool:
        return self.bboxes is None and self.detector != NO_DETECTOR

    @property
    def detector_ref(self) -> str:
        return self.detector or DEFAULT_DETECTOR

    def draw_sizes(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """``(radius, thickness)`` in pixels for an image ``(H, W)``.

        Unset sizes scale the demo's 8 px with the image's long side, ``8 * max(H, W) / 1920``
        rounded (radius at least 2, thickness at least 1): the demo's look on 1080p frames,
        and still legible on small images.
        """
        factor = max(image_hw) / DRAW_REFERENCE_SIDE
        radius = self.radius if self.radius is not None else max(2, round(DEMO_RADIUS * factor))
        thickness = self.thickness if self.thickness is not None else max(1, round(DEMO_THICKNESS * factor))
        return radius, thickness
