"""Stopping at a layer boundary on SIGINT or SIGTERM, agreed by every worker."""

import signal
import threading

import torch

from ..log import get_logger
from .collectives import any_worker

log = get_logger()


class StopRequest:
    """SIGINT and SIGTERM ask the job to stop at the next layer boundary, where every worker agrees (a
    collective), so the partial output ends on a finished layer and can be resumed. A second signal stops at
    once. Signal handlers exist only in a process's main thread; elsewhere (a Ray actor's thread) nothing is
    installed and the launcher's own handling applies."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.asked = False
        self.previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._ask) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _ask(self, signum, _frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        log.warning("%s: stopping after the current layer (send it again to stop now)", signal.Signals(signum).name)

    def agreed(self, device: torch.device) -> bool:
        return any_worker(self.asked, device)
