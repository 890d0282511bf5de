"""A worker that dies (SIGKILL) or hangs (SIGSTOP) under Ray or torchrun: noticed within the heartbeat timeout,
named in one line with how to resume; Ray's --max-restarts resumes by itself; a resumed run is bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RAY_ENV
from test_resume import ROOT, args, assert_identical, slower  # noqa: F401 (slower is a fixture)

from dist_prune.cli import main
from dist_prune.distributed import free_port

HEARTBEAT_S = 10
# The silent worker is named after HEARTBEAT_S; Ray then needs some seconds to report the actor that exited and
# to stop the others. The allowance covers a loaded 2-core machine; a hang without the watchdog lasts an hour.
ENDS_WITHIN_S = HEARTBEAT_S + 110


def start(argv: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **RAY_ENV, **env}, stderr=subprocess.PIPE, text=True)


def wait_until(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the run never reached the point to interrupt")


def layers_done(partial: Path) -> int:
    try:
        return len(json.loads((partial / "dist_prune.json").read_text())["layers"])
    except (OSError, ValueError, KeyError):
        return 0


def pids(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found if int(pid) != os.getpid()]


def ray_args(model: Path, out: Path, text: Path, method: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dist_prune", *args(model, out, text, method), "--launcher", "ray",
            "--workers", "2", "--heartbeat-timeout", str(HEARTBEAT_S), *extra]  # fmt: skip


def torchrun_args(model: Path, out: Path, text: Path, method: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "dist_prune", *args(model, out, text, method),
            "--launcher", "torchrun", "--heartbeat-timeout", str(HEARTBEAT_S), *extra]  # fmt: skip


@pytest.mark.parametrize("when", ["gradient pass", "layer loop"])
def test_ray_restarts_a_killed_worker_and_resumes(when, slower, text_file, tmp_path, ray_head):  # noqa: F811
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(args(slower, whole, text_file, "gblm")) == 0
    process = start(ray_args(slower, out, text_file, "gblm", "--max-restarts", "1"), RAY_ADDRESS=ray_head)
    reached = {
        "gradient pass": lambda: any(tmp_path.glob(".dist_prune-scratch-*/gradients-*")),
        "layer loop": lambda: layers_done(tmp_path / ".out.partial") >= 2,
    }[when]
    wait_until(reached, process)
    os.kill(pids("ray::WorkerActor")[-1], signal.SIGKILL)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "restarting the workers and resuming" in err
    assert_identical(whole, out)
    resumed = json.loads((out / "prune_report.json").read_text())["resumed_layers"]
    assert resumed >= 2 if when == "layer loop" else resumed == 0


@pytest.mark.parametrize("which", [0, -1])
def test_ray_hung_worker_is_named_within_the_heartbeat_timeout(which, slower, text_file, tmp_path, ray_head):  # noqa: F811
    """Each of the two actors in turn (one of them is worker 0, which hosts the rendezvous store: stopping it
    freezes the store, whose calls then never return)."""
    out = tmp_path / "out"
    process = start(ray_args(slower, out, text_file, "sparsegpt"), RAY_ADDRESS=ray_head)
    wait_until(lambda: layers_done(tmp_path / ".out.partial") >= 1, process)
    hung = pids("ray::WorkerActor")[which]
    os.kill(hung, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        _, err = process.communicate(timeout=ENDS_WITHIN_S)
    finally:
        os.kill(hung, signal.SIGKILL)
    assert process.returncode != 0 and time.monotonic() - stopped_at < ENDS_WITHIN_S
    assert "stopped responding" in err or "stopped answering" in err, err[-3000:]
    assert "--resume" in err.splitlines()[-1]


def test_torchrun_hung_rank_is_named_within_the_heartbeat_timeout(slower, text_file, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    process = start(torchrun_args(slower, out, text_file, "sparsegpt"))
    wait_until(lambda: layers_done(tmp_path / ".out.partial") >= 1, process)
    ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
             .stdout.split()]  # fmt: skip
    hung = max(ranks)  # rank 1 starts second
    os.kill(hung, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        _, err = process.communicate(timeout=ENDS_WITHIN_S)
    finally:
        if pids(str(hung)):
            os.kill(hung, signal.SIGKILL)
    assert process.returncode != 0 and time.monotonic() - stopped_at < ENDS_WITHIN_S
    assert "stopped responding" in err or "stopped answering" in err, err[-3000:]


@pytest.mark.parametrize("when", ["gradient pass", "layer loop"])
def test_torchrun_kill_9_then_resume_is_bit_identical(when, slower, text_file, tmp_path):  # noqa: F811
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(args(slower, whole, text_file, "gblm")) == 0
    process = start(torchrun_args(slower, out, text_file, "gblm"))
    scratch_seen = lambda: any(tmp_path.glob(".dist_prune-scratch-*/gradients-*"))  # noqa: E731
    reached = scratch_seen if when == "gradient pass" else lambda: layers_done(tmp_path / ".out.partial") >= 2
    wait_until(reached, process)
    ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
             .stdout.split()]  # fmt: skip
    os.kill(max(ranks), signal.SIGKILL)
    process.communicate(timeout=300)
    assert process.returncode != 0
    resumed = subprocess.run(torchrun_args(slower, out, text_file, "gblm", "--resume"), cwd=ROOT,
                             env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(whole, out)
