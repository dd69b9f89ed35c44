"""How long one engine run spent in the LLM prefill and in the interventions' own selection code, and its peak
memory: what a token-reduction method saves and what it costs (`embedlens.metrics.builtin.PrefillTime`).

On a GPU the marks are CUDA events, recorded without waiting; the host reads them once, when a metric first
asks (`Stopwatch.read`), after the run has been queued. On the CPU they are the process's CPU time
(`time.process_time`: every thread's, so a multi-threaded matmul counts all the cores it kept busy), the
measure that does not move with what else the machine runs.
"""

from __future__ import annotations

import math
import time

import torch


class Stopwatch:
    """Named spans of one run, on the device's own clock.

    Example:
        >>> w = Stopwatch(torch.device("cpu"))
        >>> a = w.mark(); b = w.mark(); w.add("prefill", a, b)
        >>> sorted(w.read())
        ['peak_mem_mb', 'prefill_ms']
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._spans: dict[str, list[tuple]] = {}
        self._read: dict[str, float] | None = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)  # host-side allocator counters: no device wait

    def mark(self):
        """Now: a recorded CUDA event (not waited for), or the process CPU time in seconds."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            self._last = ev
            return ev
        return time.process_time()

    def add(self, name: str, start, end) -> None:
        """Count the time from `start` to `end` (two `mark`s) under `name` (spans of one name add up)."""
        self._spans.setdefault(name, []).append((start, end))

    def stop(self) -> None:
        """End of the run: note the peak memory (GPU: the allocator's peak since the run began; CPU: not measured)."""
        self._peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else math.nan

    def read(self) -> dict[str, float]:
        """``{NAME_ms: milliseconds, ..., peak_mem_mb}``; on a GPU the host waits here, once, for the last event."""
        if self._read is None:
            out: dict[str, float] = {}
            if self.cuda:
                if getattr(self, "_last", None) is not None:
                    self._last.synchronize()  # every event before it on the stream is done too
                for name, spans in self._spans.items():
                    out[f"{name}_ms"] = float(sum(a.elapsed_time(b) for a, b in spans))
            else:
                for name, spans in self._spans.items():
                    out[f"{name}_ms"] = 1000.0 * sum(b - a for a, b in spans)
            out["peak_mem_mb"] = getattr(self, "_peak", math.nan)
            self._read = out
        return dict(self._read)
