"""Inputs -> items with output names; collisions; sharding."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from sapiens2_cli.sources import (
    Item, SourceError, check_output_dir, collect, glob_root, parse_shard, shard, shard_from_env, strip_extension,
)  # fmt: skip


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    touch(tmp_path / "photos", "a.jpg", "B.JPEG", "c.Png", "d.webp", "e.bmp", "f.tif", "g.TIFF", "notes.txt",
          "raw.cr2", ".hidden.jpg", "sub/h.jpg", "sub/deeper/i.png", ".cache/j.jpg")  # fmt: skip
    return tmp_path


def rels(collection):
    return [i.rel for i in collection.items]


def test_folder_matches_image_extensions_case_insensitively(tree):
    assert rels(collect(["photos"])) == ["B", "a", "c", "d", "e", "f", "g"]
    assert rels(collect(["photos"], recursive=True)) == ["B", "a", "c", "d", "e", "f", "g", "sub/deeper/i", "sub/h"]


def test_named_file_is_its_own_root(tree):
    c = collect(["photos/sub/h.jpg", "photos/notes.txt"])  # a .txt is a list: its lines name files
    assert rels(c) == ["h"] and [str(p.input) for p in c.problems] == ["x"]


def test_only_the_last_extension_goes():
    assert strip_extension("a/frame.0001.jpg") == "a/frame.0001"
    assert strip_extension("noext") == "noext"


def test_globs_keep_paths_below_their_fixed_part(tree):
    assert glob_root("photos/**/*.jpg") == Path("photos")
    assert rels(collect(["photos/**/*.jpg"])) == ["a", "sub/h"]
    assert rels(collect(["photos/*"])) == ["B", "a", "c", "d", "e", "f", "g"]
    c = collect(["photos/*.gif"])
    assert not c.items and c.problems[0].reason == "no image or video file matches this pattern"


def test_lists_and_stdin_use_the_deepest_common_folder(tree):
    (tree / "list.txt").write_text("# photos\nphotos/sub/h.jpg\n\n" + str(tree / "photos/sub/deeper/i.png") + "\n")
    assert rels(collect(["list.txt"])) == ["deeper/i", "h"]
    stdin = io.StringIO("photos/a.jpg\nphotos/sub/h.jpg\nphotos/missing.jpg\n")
    c = collect(["-"], stdin=stdin)
    assert rels(c) == ["a", "sub/h"]
    assert [(p.input, p.reason) for p in c.problems] == [("photos/missing.jpg", "listed in stdin: no such file")]


def test_missing_inputs_are_problems_not_errors(tree):
    c = collect(["nothing.jpg", "photos/a.jpg"])
    assert rels(c) == ["a"]
    assert [(p.input, p.reason) for p in c.problems] == [("nothing.jpg", "no such file or directory")]


def test_two_inputs_on_one_output_name_is_an_error(tree):
    touch(tree, "other/a.png")
    with pytest.raises(SourceError, match=r"photos/a.jpg and other/a.png -> a"):
        collect(["photos/a.jpg", "other/a.png"])
    touch(tree / "photos", "a.png")
    with pytest.raises(SourceError, match="same outputs"):
        collect(["photos"])


def test_the_same_file_twice_is_kept_once(tree):
    assert rels(collect(["photos/a.jpg", "./photos/a.jpg", "photos/*.jpg"])) == ["a"]


def test_output_folder_must_be_outside_input_trees(tree):
    with pytest.raises(SourceError, match="inside the input folder"):
        check_output_dir(Path("photos/out"), collect(["photos"]))
    with pytest.raises(SourceError, match="inside the input folder"):
        check_output_dir(Path("photos"), collect(["photos/**/*.jpg"]))
    with pytest.raises(SourceError, match="inside the output folder"):
        check_output_dir(Path("photos"), collect(["photos/a.jpg"]))
    check_output_dir(Path("out"), collect(["photos"], recursive=True))


def test_shards_cover_every_item_exactly_once():
    items = [Item(Path(f"{i}.jpg"), f"{i:03d}") for i in range(23)]
    for count in (1, 2, 5, 23, 40):
        parts = [shard(items, i, count) for i in range(count)]
        flat = [it.rel for part in parts for it in part]
        assert sorted(flat) == [it.rel for it in items]
        assert len(flat) == len(set(flat))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard(items, 1, 5) == shard(list(items), 1, 5)  # deterministic


def test_parse_shard():
    assert parse_shard("3/8") == (3, 8)
    for bad in ("8/8", "-1/4", "1", "a/b", "0/0"):
        with pytest.raises(SourceError):
            parse_shard(bad)


def test_slurm_array_variables():
    assert shard_from_env({}) is None
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}) == (3, 8)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "10"}
    assert shard_from_env(env) == (4, 10)
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "8", "SLURM_ARRAY_TASK_STEP": "2"}
    assert shard_from_env(env) == (2, 5)


def test_item_output_paths():
    item = Item(Path("x/y/frame.0001.jpg"), "y/frame.0001")
    assert item.output(Path("OUT/seg"), ".png") == Path("OUT/seg/y/frame.0001.png")
    assert os.fspath(Item(Path("p.jpg"), "p").output(Path("o"), ".exr")) == "o/p.exr"


def test_videos_are_items_and_their_frames_have_their_own_names(tmp_path):
    touch(tmp_path / "in", "a.jpg", "clip.MP4", "sub/take.mov", "sub/notes.txt")
    c = collect([str(tmp_path / "in")], recursive=True)
    assert [(i.rel, i.is_video) for i in c.items] == [("a", False), ("clip", True), ("sub/take", True)]
    frame = c.items[2].at_frame(42, 1.4)
    assert (frame.frame, frame.time, frame.is_video) == (42, 1.4, True)
    assert os.fspath(frame.output(Path("o"), ".png")) == "o/sub/take/000042.png"
    assert os.fspath(frame.video_output(Path("o"), ".mp4")) == "o/sub/take.mp4"
    assert rels(collect([str(tmp_path / "in" / "*")])) == ["a", "clip"]


def test_an_image_among_a_videos_frames_is_a_collision(tmp_path):
    touch(tmp_path / "in", "clip.mp4", "clip/000001.png")
    with pytest.raises(SourceError, match="the frames of"):
        collect([str(tmp_path / "in")], recursive=True)
