"""Videos -> frames for the run loop: streamed decoding and per-frame skip-existing.

:func:`expand` passes images through and turns each video into events: :class:`VideoStart`,
one :class:`FrameJob` (a decoded frame and the tasks it still needs), :class:`FrameSkipped`
(all its outputs exist) or :class:`FrameFailed` (an undecodable stretch) per frame, and
:class:`VideoEnd`. :func:`in_background` runs it on its own thread, a few events ahead, so the
model never waits for the decoder and memory holds only the frames in flight, however long
the video.

Skip-existing for videos: a task's per-frame files are looked up as each frame is decoded
(frames all of whose files exist are not run again). A task's per-video files (the ``--vis``
overlay video, JSON lines) are written in one pass, so when one of them is missing the task
runs on every frame of the video and rebuilds it.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sapiens2_cli.plan import Work
from sapiens2_cli.sources import Item
from sapiens2_cli.tasks.base import OutputFormat
from sapiens2_cli.video import FrameError, VideoError, VideoInfo, iter_frames, probe
from sapiens2_cli.writers import PART_SUFFIX

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class VideoStart:
    """A video opened: ``streams`` are the tasks whose per-video files are (re)built."""

    item: Item
    info: VideoInfo
    tasks: tuple[str, ...]
    streams: tuple[str, ...]
    estimate: int  # frames expected (for progress)


@dataclasses.dataclass(frozen=True)
class FrameJob:
    """A decoded frame: ``work.item`` is the frame's item, ``work.tasks`` what it still needs."""

    work: Work
    image: np.ndarray  # [H, W, 3] uint8 BGR, rotation applied
    pts: int | None  # presentation timestamp in the source's time base
    decode_s: float = 0.0  # demuxing and decoding since the previous frame (frames left out included)


@dataclasses.dataclass(frozen=True)
class FrameSkipped:
    item: Item  # every output of this frame exists


@dataclasses.dataclass(frozen=True)
class FrameFailed:
    """A frame (or, with ``item.frame`` None, a whole video) that could not be read."""

    item: Item
    tasks: tuple[str, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class VideoEnd:
    """The last event of a video; ``error`` when decoding stopped before its end."""

    item: Item
    error: str | None = None


Event = VideoStart | FrameJob | FrameSkipped | FrameFailed | VideoEnd


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrameOptions:
    """What to decode and which files count as done (``specs``: task -> (per-frame, per-video) files)."""

    output: Path
    specs: dict[str, tuple[list, list]]
    overwrite: bool = False
    stride: int = 1
    start: str | None = None
    end: str | None = None


def frame_options(tasks: Any, names: Iterable[str], *, output: Path, fmt: OutputFormat, vis: bool,
                  overwrite: bool, stride: int, start: str | None, end: str | None) -> FrameOptions:  # fmt: skip
    """:class:`FrameOptions` for ``names`` of the task registry ``tasks``."""
    specs = {}
    for name in names:
        files = tasks[name].video_files(fmt, vis)
        specs[name] = ([s for s in files if not s.stream], [s for s in files if s.stream])
    return FrameOptions(output=output, specs=specs, overwrite=overwrite, stride=stride, start=start, end=end)


def expand(work: Iterable[Work], options: FrameOptions) -> Iterator[Work | Event]:
    """Images as they are; each video as its events (see the module notes)."""
    for w in work:
        if w.item.is_video:
            yield from _video(w, options)
        else:
            yield w


def _estimate(info: VideoInfo, options: FrameOptions) -> int:
    from sapiens2_cli.video import parse_position

    fps = float(info.fps)
    total = info.frames or 0
    bounds = []
    for text, default in ((options.start, 0), (options.end, total)):
        pos = parse_position(text)
        bounds.append(default if pos is None else int(pos[1]) if pos[0] == "frame" else round(pos[1] * fps))
    first, last = bounds[0], min(bounds[1], total)
    return max(0, -(-last // options.stride) - -(-first // options.stride))


def _clean(item: Item, names: Iterable[str], options: FrameOptions) -> None:
    """Remove the temporary files a killed run left for this video (this shard owns it)."""
    for name in names:
        per_frame, streams = options.specs[name]
        for spec in per_frame:
            folder = spec.path(options.output, name, item.at_frame(0, 0.0)).parent
            if folder.is_dir():
                for leftover in folder.glob(f".*{PART_SUFFIX}"):
                    leftover.unlink(missing_ok=True)
        for spec in streams:
            path = spec.path(options.output, name, item)
            path.with_name(f".{path.name}{PART_SUFFIX}").unlink(missing_ok=True)


def _video(w: Work, options: FrameOptions) -> Iterator[Event]:
    import av

    item, out = w.item, options.output
    try:
        info = probe(item.path)
    except VideoError as err:
        yield FrameFailed(item, w.tasks, str(err).removeprefix(f"{item.path}: "))
        return
    _clean(item, w.tasks, options)
    streams = tuple(
        t for t in w.tasks
        if options.specs[t][1] and (options.overwrite or not all(s.path(out, t, item).exists() for s in options.specs[t][1]))
    )  # fmt: skip
    yield VideoStart(item, info, w.tasks, streams, _estimate(info, options))
    decoded = iter_frames(item.path, stride=options.stride, start=options.start, end=options.end)
    try:
        while True:
            t0 = time.perf_counter()
            frame = next(decoded, None)
            spent = time.perf_counter() - t0
            if frame is None:
                break
            if isinstance(frame, FrameError):
                yield FrameFailed(item.at_frame(frame.index, frame.time or 0.0), w.tasks, frame.reason)
                continue
            at = item.at_frame(frame.index, frame.time)
            todo = tuple(
                t for t in w.tasks
                if t in streams or options.overwrite or not all(s.path(out, t, at).exists() for s in options.specs[t][0])
            )  # fmt: skip
            yield FrameJob(Work(at, todo), frame.image, frame.pts, spent) if todo else FrameSkipped(at)
    except (VideoError, OSError, av.error.FFmpegError) as err:
        yield VideoEnd(item, f"decoding stopped ({err})")
        return
    yield VideoEnd(item)


_DONE = object()


def in_background(events: Iterator[T], *, depth: int) -> Iterator[T]:
    """``events`` produced on a separate thread, at most ``depth`` ahead of the consumer.

    An exception in the producer is raised in the consumer; leaving the loop early stops the
    producer and closes ``events``.
    """
    box: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                box.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for event in events:
                if not put((event, None)):
                    break
            put((_DONE, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            put((_DONE, err))
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="sapiens2-frames", daemon=True)
    thread.start()
    try:
        while True:
            event, err = box.get()
            if event is _DONE:
                if err is not None:
                    raise err
                return
            yield event
    finally:
        stop.set()
        thread.join()
