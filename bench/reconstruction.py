"""Reconstruction and OWL layer sparsities on a real model (SmolLM2-135M unless `--model`): perplexity and the
layer loop's cost.

In one run, on bench/quality.py's tokens (calibration windows of 512 tokens, 32 x 512 evaluation tokens):
SparseGPT, Wanda and GBLM at 50% and 2:4, each without and with `--reconstruct`; Wanda and GBLM at 70% with
uniform and OWL layer sparsities (and OWL with reconstruction). GBLM reuses one `dist-prune grad` file.
Cost: the layer loop's seconds from each run's report, reconstructed beside not. Writes the
`reconstruction` section of bench/RESULTS.md.

    python bench/reconstruction.py [--nsamples 32] [--modes linear] [--only 50%,2:4,70%]
    python bench/reconstruction.py --nsamples 128 --modes block --rows wanda/50%/block --section NAME

`--rows` keeps only the named rows (method/pattern/variant), in the order given; `--section` names the
section of bench/RESULTS.md written (a run of a few rows beside the full table). `--owl-threshold` and
`--owl-lambda` take comma-separated values: with more than one setting, the 70% rows have one OWL row per
(M, lambda), named `OWL M/lambda`, for a sweep of OWL's two parameters:

    python bench/reconstruction.py --only 70% --modes none --owl-threshold 3,5,10 --owl-lambda 0.04,0.08,0.12
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from common import machine_line, run_child, write_section

PATTERN_FLAGS = {"50%": ["--sparsity", "0.5"], "2:4": ["--pattern", "2:4"], "70%": ["--sparsity", "0.7"]}


def rows_to_run(args) -> list[tuple[str, str, str, list[str]]]:
    """(method, pattern, variant, extra flags) in the order they run."""
    rows = []
    for pattern in ("50%", "2:4"):
        if pattern in args.only:
            for method in ("sparsegpt", "wanda", "gblm"):
                rows.append((method, pattern, "-", []))
                modes = args.modes + (["block"] if (method, pattern) == ("wanda", "50%") else [])  # block: once
                rows += [(method, pattern, mode, ["--reconstruct", mode]) for mode in dict.fromkeys(modes)]
    if "70%" in args.only:
        for method in ("wanda", "gblm"):
            rows.append((method, "70%", "uniform", []))
            for name, setting in args.owl.items():
                rows.append((method, "70%", name, owl_flags(*setting)))
            if args.modes:
                first, mode = next(iter(args.owl.values())), args.modes[-1]
                rows.append((method, "70%", f"OWL + {mode}", [*owl_flags(*first), "--reconstruct", mode]))
    if args.rows:
        named = {"/".join(row[:3]): row for row in rows}
        missing = [name for name in args.rows if name not in named]
        if missing:
            sys.exit(f"--rows: no such row {missing}; the rows are {sorted(named)}")
        rows = [named[name] for name in args.rows]
    return rows


def owl_flags(threshold: str, lam: str) -> list[str]:
    return ["--sparsity-profile", "owl", "--owl-threshold", threshold, "--owl-lambda", lam]


def prune(args, out: Path, gradients: Path, method: str, pattern: str, extra: list[str]) -> dict:
    target = out / "run"
    flags = ["--gradients", str(gradients)] if method == "gblm" else []
    wall, rss = run_child([
        "prune", "--model", args.model, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--seed", "0", "--eval-text", args.eval_text, "--eval-windows", str(args.eval_windows), "--eval-seqlen", "512",
        "--out", str(target), "--overwrite", "--method", method, *PATTERN_FLAGS[pattern], *flags, *extra,
    ])  # fmt: skip
    report = json.loads((target / "prune_report.json").read_text())
    shutil.rmtree(target)
    phases = report["layer_phases_s"]
    errors = [m for layer in report["layers"] for m in layer["modules"].values() if "reconstruction_error_after" in m]
    return {
        "ppl": report["perplexity"]["pruned"], "dense": report["perplexity"]["dense"], "wall": wall, "rss": rss,
        "layers_s": report["timings_s"]["layers"], "reconstruction_s": phases.get("reconstruction", 0.0),
        "sparsity": report["total_sparsity"],
        "error_before": sum(m["reconstruction_error_before"] for m in errors) / len(errors) if errors else None,
        "error_after": sum(m["reconstruction_error_after"] for m in errors) / len(errors) if errors else None,
        "layer_sparsity": (report.get("sparsity_profile") or {}).get("layer_sparsity"),
    }  # fmt: skip


def run(args, publish) -> None:
    out = Path(args.workdir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    gradients = out / "gradients.safetensors"
    to_run = rows_to_run(args)
    if any(method == "gblm" for method, *_ in to_run):
        run_child(["grad", "--model", args.model, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--seed", "0", "--out", str(gradients)])  # fmt: skip
    rows = []
    for method, pattern, variant, extra in to_run:
        rows.append({"method": method, "pattern": pattern, "variant": variant,
                     **prune(args, out, gradients, method, pattern, extra)})  # fmt: skip
        print(rows[-1], flush=True)
        publish(rows)


def render(rows: list[dict], args, command: str) -> str:
    dense = rows[0]["dense"]
    lines = [
        f"## Reconstruction and OWL: {args.model} (real weights), {args.nsamples} x {args.seqlen} calibration, "
        "one in-process worker",
        "",
        f"Machine: {machine_line()}.",
        f"Command: `{command}`. Calibration {args.nsamples} x {args.seqlen} tokens of the Wikipedia calibration "
        f"split, seed 0 (bench/quality.py's); evaluation {args.eval_windows} x 512 tokens of {args.eval_text}, "
        f"dense {dense:.2f}. "
        "All rows measured in this one run. `linear`: each Linear's kept weights fitted on its inputs in the dense "
        "layer; `block`: the input groups in order on the layer as fitted so far (o_proj and down_proj take up the "
        "error of the Linears before them). Errors: relative output error of the Linears, mean over modules, with "
        "the method's weights and fitted. Layer loop: seconds of the layer loop; reconstruction: its part of them "
        "(the fits, and block mode's forwards; linear mode's X X^T sums are made in the loop's statistics "
        "forward, so they count in the loop only).",
        "",
        "| method | pattern | variant | perplexity | vs dense | error before / after | layer loop s | "
        "of which reconstruction s | loop vs no fit | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    baseline = {}
    for r in rows:
        key = (r["method"], r["pattern"])
        if r["variant"] in ("-", "uniform"):
            baseline[key] = r["layers_s"]
        errors = f"{r['error_before']:.4f} / {r['error_after']:.4f}" if r["error_before"] is not None else "-"
        ratio = f"{r['layers_s'] / baseline[key]:.2f}x" if key in baseline and r["reconstruction_s"] else "-"
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['variant']} | {r['ppl']:.2f} | {r['ppl'] / dense:.2f}x | {errors} "
            f"| {r['layers_s']:.0f} | {r['reconstruction_s']:.0f} | {ratio} | {r['rss']} |"
        )
    for variant, (m, lam) in args.owl.items():  # one line per setting: the same sparsities for every method
        s = next((r["layer_sparsity"] for r in rows if r["variant"] == variant), None)
        if s:
            lines += ["", f"{variant} layer sparsities (M = {m}, lambda = {lam}): {min(s):.3f} to {max(s):.3f}, "
                          f"mean {sum(s) / len(s):.4f}; per layer: " + ", ".join(f"{v:.3f}" for v in s) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="a cached asset name (gemma3-270m: `dist-prune assets --gemma3`) or a checkpoint folder",
    )
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-text", default="wikipedia", help="evaluation text: the held-out split, or a file")
    parser.add_argument(
        "--modes", default="linear", help="reconstruction modes to measure, comma-separated (none: no such rows)"
    )
    parser.add_argument("--only", default="50%,2:4,70%", help="which sparsities to run, comma-separated")
    parser.add_argument("--owl-threshold", default="5")
    parser.add_argument("--owl-lambda", default="0.08")
    parser.add_argument("--rows", default="", help="only these rows, comma-separated method/pattern/variant")
    parser.add_argument("--section", default="reconstruction", help="the section of bench/RESULTS.md to write")
    parser.add_argument("--workdir", default="bench/out/reconstruction")
    args = parser.parse_args()
    args.modes, args.only = [m for m in args.modes.split(",") if m != "none"], args.only.split(",")
    args.rows = [name for name in args.rows.split(",") if name]
    settings = [(m, lam) for m in args.owl_threshold.split(",") for lam in args.owl_lambda.split(",")]
    args.owl = {(f"OWL {m}/{lam}" if len(settings) > 1 else "OWL"): (m, lam) for m, lam in settings}
    command = ("python bench/reconstruction.py " + " ".join(sys.argv[1:])).strip()
    run(args, lambda rows: write_section(args.section, render(rows, args, command)))


if __name__ == "__main__":
    main()
