"""StepClock: when each step's device work starts and ends on one rank, and the idle time between.

The idle time before step n+1 is the time from the end of step n's last device operation to the
start of step n+1's first: how long the rank's device waited for the host (for its plan, for the
previous step's bookkeeping). On CUDA both ends are events on the step stream, so a step that was
enqueued while the previous one still ran shows ~0, and the figure excludes the host's own
launch latency only where the device was busy anyway. On the CPU they are host clock readings
(the forward computes where it is called).
"""

from __future__ import annotations

import time
from collections import deque

import torch

KEEP = 4096  # idle times kept (the most recent steps)


class StepClock:
    def __init__(self, device: torch.device, keep: int = KEEP) -> None:
        self.cuda = device.type == "cuda"
        self._idle: deque[tuple[int, int, int, float]] = deque(maxlen=keep)
        self._last_end: torch.cuda.Event | float | None = None
        self._last_kind = -1
        self._open: dict[int, tuple[int, int, torch.cuda.Event | float | None, torch.cuda.Event]] = {}
        self._step, self._kind = -1, -1

    def begin(self, step_id: int, kind: int) -> None:
        """The step's first device operation is about to be enqueued (or run)."""
        self._step, self._kind = step_id, kind
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._open[step_id] = (kind, self._last_kind, self._last_end, start)
        elif isinstance(self._last_end, float):
            self._idle.append((step_id, kind, self._last_kind, time.perf_counter() - self._last_end))

    def end(self) -> None:
        """The step's last device operation is enqueued (or done)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._last_end = end
        else:
            self._last_end = time.perf_counter()
        self._last_kind = self._kind

    def resolved(self, step_id: int) -> None:
        """The step's results were waited for: on CUDA its events are complete, read the idle time."""
        opened = self._open.pop(step_id, None)
        if opened is None:
            return
        kind, last_kind, last_end, start = opened
        if isinstance(last_end, torch.cuda.Event):
            self._idle.append((step_id, kind, last_kind, last_end.elapsed_time(start) / 1e3))

    def idle_times(self) -> list[tuple[int, int, int, float]]:
        """(step id, kind, previous step's kind, idle seconds before it), oldest first; then cleared."""
        out = list(self._idle)
        self._idle.clear()
        return out
