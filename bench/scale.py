"""Scaling of the worker engine: 1 vs 2 workers with the same total threads, on SmolLM2-135M and on a
random-weight ~1B LLaMA (TinyLlama-1.1B shapes) stored as sharded bf16 safetensors.

Per run: wall time, layer-loop time, each worker's peak resident memory and weight-shard bytes (from the
report, measured inside each worker), and the memory plan's prediction beside them. Writes the `scale`
section of bench/RESULTS.md.

    python bench/scale.py [--nsamples 16] [--seqlen 256]
"""

import argparse
import json
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
    """A random-weight LLaMA of TinyLlama-1.1B's shape (SmolLM2's vocabulary, so its tokenizer fits)."""
    if (path / "config.json").is_file():
        return path
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA_SHAPE)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="400MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smollm2_dir() / name, path / name)
    return path


def prune_args(model: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        "prune", "--model", str(model), "--out", str(out), "--method", "wanda", "--sparsity", "0.5",
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", "4", "--no-eval-after",
    ]  # fmt: skip


def run(model: Path, workers: int, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"{model.name}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    threads = str(args.threads // workers)  # the same total threads for 1 and 2 workers
    if workers == 1:
        wall, _ = run_child([*prune_args(model, out, args), "--threads", threads])
    else:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(workers), "--master-addr", "127.0.0.1",
                    "--master-port", "29533"]  # fmt: skip
        wall, _ = run_child([*prune_args(model, out, args), "--threads", threads, "--launcher", "torchrun"], launcher)
    report = json.loads((out / "prune_report.json").read_text())
    shutil.rmtree(out)
    config = json.loads((model / "config.json").read_text())
    settings = {"prune": {"method": "wanda"}, "runtime": {"workers": workers}}
    settings["calibration"] = {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": 4}
    plan = plan_memory(build_config(settings), config)
    shape = ModelShape.from_config(config)
    return dict(
        model=model.name, workers=workers, wall=wall, layers=report["timings_s"]["layers"],
        peaks=[w["peak_bytes"] for w in report["workers"]], weights=[w["weight_bytes"] for w in report["workers"]],
        plan_peak=plan.peak, plan_weights=plan.weights,
        bound=1.1 / workers * shape.total_params * 4 + shape.layer_params * 4,
    )  # fmt: skip


def render(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        "## Scale: 1 vs 2 workers, same total threads",
        "",
        f"Machine: {machine_line()}.",
        f"Command: `{command}`. Wanda 50%, {args.nsamples} x {args.seqlen} calibration tokens, no evaluation;",
        f"1 worker in-process with {args.threads} threads, 2 workers under torchrun with {args.threads // 2} each.",
        "`random-1b` is a random-weight LLaMA of TinyLlama-1.1B's shape (1.1B parameters, bf16 sharded",
        "safetensors): its perplexity means nothing, only its time and memory do. Peak memory is each worker's",
        "own peak resident set, measured inside the worker; weights are its fp32 row shards.",
        "",
        "| model | workers | wall s | layer loop s | speed-up | peak MiB per worker | plan MiB | plan / measured "
        "| weights MiB per worker | bound 1.1/W model + layer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["model"]: r["layers"] for r in rows if r["workers"] == 1}
    for r in rows:
        peak = max(r["peaks"])
        ok = "ok" if max(r["weights"]) <= r["bound"] else "EXCEEDED"
        lines.append(
            f"| {r['model']} | {r['workers']} | {r['wall']:.0f} | {r['layers']:.0f} | "
            f"{base[r['model']] / r['layers']:.2f}x | {' / '.join(f'{p / MiB:.0f}' for p in r['peaks'])} | "
            f"{r['plan_peak'] / MiB:.0f} | {r['plan_peak'] / peak:.2f} | "
            f"{' / '.join(f'{w / MiB:.0f}' for w in r['weights'])} | {r['bound'] / MiB:.0f} ({ok}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="bench/out/scale")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = [smollm2_dir(), random_1b(work / "random-1b")]
    rows = [run(model, workers, args, work) for model in models for workers in (1, 2)]
    for row in rows:
        print(row, flush=True)
    write_section("scale", render(rows, args, ("python bench/scale.py " + " ".join(sys.argv[1:])).strip()))


if __name__ == "__main__":
    main()
