"""Per-video outputs built from the frames in index order: overlay videos and JSON lines.

Frames finish out of order (on the writer threads). A stream writes them in the order the run
loop registered them (:meth:`FrameStream.expect`, decode order): each frame as soon as every
earlier one is written or dropped, so it holds no more than the frames in flight. The file is
written under ``.<name>.part`` and renamed when the video has ended and every registered frame
is resolved, so a killed run never leaves a partial file under the final name; a stream that
fails (or a video whose decoding stopped early) leaves nothing, and the next run rebuilds it.

* ``mp4`` (:data:`~sapiens2_cli.tasks.base.VIS_VIDEO`): frames come as ``jpg`` content
  (BGR images) and are encoded with H.264 at the source's rate and time base, each with its
  source timestamp, with the source's audio of the same span passed through.
* ``jsonl``: frames come as ``json`` content, one object per line.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from sapiens2_cli.runinfo import Failure
from sapiens2_cli.sources import Item
from sapiens2_cli.tasks.base import FileSpec, OutputFormat, Task
from sapiens2_cli.video import VideoInfo, VideoWriter
from sapiens2_cli.writers import FileData, part_path

STREAM_ERRORS = (OSError, ValueError, RuntimeError)


class FrameStream:
    """One per-video file fed frame by frame (see the module notes); thread-safe."""

    def __init__(self, path: Path, info: VideoInfo) -> None:
        self.path = path
        self.info = info
        self.error: str | None = None
        self.closed = False
        self._order: collections.deque[tuple[int, int | None]] = collections.deque()  # (index, pts)
        self._ready: dict[int, FileData | None] = {}  # None: dropped
        self._ended = False
        self._lock = threading.Lock()

    def expect(self, index: int, pts: int | None) -> None:
        """Register frame ``index`` (in decode order) before its content is put or dropped."""
        with self._lock:
            self._order.append((index, pts))

    def put(self, index: int, content: FileData) -> None:
        with self._lock:
            self._ready[index] = content
            self._pump()

    def drop(self, index: int) -> None:
        """Frame ``index`` failed: the stream goes on without it."""
        with self._lock:
            self._ready[index] = None
            self._pump()

    def end(self) -> None:
        """No frame will be registered any more: finalise once the registered ones are resolved."""
        with self._lock:
            self._ended = True
            self._pump()

    def abort(self) -> None:
        """Stop and remove the temporary file (an interrupted run or an unfinished video)."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self._discard()

    def _pump(self) -> None:
        if self.closed:
            return
        try:
            while self._order and self._order[0][0] in self._ready:
                index, pts = self._order.popleft()
                content = self._ready.pop(index)
                if content is not None:
                    self._emit(content, pts)
            if self._ended and not self._order:
                self.closed = True
                self._finish()
        except STREAM_ERRORS as err:
            self.error = f"cannot write {self.path} ({err})"
            self.closed = True
            self._discard()

    def _emit(self, content: FileData, pts: int | None) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _discard(self) -> None:
        raise NotImplementedError


class Mp4Stream(FrameStream):
    """Overlays encoded as H.264 MP4 (:class:`~sapiens2_cli.video.VideoWriter`)."""

    def __init__(self, path: Path, info: VideoInfo) -> None:
        super().__init__(path, info)
        self._writer: VideoWriter | None = None
        self._span: list[float] = []  # first and last frame times, seconds on the source's timeline

    def _emit(self, content: FileData, pts: int | None) -> None:
        if content.kind != "jpg":
            raise ValueError(f"an overlay video takes images, got {content.kind}")
        if self._writer is None:
            self._writer = VideoWriter(self.path, self.info)
        self._writer.write(content.data, pts)
        if pts is not None:
            t = float(pts * self.info.time_base)
            self._span = [self._span[0] if self._span else t, t]

    def _finish(self) -> None:
        if self._writer is None:  # no frame succeeded: there is no video to write
            return
        after_last = float(1 / self.info.fps) if self.info.fps else 0.0
        span = {"audio_from": self._span[0], "audio_to": self._span[1] + after_last} if self._span else {}
        self._writer.close(**span)

    def _discard(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        part_path(self.path).unlink(missing_ok=True)


class JsonlStream(FrameStream):
    """One JSON object per frame and line (an empty file for a video without frames)."""

    def __init__(self, path: Path, info: VideoInfo) -> None:
        super().__init__(path, info)
        self._file: IO[str] | None = None

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(part_path(self.path), "w", encoding="utf-8")  # noqa: SIM115 - closed in _finish
        return self._file

    def _emit(self, content: FileData, pts: int | None) -> None:
        if content.kind != "json":
            raise ValueError(f"a JSON-lines stream takes JSON objects, got {content.kind}")
        line = json.dumps(content.data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        self._open().write(line + "\n")

    def _finish(self) -> None:
        f = self._open()
        f.close()
        os.replace(part_path(self.path), self.path)

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
        part_path(self.path).unlink(missing_ok=True)


STREAM_KINDS: dict[str, type[FrameStream]] = {"mp4": Mp4Stream, "jsonl": JsonlStream}


def stream_specs(task: Task, fmt: OutputFormat, vis: bool) -> list[FileSpec]:
    return [s for s in task.video_files(fmt, vis) if s.stream]


class VideoStreams:
    """The open streams of a run, per video and task. ``start`` / ``expect`` / ``end`` are
    called by the run loop's main thread, ``put`` / ``drop`` by any thread."""

    def __init__(self, output: Path, tasks: dict[str, Task], *, fmt: OutputFormat, vis: bool) -> None:
        self.output = output
        self.specs = {name: stream_specs(task, fmt, vis) for name, task in tasks.items()}
        self._streams: dict[tuple[str, str], dict[FileSpec, FrameStream]] = {}
        self._items: dict[tuple[str, str], Item] = {}

    def start(self, item: Item, info: VideoInfo, tasks: Iterable[str]) -> None:
        """Open the streams of ``tasks`` for the video ``item`` (they are rebuilt from every frame)."""
        for name in tasks:
            if self.specs[name]:
                self._streams[(item.rel, name)] = {
                    spec: STREAM_KINDS[spec.kind](spec.path(self.output, name, item), info) for spec in self.specs[name]
                }  # fmt: skip
                self._items[(item.rel, name)] = item

    def has(self, item: Item, task: str) -> bool:
        return (item.rel, task) in self._streams

    def expect(self, item: Item, task: str, pts: int | None) -> None:
        for stream in self._streams.get((item.rel, task), {}).values():
            stream.expect(item.frame, pts)

    def put(self, item: Item, task: str, spec: FileSpec, content: FileData) -> None:
        streams = self._streams.get((item.rel, task), {})
        if spec not in streams:
            raise ValueError(f"{task}: frame_outputs gave {spec}, which video_files does not list")
        streams[spec].put(item.frame, content)

    def drop(self, item: Item, task: str) -> None:
        for stream in self._streams.get((item.rel, task), {}).values():
            stream.drop(item.frame)

    def end(self, item: Item, *, complete: bool) -> None:
        """The video has no more frames: finalise its streams, or discard them if it ended early."""
        for name in self.specs:
            for stream in self._streams.get((item.rel, name), {}).values():
                if complete:
                    stream.end()
                else:
                    stream.abort()

    def abort_all(self) -> None:
        for streams in self._streams.values():
            for stream in streams.values():
                stream.abort()

    def failures(self) -> list[Failure]:
        """Failures of streams that finished since the last call (forgets finished streams)."""
        out = []
        for key, streams in list(self._streams.items()):
            if all(s.closed for s in streams.values()):
                item = self._items.pop(key)
                del self._streams[key]
                out += [Failure(str(item.path), s.error, key[1]) for s in streams.values() if s.error]
        return out
