"""Training commands of the ``sapiens2`` command line: ``finetune``, ``pretrain`` and ``evaluate``.

Parsing, choices and exit codes only; the work is in ``sapiens2_cli.train`` and
``sapiens2_cli.pretrain`` (imported inside the commands so that ``--help`` stays instant).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

EXIT_FAILED = 1
EXIT_USAGE = 2
TRAIN_TASKS = ("seg", "pose", "normal", "pointmap", "albedo")


def _exit(message: str, code: int) -> None:
    """Print ``error: message`` on stderr (rank 0 only under torchrun) and exit ``code``."""
    import os

    if os.environ.get("RANK", "0") == "0":
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


_RUN_FOLDER_OPTIONS = (
    click.option("-o", "--output", help="Run folder (config, metrics, checkpoints, weights)."),
    click.option("--resume", is_flag=True, help="Continue the run in the output folder if any."),
    click.option("--dry-run", is_flag=True, help="Validate and print the resolved config only."),
    click.option(
        "--stop-at",
        type=click.IntRange(min=1),
        help="Stop after this step with a checkpoint (time-limited jobs); continue with --resume.",
    ),
    click.argument("overrides", nargs=-1),
)


def _run_folder_options(command: Callable) -> Callable:
    """The options finetune and pretrain share, in this order after their own."""
    for decorate in reversed(_RUN_FOLDER_OPTIONS):
        command = decorate(command)
    return command


def _train(
    *,
    recipe: str | None,
    output: str | None,
    resume: bool,
    dry_run: bool,
    recipe_hint: str,
    resolve: Callable[[str], Any],
    run: Callable[[Any], Any],
) -> None:
    """What finetune and pretrain share: the recipe of a resumed run folder, usage checks, the
    resolved config (printed by --dry-run), then ``run(cfg)`` (a ``FitResult``) with its errors
    as exit codes; a run stopped by a signal exits 128 + the signal's number."""
    import os
    from pathlib import Path

    from sapiens2_cli.hub import HubError
    from sapiens2_cli.train.config import ConfigError, to_yaml
    from sapiens2_cli.train.files import DataError
    from sapiens2_cli.train.run_folder import RunError
    from sapiens2_cli.weights import CheckpointError

    if recipe is None and resume and output and (Path(output) / "config.yaml").is_file():
        recipe = str(Path(output) / "config.yaml")
    if recipe is None:
        _exit(f"--recipe is required ({recipe_hint})", EXIT_USAGE)
    if output is None and not dry_run:
        _exit("-o/--output is required: the run folder", EXIT_USAGE)
    try:
        cfg = resolve(recipe)
    except ConfigError as err:
        _exit(str(err), EXIT_USAGE)
    if dry_run:
        if os.environ.get("RANK", "0") == "0":
            click.echo(to_yaml(cfg), nl=False)
        return
    try:
        result = run(cfg)
    except (ConfigError, RunError) as err:
        _exit(str(err), EXIT_USAGE)
    except (DataError, CheckpointError, HubError) as err:
        _exit(str(err), EXIT_FAILED)
    if result.stopped_by:  # SIGTERM / SIGINT: a checkpoint of the last step was written
        import signal

        if os.environ.get("RANK", "0") == "0":
            name = signal.Signals(result.stopped_by).name
            click.echo(f"stopped by {name} after step {result.step} (checkpoint written); continue with --resume",
                       err=True)  # fmt: skip
        sys.exit(128 + result.stopped_by)


@click.command("finetune")
@click.option(
    "--recipe",
    help="Recipe <task>/<size> (seg/1b, pose/0.4b, normal/tiny...) or a .yaml file.",
)
@click.option("--data", multiple=True, help="Training folder (repeatable); sets data.train.")
@click.option("--val-data", multiple=True, help="Validation folder (repeatable); sets data.val.")
@_run_folder_options
def finetune_cmd(
    recipe: str | None,
    data: tuple[str, ...],
    val_data: tuple[str, ...],
    output: str | None,
    resume: bool,
    dry_run: bool,
    stop_at: int | None,
    overrides: tuple[str, ...],
) -> None:
    """Fine-tune a Sapiens2 model: a recipe, then key=value overrides (optim.lr=1e-4 ...).

    Several GPUs or nodes: torchrun --nproc-per-node 8 -m sapiens2_cli finetune ...
    """
    from sapiens2_cli.train.finetune import finetune, resolve_run_config

    _train(
        recipe=recipe, output=output, resume=resume, dry_run=dry_run,
        recipe_hint="a <task>/<size> name or a .yaml file",
        resolve=lambda r: resolve_run_config(r, overrides, data=data, val_data=val_data),
        run=lambda cfg: finetune(cfg, output, resume=resume, stop_at=stop_at),
    )  # fmt: skip


@click.command("pretrain")
@click.option(
    "--recipe",
    help="Recipe: tiny, a size (0.1b, 0.4b, 0.8b, 1b, 5b, 1b-4k) or a .yaml file.",
)
@click.option("--data", help="Folder of images or WebDataset .tar shards; sets data.train.")
@_run_folder_options
def pretrain_cmd(
    recipe: str | None,
    data: str | None,
    output: str | None,
    resume: bool,
    dry_run: bool,
    stop_at: int | None,
    overrides: tuple[str, ...],
) -> None:
    """Pretrain a Sapiens2 backbone (masked reconstruction + self-distillation): a recipe, then
    key=value overrides (train.batch_size=16 ...). Writes the teacher backbone to
    OUTPUT/final.safetensors.

    Several GPUs or nodes: torchrun --nproc-per-node 8 -m sapiens2_cli pretrain ...
    """
    from sapiens2_cli.pretrain.run import pretrain, resolve_pretrain_config

    _train(
        recipe=recipe, output=output, resume=resume, dry_run=dry_run,
        recipe_hint="tiny, a size such as 1b, or a .yaml file",
        resolve=lambda r: resolve_pretrain_config(r, overrides, data=data),
        run=lambda cfg: pretrain(cfg, output, resume=resume, stop_at=stop_at),
    )  # fmt: skip


@click.command("evaluate")
@click.argument("ref")
@click.option("-t", "--task", required=True, type=click.Choice(TRAIN_TASKS))
@click.option("--data", multiple=True, required=True, help="Dataset folder (repeatable).")
@click.option("--input-size", help="Network input HxW, e.g. 1024x768; default: the checkpoint's.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--max-samples", type=click.IntRange(min=1), help="Only the first N samples.")
@click.option("--no-flip-test", is_flag=True, help="Pose: no flip test.")
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every metric).")
def evaluate_cmd(
    ref: str,
    task: str,
    data: tuple[str, ...],
    input_size: str | None,
    batch_size: int,
    max_samples: int | None,
    no_flip_test: bool,
    device: str | None,
    as_json: bool,
) -> None:
    """Evaluate a checkpoint (zoo name, Hub repo or file) on dataset folders with the official
    metrics; under torchrun the samples are split over the ranks."""
    size = None
    if input_size is not None:
        h, sep, w = input_size.lower().partition("x")
        if not (sep and h.isdigit() and w.isdigit()):
            _exit(f"--input-size must look like 1024x768 (H x W), got {input_size!r}", EXIT_USAGE)
        size = (int(h), int(w))
    from sapiens2_cli.distributed import init_distributed, shutdown
    from sapiens2_cli.hub import HubError
    from sapiens2_cli.train.config import ConfigError
    from sapiens2_cli.train.datasets import DataError
    from sapiens2_cli.train.evaluation import evaluate_checkpoint
    from sapiens2_cli.weights import CheckpointError

    env = init_distributed(device=device)
    try:
        metrics = evaluate_checkpoint(
            ref,
            task=task,
            data=list(data),
            env=env,
            input_size=size,
            batch_size=batch_size,
            flip_test=not no_flip_test,
            max_samples=max_samples,
        )
    except ConfigError as err:
        _exit(str(err), EXIT_USAGE)
    except (DataError, CheckpointError, HubError) as err:
        _exit(str(err), EXIT_FAILED)
    finally:
        shutdown(env)
    if not env.is_main:
        return
    if as_json:
        import json

        click.echo(json.dumps(metrics, indent=1))
        return
    for key, value in metrics.items():
        if isinstance(value, float):
            click.echo(f"{key:>24}: {value:.4f}")
        elif not isinstance(value, list):
            click.echo(f"{key:>24}: {value}")
