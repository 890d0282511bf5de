"""Time lost to a kill -9 halfway through a GBLM run on SmolLM2-135M: resumed against rerun from scratch.

One uninterrupted run (wall T); one run killed with SIGKILL once half of its decoder layers are written
(wall K until the kill), then the same command with --resume (wall R). Without resume the kill costs K (the
run starts again and takes T); with resume it costs K + R - T. The resumed output must equal the
uninterrupted one tensor for tensor. Writes the `resume` section of bench/RESULTS.md.

    python bench/resume.py [--nsamples 8] [--seqlen 256]
"""

import argparse
import datetime
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import machine_line, write_section
from safetensors.torch import load_file

LAYERS = 30  # SmolLM2-135M


def prune_argv(out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "dist_prune", "--quiet", "prune", "--model", "smollm2-135m", "--out", str(out),
            "--method", "gblm", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", "2",
            "--no-eval-after", "--threads", "2", "--residency", "stream"]  # fmt: skip


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


def killed_halfway(argv: list[str], partial: Path) -> float:
    """Wall seconds until SIGKILL, sent once half of the layers are in the manifest."""
    start = time.perf_counter()
    process = subprocess.Popen(argv)
    while _layers_written(partial) < LAYERS // 2:
        if process.poll() is not None:
            raise RuntimeError("the run ended before it could be killed")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return time.perf_counter() - start


def _layers_written(partial: Path) -> int:
    try:
        return len(json.loads((partial / "dist_prune.json").read_text())["layers"])
    except (OSError, ValueError, KeyError):
        return 0


def same_tensors(a: Path, b: Path) -> bool:
    def tensors(path: Path) -> dict:
        found = {}
        for file in path.glob("*.safetensors"):
            found.update(load_file(file))
        return found

    first, second = tensors(a), tensors(b)
    return first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--workdir", default="/tmp/dist_prune_bench_resume")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    whole, out = work / "whole", work / "out"
    uninterrupted = timed(prune_argv(whole, args))
    until_kill = killed_halfway(prune_argv(out, args), work / ".out.partial")
    resumed = timed([*prune_argv(out, args), "--resume"])
    identical = same_tensors(whole, out)
    shutil.rmtree(work, ignore_errors=True)
    lost_with, lost_without = until_kill + resumed - uninterrupted, until_kill
    body = f"""## Resume: a kill -9 halfway through a GBLM run (SmolLM2-135M, real weights)

Machine: {machine_line()}. Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.
Command: `python bench/resume.py --nsamples {args.nsamples} --seqlen {args.seqlen}` (GBLM 50%, stream, one
in-process worker with 2 threads, {args.nsamples} x {args.seqlen} calibration tokens, no evaluation).
SIGKILL once {LAYERS // 2} of {LAYERS} layers were written; then the same command with `--resume`.

| uninterrupted s | until the kill s | resumed s | time lost with resume s | time lost rerunning s | resumed == uninterrupted |
|---|---|---|---|---|---|
| {uninterrupted:.1f} | {until_kill:.1f} | {resumed:.1f} | {lost_with:.1f} | {lost_without:.1f} | {"yes, every tensor" if identical else "NO"} |

The resumed run repeats the gradient pass for the layers still to prune (its backward stops at the first of
them) and replays the written layers to rebuild the calibration states; single runs on a shared 2-core
machine, so the seconds carry noise of 10-20%.
"""
    write_section("resume", body)
    print(body)


if __name__ == "__main__":
    main()
