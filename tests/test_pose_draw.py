"""Skeleton drawing: official colours and order, thresholds, and the RGB-canvas equivalence."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sapiens2_cli.tasks.keypoint_formats import (
    convert_keypoints,
    get_keypoint_format,
    goliath_index,
)
from sapiens2_cli.tasks.pose_draw import draw_pose, goliath_style, style_for


def _pose(seed=0, n=2, size=(120, 100)):
    rng = np.random.default_rng(seed)
    h, w = size
    kp = np.stack([rng.uniform(-10, w + 10, (n, 308)), rng.uniform(-10, h + 10, (n, 308))], -1)
    scores = rng.uniform(0, 1, (n, 308))
    return kp, scores


def _draw_like_the_demo(image_bgr, kp, scores, thr, radius, thickness):
    """The demo's procedure written out: RGB copy, RGB colours, then back to BGR."""
    style = goliath_style()
    canvas = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    h, w = canvas.shape[:2]
    for points, conf in zip(kp, scores):
        pts = [(int(np.round(x)), int(np.round(y))) for x, y in points]
        ok = [c >= thr and 0 <= p[0] < w and 0 <= p[1] < h for p, c in zip(pts, conf)]
        for (a, b), color in zip(style.links, style.link_colors):
            if ok[a] and ok[b]:
                cv2.line(
                    canvas, pts[a], pts[b], color, thickness=max(1, thickness), lineType=cv2.LINE_AA
                )
        for p, color, good in zip(pts, style.keypoint_colors, ok):
            if good:
                cv2.circle(canvas, p, radius, color, -1, lineType=cv2.LINE_AA)
    return cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)


@pytest.mark.parametrize(("radius", "thickness"), [(3, 1), (8, 8)])
def test_equals_drawing_on_an_rgb_copy(radius, thickness):
    image = np.random.default_rng(1).integers(0, 256, (120, 100, 3), dtype=np.uint8)
    kp, scores = _pose()
    ours = draw_pose(image, kp, scores, kpt_thr=0.3, radius=radius, thickness=thickness)
    np.testing.assert_array_equal(
        ours, _draw_like_the_demo(image, kp, scores, 0.3, radius, thickness)
    )
    assert (ours != image).any()


def test_style_is_the_official_table():
    style = goliath_style()
    assert len(style.links) == 65 and len(style.keypoint_colors) == 308
    assert style.links[0] == (goliath_index("left_ankle"), goliath_index("left_knee"))
    assert style.link_colors[0] == (0, 255, 0)


def test_threshold_outside_and_nan_points_are_not_drawn():
    image = np.zeros((50, 50, 3), np.uint8)
    kp = np.full((1, 308, 2), np.nan)
    scores = np.zeros((1, 308))
    nose = goliath_index("nose")
    kp[0, nose], scores[0, nose] = (25, 25), 0.29
    assert not draw_pose(image, kp, scores, kpt_thr=0.3).any()
    scores[0, nose] = 0.3  # >= threshold is drawn, in the official BGR (255, 153, 51)
    drawn = draw_pose(image, kp, scores, kpt_thr=0.3)
    np.testing.assert_array_equal(drawn[25, 25], [255, 153, 51])
    kp[0, nose] = (49.6, 25)  # rounds to x = 50: outside
    assert not draw_pose(image, kp, scores, kpt_thr=0.3).any()


def test_other_formats_draw_with_named_colours():
    fmt = get_keypoint_format("openpose25")
    style = style_for(fmt)
    kp, scores = convert_keypoints(*_pose(seed=2, n=1), fmt)
    assert len(style.keypoint_colors) == 25 and len(style.links) == len(fmt.skeleton)
    # A link between copied points keeps the Goliath link colour (right knee -> right ankle).
    link = (fmt.names.index("RKnee"), fmt.names.index("RAnkle"))
    assert style.link_colors[fmt.skeleton.index(link)] == (255, 128, 0)
    out = draw_pose(np.zeros((120, 100, 3), np.uint8), kp, scores, style=style)
    assert out.any()
    with pytest.raises(ValueError, match=r"\[N, 308, 2\]"):
        draw_pose(np.zeros((10, 10, 3), np.uint8), kp, scores)
