"""Quality, speed and memory of the four methods on the real SmolLM2-135M.

Prunes at 50% unstructured, 2:4 and 4:8 with each method, plus GBLM and Wanda at the paper's 128
calibration sequences, and measures held-out perplexity with `dist-prune eval`. Each run is a separate
process so its peak resident memory is its own. Writes the `quality` section of bench/RESULTS.md.

    python bench/quality.py [--nsamples 64] [--seqlen 512] [--eval-windows 64]
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from common import eval_json, machine_line, matmul_gflops, run_child, write_section

from dist_prune.assets import smollm2_dir

PATTERNS = [("50%", ["--sparsity", "0.5"]), ("2:4", ["--pattern", "2:4"]), ("4:8", ["--pattern", "4:8"])]
METHODS = ["magnitude", "wanda", "sparsegpt", "gblm"]


def calibration_flops(config: dict, sequences: int, seqlen: int, hessian: bool) -> float:
    """FLOPs of the layer loop's two forward passes per layer (statistics pass + propagation), from shapes."""
    h, mlp, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    tokens = sequences * seqlen
    linear_params = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * mlp
    attention = 2 * sequences * heads * seqlen * seqlen * hd  # QK^T and AV, causal half of 2 * 2 * T^2 * hd
    per_pass = 2 * tokens * linear_params + attention
    stats = 2 * tokens * (2 * h * h + (heads * hd) ** 2 + mlp * mlp) if hessian else 0  # X^T X per input group
    return layers * (2 * per_pass + stats)


def run(args: argparse.Namespace, publish) -> list[dict]:
    """Every row, publishing the table after each one so that a long run leaves what it has measured."""
    out = Path(args.workdir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = json.loads((smollm2_dir() / "config.json").read_text())
    common = ["--model", "smollm2-135m", "--seqlen", str(args.seqlen), "--seed", "0", "--no-eval-after"]
    dense = eval_json("smollm2-135m", args.eval_seqlen, args.eval_windows)
    rows = [dict(method="dense", pattern="-", nsamples=0, ppl=dense["perplexity"], wall=None, rss=None, rate=None)]
    # The memory target is stated for Wanda at 32 x 512 tokens.
    rows.append(_prune_and_eval(args, out, common, "wanda", *PATTERNS[0], 32, None, config))
    publish(rows)
    sizes = [(args.nsamples, METHODS, PATTERNS)]
    if args.paper_size:
        sizes.append((128, ["wanda", "gblm"], PATTERNS[:1]))
    for nsamples, methods, patterns in sizes:
        gradients = out / f"gradients-{nsamples}.safetensors"
        for method in methods:
            grad = {}
            if method == "gblm":
                wall, rss = run_child(["grad", *common, "--nsamples", str(nsamples), "--out", str(gradients)])
                grad = dict(grad_wall=wall, grad_rss=rss)
            for pattern, flags in patterns:
                rows.append(_prune_and_eval(args, out, common, method, pattern, flags, nsamples, gradients, config))
                rows[-1].update(grad)
                print(rows[-1], flush=True)
                publish(rows)
    return rows


def _prune_and_eval(args, out, common, method, pattern, flags, nsamples, gradients, config) -> dict:
    target = out / f"{method}-{pattern.replace(':', 'of').replace('%', '')}-{nsamples}"
    extra = ["--gradients", str(gradients)] if method == "gblm" else []
    wall, rss = run_child(
        ["prune", *common, "--method", method, *flags, "--nsamples", str(nsamples), "--out", str(target), *extra]
    )
    report = json.loads((target / "prune_report.json").read_text())
    forward = report["timings_s"].get("calibration_forward")
    rate = None
    if forward:
        rate = calibration_flops(config, nsamples, args.seqlen, method == "sparsegpt") / forward / 1e9
    ppl = eval_json(str(target), args.eval_seqlen, args.eval_windows)["perplexity"]
    shutil.rmtree(target)
    return dict(method=method, pattern=pattern, nsamples=nsamples, ppl=ppl, wall=wall, rss=rss, rate=rate)


def render(rows: list[dict], args: argparse.Namespace, gemm: float, command: str) -> str:
    dense = rows[0]["ppl"]
    lines = [
        "## Quality: SmolLM2-135M (real weights), one in-process worker",
        "",
        f"Machine: {machine_line()}.",
        f"Command: `{command}`.",
        f"Calibration: Wikipedia calibration split, seed 0, windows of {args.seqlen} tokens "
        f"(nsamples as listed). Evaluation: {args.eval_windows} non-overlapping windows of {args.eval_seqlen} "
        "tokens of the held-out evaluation split (about one article in ten, chosen by a hash of the title).",
        "GBLM reuses gradients from `dist-prune grad` (its wall time and peak memory are listed apart).",
        "All runs: one in-process worker, fp32 compute.",
        f"fp32 matmul rate measured in the same run: {gemm:.1f} GFLOP/s (median of 7, 4096x576 @ 576x1536).",
        "",
        "| method | pattern | nsamples | perplexity | vs dense | prune wall s | peak RSS MiB | calib GFLOP/s | of matmul | grad pass s / MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = f"{r['rate']:.1f} | {r['rate'] / gemm:.0%}" if r.get("rate") else "- | -"
        grad = f"{r['grad_wall']:.0f} / {r['grad_rss']}" if r.get("grad_wall") else "-"
        wall = f"{r['wall']:.0f}" if r["wall"] else "-"
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['nsamples'] or '-'} | {r['ppl']:.2f} | {r['ppl'] / dense:.2f}x "
            f"| {wall} | {r['rss'] or '-'} | {rate} | {grad} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument(
        "--paper-size",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run GBLM and Wanda at 128 calibration sequences",
    )
    parser.add_argument("--workdir", default="bench/out/quality")
    args = parser.parse_args()
    gemm = matmul_gflops(4096, 576, 1536)
    command = ("python bench/quality.py " + " ".join(sys.argv[1:])).strip()

    def publish(rows: list[dict]) -> None:
        nonlocal gemm
        gemm = max(gemm, matmul_gflops(4096, 576, 1536))  # the best seen, so the ratio is not flattered
        write_section("quality", render(rows, args, gemm, command))

    run(args, publish)


if __name__ == "__main__":
    main()
