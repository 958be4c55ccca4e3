"""The ``sapiens2`` command line: parsing, choices and exit codes only.

torch and the model code are imported inside the commands, so ``sapiens2 --help`` is instant.
Exit codes: 0 success, 1 some item or the job failed, 2 usage error.
"""

from __future__ import annotations

import click

from sapiens2_cli import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sapiens2")
def main() -> None:
    """Run Meta's Sapiens2 models: predict, fine-tune, pretrain and export."""
