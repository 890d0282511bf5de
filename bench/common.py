"""Helpers shared by the benchmarks: child runs with their own peak memory, the matmul rate, RESULTS.md."""

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).with_name("RESULTS.md")


def run_child(args: list[str], launcher: list[str] | None = None) -> tuple[float, int]:
    """Run `python [LAUNCHER] -m dist_prune ARGS`; returns (wall seconds, peak resident MiB of that child).

    Under a launcher such as torchrun the child is the launcher itself: read the workers' own peaks from
    the report instead.
    """
    wall, peak = run_measured([sys.executable, *(launcher or []), "-m", "dist_prune", "--quiet", *args])
    return wall, peak // 2**20


def run_measured(command: list[str], **popen) -> tuple[float, int]:
    """Run a command; returns (wall seconds, peak resident bytes of the child, from os.wait4)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {code}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def eval_json(model: str, seqlen: int, windows: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_prune",
            "--quiet",
            "eval",
            "--model",
            model,
            "--seqlen",
            str(seqlen),
            "--windows",
            str(windows),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_gflops(m: int, k: int, n: int, repeats: int = 7) -> float:
    """Median fp32 GEMM rate on this machine for an (m x k) @ (k x n) product."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # warm-up: thread pool and allocator
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        rates.append(2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    model = ""
    if Path("/proc/cpuinfo").is_file():
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else ""
    return (
        f"{os.cpu_count()} cores ({model or cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def write_section(name: str, body: str, results: Path | None = None) -> None:
    """Replace this benchmark's section of RESULTS.md (or of `results`), leaving the other sections alone."""
    results = results or RESULTS
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = (
        results.read_text()
        if results.exists()
        else "# Benchmark results\n\nEach section is written by the script it names.\n"
    )
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results.write_text(text)
