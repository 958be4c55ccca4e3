"""Skeleton drawing in the style of the official pose demo.

Per instance: first every skeleton link in table order (drawn when both end scores are
``>= kpt_thr`` and both rounded end points lie inside the image; anti-aliased ``cv2.line`` of
``max(1, thickness)``), then every keypoint (score ``>= kpt_thr``, rounded position inside the
image; filled anti-aliased ``cv2.circle`` of ``radius``). Colours are the official RGB ones from
``data/keypoints308_vis.json``. The demo draws on an RGB copy and converts back to BGR; drawing
on the BGR image with the channel-reversed colours gives the same pixels (OpenCV blends each
channel independently), which is what :func:`draw_pose` does.

Demo settings: ``radius=8, thickness=8, kpt_thr=0.3``; library defaults ``3, 1, 0.3``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

import cv2
import numpy as np

from sapiens2_cli.tasks.keypoint_formats import KeypointFormat

Color = tuple[int, int, int]


@dataclass(frozen=True)
class SkeletonStyle:
    """What to draw: ``links`` index pairs in drawing order with RGB ``link_colors``, and one RGB
    colour per keypoint."""

    links: tuple[tuple[int, int], ...]
    link_colors: tuple[Color, ...]
    keypoint_colors: tuple[Color, ...]


@cache
def _vis_data() -> dict:
    text = resources.files("sapiens2_cli").joinpath("data/keypoints308_vis.json").read_text()
    return json.loads(text)


@cache
def goliath_style() -> SkeletonStyle:
    """The official 308-keypoint colours and the 65 links in the demo's order."""
    vis = _vis_data()
    return SkeletonStyle(
        links=tuple((a, b) for a, b in (link["ids"] for link in vis["links"])),
        link_colors=tuple(tuple(link["color_rgb"]) for link in vis["links"]),
        keypoint_colors=tuple(tuple(c) for c in vis["keypoint_colors_rgb"]),
    )


def style_for(fmt: KeypointFormat) -> SkeletonStyle:
    """Colours for another layout, taken by name from the Goliath style.

    A point takes the colour of the Goliath point it is copied from (derived and missing points:
    the first source's colour or the default keypoint colour); a link takes the colour of the
    Goliath link between the same sources, else that of its first end point.
    """
    base = goliath_style()
    vis = _vis_data()
    default_kpt = tuple(vis["default_keypoint_colour_rgb"])
    kpt_colors = tuple(base.keypoint_colors[s[0]] if s else default_kpt for s in fmt.sources)
    link_by_ends = {frozenset(link): c for link, c in zip(base.links, base.link_colors)}
    link_colors = []
    for a, b in fmt.skeleton:
        sa, sb = fmt.sources[a], fmt.sources[b]
        ends = frozenset((sa[0], sb[0])) if len(sa) == 1 and len(sb) == 1 else None
        link_colors.append(link_by_ends.get(ends, kpt_colors[a]))
    return SkeletonStyle(tuple(fmt.skeleton), tuple(link_colors), kpt_colors)


def _inside(x: float, y: float, width: int, height: int) -> bool:
    return 0 <= x < width and 0 <= y < height


def draw_pose(
    image_bgr: np.ndarray,
    keypoints: np.ndarray,
    scores: np.ndarray,
    *,
    style: SkeletonStyle | None = None,
    kpt_thr: float = 0.3,
    radius: int = 3,
    thickness: int = 1,
) -> np.ndarray:
    """Draw every instance's skeleton on a copy of the image.

    Args:
        image_bgr: ``[H, W, 3]`` uint8 BGR.
        keypoints: ``[N, K, 2]`` ``(x, y)`` image pixels (NaN points are never drawn).
        scores: ``[N, K]``.
        style: links and colours; defaults to :func:`goliath_style` (K = 308).
        kpt_thr: minimum score of a drawn keypoint and of both ends of a drawn link.
        radius: keypoint circle radius in pixels.
        thickness: link thickness in pixels (at least 1).

    Returns:
        ``[H, W, 3]`` uint8 BGR with the drawing.
    """
    style = style or goliath_style()
    kp = np.asarray(keypoints, dtype=np.float64)
    sc = np.asarray(scores, dtype=np.float64)
    if kp.ndim != 3 or kp.shape[1] != len(style.keypoint_colors) or sc.shape != kp.shape[:2]:
        raise ValueError(
            f"expected keypoints [N, {len(style.keypoint_colors)}, 2] and scores [N, K], "
            f"got {kp.shape}, {sc.shape}"
        )
    canvas = np.ascontiguousarray(image_bgr).copy()
    height, width = canvas.shape[:2]
    for points, conf in zip(kp, sc):
        finite = np.isfinite(points).all(axis=1)
        # Python's round(): half to even, like NumPy's.
        pix = [(round(x), round(y)) if ok else None for (x, y), ok in zip(points.tolist(), finite)]
        visible = [
            p is not None and c >= kpt_thr and _inside(*p, width, height) for p, c in zip(pix, conf)
        ]
        for (a, b), rgb in zip(style.links, style.link_colors):
            if visible[a] and visible[b]:
                cv2.line(
                    canvas,
                    pix[a],
                    pix[b],
                    rgb[::-1],
                    thickness=max(1, thickness),
                    lineType=cv2.LINE_AA,
                )
        for p, rgb, ok in zip(pix, style.keypoint_colors, visible):
            if ok:
                cv2.circle(canvas, p, radius, rgb[::-1], thickness=-1, lineType=cv2.LINE_AA)
    return canvas
