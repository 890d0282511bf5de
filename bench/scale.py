"""Scaling of the worker engine on SmolLM2-135M and on a random-weight ~1B LLaMA (TinyLlama-1.1B shapes) stored
as sharded bf16 safetensors: 1 worker with 2 threads, 2 workers with 1 thread each (the same total threads),
and 1 worker with 1 thread (what a second worker adds when it brings its own core).

Per run: wall time, layer-loop time, each worker's peak resident memory, the phase that set it, and its
weight-shard bytes (from the report, measured inside each worker), with the memory plan's prediction beside
them. Writes the `scale` section of bench/RESULTS.md.

    python bench/scale.py [--nsamples 16] [--seqlen 256]
"""

import argparse
import json
import multiprocessing
import shutil
import sys
from pathlib import Path

import torch
from common import machine_line, run_child, write_section

from dist_prune.assets import smollm2_dir
from dist_prune.config import build_config
from dist_prune.memory import ModelShape, plan_memory

TINYLLAMA_SHAPE = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
    vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip
MiB = 2**20


def random_1b(path: Path) -> Path:
    """A random-weight LLaMA of TinyLlama-1.1B's shape (SmolLM2's vocabulary, so its tokenizer fits).

    Built in a spawned process: Linux keeps a process's peak RSS across fork and exec, so building 4 GB here
    would show up as every later child's own peak.
    """
    if not (path / "config.json").is_file():
        child = multiprocessing.get_context("spawn").Process(target=_write_random_1b, args=(path,))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError("building the random 1B model failed")
    return path


def _write_random_1b(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA_SHAPE)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="400MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smollm2_dir() / name, path / name)


def prune_args(model: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        "prune", "--model", str(model), "--out", str(out), "--method", "wanda", "--sparsity", "0.5",
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", "4", "--no-eval-after",
    ]  # fmt: skip


def run(model: Path, workers: int, threads: int, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"{model.name}-w{workers}-t{threads}"
    shutil.rmtree(out, ignore_errors=True)
    common = [*prune_args(model, out, args), "--threads", str(threads)]
    if workers == 1:
        wall, _ = run_child(common)
    else:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(workers), "--master-addr", "127.0.0.1",
                    "--master-port", "29533"]  # fmt: skip
        wall, _ = run_child([*common, "--launcher", "torchrun"], launcher)
    report = json.loads((out / "prune_report.json").read_text())
    shutil.rmtree(out)
    config = json.loads((model / "config.json").read_text())
    settings = {"prune": {"method": "wanda"}, "runtime": {"workers": workers}}
    settings["calibration"] = {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": 4}
    settings["evaluation"] = {"eval_after": False}
    largest = max(f.stat().st_size for f in model.glob("*.safetensors"))
    plan = plan_memory(build_config(settings), config, largest_file=largest)
    shape = ModelShape.from_config(config)
    return dict(
        model=model.name, workers=workers, threads=threads, wall=wall, layers=report["timings_s"]["layers"],
        peaks=[w["peak_bytes"] for w in report["workers"]], weights=[w["weight_bytes"] for w in report["workers"]],
        peak_phase=peak_phase(report["workers"][0]),
        plan_peak=plan.peak, plan_phase=max(plan.phases, key=plan.phases.get),
        bound=1.1 / workers * shape.total_params * 4 + shape.layer_params * 4,
    )  # fmt: skip


def peak_phase(worker: dict) -> str:
    """The first phase after which the host peak had reached its final value ("end": after the last phase)."""
    for phase, peak in worker["host_peak_after_phase"].items():
        if peak >= worker["peak_bytes"]:
            return phase
    return "end (gathering embeddings and head)"


SHAPES = ((1, 2), (2, 1), (1, 1))  # (workers, threads per worker)


def render(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        "## Scale: 1 vs 2 workers",
        "",
        f"Machine: {machine_line()}.",
        f"Command: `{command}`. Wanda 50%, {args.nsamples} x {args.seqlen} calibration tokens, batch 4, no",
        "evaluation; 1 worker in-process, 2 workers under torchrun. `random-1b` is a random-weight LLaMA of",
        "TinyLlama-1.1B's shape (1.1B parameters, bf16, sharded safetensors): its perplexity means nothing, only",
        "its time and memory do. Peak memory is each worker's own peak resident set, measured inside the worker",
        "(`peak set in`: the phase after which it was reached); weights are its fp32 row shards.",
        "Speed-ups are layer-loop times against the same model's 1 worker x 2 threads run (same total threads)",
        "and against its 1 worker x 1 thread run (what a second worker adds when it brings its own core).",
        "",
        "| model | workers x threads | wall s | layer loop s | speed-up vs 1x2 | vs 1x1 | peak MiB per worker "
        "| peak set in | plan MiB (phase) | plan / measured | weights MiB per worker | bound 1.1/W model + layer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["model"], r["workers"], r["threads"]): r["layers"] for r in rows}
    for r in rows:
        peak = max(r["peaks"])
        ok = "ok" if max(r["weights"]) <= r["bound"] else "EXCEEDED"
        same_threads = base[(r["model"], 1, 2)] / r["layers"]
        one_core = base[(r["model"], 1, 1)] / r["layers"]
        lines.append(
            f"| {r['model']} | {r['workers']} x {r['threads']} | {r['wall']:.0f} | {r['layers']:.0f} | "
            f"{same_threads:.2f}x | {one_core:.2f}x | {' / '.join(f'{p / MiB:.0f}' for p in r['peaks'])} | "
            f"{r['peak_phase']} | {r['plan_peak'] / MiB:.0f} ({r['plan_phase']}) | {r['plan_peak'] / peak:.2f} | "
            f"{' / '.join(f'{w / MiB:.0f}' for w in r['weights'])} | {r['bound'] / MiB:.0f} ({ok}) |"
        )
    return "\n".join(lines + [""] + verdicts(rows, base)) + "\n"


def verdicts(rows: list[dict], base: dict) -> list[str]:
    """The issue's three targets, computed from the rows above."""
    bound_ok = all(max(r["weights"]) <= r["bound"] for r in rows)
    ratios = [r["plan_peak"] / max(r["peaks"]) for r in rows]
    plan_ok = all(abs(ratio - 1) <= 0.15 for ratio in ratios)
    same = base[("random-1b", 1, 2)] / base[("random-1b", 2, 1)]
    own_core = base[("random-1b", 1, 1)] / base[("random-1b", 2, 1)]
    lines = [
        f"- Weights per worker within 1.1/W of the model plus one layer: {'met' if bound_ok else 'NOT met'}.",
        f"- Plan within 15% of the measured peak: {'met' if plan_ok else 'NOT met'} "
        f"(plan / measured from {min(ratios):.2f} to {max(ratios):.2f}).",
        f"- random-1b layer loop, 2 workers x 1 thread against 1 worker x 2 threads: {same:.2f}x "
        f"(target >= 1.6x: {'met' if same >= 1.6 else 'NOT met'}); against 1 worker x 1 thread: {own_core:.2f}x.",
    ]
    if same < 1.6:
        lines.append(
            "  On this 2-core CPU the layer loop is matrix products that one process already spreads over both "
            "cores (2 threads run it 1.7x faster than 1); splitting the sequences over two single-threaded "
            "workers does the same arithmetic on the same two cores, so it cannot be faster. Workers scale when "
            "each brings its own compute (the `vs 1x1` column, and one GPU per worker), not by re-dividing the "
            "same cores."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--workdir", default="bench/out/scale")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = [smollm2_dir(), random_1b(work / "random-1b")]
    rows = [run(model, workers, threads, args, work) for model in models for workers, threads in SHAPES]
    for row in rows:
        print(row, flush=True)
    write_section("scale", render(rows, args, ("python bench/scale.py " + " ".join(sys.argv[1:])).strip()))


if __name__ == "__main__":
    main()
