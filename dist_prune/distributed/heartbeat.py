"""Noticing a dead or hung worker within a minute, under every launcher.

A collective waits for the slowest worker for as long as its timeout, and a layer of a 70B model can keep a
healthy worker away from the next collective for minutes, so the collective timeout cannot tell a hung worker
(SIGSTOP, a stuck driver) from a slow one. Instead every worker counts up a key in the rendezvous store every
few seconds from a background thread, which runs whatever the main thread computes; each worker watches the
others' counts, and one that has not moved for `limit` seconds, or a store that stops answering, ends this
worker with a line naming the silent one. The launcher then stops the rest (Ray kills every actor, torchrun's
agent the other ranks), and the run's finished layers are kept for --resume.
"""

import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from ..log import get_logger

log = get_logger()

BEAT_EVERY_S = 5.0
EXIT_CODE = 1


class Heartbeat:
    def __init__(self, address: str, port: int, rank: int, world_size: int, limit_s: float):
        self.rank, self.world_size, self.limit_s = rank, world_size, limit_s
        # Its own client connection with a short timeout: the job's own store calls may wait for an hour.
        timeout = timedelta(seconds=max(limit_s / 2, 1.0))
        client = dist.TCPStore(address, port, is_master=False, timeout=timeout, wait_for_workers=False)
        self.store = dist.PrefixStore("dist_prune/heartbeat", client)
        self.where = f"{address}:{port}"
        self.stopped = threading.Event()
        self.answered_at = time.monotonic()  # the last time a round of store calls came back
        self.thread = threading.Thread(target=self._run, name="dist_prune-heartbeat", daemon=True)
        # A store hosted by a stopped process (worker 0 under Ray, SIGSTOP) keeps the connection open and never
        # answers: the client's timeout does not cover every call, so the calls are timed from outside.
        self.watch = threading.Thread(target=self._watch_store, name="dist_prune-heartbeat-watch", daemon=True)

    def start(self) -> "Heartbeat":
        self.thread.start()
        self.watch.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        last_seen = {r: (None, time.monotonic()) for r in range(self.world_size) if r != self.rank}
        beats = 0
        while not self.stopped.wait(BEAT_EVERY_S if beats else 0.0):
            beats += 1
            try:
                self.store.set(str(self.rank), str(beats))
                silent = self._silent(last_seen)
                self.answered_at = time.monotonic()
            except Exception:  # a stopped or dead store host: every call times out
                if not self.stopped.is_set():
                    self._give_up(f"the rendezvous store at {self.where} stopped answering (the host of worker 0)")
                return
            if silent is not None and not self.stopped.is_set():
                self._give_up(f"worker {silent[0]} stopped responding: no heartbeat for {silent[1]:.0f} s")
                return

    def _watch_store(self) -> None:
        while not self.stopped.wait(BEAT_EVERY_S):
            waited = time.monotonic() - self.answered_at
            if waited > self.limit_s and not self.stopped.is_set():
                self._give_up(
                    f"the rendezvous store at {self.where} stopped answering for {waited:.0f} s (the host of worker 0)"
                )

    def _silent(self, last_seen: dict) -> tuple[int, float] | None:
        now = time.monotonic()
        for rank, (count, since) in last_seen.items():
            current = self.store.get(str(rank)).decode() if self.store.check([str(rank)]) else None
            if current != count:
                last_seen[rank] = (current, now)
            elif now - since > self.limit_s:
                return rank, now - since
        return None

    def _give_up(self, why: str) -> None:
        log.error("worker %d stops the job: %s", self.rank, why)
        print(f"dist-prune: error: {why}; the finished layers are kept: rerun with --resume", file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_CODE)  # the main thread may be blocked in a collective that would never return
