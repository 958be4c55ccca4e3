"""Keypoint layouts: tables built by name, conversions, round trips, skeletons and flips."""

from __future__ import annotations

import numpy as np
import pytest

from sapiens2_cli.tasks.keypoint_formats import (
    FACE68_FROM_GOLIATH,
    KEYPOINT_FORMATS,
    convert_keypoints,
    get_keypoint_format,
    goliath_index,
    goliath_names,
    to_goliath,
)

FORMATS = sorted(KEYPOINT_FORMATS)
# (points, copied, derived, missing, links) per layout.
EXPECTED_COUNTS = {
    "goliath308": (308, 308, 0, 0, 65),
    "coco17": (17, 17, 0, 0, 19),
    "coco133": (133, 81, 0, 52, 65),
    "openpose25": (25, 23, 2, 0, 24),
}


def _random_pose(n=3, seed=0):
    rng = np.random.default_rng(seed)
    kp = rng.uniform(0, 500, size=(n, 308, 2))
    scores = rng.uniform(0, 1, size=(n, 308)).astype(np.float32)
    return kp, scores


@pytest.mark.parametrize("name", FORMATS)
def test_layout_shape(name):
    fmt = get_keypoint_format(name)
    assert fmt.name == name
    counts = (
        fmt.num_keypoints,
        len(fmt.copied()),
        len(fmt.derived()),
        len(fmt.missing()),
        len(fmt.skeleton),
    )
    assert counts == EXPECTED_COUNTS[name]
    assert len(set(fmt.names)) == fmt.num_keypoints
    assert all(
        0 <= a < fmt.num_keypoints and 0 <= b < fmt.num_keypoints and a != b
        for a, b in fmt.skeleton
    )


@pytest.mark.parametrize("name", FORMATS)
def test_flip_indices_are_an_involution_consistent_with_goliath(name):
    fmt = get_keypoint_format(name)
    goliath = get_keypoint_format("goliath308")
    flip = fmt.flip_indices
    assert sorted(flip) == list(range(fmt.num_keypoints))
    assert all(flip[flip[i]] == i for i in range(fmt.num_keypoints))
    source = dict(fmt.copied())
    for target, g in source.items():
        if flip[target] in source:  # a copied point's partner is copied from Goliath's partner
            assert source[flip[target]] == goliath.flip_indices[g], fmt.names[target]


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_returns_shared_points_exactly(name):
    fmt = get_keypoint_format(name)
    kp, scores = _random_pose()
    out_kp, out_scores = convert_keypoints(kp, scores, fmt)
    assert out_kp.shape == (3, fmt.num_keypoints, 2) and out_scores.shape == (3, fmt.num_keypoints)
    back_kp, back_scores = to_goliath(out_kp, out_scores, fmt)
    shared = sorted(g for _, g in fmt.copied())
    np.testing.assert_array_equal(back_kp[:, shared], kp[:, shared])
    np.testing.assert_array_equal(back_scores[:, shared], scores[:, shared])
    others = sorted(set(range(308)) - set(shared))
    assert np.isnan(back_kp[:, others]).all() and (back_scores[:, others] == 0).all()


@pytest.mark.parametrize("name", FORMATS)
def test_missing_points_are_nan_with_score_zero(name):
    fmt = get_keypoint_format(name)
    kp, scores = convert_keypoints(*_random_pose(n=1), fmt)
    missing = fmt.missing()
    assert np.isnan(kp[:, missing]).all() and (scores[:, missing] == 0).all()
    present = [i for i in range(fmt.num_keypoints) if i not in missing]
    assert np.isfinite(kp[:, present]).all()


def test_openpose_neck_and_midhip_are_midpoints_with_min_score():
    fmt = get_keypoint_format("openpose25")
    kp, scores = _random_pose(n=2, seed=4)
    out_kp, out_scores = convert_keypoints(kp, scores, fmt)
    ls, rs, lh, rh = (
        goliath_index(n) for n in ("left_shoulder", "right_shoulder", "left_hip", "right_hip")
    )
    neck, midhip = fmt.names.index("Neck"), fmt.names.index("MidHip")
    np.testing.assert_allclose(out_kp[:, neck], (kp[:, ls] + kp[:, rs]) / 2)
    np.testing.assert_allclose(out_kp[:, midhip], (kp[:, lh] + kp[:, rh]) / 2)
    np.testing.assert_array_equal(out_scores[:, neck], np.minimum(scores[:, ls], scores[:, rs]))
    assert sorted(fmt.derived()) == sorted([neck, midhip])
    # Right in OpenPose is the subject's right: RWrist is Goliath's right_wrist (index 41).
    np.testing.assert_array_equal(
        out_kp[:, fmt.names.index("RWrist")], kp[:, goliath_index("right_wrist")]
    )


def test_coco17_is_the_goliath_body_and_its_skeleton():
    fmt = get_keypoint_format("coco17")
    # Same names, but Goliath keeps the wrists elsewhere (indices 62 and 41), so not a prefix.
    assert [goliath_names()[s] for (s,) in fmt.sources] == list(fmt.names)
    assert fmt.names[9:11] == ("left_wrist", "right_wrist") and fmt.sources[9:11] == ((62,), (41,))
    goliath = get_keypoint_format("goliath308")
    body_links = [tuple(goliath.names[i] for i in link) for link in goliath.skeleton[:19]]
    assert [tuple(fmt.names[i] for i in link) for link in fmt.skeleton] == body_links


def test_coco133_hands_and_face():
    fmt = get_keypoint_format("coco133")
    names = fmt.names
    assert names[17:23] == (
        "left_big_toe",
        "left_small_toe",
        "left_heel",
        "right_big_toe",
        "right_small_toe",
        "right_heel",
    )
    assert names[23] == "face-0" and names[90] == "face-67"
    assert (
        names[91] == "left_hand_root"
        and names[112] == "right_hand_root"
        and names[132] == "right_pinky_finger4"
    )

    def source(name):
        (s,) = fmt.sources[names.index(name)]
        return goliath_names()[s]

    assert source("left_hand_root") == "left_wrist"
    assert source("right_thumb1") == "right_thumb_third_joint"
    assert source("left_middle_finger3") == "left_middle_finger3"
    assert source("face-30") == "tip_of_nose"
    assert {f"face-{i}" for i in FACE68_FROM_GOLIATH} == {
        names[i] for i in range(23, 91) if fmt.sources[i]
    }
    # Foot links, then each finger chained from the hand root.
    links = {(names[a], names[b]) for a, b in fmt.skeleton}
    assert ("left_ankle", "left_heel") in links and (
        "right_hand_root",
        "right_pinky_finger1",
    ) in links
    assert ("left_ring_finger3", "left_ring_finger4") in links


def test_goliath_is_identity():
    fmt = get_keypoint_format("goliath308")
    kp, scores = _random_pose(n=2)
    out_kp, out_scores = convert_keypoints(kp, scores, fmt)
    np.testing.assert_array_equal(out_kp, kp)
    np.testing.assert_array_equal(out_scores, scores)


def test_errors_name_the_problem():
    with pytest.raises(KeyError, match="unknown keypoint format 'coco18'.*coco17"):
        get_keypoint_format("coco18")
    with pytest.raises(KeyError, match="left_wrist"):
        goliath_index("left_wirst")
    with pytest.raises(ValueError, match=r"\[\.\.\., 308, 2\]"):
        convert_keypoints(np.zeros((1, 17, 2)), np.zeros((1, 17)), get_keypoint_format("coco17"))
