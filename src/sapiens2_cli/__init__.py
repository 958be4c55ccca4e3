"""sapiens2: a command-line tool and Python API for Meta's Sapiens2 models.

The public API is imported lazily so that ``import sapiens2_cli`` (and ``sapiens2 --help``)
stays instant and does not import torch:

>>> from sapiens2_cli import load_model
>>> model = load_model("seg-0.4b", device="cuda")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "load_detector"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from sapiens2_cli.weights import load_model

        return load_model
    if name == "load_detector":
        from sapiens2_cli.detector_weights import load_detector

        return load_detector
    raise AttributeError(f"module 'sapiens2_cli' has no attribute {name!r}")
