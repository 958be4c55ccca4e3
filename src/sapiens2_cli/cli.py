"""The ``sapiens2`` command line: parsing, choices and exit codes only.

torch and the model code are imported inside the commands, so ``sapiens2 --help`` is instant.
Exit codes: 0 success, 1 some item or the job failed, 2 usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sapiens2_cli import __version__
from sapiens2_cli.plan import DEFAULT_SIZE, FORMATS, PRECISIONS, PREDICT_SIZES
from sapiens2_cli.tasks import TASK_NAMES
from sapiens2_cli.tasks.pose_options import KEYPOINT_FORMAT_NAMES

EXIT_FAILED = 1


def fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit 1."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILED)


class _Group(click.Group):
    """The root group; keeps the raw arguments so that a run can record its own command line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGV_KEY] = list(args)
        return super().parse_args(ctx, args)


ARGV_KEY = "sapiens2.argv"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sapiens2")
def main() -> None:
    """Run Meta's Sapiens2 models: predict, fine-tune, pretrain and export."""


@main.command("models")
@click.option("--task", "tasks", multiple=True, help="Only these tasks.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(tasks: tuple[str, ...], as_json: bool) -> None:
    """List the released models: task, size, Hub repo, file, parameters, cached or not."""
    from sapiens2_cli.inspect_cmd import zoo_table

    rows = zoo_table(set(tasks) or None)
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "task", "size", "Hub repo", "file", "params", "cached", "note")
    for r in rows:
        table.add_row(
            r["name"], r["task"], r["size"], r["repo_id"], r["filename"],
            f"{r['parameters'] / 1e9:.3f} B", "yes" if r["cached"] else "no", r["note"],
        )  # fmt: skip
    Console().print(table)


@main.command("download")
@click.argument("refs", nargs=-1, required=True)
def download_cmd(refs: tuple[str, ...]) -> None:
    """Fill the Hugging Face cache ahead of an offline job (zoo names or Hub repo ids)."""
    from sapiens2_cli.hub import HubError
    from sapiens2_cli.weights import CheckpointError, file_digest, resolve

    failed = 0
    for ref in refs:
        try:
            resolved = resolve(ref)
        except (HubError, CheckpointError) as err:
            click.echo(f"error: {ref}: {err}", err=True)
            failed += 1
            continue
        click.echo(f"{ref}\t{resolved.path}\t{file_digest(resolved.path)}")
    if failed:
        sys.exit(EXIT_FAILED)


@main.command("inspect")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(ref: str, as_json: bool) -> None:
    """Show a checkpoint's inferred architecture and head, dtypes, key count and problems."""
    from sapiens2_cli.hub import HubError
    from sapiens2_cli.inspect_cmd import inspect_checkpoint
    from sapiens2_cli.weights import CheckpointError

    try:
        report = inspect_checkpoint(ref)
    except (HubError, CheckpointError) as err:
        fail(str(err))
    if as_json:
        import json

        click.echo(json.dumps(report, indent=1))
    else:
        for key, value in report.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, list):
                value = "; ".join(map(str, value)) or "none"
            click.echo(f"{key:>12}: {value}")
    if report["problems"]:
        sys.exit(EXIT_FAILED)



def _parse_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not HxW, e.g. 1024x768") from None
    return h, w


@main.command("export")
@click.argument("ref")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Artifact to write.")
@click.option(
    "--format", "fmt", type=click.Choice(["safetensors", "pt2", "onnx"]),
    help="Artifact format (default: from the output suffix).",
)  # fmt: skip
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--input-size", callback=_parse_size, metavar="HxW", help="Export and verification size (default: the model's)."
)
@click.option("--normalize-in-graph", is_flag=True, help="pt2/onnx graphs take RGB pixels 0-255 and normalise inside.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (18 or newer).")
@click.option("--device", default="cpu", show_default=True, help="Where to trace and verify (cpu, cuda...).")
@click.option("--check-image", type=click.Path(exists=True, dir_okay=False), help="Photo for the real-input check.")
@click.option("--tolerance", type=float, help="Fixed limit on max|artifact-eager|/max|eager| (default: per dtype).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def export_cmd(
    ref: str, output: str, fmt: str | None, dtype: str, input_size: tuple[int, int] | None,
    normalize_in_graph: bool, opset: int, device: str, check_image: str | None, tolerance: float | None,
    overwrite: bool,
) -> None:  # fmt: skip
    """Export REF as release safetensors, a torch.export program (.pt2) or ONNX, verified against eager.

    The written artifact is run on a random and a real input and compared with the float32
    eager model; the differences go to OUTPUT.verify.json. Beyond tolerance nothing is kept
    and the command exits 1.
    """
    from sapiens2_cli.export import ExportError, export_model
    from sapiens2_cli.hub import HubError
    from sapiens2_cli.weights import CheckpointError

    try:
        result = export_model(
            ref, output, fmt=fmt, dtype=dtype, input_size=input_size, normalize_in_graph=normalize_in_graph,
            opset=opset, device=device, check_image=check_image, tolerance=tolerance, overwrite=overwrite,
            log=click.echo,
        )  # fmt: skip
    except (ExportError, CheckpointError, HubError) as err:
        fail(str(err))
    files = ", ".join(map(str, result.files))
    click.echo(f"wrote {files} (max|diff| {result.max_abs:.3g}, relative {result.max_rel:.3g})")
    click.echo(f"check: {result.sidecar}")
EXIT_USAGE = 2


def usage_fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit 2 (a usage error)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("-t", "--task", "tasks", multiple=True, type=click.Choice(TASK_NAMES),
              help="Task to run; repeat for several (each image is decoded once).")
@click.option("--size", default=DEFAULT_SIZE, show_default=True, type=click.Choice(PREDICT_SIZES),
              help="Zoo model size for tasks without --checkpoint.")
@click.option("--checkpoint", "checkpoints", multiple=True, metavar="[TASK=]REF",
              help="Zoo name, Hub repo id or local file; TASK=REF when several tasks run.")
@click.option("--input-size", metavar="HxW", help="Model input size (default: the model's, 1024x768).")
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              help="Dense maps as exr (default) or npy; pretrain features as npy (default) or safetensors.")
@click.option("--vis", is_flag=True, help="Also write overlays under OUT/vis/<task>/ (videos: one .mp4 each).")
@click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders of folder inputs.")
@click.option("-b", "--batch-size", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", type=click.IntRange(min=0), help="Reader threads (writers: half). Default: from the CPU count.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS))
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (static batch).")
@click.option("--skip-existing/--overwrite", "skip_existing", default=True, show_default=True,
              help="Skip images whose outputs all exist, or redo everything.")
@click.option("--shard", metavar="i/N", help="Process every N-th image from the i-th (0-based); "
              "default: the SLURM array task when there is one.")
@click.option("--tile", default="off", show_default=True, metavar="auto|off|HxW",
              help="Dense tasks on large images: overlapping tiles at native scale, blended. auto: when a "
                   "side exceeds 1.5x the model input; HxW: tiles of that size for images larger than one.")
@click.option("--tile-overlap", type=click.IntRange(min=0), metavar="PX",
              help="Minimum overlap of neighbouring tiles (default: a quarter of the tile's shorter side).")
@click.option("--stride", default=1, show_default=True, type=click.IntRange(min=1),
              help="Videos: every N-th frame (frame index divisible by N).")
@click.option("--start", metavar="POS", help="Videos: first frame, a frame number (120) or a time (4.5s, 01:02.5).")
@click.option("--end", metavar="POS", help="Videos: stop before this frame or time.")
@click.option("-q", "--quiet", is_flag=True, help="No progress; failures are still printed.")
@click.option("--bboxes", metavar="FILE", help="Pose: person boxes from a JSON file ({\"<path relative to "
              "the input root>\": [[x1, y1, x2, y2, score?], ...]} or COCO) instead of the detector.")
@click.option("--detector", metavar="REF|none", help="Pose: person detector weights (Hub repo, .pth, "
              ".safetensors; default facebook/sapiens-pose-bbox-detector); none: the whole image.")
@click.option("--bbox-thr", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="Pose: keep person boxes scoring above this.")
@click.option("--nms-thr", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="Pose: IoU threshold of the detector's NMS.")
@click.option("--keypoint-format", default="goliath308", show_default=True, type=click.Choice(KEYPOINT_FORMAT_NAMES),
              help="Pose: keypoint layout written (converted by keypoint name).")
@click.option("--kpt-thr", default=0.3, show_default=True, type=float, help="Pose --vis: draw points scoring this or more.")
@click.option("--radius", type=click.IntRange(min=1), help="Pose --vis: keypoint radius, px [8 at a 1920 px long side].")
@click.option("--thickness", type=click.IntRange(min=1), help="Pose --vis: link width, px [8 at a 1920 px long side].")
@click.option("--no-flip-test", is_flag=True, help="Pose: no flip test (half the model time, less accurate).")
def predict_cmd(inputs: tuple[str, ...], output: str, tasks: tuple[str, ...], size: str,
                checkpoints: tuple[str, ...], input_size: str | None, fmt: str | None, vis: bool, recursive: bool,
                batch_size: int, workers: int | None, device: str, precision: str, compile_: bool,
                skip_existing: bool, shard: str | None, tile: str, tile_overlap: int | None, stride: int,
                start: str | None, end: str | None, quiet: bool, bboxes: str | None, detector: str | None,
                bbox_thr: float, nms_thr: float, keypoint_format: str, kpt_thr: float, radius: int | None,
                thickness: int | None, no_flip_test: bool) -> None:  # fmt: skip
    """Run seg / pose / normal / pointmap / albedo / pretrain on images and videos: files, folders,
    globs, .txt lists or - (stdin).

    Outputs go to OUT/<task>/<input path relative to its root>.<ext> (video frames:
    OUT/<task>/<video>/<frame:06d>.<ext>), with OUT/run.json describing the run. Exit 0 when
    every image and frame succeeded, 1 when any failed, 2 on usage errors.
    """
    import signal

    from sapiens2_cli.hub import HubError
    from sapiens2_cli.plan import PlanError, PredictOptions, parse_input_size, parse_tile
    from sapiens2_cli.sources import SourceError, parse_shard
    from sapiens2_cli.tasks.pose_options import PoseOptions

    try:
        pose = PoseOptions(
            bboxes=bboxes, detector=detector, bbox_thr=bbox_thr, nms_thr=nms_thr, keypoint_format=keypoint_format,
            kpt_thr=kpt_thr, radius=radius, thickness=thickness, flip_test=not no_flip_test,
        )  # fmt: skip
        options = PredictOptions(
            inputs=inputs, output=Path(output), tasks=tasks, size=size, checkpoints=checkpoints,
            input_size=parse_input_size(input_size) if input_size else None, fmt=fmt, vis=vis,
            recursive=recursive, batch_size=batch_size, workers=workers, device=device,
            precision=precision, compile=compile_, overwrite=not skip_existing,
            shard=parse_shard(shard) if shard else None, tile=parse_tile(tile), tile_overlap=tile_overlap,
            stride=stride, start=start, end=end, quiet=quiet, pose=pose,
            command=("sapiens2", *click.get_current_context().meta.get(ARGV_KEY, sys.argv[1:])),
        )  # fmt: skip
    except ValueError as err:  # PlanError, SourceError, PoseOptions' checks
        usage_fail(str(err))

    from sapiens2_cli.predict import run_predict
    from sapiens2_cli.weights import CheckpointError

    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)  # farm schedulers stop jobs with SIGTERM
    try:
        record = run_predict(options, stdin=sys.stdin)
    except (PlanError, SourceError, CheckpointError) as err:
        usage_fail(str(err))
    except HubError as err:
        fail(str(err))
    except KeyboardInterrupt:
        sys.exit(128 + (received[0] if received else signal.SIGINT))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if record.status == "interrupted":
        click.echo("interrupted: outputs written so far are complete; run again to resume", err=True)
        sys.exit(128 + (received[0] if received else signal.SIGINT))
    if not quiet:
        click.echo(
            f"done: {record.ok} ok, {record.skipped} skipped, {record.failed} failed "
            f"of {record.total} -> {output}", err=True,
        )  # fmt: skip
    sys.exit(EXIT_FAILED if record.failed or record.failures else 0)


def _register_training_commands() -> None:
    from sapiens2_cli.cli_train import evaluate_cmd, finetune_cmd, pretrain_cmd

    for command in (finetune_cmd, pretrain_cmd, evaluate_cmd):
        main.add_command(command)


_register_training_commands()
