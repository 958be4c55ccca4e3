"""``sapiens2`` under torchrun, with rank 1 (only) sent SIGTERM while it takes optimizer step
``SAPIENS2_TEST_SIGTERM_STEP``: what a scheduler's signal reaching one node first looks like."""

from __future__ import annotations

import os
import signal
import sys

from sapiens2_cli.cli import main
from sapiens2_cli.train.loop import Trainer

AT = int(os.environ["SAPIENS2_TEST_SIGTERM_STEP"])
step = Trainer._optimizer_step


def step_and_signal(self, stream):  # noqa: ANN001, ANN202
    step(self, stream)
    if self.env.rank == 1 and self.step == AT - 1:
        os.kill(os.getpid(), signal.SIGTERM)


Trainer._optimizer_step = step_and_signal
sys.exit(main(sys.argv[1:]))
