"""Keypoint layouts (``--keypoint-format``) and conversion from the 308-point Goliath output.

Every table is built from keypoint *names*; Goliath indices come from the packaged
``data/keypoints308.json``. Each point of a target layout is one of:

* copied: the Goliath point with the same meaning (usually the same name);
* derived: the midpoint of two Goliath points, score = the smaller of their two scores;
* missing: no Goliath counterpart; coordinates NaN, score 0 (writers emit ``null``).

Formats:

``goliath308``
    The model output as is (308 points).
``coco17``
    COCO body: the 17 names are Goliath names; all copied.
``coco133``
    COCO-WholeBody: body 17 + feet 6 (same names, copied); hands 2 x 21 with ``*_hand_root``
    copied from ``*_wrist`` and finger point 1 (thumb CMC, finger MCP: the third joint from the
    tip) from Goliath's ``*_third_joint``, points 2-4 by name. Face ``face-0 .. face-67``
    (iBUG 300-W 68-point order, face-0..16 the jaw line from the subject's right): the 16
    landmarks Goliath names exactly are copied (chin, nose root / tip / base, eye corners =
    ends of the upper lash line, outer and inner mouth corners and lip centres); the other 52
    face points (jaw line, eyebrows, eyelid midpoints, nostril wings, lip midpoints) are
    missing. Goliath's ``l_``/``r_`` face prefixes are the subject's left/right, as its body names.
``openpose25``
    OpenPose BODY_25: 23 points copied by name; ``Neck`` = midpoint of the shoulders and
    ``MidHip`` = midpoint of the hips (OpenPose's own definitions; Goliath's separate ``neck``
    landmark is not used).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

FINGERS = ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")
SIDES = ("left", "right")


@dataclass(frozen=True)
class KeypointFormat:
    """A keypoint layout and how each of its points is obtained from Goliath-308.

    Attributes:
        name: registry name (``--keypoint-format`` value).
        names: ``K`` keypoint names in output order.
        sources: per point, the Goliath indices it comes from: one (copied), two (midpoint), or
            none (missing).
        skeleton: ``(i, j)`` index pairs into ``names``, in drawing order.
        flip_indices: ``K`` indices; point ``i`` becomes point ``flip_indices[i]`` after a
            horizontal flip.
    """

    name: str
    names: tuple[str, ...]
    sources: tuple[tuple[int, ...], ...]
    skeleton: tuple[tuple[int, int], ...]
    flip_indices: tuple[int, ...]

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    def copied(self) -> list[tuple[int, int]]:
        """``(target index, Goliath index)`` of every copied point."""
        return [(i, s[0]) for i, s in enumerate(self.sources) if len(s) == 1]

    def derived(self) -> list[int]:
        return [i for i, s in enumerate(self.sources) if len(s) == 2]

    def missing(self) -> list[int]:
        return [i for i, s in enumerate(self.sources) if not s]


@cache
def goliath_metadata() -> dict:
    """The packaged ``keypoints308.json`` (names, groups, sigmas, flip partners, skeleton)."""
    text = resources.files("sapiens2_cli").joinpath("data/keypoints308.json").read_text()
    return json.loads(text)


@cache
def goliath_names() -> tuple[str, ...]:
    return tuple(k["name"] for k in goliath_metadata()["keypoints"])


def goliath_index(name: str) -> int:
    """Index of a Goliath keypoint by name; an unknown name fails with close matches."""
    names = goliath_names()
    try:
        return names.index(name)
    except ValueError:
        close = difflib.get_close_matches(name, names, n=3)
        raise KeyError(f"no Goliath keypoint named {name!r} (close: {close})") from None


def _flip_name(name: str) -> str:
    for a, b in (("left_", "right_"), ("right_", "left_")):
        if name.startswith(a):
            return b + name[len(a) :]
    return name


def _build(
    name: str,
    names: list[str],
    sources_by_name: dict[str, tuple[str, ...]],
    skeleton: list[tuple[str, str]],
    flip: dict[str, str] | None = None,
) -> KeypointFormat:
    """Resolve a layout given by names into indices; every name must be known."""
    position = {n: i for i, n in enumerate(names)}
    if len(position) != len(names):
        raise ValueError(f"{name}: duplicate keypoint names")
    sources = tuple(tuple(goliath_index(s) for s in sources_by_name.get(n, ())) for n in names)
    flips = flip or {}
    flip_indices = tuple(position[flips.get(n, _flip_name(n))] for n in names)
    links = tuple((position[a], position[b]) for a, b in skeleton)
    return KeypointFormat(name, tuple(names), sources, links, flip_indices)


def _goliath308() -> KeypointFormat:
    meta = goliath_metadata()
    names = goliath_names()
    return KeypointFormat(
        name="goliath308",
        names=names,
        sources=tuple((i,) for i in range(len(names))),
        skeleton=tuple((a, b) for a, b in meta["skeleton_links"]),
        flip_indices=tuple(k["flip_index"] for k in meta["keypoints"]),
    )


COCO17_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
COCO17_SKELETON = [
    ("left_ankle", "left_knee"), ("left_knee", "left_hip"), ("right_ankle", "right_knee"),
    ("right_knee", "right_hip"), ("left_hip", "right_hip"), ("left_shoulder", "left_hip"),
    ("right_shoulder", "right_hip"), ("left_shoulder", "right_shoulder"),
    ("left_shoulder", "left_elbow"), ("right_shoulder", "right_elbow"),
    ("left_elbow", "left_wrist"), ("right_elbow", "right_wrist"), ("left_eye", "right_eye"),
    ("nose", "left_eye"), ("nose", "right_eye"), ("left_eye", "left_ear"),
    ("right_eye", "right_ear"), ("left_ear", "left_shoulder"), ("right_ear", "right_shoulder"),
]  # fmt: skip
FEET = [
    "left_big_toe",
    "left_small_toe",
    "left_heel",
    "right_big_toe",
    "right_small_toe",
    "right_heel",
]

#: iBUG 68-point index -> the Goliath landmark with the same definition.
FACE68_FROM_GOLIATH = {
    8: "tip_of_chin",
    27: "center_of_nose_root",
    30: "tip_of_nose",
    33: "bottom_center_of_nose",
    36: "r_outer_end_of_upper_lash_line",
    39: "r_inner_end_of_upper_lash_line",
    42: "l_inner_end_of_upper_lash_line",
    45: "l_outer_end_of_upper_lash_line",
    48: "r_outer_corner_of_mouth",
    51: "center_of_cupid_bow",
    54: "l_outer_corner_of_mouth",
    57: "center_of_lower_outer_lip",
    60: "r_inner_corner_of_mouth",
    62: "center_of_upper_inner_lip",
    64: "l_inner_corner_of_mouth",
    66: "center_of_lower_inner_lip",
}


def _face68_mirror(i: int) -> int:
    """iBUG 68 horizontal mirror partner (jaw, brows, nose, eyes, outer and inner lips)."""
    if i <= 16:
        return 16 - i
    if i <= 26:
        return 43 - i  # 17..21 <-> 26..22
    if i <= 30:
        return i
    if i <= 35:
        return 66 - i  # 31..35 <-> 35..31
    if i <= 47:  # right eye 36..41 <-> left eye 45, 44, 43, 42, 47, 46
        eyes = [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
        return next(b if i == a else a for a, b in eyes if i in (a, b))
    if i <= 54:
        return 102 - i  # 48..54 <-> 54..48
    if i <= 59:
        return 114 - i  # 55..59 <-> 59..55
    if i <= 64:
        return 124 - i  # 60..64 <-> 64..60
    return 132 - i  # 65..67 <-> 67..65


def _hand_names(side: str) -> list[str]:
    return [f"{side}_hand_root"] + [f"{side}_{f}{j}" for f in FINGERS for j in range(1, 5)]


def _coco17() -> KeypointFormat:
    return _build("coco17", COCO17_NAMES, {n: (n,) for n in COCO17_NAMES}, COCO17_SKELETON)


def _coco133() -> KeypointFormat:
    face = [f"face-{i}" for i in range(68)]
    names = COCO17_NAMES + FEET + face + _hand_names("left") + _hand_names("right")
    sources = {n: (n,) for n in COCO17_NAMES + FEET}
    sources.update({f"face-{i}": (g,) for i, g in FACE68_FROM_GOLIATH.items()})
    skeleton = list(COCO17_SKELETON)
    for side in SIDES:
        skeleton += [(f"{side}_ankle", f"{side}_{p}") for p in ("big_toe", "small_toe", "heel")]
    for side in SIDES:
        sources[f"{side}_hand_root"] = (f"{side}_wrist",)
        for f in FINGERS:
            sources[f"{side}_{f}1"] = (f"{side}_{f}_third_joint",)
            sources.update({f"{side}_{f}{j}": (f"{side}_{f}{j}",) for j in range(2, 5)})
            chain = [f"{side}_hand_root"] + [f"{side}_{f}{j}" for j in range(1, 5)]
            skeleton += list(zip(chain[:-1], chain[1:]))
    flip = {f"face-{i}": f"face-{_face68_mirror(i)}" for i in range(68)}
    return _build("coco133", names, sources, skeleton, flip)


#: OpenPose BODY_25 names -> Goliath names (one: copied, two: midpoint).
OPENPOSE25 = {
    "Nose": ("nose",), "Neck": ("left_shoulder", "right_shoulder"),
    "RShoulder": ("right_shoulder",), "RElbow": ("right_elbow",), "RWrist": ("right_wrist",),
    "LShoulder": ("left_shoulder",), "LElbow": ("left_elbow",), "LWrist": ("left_wrist",),
    "MidHip": ("left_hip", "right_hip"),
    "RHip": ("right_hip",), "RKnee": ("right_knee",), "RAnkle": ("right_ankle",),
    "LHip": ("left_hip",), "LKnee": ("left_knee",), "LAnkle": ("left_ankle",),
    "REye": ("right_eye",), "LEye": ("left_eye",), "REar": ("right_ear",), "LEar": ("left_ear",),
    "LBigToe": ("left_big_toe",), "LSmallToe": ("left_small_toe",), "LHeel": ("left_heel",),
    "RBigToe": ("right_big_toe",), "RSmallToe": ("right_small_toe",), "RHeel": ("right_heel",),
}  # fmt: skip
OPENPOSE25_SKELETON = [
    ("Neck", "MidHip"), ("Neck", "RShoulder"), ("Neck", "LShoulder"), ("RShoulder", "RElbow"),
    ("RElbow", "RWrist"), ("LShoulder", "LElbow"), ("LElbow", "LWrist"), ("MidHip", "RHip"),
    ("RHip", "RKnee"), ("RKnee", "RAnkle"), ("MidHip", "LHip"), ("LHip", "LKnee"),
    ("LKnee", "LAnkle"), ("Neck", "Nose"), ("Nose", "REye"), ("REye", "REar"), ("Nose", "LEye"),
    ("LEye", "LEar"), ("LAnkle", "LBigToe"), ("LBigToe", "LSmallToe"), ("LAnkle", "LHeel"),
    ("RAnkle", "RBigToe"), ("RBigToe", "RSmallToe"), ("RAnkle", "RHeel"),
]  # fmt: skip


def _openpose25() -> KeypointFormat:
    names = list(OPENPOSE25)
    # "LShoulder" <-> "RShoulder"; "Nose", "Neck", "MidHip" are their own partners.
    swap = {"L": "R", "R": "L"}
    flip = {n: swap[n[0]] + n[1:] if n[0] in swap and n[1].isupper() else n for n in names}
    return _build("openpose25", names, OPENPOSE25, OPENPOSE25_SKELETON, flip)


#: ``--keypoint-format`` registry: name -> builder.
KEYPOINT_FORMATS = {
    "goliath308": _goliath308,
    "coco17": _coco17,
    "coco133": _coco133,
    "openpose25": _openpose25,
}


@cache
def get_keypoint_format(name: str) -> KeypointFormat:
    """The layout registered as ``name``; an unknown name fails with the valid choices."""
    if name not in KEYPOINT_FORMATS:
        raise KeyError(
            f"unknown keypoint format {name!r}; choose one of {sorted(KEYPOINT_FORMATS)}"
        )
    return KEYPOINT_FORMATS[name]()


def convert_keypoints(
    keypoints: np.ndarray, scores: np.ndarray, fmt: KeypointFormat
) -> tuple[np.ndarray, np.ndarray]:
    """Goliath-308 keypoints -> ``fmt``.

    Args:
        keypoints: ``[..., 308, 2]`` ``(x, y)`` image pixels.
        scores: ``[..., 308]``.
        fmt: target layout.

    Returns:
        ``keypoints [..., K, 2]`` float64 (NaN where missing) and ``scores [..., K]`` float64
        (0 where missing; the smaller source score for midpoints). Copied points are exact copies.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    sc = np.asarray(scores, dtype=np.float64)
    if kp.shape[-2:] != (len(goliath_names()), 2) or sc.shape != kp.shape[:-1]:
        raise ValueError(
            f"expected keypoints [..., 308, 2] and scores [..., 308], got {kp.shape}, {sc.shape}"
        )
    out_kp = np.full(kp.shape[:-2] + (fmt.num_keypoints, 2), np.nan)
    out_sc = np.zeros(sc.shape[:-1] + (fmt.num_keypoints,))
    for i, src in enumerate(fmt.sources):
        if len(src) == 1:
            out_kp[..., i, :] = kp[..., src[0], :]
            out_sc[..., i] = sc[..., src[0]]
        elif len(src) == 2:
            a, b = src
            out_kp[..., i, :] = (kp[..., a, :] + kp[..., b, :]) * 0.5
            out_sc[..., i] = np.minimum(sc[..., a], sc[..., b])
    return out_kp, out_sc


def to_goliath(
    keypoints: np.ndarray, scores: np.ndarray, fmt: KeypointFormat
) -> tuple[np.ndarray, np.ndarray]:
    """Read the copied points of a ``fmt`` array back into Goliath order.

    ``keypoints [..., K, 2]``, ``scores [..., K]`` -> ``[..., 308, 2]`` (NaN for points ``fmt``
    does not copy) and ``[..., 308]`` (0 there). Derived points are not inverted.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    sc = np.asarray(scores, dtype=np.float64)
    if kp.shape[-2:] != (fmt.num_keypoints, 2) or sc.shape != kp.shape[:-1]:
        raise ValueError(
            f"expected {fmt.name} keypoints [..., {fmt.num_keypoints}, 2], "
            f"got {kp.shape}, {sc.shape}"
        )
    n = len(goliath_names())
    out_kp = np.full(kp.shape[:-2] + (n, 2), np.nan)
    out_sc = np.zeros(sc.shape[:-1] + (n,))
    for target, source in fmt.copied():
        out_kp[..., source, :] = kp[..., target, :]
        out_sc[..., source] = sc[..., target]
    return out_kp, out_sc
