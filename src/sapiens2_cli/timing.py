"""Time spent in the model, measured without stalling the device queue."""

from __future__ import annotations

import time
from typing import Any

import torch


class ForwardTimer:
    """Seconds spent in the model. CUDA kernels run asynchronously, so there the time comes
    from events recorded around each forward (read at the end, without stalling the queue)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.events: list[tuple[Any, Any]] = []

    def start(self, device: torch.device) -> Any:
        if device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            return begin
        return time.perf_counter()

    def stop(self, begin: Any) -> None:
        if isinstance(begin, float):
            self.seconds += time.perf_counter() - begin
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.events.append((begin, end))
        if len(self.events) > 1000:  # keep the list short on long runs: read the finished ones
            self.events[0][1].synchronize()
            done = 0  # events on one stream complete in order
            while done < len(self.events) and self.events[done][1].query():
                done += 1
            self.seconds += sum(b.elapsed_time(e) for b, e in self.events[:done]) / 1000
            del self.events[:done]

    def total(self) -> float:
        for _, end in self.events:
            end.synchronize()
        seconds = self.seconds + sum(b.elapsed_time(e) for b, e in self.events) / 1000
        self.seconds, self.events = seconds, []
        return seconds
