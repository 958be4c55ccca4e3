"""The ``sapiens2`` command line: parsing, choices and exit codes only.

torch and the model code are imported inside the commands, so ``sapiens2 --help`` is instant.
Exit codes: 0 success, 1 some item or the job failed, 2 usage error.
"""

from __future__ import annotations

import sys

import click

from sapiens2_cli import __version__

EXIT_FAILED = 1


def fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit 1."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILED)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
