"""Starting and stopping the worker process group; the one place that picks a backend.

Every launcher (Ray actors, torchrun, the in-process worker) ends up in `init_workers`, so the rest of
`dist_prune.distributed` can assume a process group and a device mesh exist, even for a single worker.
"""

import gc
import os
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..log import get_logger

log = get_logger()

T = TypeVar("T")

# Long enough for the slowest rank to finish a layer of calibration before the next collective.
DEFAULT_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Workers:
    """This process's place among the workers, and the 1-D mesh FSDP shards rows over."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_workers(
    rank: int,
    world_size: int,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    device: torch.device | str = "cpu",
    timeout: timedelta = DEFAULT_TIMEOUT,
    heartbeat_s: float | None = None,
) -> Workers:
    """Join (or, for one worker, create) the default process group and build the device mesh.

    A single worker gets an in-memory store: no port, no network, but the same code path as many. With
    `heartbeat_s`, a silent worker is noticed within that many seconds (heartbeat.py).
    """
    device = _resolve_device(torch.device(device), rank)
    if world_size == 1:
        store = dist.HashStore()
    else:
        if master_port is None:
            raise ValueError("more than one worker needs a master port")
        store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout)
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size, timeout=timeout)
    if world_size > 1 and heartbeat_s:
        _start_heartbeat(master_addr, master_port, rank, world_size, heartbeat_s)
    return _workers(device)


def init_from_env(
    device: torch.device | str = "auto", timeout: timedelta = DEFAULT_TIMEOUT, heartbeat_s: float | None = None
) -> Workers:
    """Under torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from the environment.
    The heartbeat uses the store at MASTER_ADDR:MASTER_PORT (torchrun's agent hosts it)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device) if device != "auto" else _default_device()
    device = _resolve_device(device, local_rank)
    dist.init_process_group(backend_for(device), init_method="env://", timeout=timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size > 1 and heartbeat_s:
        _start_heartbeat(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world_size, heartbeat_s)
    return _workers(device)


_heartbeats: list = []


def _start_heartbeat(address: str, port: int, rank: int, world_size: int, limit_s: float) -> None:
    from .heartbeat import Heartbeat

    _heartbeats.append(Heartbeat(address, port, rank, world_size, limit_s).start())


def on_workers(start: Callable[[], Workers], job: Callable[[Workers], T]) -> T:
    """`job(workers)` on the process group `start()` makes, then `teardown`. The Workers exist only inside the
    job's call, and a failure's traceback is stripped of its frames' variables (its text stays whole), so
    that when teardown runs nothing holds the group any more."""
    try:
        return job(start())
    except BaseException as failure:
        traceback.clear_frames(failure.__traceback__)
        raise
    finally:
        teardown()


def teardown() -> None:
    """Stop the heartbeat, leave the process group, and wait until its worker threads have ended; safe to call
    when none was started.

    A collective returns before gloo's worker thread has destroyed its work, whose tensors drop their Python
    objects under the GIL, and destroy_process_group does not join those threads: the group's destructor does
    (torch runs it without the GIL), once the group's last reference is gone. Left to the interpreter's exit,
    that happens while Python finalises, a thread still releasing a work cannot take the GIL, and the process
    aborts (std::terminate in ProcessGroupGloo::runLoop, seen as a SIGABRT after a finished job). So the last
    references (the workers' device mesh: `on_workers` keeps none; DTensor's caches) go here, and the join is
    done while the interpreter runs."""
    while _heartbeats:
        _heartbeats.pop().stop()
    if dist.is_initialized():
        dist.destroy_process_group()
        _forget_device_meshes()
        gc.collect()


def _forget_device_meshes() -> None:
    """DTensor (FSDP2, structured pruning) caches sharding and redistribution plans keyed by the device mesh,
    and a mesh holds its process group: cleared, or the group would outlive teardown. torch has no public call
    that clears them (the one private use in dist_prune; the rest goes through public APIs)."""
    if "torch.distributed.tensor" not in sys.modules:  # never used: nothing cached
        return
    from torch.distributed.tensor import _redistribute
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    _redistribute._gen_transform_infos.cache_clear()
    _redistribute.clear_redistribute_planner_cache()


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it), for a rendezvous on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _resolve_device(device: torch.device, local_rank: int) -> torch.device:
    """One GPU per process: cuda means cuda:LOCAL_RANK, and NCCL needs it to be the current device."""
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _workers(device: torch.device) -> Workers:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world_size,))
    log.debug("worker %d/%d on %s (%s)", rank, world_size, device, backend_for(device))
    return Workers(rank=rank, world_size=world_size, device=device, mesh=mesh)
