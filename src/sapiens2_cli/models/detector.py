"""The built-in person detector: RTMDet-m (CSPNeXt + PAFPN + SepBN head), one class.

:class:`Detector` reproduces what the Sapiens2 pose demo runs to find people: mmdet's RTMDet-m
with the demo's config (no NMS inside the detector), followed by the demo's own filter
(``score > 0.3``, greedy NMS at IoU 0.3 with the "+1" convention, whole-image fallback).
Load released weights with :func:`sapiens2_cli.load_detector`.

>>> det = load_detector("default", device="cuda")
>>> boxes = det.detect(cv2.imread("people.jpg"))  # [N, 5] x1, y1, x2, y2, score
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sapiens2_cli.models.cspnext import ConvBNAct, CSPNeXt, CSPNeXtPAFPN
from sapiens2_cli.models.rtmdet_boxes import (
    INPUT_SIZE,
    RawDetections,
    check_image,
    decode_detections,
    letterbox,
    normalize,
    kept_person_rows,
)
from sapiens2_cli.models.rtmdet_head import RTMDetSepBNHead

#: Score carried by the whole-image fallback row: it is not a detection, and 0.0 lies below
#: any threshold, so callers can tell it apart (``dets[:, 4] == 0``) or drop it.
FALLBACK_SCORE = 0.0


class Detector(nn.Module):
    """RTMDet-m person detector; ``state_dict`` keys equal those of the mmdet checkpoint.

    Submodules ``backbone`` (:class:`CSPNeXt`), ``neck`` (:class:`CSPNeXtPAFPN`) and
    ``bbox_head`` (:class:`RTMDetSepBNHead`). Works on any device in float32. On CUDA, TF32
    convolutions (``torch.backends.cudnn.allow_tf32``) trade ~1e-3 relative precision for
    speed; the parity tolerances assume it is off.
    """

    input_size: int = INPUT_SIZE

    def __init__(self) -> None:
        super().__init__()
        self.backbone = CSPNeXt()
        self.neck = CSPNeXtPAFPN()
        self.bbox_head = RTMDetSepBNHead(channels=192)
        self.fused = False

    @property
    def device(self) -> torch.device:
        return self.bbox_head.rtm_cls[0].weight.device

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``x [B, 3, 640, 640]`` normalised BGR -> raw per-level outputs.

        Returns ``(cls_scores, bbox_preds)``: for strides 8, 16, 32, logits ``[B, 1, H_l, W_l]``
        and box distances ``[B, 4, H_l, W_l]`` (left, top, right, bottom; input pixels).
        """
        return self.bbox_head(self.neck(self.backbone(x)))

    @torch.no_grad()
    def fuse_bn(self) -> Detector:
        """Fold every BatchNorm into its conv (in place; faster, equal within float rounding).

        The shared head convs become one conv per level. Afterwards the ``state_dict`` keys
        no longer match the checkpoint, so fuse after loading. Returns ``self``.
        """
        for module in self.modules():
            if isinstance(module, ConvBNAct):
                module.fuse_bn()
        self.fused = True
        return self

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> list[RawDetections]:
        """The detector's own output per image (mmdet ``pred_instances``), before the demo filter.

        ``images``: BGR uint8 ``[H, W, 3]`` arrays (any sizes; each is letterboxed to 640 and
        all go through one forward pass). Returns up to 100 boxes per image in
        original-image pixels with scores above 0.05, best first, on the model's device.
        """
        if not images:
            return []
        for i, image in enumerate(images):
            check_image(image, what=f"images[{i}]")
        boxed = [letterbox(image, size=self.input_size) for image in images]
        dtype = self.bbox_head.rtm_cls[0].weight.dtype
        x = normalize(np.stack([b.canvas for b in boxed]), device=self.device, dtype=dtype)
        cls_scores, bbox_preds = self(x)  # per level [B, 1, h, w] / [B, 4, h, w]
        return [
            decode_detections(
                [c[i] for c in cls_scores],
                [b[i] for b in bbox_preds],
                self.bbox_head.strides,
                scale_wh=box.scale_wh,
                canvas_hw=(self.input_size, self.input_size),
            )
            for i, box in enumerate(boxed)
        ]

    def detect(
        self,
        image_bgr: np.ndarray,
        *,
        score_thr: float = 0.3,
        nms_thr: float = 0.3,
        whole_image_fallback: bool = True,
    ) -> np.ndarray:
        """Person boxes for one BGR uint8 image ``[H, W, 3]`` (as ``cv2.imread`` returns).

        Returns ``[N, 5]`` float32 rows ``(x1, y1, x2, y2, score)`` in original-image pixels,
        highest score first: the detector's boxes with ``score > score_thr`` that survive
        greedy NMS at IoU ``nms_thr`` (inclusive "+1" areas). Boxes are not clipped to the
        image. If none survives and ``whole_image_fallback``, one row
        ``(0, 0, W - 1, H - 1, 0.0)`` covers the whole image (score :data:`FALLBACK_SCORE`);
        without the fallback the result is ``[0, 5]``.
        """
        return self.detect_batch(
            [image_bgr],
            score_thr=score_thr,
            nms_thr=nms_thr,
            whole_image_fallback=whole_image_fallback,
        )[0]

    def detect_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        score_thr: float = 0.3,
        nms_thr: float = 0.3,
        whole_image_fallback: bool = True,
    ) -> list[np.ndarray]:
        """:meth:`detect` for several images with one forward pass; one ``[N_i, 5]`` per image."""
        results = []
        for image, raw in zip(images, self.predict(images), strict=True):
            bboxes = raw.bboxes.cpu().numpy()
            scores = raw.scores.cpu().numpy()
            keep = kept_person_rows(bboxes, scores, score_thr=score_thr, nms_thr=nms_thr)
            dets = np.concatenate([bboxes[keep], scores[keep, None]], axis=1).astype(np.float32)
            if len(dets) == 0 and whole_image_fallback:
                h, w = image.shape[:2]
                dets = np.array([[0, 0, w - 1, h - 1, FALLBACK_SCORE]], dtype=np.float32)
            results.append(dets.reshape(-1, 5))
        return results
