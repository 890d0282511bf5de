"""Phases of a job: timed for the report, and shown once by the driver as bars with ETA for people or
JSON lines for pipelines.

Workers report through the driver (never one bar per worker), so a phase is a count of units done out of
a total, whatever the number of workers.
"""

import json
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

MODES = ("bars", "json", "quiet")


class Progress:
    def __init__(self, mode: str = "bars", stream=None, sink: Callable[[dict], None] | None = None):
        """`sink` receives every event as a dict: how a remote worker 0 forwards its progress to the driver."""
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}")
        self.mode = mode
        self.stream = stream or sys.stderr
        self.sink = sink
        self.timings: dict[str, float] = {}
        # This process's peak resident bytes when each phase ended: where the peak rose says which phase
        # set it (the memory plan's phases, measured).
        self.host_peaks: dict[str, int] = {}
        self._replayed_bars: dict[str, tqdm] = {}

    def add_time(self, name: str, seconds: float) -> None:
        """Seconds per phase; a phase entered twice accumulates."""
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 3)

    @contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Yields `advance(n=1)`; the phase's start, steps (with ETA) and end are reported."""
        start = time.perf_counter()
        done = 0
        # Only counted phases get a bar: a bar without a total says nothing, and it would precede any error.
        show = self.mode == "bars" and total is not None
        bar = tqdm(total=total, desc=name, file=self.stream, leave=True, dynamic_ncols=True) if show else None
        self._event("start", name, done, total, start)

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            if bar is not None:
                bar.update(n)
            self._event("step", name, done, total, start)

        try:
            yield advance
        finally:
            if bar is not None:
                bar.close()
            self.add_time(name, time.perf_counter() - start)
            self.host_peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self._event("end", name, done, total, start)

    def _event(self, kind: str, name: str, done: int, total: int | None, start: float) -> None:
        if self.mode != "json" and self.sink is None:
            return
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (total - done) if total and done else None
        record = {"event": kind, "phase": name, "done": done, "total": total, "elapsed_s": round(elapsed, 3)}
        if eta is not None:
            record["eta_s"] = round(eta, 3)
        if self.sink is not None:
            self.sink(record)
        if self.mode == "json":
            self._write(record)

    def _write(self, record: dict) -> None:
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def replay(self, record: dict) -> None:
        """Show an event forwarded from a worker as if the phase ran here."""
        if self.mode == "json":
            self._write(record)
        if self.mode != "bars":
            return
        name = record["phase"]
        if record["event"] == "start" and record["total"] is not None:
            self._replayed_bars[name] = tqdm(total=record["total"], desc=name, file=self.stream, dynamic_ncols=True)
        bar = self._replayed_bars.get(name)
        if bar is None:
            return
        bar.update(record["done"] - bar.n)
        if record["event"] == "end":
            bar.close()
            del self._replayed_bars[name]


class PhaseClock:
    """Where the time of each unit of work (a decoder layer) went: seconds per phase, for this unit (`take`)
    and in total. `with clock("forward"):` times a phase of this thread; a phase inside another is taken out
    of the outer one. Work on other threads (reading ahead, writing behind) reports its seconds with `add`.
    On CUDA a phase starts and ends with a synchronisation, so the GPU work it queued counts in it."""

    def __init__(self, device=None):
        self.device = device  # a torch.device; None or the CPU: nothing to synchronise
        self.totals: dict[str, float] = {}
        self._unit: dict[str, float] = {}
        self._lock = threading.Lock()
        self._open: list[list[float]] = []  # per open phase: its start and the seconds of phases inside it

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._synchronize()
        frame = [time.perf_counter(), 0.0]
        self._open.append(frame)
        try:
            yield
        finally:
            self._synchronize()
            self._open.pop()
            elapsed = time.perf_counter() - frame[0]
            self.add(phase, elapsed - frame[1])
            if self._open:
                self._open[-1][1] += elapsed

    def add(self, phase: str, seconds: float, unit: dict[str, float] | None = None) -> None:
        """Count `seconds` of `phase` in the totals and in `unit` (default: the current unit)."""
        with self._lock:
            into = self._unit if unit is None else unit
            into[phase] = into.get(phase, 0.0) + seconds
            self.totals[phase] = self.totals.get(phase, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """This unit's phases (a dict that background work may still add to), and a fresh unit."""
        with self._lock:
            unit, self._unit = self._unit, {}
        return unit

    def _synchronize(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {phase: round(value, 3) for phase, value in seconds.items()}
