"""Overlap on the CPU: the real SmolLM2's layer loop against its compute time.

Reading the next layer and writing (and hashing) the finished one run in threads while a layer computes
(dist_prune/background.py). This prunes the real SmolLM2-135M with one in-process worker, `--residency stream`,
on the CPU with `--overlap` (a CPU run's default is inline: this benchmark is why), and reads from each run's
prune_report.json the layer loop's wall time, its compute (forward, statistics, pruning), the background's
seconds (read, write, hash) and the loop thread's waits for them.
"serial" is what the loop would take if it did the background's work itself: wall + background - waits.

    python bench/overlap.py                          # Wanda, SparseGPT, GBLM; 128 x 512 calibration tokens
    python bench/overlap.py --runs wanda --nsamples 32 --results /tmp/R.md
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import RESULTS, machine_line, write_section

RUNS = {"wanda": ["--method", "wanda"], "sparsegpt": ["--method", "sparsegpt"], "gblm": ["--method", "gblm"]}
TARGET = 1.15  # the layer loop's wall time against its compute (issue 20)
COMPUTE = ("forward", "statistics", "pruning")
BACKGROUND = ("read", "write", "hash")
WAITS = ("read_wait", "write_wait")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dist_prune_overlap_") as workdir:
        for name in args.runs.split(","):
            out = Path(workdir) / name
            command = [sys.executable, "-m", "dist_prune", "--quiet", "prune", "--model", "smollm2-135m", "--out",
                       str(out), *RUNS[name], "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                       "--residency", "stream", "--launcher", "local", "--device", "cpu", "--threads",
                       str(args.threads), "--no-eval-after", "--scratch", workdir, "--overlap"]  # fmt: skip
            subprocess.run(command, check=True)
            rows.append(summarise(name, json.loads((out / "prune_report.json").read_text())))
            print(json.dumps(rows[-1]), flush=True)
    body = render(rows, args)
    print(body)
    write_section("overlap", body, Path(args.results))


def summarise(name: str, report: dict) -> dict:
    phases, loop = report["layer_phases_s"], report["layer_loop"]
    background = sum(phases.get(p, 0.0) for p in BACKGROUND)
    waits = sum(phases.get(p, 0.0) for p in WAITS)
    return {
        "method": name,
        "wall": loop["wall_s"],
        "compute": loop["compute_s"],
        "ratio": loop["wall_over_compute"],
        "background": round(background, 2),
        "waits": round(waits, 2),
        "serial": round(loop["wall_s"] + background - waits, 2),
        "phases": phases,
        "gradient_pass": report["timings_s"].get("gradients"),
    }


def render(rows: list[dict], args) -> str:
    lines = [
        "## Overlap on the CPU: SmolLM2-135M (real weights), layer loop against compute",
        "",
        f"Machine: {machine_line()}. Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.",
        f"Command: `python bench/overlap.py {' '.join(sys.argv[1:])}`; one in-process worker, {args.threads} threads, "
        f"`--residency stream --overlap`, {args.nsamples} x {args.seqlen} calibration tokens, no evaluation, each method in "
        "one run. Seconds summed over the 30 layers, from prune_report.json. compute: forward + statistics + "
        "pruning; background: read ahead + write + hash in their threads; waits: the loop's waits for them; "
        "serial: wall + background - waits (the loop doing that work itself).",
        "",
        "| method | layer loop wall s | compute s | wall / compute | target | background s | waits s | serial s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        verdict = "met" if row["ratio"] <= TARGET else "NOT met"
        lines.append(
            f"| {row['method']} | {row['wall']:.1f} | {row['compute']:.1f} | {row['ratio']:.3f} | <= {TARGET} "
            f"({verdict}) | {row['background']:.1f} | {row['waits']:.2f} | {row['serial']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
