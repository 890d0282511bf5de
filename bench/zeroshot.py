"""Zero-shot accuracy of dense and pruned SmolLM2-135M on the offline BIG-bench suite, and generation speed.

First the dense model on every example of the six tasks (is it above chance, with the binomial 95% interval
clear of it?), then in one run: dense, magnitude, Wanda, SparseGPT and GBLM at 50% and 2:4, FLAP and
SAAP-style at 20% after recovery, each on the first `--limit` examples of each task (the same examples for
every model); then greedy decoding speed of dense, FLAP and SAAP-style, dense measured first and last so the
machine's drift shows. Writes the `zeroshot` section of bench/RESULTS.md.

`--speeds-only` measures the generation speeds again, alone, of the structured outputs a full run left in the
work folder (for a machine that was busy during the full run); it writes the `zeroshot-speed` section.

    python bench/zeroshot.py [--limit 40] [--nsamples 32] [--seqlen 256] [--speeds-only]
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from common import machine_line, run_child, write_section

UNSTRUCTURED = [(m, p) for m in ("magnitude", "wanda", "sparsegpt", "gblm") for p in ("50%", "2:4")]
STRUCTURED = ["flap", "saap"]
PATTERN_FLAGS = {"50%": ["--sparsity", "0.5"], "2:4": ["--pattern", "2:4"]}


def eval_child(*args: str) -> dict:
    command = [sys.executable, "-m", "dist_prune", "--quiet", "eval", *args, "--json"]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def zero_shot(model: str, limit: int | None) -> dict:
    extra = [] if limit is None else ["--limit", str(limit)]
    return eval_child("--model", model, "--tasks", "bigbench", *extra, "--trust-remote-code")["zero_shot"][model]


def speed(model: str) -> dict:
    return eval_child("--model", model, "--generation", "--trust-remote-code")["generation"][model]["tokens_per_s"]


def wilson_low_high(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The binomial 95% (Wilson score) interval of an accuracy p over n examples."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def prune(args, out: Path, name: str, flags: list[str]) -> str:
    target = out / name
    common = ["--model", "smollm2-135m", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
              "--seed", "0", "--no-eval-after", "--out", str(target), "--overwrite"]  # fmt: skip
    run_child(["prune", *common, *flags])
    return str(target)


def run(args, publish) -> None:
    out = Path(args.workdir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    state: dict = {"selection": zero_shot("smollm2-135m", None), "rows": {}, "speed": {}}
    publish(state)
    state["rows"]["dense"] = zero_shot("smollm2-135m", args.limit)
    state["speed"]["dense (first)"] = speed("smollm2-135m")
    publish(state)
    for method, pattern in UNSTRUCTURED:
        model = prune(args, out, f"{method}-{pattern}".replace(":", "of").replace("%", ""),
                      ["--method", method, *PATTERN_FLAGS[pattern]])  # fmt: skip
        state["rows"][f"{method} {pattern}"] = zero_shot(model, args.limit)
        shutil.rmtree(model)
        publish(state)
    for method in STRUCTURED:
        model = prune(args, out, method, ["--method", method, "--ratio", "0.2", "--recover-steps",
                                          str(args.recover_steps), "--batch-size", "2"])  # fmt: skip
        state["rows"][f"{method} 20% + recovery"] = zero_shot(model, args.limit)
        state["speed"][f"{method} 20%"] = speed(model)
        publish(state)
    state["speed"]["dense (last)"] = speed("smollm2-135m")
    publish(state)


def speeds_only(args) -> None:
    """Dense first and last, FLAP and SAAP-style between, from the full run's structured outputs."""
    out = Path(args.workdir)
    models = {"dense (first)": "smollm2-135m", **{f"{m} 20%": str(out / m) for m in STRUCTURED}}
    missing = [path for path in models.values() if path != "smollm2-135m" and not Path(path).is_dir()]
    if missing:
        sys.exit(f"no structured output at {', '.join(missing)}: run python bench/zeroshot.py first")
    speeds = {name: speed(model) for name, model in models.items()}
    speeds["dense (last)"] = speed("smollm2-135m")
    lines = [
        "## Generation speed of the structured outputs, measured alone",
        "",
        f"Machine: {machine_line()}; nothing else running. Command: `python bench/zeroshot.py --speeds-only` on the "
        "FLAP and SAAP-style outputs of the run in the section above (20% of the decoder parameters removed, "
        "recovered). Greedy decoding, 128-token prompts, 128 new tokens, median of 3 after a warm-up, fp32.",
        "",
        "| model | batch 1 tokens/s | batch 16 tokens/s | batch 1 vs dense | batch 16 vs dense |",
        "|---|---|---|---|---|",
    ]
    dense = {b: (speeds["dense (first)"][b] + speeds["dense (last)"][b]) / 2 for b in ("1", "16")}
    for name, s in speeds.items():
        lines.append(
            f"| {name} | {s['1']:.1f} | {s['16']:.1f} | {s['1'] / dense['1']:.2f}x | {s['16'] / dense['16']:.2f}x |"
        )
    lines += ["", "vs dense: against the mean of the dense speeds measured first and last."]
    write_section("zeroshot-speed", "\n".join(lines) + "\n")


def render(state: dict, args, command: str) -> str:
    lines = [
        "## Zero-shot accuracy: SmolLM2-135M (real weights) on the offline BIG-bench suite",
        "",
        f"Machine: {machine_line()}.",
        f"Command: `{command}`. Harness: lm-eval 0.4.13 through dist-prune eval --tasks bigbench; each choice "
        "scored as a continuation, accuracy = the highest log-likelihood is the right one.",
        "",
        "### The suite: dense SmolLM2-135M on every example",
        "",
        "| task | examples | chance | accuracy | 95% interval (Wilson) | clear of chance |",
        "|---|---|---|---|---|---|",
    ]
    for task, entry in state["selection"]["tasks"].items():
        low, high = wilson_low_high(entry["acc"], entry["examples"])
        lines.append(f"| {task} | {entry['examples']} | {entry['chance']:.3f} | {entry['acc']:.3f} | "
                     f"{low:.3f}-{high:.3f} | {'yes' if low > entry['chance'] else 'NO'} |")  # fmt: skip
    rows = state["rows"]
    if rows:
        tasks = list(next(iter(rows.values()))["tasks"])
        dense = rows["dense"]
        lines += [
            "",
            f"### Dense beside pruned: the first {args.limit} examples of each task (seeded order), one run",
            "",
            f"Calibration {args.nsamples} x {args.seqlen} tokens of the Wikipedia calibration split, seed 0; FLAP and "
            f"SAAP-style remove 20% of the decoder parameters, then recover {args.recover_steps} steps x 2 x "
            f"{args.seqlen} fresh calibration tokens. Accuracy ± standard error; retained = mean / dense mean.",
            "",
            "| model | " + " | ".join(t.removeprefix("bb_") for t in tasks) + " | mean | retained |",
            "|---|" + "---|" * (len(tasks) + 2),
        ]
        for name, r in rows.items():
            cells = [f"{r['tasks'][t]['acc']:.3f} ± {r['tasks'][t]['acc_stderr']:.3f}" for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['mean_acc']:.3f} | "
                         f"{r['mean_acc'] / dense['mean_acc']:.2f} |")  # fmt: skip
    if state["speed"]:
        lines += ["", "### Greedy generation speed (128-token prompt, 128 new tokens, median of 3, fp32 on the CPU)",
                  "", "| model | batch 1 tokens/s | batch 16 tokens/s |", "|---|---|---|"]  # fmt: skip
        for name, s in state["speed"].items():
            lines.append(f"| {name} | {s['1']:.1f} | {s['16']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--recover-steps", type=int, default=40)
    parser.add_argument("--workdir", default="bench/out/zeroshot")
    parser.add_argument("--speeds-only", action="store_true", help="measure the structured outputs' speeds again")
    args = parser.parse_args()
    if args.speeds_only:
        speeds_only(args)
        return
    command = ("python bench/zeroshot.py " + " ".join(sys.argv[1:])).strip()
    run(args, lambda state: write_section("zeroshot", render(state, args, command)))


if __name__ == "__main__":
    main()
