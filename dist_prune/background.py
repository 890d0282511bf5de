"""Work that overlaps the compute: reading ahead, writing behind, and the host copies they need.

A worker's layer loop alternates reading a layer, computing on it and writing it. Reading the next layer and
writing (and hashing) the finished one go to a thread each, at most one item ahead or behind, so the loop's
wall time approaches its compute time. File reads, `safetensors` and hashing release the GIL. The run's
`overlap` setting (config.py; the driver decides it: on for CUDA, off on a CPU) can make both run inline
instead, holding no second layer.

Host copies on CUDA: a copy from the device into ordinary (pageable) memory goes through the driver's staging
buffer and faults in every fresh page on the way (1.3 GB/s measured on an H200 host, against 51 GB/s into
page-locked memory). Buffers that are made again for every layer with the same shapes (a layer's weights,
its gradient rows) are page-locked: torch's host allocator keeps them and hands them out again. Buffers that
live long and add up (the gradient pass's stored layer inputs) stay pageable, their pages faulted in by all
threads at once before the copy.
"""

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor


class Background:
    """One task at a time in a thread of its own: `submit` waits for the previous task first (at most one
    pending), and a task's error is raised in the caller at the next `submit` or `wait`. `overlap=False`: each
    task runs in the caller's thread as it is submitted (its error raised at once), holding nothing past it."""

    def __init__(self, name: str, overlap: bool = True):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) if overlap else None
        self._pending: Future | None = None

    def submit(self, task: Callable[..., Any], *args: Any) -> float:
        """Queue `task(*args)`; returns the seconds spent waiting for the previous one."""
        waited = self.wait()
        if self._pool is None:
            task(*args)
        else:
            self._pending = self._pool.submit(task, *args)
        return waited

    def wait(self) -> float:
        """Wait for the pending task (raising its error); returns the seconds waited."""
        start = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        return time.perf_counter() - start

    def close(self) -> None:
        """Finish the pending task (its error is raised) and stop the thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


class Prefetcher:
    """`get(key, then=next_key)`: `load(key)`, where the value asked for next was read in a thread while the
    caller worked. The seconds of the last load (wherever it ran) and of the caller's wait for it are kept.
    `overlap=False`: nothing is read ahead (`then` is ignored); every value is read when asked for."""

    def __init__(self, load: Callable[[Any], Any], name: str, overlap: bool = True):
        self._load = load
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) if overlap else None
        self._ahead: tuple[Any, Future] | None = None
        self.load_seconds = 0.0
        self.wait_seconds = 0.0

    def get(self, key: Any, then: Any | None = None) -> Any:
        start = time.perf_counter()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            value, self.load_seconds = ahead[1].result()
            self.wait_seconds = time.perf_counter() - start
        else:
            if ahead is not None:  # read ahead for nothing: the caller changed its order
                ahead[1].result()
            value, self.load_seconds = self._timed_load(key)
            self.wait_seconds = 0.0
        if then is not None and self._pool is not None:
            self._ahead = (then, self._pool.submit(self._timed_load, then))
        return value

    def _timed_load(self, key: Any) -> tuple[Any, float]:
        start = time.perf_counter()
        value = self._load(key)
        return value, time.perf_counter() - start

    def close(self) -> None:
        """Let a read ahead finish (its value and any error are dropped) and stop the thread."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].exception()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def to_host(tensor: Tensor, recycled: bool = False) -> Tensor:
    """A host copy of a device tensor (a host tensor as it is). `recycled`: the caller frees it soon and asks
    again for the same shapes, so page-locked memory from torch's host allocator pays off."""
    if tensor.device.type == "cpu":
        return tensor
    if recycled:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    else:
        host = torch.empty(tensor.shape, dtype=tensor.dtype)
        host.view(torch.uint8).zero_()  # fault the fresh pages in with all threads, not one by one in the copy
    host.copy_(tensor)
    return host


def to_host_dict(tensors: dict[str, Tensor], recycled: bool = False) -> dict[str, Tensor]:
    return {name: to_host(tensor.detach(), recycled) for name, tensor in tensors.items()}


def page_locked(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Host tensors copied into page-locked memory, so that their copy to the GPU is a fast DMA (for buffers
    made again for every layer with the same shapes: torch's host allocator recycles them)."""
    pinned = {}
    for name, tensor in tensors.items():
        pinned[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        pinned[name].copy_(tensor)
    return pinned
