"""What the server's per-step hook reads from transformers' continuous batching, in synchronous and async batching.

`scheduled_requests(io)`: the batch about to run. Synchronous batching keeps one set of inputs (`io.requests_in_batch`);
async batching keeps two IO pairs and swaps them after each step, so the batch being launched is the current pair's.

`StepsInFlight`: under async batching a step returns once its work is queued on the engine's compute stream, so the
host cannot time it with a clock. Each step gets two CUDA events on that stream, one before its work and one after;
`done()` hands back, in launch order, the steps whose end event has passed, with their GPU time. The start event is
reached only when the previous step's work is over, so the time is the step's own (plus its input copy), not the
wait behind the step before it.
"""
from __future__ import annotations

from collections import deque


def scheduled_requests(io) -> list:
    """The FutureRequestStates of the batch about to run (`bp.inputs_and_outputs` of transformers' manager)."""
    pairs = getattr(io, "io_pairs", None)
    if pairs:  # async batching: the pair the next step reads
        return pairs[io.current_pair].host_io.requests_in_batch
    return io.requests_in_batch


class StepsInFlight:
    """Steps launched on `stream` and not yet seen done, each with its CUDA events and the caller's info."""

    def __init__(self, stream, event_factory=None):
        if event_factory is None:
            import torch

            def event_factory():
                return torch.cuda.Event(enable_timing=True)

        self.stream = stream
        self._event = event_factory
        self._q: deque = deque()

    def begin(self):
        """Record the start event of the step about to be launched (before any of its work is queued)."""
        ev = self._event()
        ev.record(self.stream)
        return ev

    def launched(self, start, info) -> None:
        """The step's work is queued: record its end event and keep `info` until it is done."""
        end = self._event()
        end.record(self.stream)
        self._q.append((start, end, info))

    def done(self) -> list[tuple[object, float]]:
        """[(info, GPU seconds)] of the steps finished since the last call, oldest first. A step finishes after every
        step launched before it (one stream), so the first unfinished one ends the scan."""
        out = []
        while self._q and self._q[0][1].query():
            start, end, info = self._q.popleft()
            out.append((info, start.elapsed_time(end) / 1e3))
        return out

    def __len__(self) -> int:
        return len(self._q)
