"""The released Sapiens2 weights: one record per (task, size)."""

from __future__ import annotations

import dataclasses

from sapiens2_cli.models.arch import ARCHS

HUB_ORG = "facebook"
TASK_SIZES: dict[str, tuple[str, ...]] = {
    "pretrain": ("0.1b", "0.4b", "0.8b", "1b", "5b", "1b-4k"),
    "seg": ("0.4b", "0.8b", "1b", "5b"),
    "pose": ("0.4b", "0.8b", "1b", "5b"),
    "normal": ("0.4b", "0.8b", "1b", "5b"),
    "pointmap": ("0.4b", "0.8b", "1b", "5b"),
    "albedo": ("0.4b", "0.8b", "1b", "5b"),
}
# Albedo configs exist upstream but its model zoo lists no albedo weights.
UNLISTED_TASKS = frozenset({"albedo"})


@dataclasses.dataclass(frozen=True)
class ZooRecord:
    """One released weight set: ``facebook/sapiens2-<task>-<size>`` holding one safetensors file."""

    task: str
    size: str

    @property
    def name(self) -> str:
        return f"{self.task}-{self.size}"

    @property
    def repo_id(self) -> str:
        return f"{HUB_ORG}/sapiens2-{self.task}-{self.size}"

    @property
    def filename(self) -> str:
        return f"sapiens2_{self.size.replace('-', '_')}_{self.task}.safetensors"

    @property
    def input_size(self) -> tuple[int, int]:
        return (4096, 3072) if self.size == "1b-4k" else (1024, 768)

    @property
    def listed(self) -> bool:
        """Whether the official model zoo lists these weights."""
        return self.task not in UNLISTED_TASKS

    @property
    def arch(self):  # noqa: ANN201 - BackboneArch
        return ARCHS[self.size]


ZOO: dict[str, ZooRecord] = {
    f"{task}-{size}": ZooRecord(task, size) for task, sizes in TASK_SIZES.items() for size in sizes
}
REPO_TO_RECORD: dict[str, ZooRecord] = {r.repo_id: r for r in ZOO.values()}


def find_record(name: str) -> ZooRecord | None:
    """The record for a zoo name (``seg-0.4b``) or its Hub repo id (``facebook/sapiens2-seg-0.4b``)."""
    return ZOO.get(name.lower()) or REPO_TO_RECORD.get(name)
