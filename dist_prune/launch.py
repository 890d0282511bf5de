"""Launching workers: the one place that knows about the in-process worker, torchrun and Ray.

Every launcher runs the same `worker` functions. The in-process launcher makes a world of one (an
in-memory store: no network); a torchrun process is one rank of a world torchrun made; the Ray launcher
starts one actor per worker, the actors form their own process group, and the driver relays worker 0's
progress and surfaces any worker's error with its traceback.
"""

import os
from dataclasses import replace
from pathlib import Path

import torch

from .config import PruneConfig
from .errors import ConfigError, DistPruneError
from .log import get_logger, setup_logging
from .progress import Progress
from .resolved import Resolved

log = get_logger()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def launch(job: str, run: Resolved, progress: Progress):
    r = run.config.runtime
    if r.launcher == "local":
        if r.workers != 1:
            raise ConfigError("the local launcher runs one in-process worker; use --launcher ray or torchrun")
        return _in_process(job, run, progress)
    if r.launcher == "torchrun":
        return _torchrun_rank(job, run, progress)
    return _ray(job, run, progress)


def run_job(job: str, run: Resolved, workers, progress: Progress):
    from .job import gradients_on_worker, prune_on_worker

    threads = torch.get_num_threads()
    if run.config.runtime.threads:
        torch.set_num_threads(run.config.runtime.threads)
    try:
        if job == "grad":
            return gradients_on_worker(run, Path(run.config.out), workers, progress)
        if run.method.structured:
            from .structured.pipeline import prune_structured_on_worker

            return prune_structured_on_worker(run, workers, progress)
        return prune_on_worker(run, workers, progress)
    finally:
        torch.set_num_threads(threads)  # an in-process job must not change its caller's thread count


def _in_process(job: str, run: Resolved, progress: Progress):
    from .distributed import init_workers, on_workers

    device = pick_device(run.config.runtime.device)
    return on_workers(lambda: init_workers(0, 1, device=device), lambda w: run_job(job, run, w, progress))


def _torchrun_rank(job: str, run: Resolved, progress: Progress):
    """This process is one rank; torchrun set RANK, WORLD_SIZE, MASTER_ADDR, ... and kills the others on failure."""
    from .distributed import init_from_env, on_workers

    if "RANK" not in os.environ:
        raise ConfigError("--launcher torchrun must run under torchrun (RANK/WORLD_SIZE are not set)")
    device, heartbeat_s = pick_device(run.config.runtime.device), run.config.runtime.heartbeat_timeout

    def rank_job(workers) -> dict | Path | None:
        shown = progress if workers.is_main else Progress("quiet")  # one view of the job: worker 0's
        setup_logging(quiet=shown.mode == "quiet", rank=workers.rank, world_size=workers.world_size)
        return run_job(job, _as_rank0_decided(run), workers, shown)

    return on_workers(lambda: init_from_env(device, heartbeat_s=heartbeat_s), rank_job)


def writes_output(config: PruneConfig) -> bool:
    """Whether this process's driver stands for the run that writes the output: every driver but a torchrun
    rank other than 0 (worker 0 writes; under Ray the actors write for the driver)."""
    return config.runtime.launcher != "torchrun" or os.environ.get("RANK", "0") == "0"


def torchrun_world(config: PruneConfig) -> PruneConfig:
    """Under torchrun the world is torchrun's: the driver plans for WORLD_SIZE workers, whatever --workers says."""
    if config.runtime.launcher != "torchrun" or "WORLD_SIZE" not in os.environ:
        return config
    return replace(config, runtime=replace(config.runtime, workers=int(os.environ["WORLD_SIZE"])))


def _as_rank0_decided(run: Resolved) -> Resolved:
    """Every torchrun rank runs the driver and resolves "auto" from its own free memory; ranks that chose
    differently would deadlock in mismatched collectives, so all take rank 0's choices (and its plan)."""
    import torch.distributed as dist

    chosen = [run]
    dist.broadcast_object_list(chosen, src=0)
    r = chosen[0].config.runtime
    runtime = replace(
        run.config.runtime, residency=r.residency, activation_storage=r.activation_storage, overlap=r.overlap
    )
    return replace(run, config=replace(run.config, runtime=runtime), plan=chosen[0].plan)


def _ray(job: str, run: Resolved, progress: Progress):
    """One actor per worker; the driver relays worker 0's progress and stops every actor on any error. A worker
    that dies (killed, out of memory, or ended by the others' heartbeat watchdog) restarts the job up to
    --max-restarts times, resuming from the last verified layer."""
    for restart in range(run.config.runtime.max_restarts + 1):
        try:
            return _ray_attempt(job, run, progress)
        except WorkerDied as died:
            if restart == run.config.runtime.max_restarts or job != "prune":
                raise
            log.warning("%s; restarting the workers and resuming (%d of %d)", died, restart + 1,
                        run.config.runtime.max_restarts)  # fmt: skip
            run = run.resumed()


def _ray_attempt(job: str, run: Resolved, progress: Progress):
    import ray
    from ray.util.queue import Queue

    config = run.config
    _ray_init(config)
    use_gpu = _ray_uses_gpu(config.runtime.device)
    actor_class = ray.remote(num_cpus=config.runtime.threads or 1, num_gpus=1 if use_gpu else 0)(WorkerActor)
    actors = [actor_class.remote() for _ in range(config.runtime.workers)]
    try:
        address, port = ray.get(actors[0].rendezvous.remote())
        events = Queue()
        device = "cuda:0" if use_gpu else "cpu"  # Ray shows each actor only its own GPU
        futures = [
            actor.run.remote(job, run, rank, address, port, device, events if rank == 0 else None)
            for rank, actor in enumerate(actors)
        ]
        return _wait_for_workers(futures, events, progress)
    finally:
        for actor in actors:
            ray.kill(actor)


class WorkerActor:
    """A Ray actor holding one worker; its methods run in the actor's own process."""

    def rendezvous(self) -> tuple[str, int]:
        import ray

        from .distributed import free_port

        return ray.util.get_node_ip_address(), free_port()

    def run(self, job: str, run: Resolved, rank: int, address: str, port: int, device: str, events):
        from .distributed import init_workers, on_workers

        world_size, heartbeat_s = run.config.runtime.workers, run.config.runtime.heartbeat_timeout
        setup_logging(quiet=True, rank=rank, world_size=world_size)
        progress = Progress("quiet", sink=events.put if events is not None else None)
        return on_workers(
            lambda: init_workers(rank, world_size, address, port, device, heartbeat_s=heartbeat_s),
            lambda workers: run_job(job, run, workers, progress),
        )


def _wait_for_workers(futures: list, events, progress: Progress):
    """Relay progress until every worker is done; the first failure stops the job with its traceback."""
    import ray

    pending = list(futures)
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.25)
        for record in events.get_nowait_batch(events.qsize()):
            progress.replay(record)
        if any(_failed(future) for future in done):
            _raise_the_cause(futures)
    for record in events.get_nowait_batch(events.qsize()):
        progress.replay(record)
    return ray.get(futures[0])


# After a worker dies, the others fail in their next collective within a second or two: wait a little for
# every outcome, so the dead one is named rather than a survivor's connection error.
SETTLE_S = 5


def _failed(future) -> bool:
    import ray

    try:
        ray.get(future)
    except ray.exceptions.RayError:
        return True
    return False


def _raise_the_cause(futures: list) -> None:
    """A dead worker first (the job can resume), then bad input (one line, exit 2), then any other error."""
    import ray

    ray.wait(futures, num_returns=len(futures), timeout=SETTLE_S)
    errors = {}
    for rank, future in enumerate(futures):
        try:
            ray.get(future, timeout=0)
        except ray.exceptions.GetTimeoutError:
            continue  # still running: stopped with the rest
        except ray.exceptions.RayError as err:
            errors[rank] = err
    dead = [rank for rank, err in errors.items() if isinstance(err, ray.exceptions.RayActorError)]
    if dead:
        raise WorkerDied(f"worker {dead[0]} died (killed, out of memory, or stopped by a silent worker)")
    for err in errors.values():
        if isinstance(getattr(err, "cause", None), DistPruneError):
            raise err.cause from None  # bad input: the same one-line message and exit code as in-process
    raise WorkerFailed(f"a worker failed; its traceback:\n{next(iter(errors.values()))}")


class WorkerFailed(RuntimeError):
    """A worker raised something other than bad input (exit code 1 with the worker's traceback)."""


class WorkerDied(WorkerFailed):
    """A worker's process ended without an answer: the job can resume from its last verified layer."""


def _ray_init(config: PruneConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Keep a single-machine Ray on loopback: otherwise a driver can hang resolving the host's address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env = {k: os.environ[k] for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "HF_HUB_OFFLINE") if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    cpus = max(os.cpu_count() or 1, config.runtime.workers * (config.runtime.threads or 1))
    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)


def _ray_uses_gpu(device: str) -> bool:
    import ray

    if device == "cpu":
        return False
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if device == "cuda" and not has_gpus:
        raise ConfigError("device cuda was asked for but the Ray cluster has no GPUs")
    return has_gpus
