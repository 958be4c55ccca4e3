"""The prediction tasks: one module per task and the :data:`TASKS` registry.

``TASK_NAMES`` is importable without torch (the command line uses it for its choices);
``TASKS`` (name -> :class:`~sapiens2_cli.tasks.base.Task`) imports the task modules, and torch,
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

TASK_NAMES: tuple[str, ...] = ("seg", "pose", "normal", "pointmap", "albedo", "pretrain")

if TYPE_CHECKING:
    from sapiens2_cli.tasks.base import Task

    TASKS: dict[str, Task]


def __getattr__(name: str) -> Any:
    if name == "TASKS":
        from sapiens2_cli.tasks.albedo import AlbedoTask
        from sapiens2_cli.tasks.normal import NormalTask
        from sapiens2_cli.tasks.pointmap import PointmapTask
        from sapiens2_cli.tasks.pose import PoseTask
        from sapiens2_cli.tasks.pretrain import PretrainTask
        from sapiens2_cli.tasks.seg import SegTask

        tasks = {
            "seg": SegTask(), "pose": PoseTask(), "normal": NormalTask(), "pointmap": PointmapTask(),
            "albedo": AlbedoTask(), "pretrain": PretrainTask(),
        }  # fmt: skip
        globals()["TASKS"] = tasks
        return tasks
    raise AttributeError(f"module 'sapiens2_cli.tasks' has no attribute {name!r}")
