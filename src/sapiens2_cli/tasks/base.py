"""What a task is to the predictor: geometry in, post-processing and files out.

One image gives one or more model inputs (:meth:`Task.prepare`); a dense task makes one, a
top-down pose task one crop per person. The run loop batches model inputs of any images
together (they all have the model's input size), runs :meth:`Task.forward`, and hands all the
raw outputs of one image back to :meth:`Task.postprocess` with the inputs they came from.
:meth:`Task.render` turns the prediction into the files of :meth:`Task.files`.

A task whose inputs depend on a second model (pose: the person detector) returns ``None``
from :meth:`Task.prepare_item`; the run loop then batches those images through
:meth:`Task.detect` on the main thread and makes their inputs with :meth:`Task.prepare_detected`.
A task with run options (pose) is set up per run by :meth:`Task.configure`.

Video frames go through the same steps; the frame's :class:`~sapiens2_cli.sources.Item` has
``frame`` (index) and ``time`` (seconds) set. Which files a video produces is
:meth:`Task.video_files`: per-frame files ``OUT/<task>/<video rel>/<frame:06d><ext>`` and
*streams* (``FileSpec.stream``), one file per video built from its frames in index order and
renamed into place when the video ends (``.mp4`` overlays, ``.jsonl`` records).
:meth:`Task.frame_outputs` maps one frame's rendered files to those specs and is where a task
puts the frame index and time into its records. A task whose video output is one record per
frame (pose: ``OUT/pose/<video rel>.jsonl``, a line ``{"index", "time", "instances"}`` per
frame) overrides both: ``video_files`` returns ``FileSpec(".jsonl", "jsonl", stream=True)``
and ``frame_outputs`` returns ``{that spec: FileData("json", {"index": item.frame, "time":
item.time, ...})}``; the run loop writes the lines in frame order.

Dense tasks that can be tiled (``--tile``) set :attr:`Task.tile_rule`
(:class:`~sapiens2_cli.tasks.tiled.TileRule`); the others explain why in :attr:`Task.tile_refusal`.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import cv2
import numpy as np

from sapiens2_cli.writers import FileData, FileKind

if TYPE_CHECKING:
    import torch

    from sapiens2_cli.models.sapiens2 import Sapiens2Model
    from sapiens2_cli.plan import PredictOptions
    from sapiens2_cli.sources import Item
    from sapiens2_cli.tasks.tiled import TileRule

OutputFormat = Literal["exr", "npy", "safetensors"] | None  # None: the task's default
Raw = Any  # one sample's raw model output: a tensor [C, H, W] or a tuple of tensors
Prediction = dict[str, Any]  # named numpy arrays and numbers, on the CPU


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """One model input made from an image: pixels at the model's input size and the geometry
    needed to map its output back (a :class:`~sapiens2_cli.transforms.Placement` for dense tasks)."""

    pixels: np.ndarray  # [H_in, W_in, 3] uint8 BGR
    geometry: Any


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One file an item produces: ``OUT/<task>/<rel><ext>`` or, for overlays, ``OUT/vis/<task>/<rel><ext>``.

    A ``stream`` file belongs to a whole video (``OUT/<task>/<video rel><ext>``) and is written
    from its frames in order (see the module notes).
    """

    ext: str
    kind: FileKind
    vis: bool = False
    stream: bool = False

    def path(self, out: Path, task: str, item: Item) -> Path:
        base = out / "vis" / task if self.vis else out / task
        return item.video_output(base, self.ext) if self.stream else item.output(base, self.ext)


VIS_FILE = FileSpec(".jpg", "jpg", vis=True)
VIS_VIDEO = FileSpec(".mp4", "mp4", vis=True, stream=True)  # a video's overlays, at its frame rate


class Task(abc.ABC):
    """A prediction task; the instances live in :data:`sapiens2_cli.tasks.TASKS`."""

    name: ClassVar[str]  # also the task of the checkpoint it runs
    formats: ClassVar[tuple[str, ...]] = ("exr", "npy")  # accepted --format values
    tile_rule: ClassVar[TileRule | None] = None
    tile_refusal: ClassVar[str] = "its outputs are not dense maps that tiles could share"

    def configure(self, options: PredictOptions, *, model_ref: str) -> Task:
        """This task set up for one run (``self`` for tasks without run options).

        Cheap (no model is loaded); raises ``PlanError`` for options it cannot use.
        """
        return self

    def load_helpers(self, device: torch.device) -> None:
        """Load what the task runs besides its model (pose: the person detector) on ``device``."""

    @abc.abstractmethod
    def files(self, fmt: OutputFormat, vis: bool) -> list[FileSpec]:
        """The files one item produces (skip-existing looks for exactly these)."""

    def for_model(self, model: Any) -> Task:
        """This task bound to ``model`` (e.g. a fine-tune's own class names); the default is ``self``."""
        return self

    def video_files(self, fmt: OutputFormat, vis: bool) -> list[FileSpec]:
        """The files a video produces: by default the image files per frame, and the overlays
        as one video (:data:`VIS_VIDEO`) instead of one JPEG per frame."""
        return [*self.files(fmt, False), *([VIS_VIDEO] if vis else [])]

    def frame_outputs(self, files: dict[FileSpec, FileData], item: Item) -> dict[FileSpec, FileData]:
        """One video frame's share of :meth:`video_files`, from what :meth:`render` gave
        (``item.frame`` and ``item.time`` identify the frame)."""
        return {VIS_VIDEO if spec == VIS_FILE else spec: data for spec, data in files.items()}

    def run_files(self) -> dict[str, FileData]:
        """Files written once per run under ``OUT/<task>/`` (name -> content)."""
        return {}

    def check_input_size(self, model: Sapiens2Model, input_hw: tuple[int, int]) -> None:
        """Raise ``ValueError`` when ``model`` cannot run at ``input_hw`` ``(H, W)``."""
        stride = model.info.arch.stride if model.info.arch is not None else 16
        if input_hw[0] % stride or input_hw[1] % stride:
            raise ValueError(f"input size {input_hw[0]}x{input_hw[1]} is not a multiple of {stride}")

    @abc.abstractmethod
    def prepare(self, image: np.ndarray, input_hw: tuple[int, int]) -> list[ModelInput]:
        """Model inputs of one ``[H, W, 3]`` uint8 BGR image (CPU, called from worker threads)."""

    def prepare_item(self, image: np.ndarray, input_hw: tuple[int, int], item: Item) -> list[ModelInput] | None:
        """:meth:`prepare` for the image of ``item``; ``None`` when its inputs wait for :meth:`detect`."""
        return self.prepare(image, input_hw)

    def detect(self, images: list[np.ndarray]) -> list[Any]:
        """What :meth:`prepare_detected` needs for each image (one batch, the main thread)."""
        raise NotImplementedError(f"{self.name} prepares its inputs without a detector")

    def prepare_detected(self, image: np.ndarray, input_hw: tuple[int, int], found: Any) -> list[ModelInput]:
        """Model inputs of one image from its :meth:`detect` result (worker threads)."""
        raise NotImplementedError(f"{self.name} prepares its inputs without a detector")

    def forward(self, model: Sapiens2Model, x: torch.Tensor) -> Any:
        """Raw output for a normalised batch ``[B, 3, H_in, W_in]`` (batch-first tensors)."""
        return model(x)

    @abc.abstractmethod
    def postprocess(self, raws: list[Raw], inputs: list[ModelInput], image_hw: tuple[int, int]) -> Prediction:
        """The prediction of one image from the raw outputs of all its model inputs.

        ``raws[i]`` (float32, on the model's device) belongs to ``inputs[i]``. Runs on that
        device; the returned arrays are numpy on the CPU.
        """

    @abc.abstractmethod
    def render(self, pred: Prediction, image: np.ndarray, fmt: OutputFormat, vis: bool) -> dict[FileSpec, FileData]:
        """File contents for :meth:`files` (same keys). ``image`` is the BGR input, for overlays."""

    def render_item(
        self, pred: Prediction, image: np.ndarray, item: Item, fmt: OutputFormat, vis: bool
    ) -> dict[FileSpec, FileData]:
        """:meth:`render` for ``item`` (for tasks whose files name their source)."""
        return self.render(pred, image, fmt, vis)


def side_by_side(image: np.ndarray, panel: np.ndarray) -> np.ndarray:
    """``[original | panel]`` (both ``[H, W, 3]`` uint8 BGR) -> ``[H, 2W, 3]``."""
    return np.concatenate([image, panel], axis=1)


def put_label(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
    """White text with a dark outline at ``origin`` (x, y of the baseline), in place."""
    thickness = max(1, round(scale * 2))
    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
