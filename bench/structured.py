"""Structured pruning of the real SmolLM2-135M: SAAP-style against FLAP and LLM-Pruner, with generation speed.

At 20% and 50% of the decoder-layer parameters removed: SAAP-style (fused importance, per-module ratios from
one global cut of the standardised scores), the uniform per-layer ratio with the same fused scores,
element-wise Taylor alone with uniform ratios (LLM-Pruner's choice), FLAP (fluctuation, global standardised
allocation, bias compensation), and the fused scores with the stability-driven adaptive ratios.
Each prune is its own process and measures perplexity before recovery, along the recovery (every
--recover-eval-every steps) and after it; every variant gets the same recovery budget. Greedy generation speed
(tokens/s at batch 1 and 8) is measured in another process per model, dense included. Writes the `structured`
section of bench/RESULTS.md.

    python bench/structured.py [--nsamples 32] [--seqlen 128] [--recover-steps 40] [--threads N]
    python bench/structured.py --workers 2 --ratios 0.2 --variants 0   # the same job on 2 torchrun workers

With --workers > 1 every prune runs under torchrun and the table goes to its own section
(`structured-wN`), so the one-worker table stays as it is.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine_line, run_child, write_section

VARIANTS = [
    ("SAAP-style (fused, global, compensated)", ["--method", "saap"]),
    ("SAAP-style without bias compensation", ["--method", "saap", "--no-bias-compensation"]),
    ("uniform ratio, fused scores, compensated", ["--method", "saap", "--allocation", "uniform"]),
    ("element-wise Taylor, uniform (LLM-Pruner)", ["--method", "saap", "--importance", "element", "--allocation", "uniform", "--no-bias-compensation"]),
    ("FLAP (fluctuation, global, compensated)", ["--method", "flap"]),
    ("fused, adaptive (stability) ratios, compensated", ["--method", "saap", "--allocation", "adaptive"]),
]  # fmt: skip
RATIOS = (0.2, 0.5)
PROMPT_TOKENS = 32


def prune_variant(args: argparse.Namespace, out: Path, ratio: float, flags: list[str]) -> dict:
    settings = {
        "ratio": ratio,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "batch-size": args.batch_size,
        "eval-seqlen": args.eval_seqlen,
        "eval-windows": args.eval_windows,
        "recover-steps": args.recover_steps,
        "recover-lr": args.recover_lr,
        "recover-eval-every": args.recover_eval_every,
        "stability-batches": args.stability_batches,
        "out": out,
    }
    options = [item for name, value in settings.items() for item in (f"--{name}", str(value))]
    command = ["prune", "--model", "smollm2-135m", *flags, *options, *thread_flags(args)]
    if args.workers == 1:
        wall, rss = run_child([*command, "--overwrite"])
    else:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(args.workers), "--master-addr",
                    "127.0.0.1", "--master-port", "29534"]  # fmt: skip
        wall, rss = run_child([*command, "--overwrite", "--launcher", "torchrun"], launcher)
    report = json.loads((out / "prune_report.json").read_text())
    return dict(report=report, wall=wall, rss=rss, speed=measure_speed(str(out), args))


def thread_flags(args: argparse.Namespace) -> list[str]:
    return ["--threads", str(args.threads)] if args.threads else []


def measure_speed(model: str, args: argparse.Namespace) -> dict:
    """Generation speed in a fresh process, so that no two models share allocator state or threads."""
    out = subprocess.run(
        [sys.executable, __file__, "--speed-of", model, "--new-tokens", str(args.new_tokens), *thread_flags(args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed_child(model: str, new_tokens: int, threads: int | None) -> dict:
    """tokens/s of greedy generation (fp32), exactly `new_tokens` per sequence, median of 3, after a warm-up."""
    import torch
    from transformers import AutoModelForCausalLM

    from dist_prune.assets import resolve_model

    if threads:
        torch.set_num_threads(threads)
    path = resolve_model(model)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=True).eval()
    result = {}
    for batch in (1, 8):
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, loaded.config.vocab_size, (batch, PROMPT_TOKENS), generator=generator)
        settings = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
        loaded.generate(prompt, min_new_tokens=4, max_new_tokens=4, **settings)  # warm-up
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            loaded.generate(prompt, min_new_tokens=new_tokens, max_new_tokens=new_tokens, **settings)
            seconds.append(time.perf_counter() - start)
        result[f"batch{batch}"] = batch * new_tokens / statistics.median(seconds)
    return result


def workers_text(workers: int) -> str:
    return "one in-process worker" if workers == 1 else f"{workers} workers under torchrun"


def render(args: argparse.Namespace, dense: dict, rows: list[dict], command: str) -> str:
    s = rows[0]["report"]["config"]["structured"]
    lines = [
        f"## Structured pruning: SmolLM2-135M (real weights), {workers_text(args.workers)}",
        "",
        f"Machine: {machine_line()}; children ran with {args.threads or 'the default number of'} torch threads.",
        f"Command: `{command}`.",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of the Wikipedia calibration split (seed 0), "
        f"{args.stability_batches} stability batches. Evaluation: {args.eval_windows} windows of {args.eval_seqlen} "
        f"tokens of the held-out split. Protected layers: the first {s['protect_first']} and the last "
        f"{s['protect_last']}. GQA mode: {rows[0]['report']['gqa_mode']}.",
        f"Recovery, the same for every variant: {args.recover_steps} steps of rank-8 adapters, AdamW at a constant lr "
        f"{args.recover_lr}, batches of {args.batch_size} fresh windows of {args.seqlen} tokens of the calibration "
        f"split ({args.recover_steps * args.batch_size * args.seqlen:,} tokens), attention and MLP adapters "
        "alternating; merged before saving.",
        f"Speed: greedy `generate`, fp32, prompt {PROMPT_TOKENS} tokens, exactly {args.new_tokens} new tokens per "
        "sequence, median of 3 after a warm-up, each model in a fresh process. Dense was measured first and last "
        f"(b1 {_speeds(dense, 'batch1')}, b8 {_speeds(dense, 'batch8')} tok/s; a single value: the run "
        "stopped before the last); the faster is the baseline.",
        "Reduction is of decoder-layer parameters (the target); `params` counts the whole model (tied embeddings once).",
        "",
        "| variant | target | params | reduction | ppl pruned | ppl recovered | tok/s b1 | tok/s b8 | speed-up b1 / b8 "
        "| prune wall s | peak MiB per worker | plan MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | - | {dense['params'] / 1e6:.1f}M | - | {dense['ppl']:.2f} | - | {dense['speed']['batch1']:.1f} "
        f"| {dense['speed']['batch8']:.1f} | 1.00x / 1.00x | - | - | - |",
    ]
    for row in rows:
        r, ppl, speed = row["report"], row["report"]["perplexity"], row["speed"]
        before = ppl.get("before_recovery", ppl["pruned"])
        recovered = f"{ppl['pruned']:.2f}" if "before_recovery" in ppl else "-"
        ups = f"{speed['batch1'] / dense['speed']['batch1']:.2f}x / {speed['batch8'] / dense['speed']['batch8']:.2f}x"
        lines.append(
            f"| {row['variant']} | {row['ratio']:.0%} | {r['parameters']['model_after'] / 1e6:.1f}M "
            f"| {r['total_sparsity']:.2%} | {before:.2f} | {recovered} | {speed['batch1']:.1f} | {speed['batch8']:.1f} "
            f"| {ups} | {row['wall']:.0f} | {' / '.join(str(w['peak_bytes'] // 2**20) for w in r['workers'])} "
            f"| {r['memory_plan']['peak'] // 2**20} |"
        )
    return "\n".join(lines + _curve_table(rows)) + "\n"


def _speeds(dense: dict, key: str) -> str:
    return " / ".join(f"{speeds[key]:.1f}" for speeds in dense["speeds"])


def _curve_table(rows: list[dict]) -> list[str]:
    """Perplexity against recovery tokens, one row per variant and target (when the curve was measured)."""
    curves = [(row, (row["report"].get("recovery") or {}).get("curve") or []) for row in rows]
    if not any(curve for _, curve in curves):
        return []
    tokens = [point["tokens"] for point in max((c for _, c in curves), key=len)]
    lines = ["", "Perplexity along the recovery (adapters attached; 0: the pruned model):", ""]
    lines += ["| variant | target | " + " | ".join(f"{t:,} tok" for t in tokens) + " |"]
    lines += ["|---|---|" + "---|" * len(tokens)]
    for row, curve in curves:
        values = {point["tokens"]: f"{point['perplexity']:.2f}" for point in curve}
        lines.append(
            f"| {row['variant']} | {row['ratio']:.0%} | " + " | ".join(values.get(t, "-") for t in tokens) + " |"
        )
    return lines


def run(args: argparse.Namespace, publish) -> None:
    """Every variant at every ratio; `publish(dense, rows)` after each, so a long run leaves what it measured."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dense_speeds = [measure_speed("smollm2-135m", args)]
    rows = []
    for ratio in args.ratios:
        for number, (variant, flags) in enumerate(VARIANTS):
            if number not in args.variants:
                continue
            out = workdir / f"r{int(ratio * 100)}-v{number}"
            rows.append(dict(prune_variant(args, out, ratio, flags), variant=variant, ratio=ratio))
            print(variant, ratio, rows[-1]["report"]["perplexity"], rows[-1]["speed"], flush=True)
            shutil.rmtree(out)
            publish(dense_summary(dense_speeds, rows), rows)
    if not any(workdir.iterdir()):
        workdir.rmdir()
    # Dense again at the end: a drift of the machine between the first and the last measurement shows here.
    dense_speeds.append(measure_speed("smollm2-135m", args))
    publish(dense_summary(dense_speeds, rows), rows)


def dense_summary(dense_speeds: list[dict], rows: list[dict]) -> dict:
    first = rows[0]["report"]
    speed = {key: max(s[key] for s in dense_speeds) for key in dense_speeds[0]}  # the faster: no flattering
    return dict(
        params=first["parameters"]["model_before"], ppl=first["perplexity"]["dense"], speed=speed, speeds=dense_speeds
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--recover-steps", type=int, default=40)
    parser.add_argument("--recover-lr", type=float, default=1e-3)
    parser.add_argument("--recover-eval-every", type=int, default=0, help="steps between points of the curve")
    parser.add_argument("--stability-batches", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every child (default: torch's)")
    parser.add_argument("--workdir", default="bench/out/structured")
    parser.add_argument("--workers", type=int, default=1, help="prune on this many torchrun workers")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--variants", type=int, nargs="+", default=list(range(len(VARIANTS))))
    parser.add_argument("--speed-of", help=argparse.SUPPRESS)  # child mode: measure one model's speed
    args = parser.parse_args()
    if not args.speed_of and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty: this script writes (and then deletes) its files there")
    if args.speed_of:
        print(json.dumps(speed_child(args.speed_of, args.new_tokens, args.threads)))
        return
    command = ("python bench/structured.py " + " ".join(sys.argv[1:])).strip()
    section = "structured" if args.workers == 1 else f"structured-w{args.workers}"
    run(args, lambda dense, rows: write_section(section, render(args, dense, rows, command)))


if __name__ == "__main__":
    main()
