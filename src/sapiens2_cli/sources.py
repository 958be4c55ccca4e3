"""Inputs -> an ordered list of items, each with its output-relative name; sharding.

An input is a file, a folder (``--recursive`` to descend), a glob, a ``.txt`` list of paths
(one per line, ``#`` comments and blank lines ignored) or ``-`` (paths on stdin). List and
stdin paths are taken relative to the current directory. Every item gets a *relative name*
(``rel``): its path relative to its root, extension removed, ``/``-separated. Outputs are
``OUT/<task>/<rel><ext>``. Roots:

* a file named directly is its own root: ``photo.jpg`` -> ``photo``;
* a folder is the root of the files under it: ``photos/`` + ``a/b.jpg`` -> ``a/b``;
* a glob's root is its leading part without wildcards: ``photos/**/*.jpg`` -> ``photos``;
* a list's (or stdin's) root is the deepest folder holding all its entries.

Folders and globs keep only image and video extensions (case-insensitive) and skip hidden
files and folders (names starting with ``.``). Items are sorted by ``rel``; two inputs with the
same ``rel`` are an error before anything runs, and so are images whose outputs would land
among a video's frames.

A video is one item here (sharding and the order treat it as a unit); the run loop expands it
into frame items as it decodes (:mod:`sapiens2_cli.frames`): the same ``path`` and ``rel`` with
``frame`` (index) and ``time`` (seconds) set, whose files are ``<base>/<rel>/<frame:06d><ext>``
(:meth:`Item.output`); files of the whole video are ``<base>/<rel><ext>`` (:meth:`Item.video_output`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TextIO

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".mts", ".wmv", ".flv"}
)
LIST_EXTENSIONS = frozenset({".txt"})
STDIN = "-"


class SourceError(ValueError):
    """The inputs cannot be used as given (a usage error): collisions, bad shard, output inside input."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One image, video or video frame to process: the file to read and its output-relative
    name (no extension)."""

    path: Path
    rel: str
    frame: int | None = None  # video frames: the frame index inside ``path``
    time: float | None = None  # video frames: presentation time in seconds from the stream start

    @property
    def is_video(self) -> bool:
        """A video file (or a frame of one)."""
        return is_video_name(self.path.name)

    def at_frame(self, index: int, time: float) -> Item:
        """The item of frame ``index`` (at ``time`` seconds) of this video."""
        return dataclasses.replace(self, frame=index, time=time)

    def output(self, base: Path, ext: str) -> Path:
        """``base / <rel><ext>``, or ``base / <rel> / <frame:06d><ext>`` for a video frame."""
        if self.frame is not None:
            return base.joinpath(*self.rel.split("/"), f"{self.frame:06d}{ext}")
        return self.video_output(base, ext)

    def video_output(self, base: Path, ext: str) -> Path:
        """``base / <rel><ext>``: the file of a whole video (or of an image)."""
        return base.joinpath(*self.rel.split("/")[:-1], self.rel.split("/")[-1] + ext)


@dataclasses.dataclass(frozen=True)
class InputProblem:
    """An input that yields no item: a missing path, a glob without matches, an unreadable list."""

    input: str
    reason: str


@dataclasses.dataclass
class Collection:
    items: list[Item]
    problems: list[InputProblem]
    folder_roots: list[Path]  # roots of folders and globs (the "input trees")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_video_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def is_input_name(name: str) -> bool:
    """An image or a video, by extension (what folders and globs keep)."""
    return is_image_name(name) or is_video_name(name)


def strip_extension(rel: str) -> str:
    """``a/b.c.jpg`` -> ``a/b.c`` (only the last extension goes)."""
    p = PurePosixPath(rel)
    return str(p.with_name(p.stem)) if p.suffix else rel


def _rel(path: Path, root: Path) -> str:
    return strip_extension(PurePosixPath(*path.relative_to(root).parts).as_posix())


def _walk(folder: Path, recursive: bool) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in sorted(filenames):
            if not name.startswith(".") and is_input_name(name):
                yield Path(dirpath) / name


def _raise(err: OSError) -> None:
    raise err


def glob_root(pattern: str) -> Path:
    """The leading components of ``pattern`` that hold no wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _list_entries(text: str) -> list[str]:
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _from_list(entries: Sequence[str], origin: str, problems: list[InputProblem]) -> list[Item]:
    paths = []
    for entry in entries:
        path = Path(os.path.abspath(os.path.expanduser(entry)))
        if path.is_dir():
            problems.append(InputProblem(entry, f"listed in {origin} but is a directory (lists name files)"))
        elif not path.exists() and not path.is_symlink():
            problems.append(InputProblem(entry, f"listed in {origin}: no such file"))
        else:
            paths.append(path)
    if not paths:
        return []
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return [Item(p, _rel(p, root)) for p in paths]


def collect(inputs: Sequence[str], *, recursive: bool = False, stdin: TextIO | None = None) -> Collection:
    """Expand ``inputs`` into sorted, de-duplicated items (see the module notes).

    Raises:
        SourceError: two different inputs map to the same output name.
    """
    items: list[Item] = []
    problems: list[InputProblem] = []
    roots: list[Path] = []
    for text in inputs:
        if text == STDIN:
            if stdin is None:
                raise SourceError("'-' (paths on stdin) given but no stdin is available")
            items += _from_list(_list_entries(stdin.read()), "stdin", problems)
            continue
        path = Path(os.path.expanduser(text))
        if path.is_dir():
            try:
                found = list(_walk(path, recursive))
            except OSError as err:
                problems.append(InputProblem(text, f"cannot list the folder ({err.strerror or err})"))
                continue
            roots.append(path)
            items += [Item(p, _rel(p, path)) for p in found]
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            try:
                entries = _list_entries(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as err:
                problems.append(InputProblem(text, f"cannot read the list ({err})"))
                continue
            items += _from_list(entries, text, problems)
        elif path.exists() or path.is_symlink():
            items.append(Item(path, strip_extension(path.name)))
        elif glob.has_magic(text):
            root = glob_root(text)
            found = sorted(
                Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)
                if is_input_name(p) and os.path.isfile(p)
            )  # fmt: skip
            if not found:
                problems.append(InputProblem(text, "no image or video file matches this pattern"))
                continue
            roots.append(root)
            items += [Item(p, _rel(p, root)) for p in found]
        else:
            problems.append(InputProblem(text, "no such file or directory"))
    return Collection(unique_sorted(items), problems, roots)


def unique_sorted(items: Iterable[Item]) -> list[Item]:
    """Items sorted by ``rel``; the same file twice is kept once, two files on one name is an error."""
    by_rel: dict[str, Item] = {}
    clashes: list[str] = []
    for item in items:
        seen = by_rel.setdefault(item.rel, item)
        if seen is not item and os.path.realpath(seen.path) != os.path.realpath(item.path):
            clashes.append(f"{seen.path} and {item.path} -> {item.rel}")
    videos = {rel for rel, item in by_rel.items() if item.is_video}
    for rel, item in by_rel.items():
        parent = rel.rpartition("/")[0]
        if parent in videos and not item.is_video:
            clashes.append(f"{item.path} and the frames of {by_rel[parent].path} -> {rel}")
    if clashes:
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        raise SourceError(
            "several inputs would write the same outputs: " + "; ".join(clashes[:5]) + more
            + ". Rename them or pass their folder so that their sub-paths keep them apart"
        )  # fmt: skip
    return [by_rel[rel] for rel in sorted(by_rel)]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(out: Path, collection: Collection) -> None:
    """Refuse an output folder inside an input tree, and inputs inside the output folder."""
    out_real, out_abs = os.path.realpath(out), os.path.abspath(out)
    for root in collection.folder_roots:
        if _inside(out_real, os.path.realpath(root)) or _inside(out_abs, os.path.abspath(root)):
            raise SourceError(
                f"the output folder {out} is inside the input folder {root}; "
                "choose an output folder outside the input tree"
            )
    # abspath only (no file-system calls per item): lists may name millions of files
    inside = [str(i.path) for i in collection.items if _inside(os.path.abspath(i.path), out_abs)
              or _inside(os.path.abspath(i.path), out_real)]  # fmt: skip
    if inside:
        raise SourceError(f"inputs lie inside the output folder {out}: {', '.join(inside[:3])}")


# --------------------------------------------------------------------------- sharding

def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise SourceError(f"--shard {text!r}: expected i/N, e.g. 0/8") from None
    if count < 1 or not 0 <= index < count:
        raise SourceError(f"--shard {text!r}: need 0 <= i < N")
    return index, count


def shard_from_env(env: Mapping[str, str]) -> tuple[int, int] | None:
    """The shard of a SLURM array task (``SLURM_ARRAY_TASK_ID`` / ``_COUNT`` / ``_MIN`` / ``_STEP``), or None."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = int(env["SLURM_ARRAY_TASK_ID"])
    first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    if "SLURM_ARRAY_TASK_COUNT" in env:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        count = (int(env.get("SLURM_ARRAY_TASK_MAX", task)) - first) // step + 1
    index = (task - first) // step
    if not 0 <= index < count:
        raise SourceError(f"SLURM array task {task} is outside the array (min {first}, count {count})")
    return index, count


def shard(items: Sequence[Item], index: int, count: int) -> list[Item]:
    """Every ``count``-th item starting at ``index``: shards are disjoint and cover all items.

    Sharding is applied to the sorted inputs before skip-existing, so a resumed shard owns
    exactly the items it owned the first time.
    """
    return list(items[index::count])
