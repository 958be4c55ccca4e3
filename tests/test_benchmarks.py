"""The forward benchmark runs end to end on a tiny model, and its peer comparison is sound.

transformers is a benchmark-only extra (``pip install .[benchmarks]``); without it the
comparison with the peer is skipped, our own rows still run.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO

TINY = ["--size", "tiny", "--height", "64", "--width", "48", "--iters", "1", "--no-peak"]


def _bench_module(name: str):
    """benchmarks/<name>.py imported as a module (the folder is on sys.path while it loads)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_our_variants_agree_and_every_batch_is_timed(tmp_path):
    forward = _bench_module("forward")
    impls = "ours,ours-fused,ours-legacy"
    records = forward.main(
        [*TINY, "--part", "task", "--impl", impls, "--dtype", "fp32,bf16", "--batch", "1,2",
         "--cache", str(tmp_path), "--out", str(tmp_path / "r.jsonl")]
    )  # fmt: skip
    assert len(records) == 3 * 2 * 2 == len((tmp_path / "r.jsonl").read_text().splitlines())
    for r in records:
        assert r["images_per_s"] > 0 and r["gflop_per_image"] > 0 and len(r["wall_s"]) == 1
        if r["dtype"] == "fp32":  # the optimisations change no float32 result here
            assert r["check_max_abs"] == 0, r["impl"]
        else:
            assert 0 < r["check_max_rel"] < 0.1, r["impl"]  # bf16: rounded, not broken


def test_transformers_matches_once_rope_is_the_official_one(tmp_path):
    pytest.importorskip("transformers.models.sapiens2")
    forward = _bench_module("forward")
    for part in ("backbone", "task"):
        (record,) = forward.main([*TINY, "--part", part, "--impl", "hf", "--cache", str(tmp_path)])
        # as shipped, transformers' float32 RoPE moves the outputs by ~1e-2 relative
        assert record["hf_fp32_rope_max_rel"] > 1e-4
        assert record["hf_bf16_rope_max_abs"] < 1e-5


def test_pipeline_overhead_runs_on_photos_and_on_a_video(tmp_path):
    """predict_overhead.py times the real run on a folder of photos and on an H.264 video, every
    picture processed once per round."""
    module = _bench_module("predict_overhead")
    common = ["--task", "seg", "--input-size", "64x48", "--image-size", "160x120", "--rounds", "1"]
    for source in (["--images", "3"], ["--video", "5", "--fps", "25"]):
        result = module.main([*common, *source])
        assert result["forward_only_images_per_second"] > 0 and result["end_to_end_images_per_second"] > 0
        assert result["end_to_end_stage_seconds"]["forward"] > 0
    assert result["config"]["video"] == 5


def test_rope_in_float32_is_a_timing_variant_that_moves_the_outputs(tmp_path):
    forward = _bench_module("forward")
    records = forward.main([*TINY, "--impl", "ours-fused,ours-rope32", "--cache", str(tmp_path)])
    assert records[0]["check_max_abs"] == 0
    assert 0 < records[1]["check_max_rel"] < 0.05  # the official bf16 rounding is gone, nothing else


def test_memory_is_measured_in_a_fresh_process(tmp_path):
    memory = _bench_module("memory")
    (fp32, bf16) = memory.main(["--size", "tiny", "--height", "64", "--width", "48", "--impl", "ours-fused",
                                "--dtype", "fp32,bf16", "--threads", "1", "--cache", str(tmp_path)])  # fmt: skip
    assert bf16["weights_mib"] > 0 and fp32["weights_mib"] == pytest.approx(2 * bf16["weights_mib"], rel=1e-3)
    assert fp32["total_mib"] >= fp32["activations_mib"] >= 0


def test_parity_drift_reports_the_shipped_paths_within_tolerance(capsys):
    from conftest import FIXTURES

    drift = _bench_module("parity_drift")
    drift.main(["--fixtures", str(FIXTURES), "--variants", "fused,separate"])
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert {row[0] for row in rows} >= {"seg", "pose", "normal", "albedo", "pointmap", "backbone_plain"}
    for case, atol, fused, separate in rows:
        assert float(fused) <= float(atol) and float(separate) <= float(atol), case  # "(fails)" would not parse
