"""`dist-prune`: prune, grad, eval and assets. Flags for every config field are generated from the dataclasses.

Exit codes: 0 success; 2 bad input (one message on stderr, nothing written); 1 an unexpected failure.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import field_doc, leaf_fields, leaf_type, load_config
from .errors import ConfigError, DistPruneError
from .log import get_logger, setup_logging
from .progress import Progress


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except DistPruneError as err:  # a malformed flag (an int flag given "1e23"): one line, as any bad input
        return _report_error(err)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    quiet, json_lines = getattr(args, "quiet", False), getattr(args, "log_json", False)
    setup_logging(quiet=quiet, json_lines=json_lines)
    args.progress = Progress("json" if json_lines else "quiet" if quiet else "bars")
    try:
        return args.handler(args)
    except DistPruneError as err:
        return _report_error(err)


def _report_error(err: DistPruneError) -> int:
    print(f"dist-prune: error: {err}", file=sys.stderr)
    return err.exit_code


class _Parser(argparse.ArgumentParser):
    """argparse, with a malformed command line reported as one line (no usage block), as any bad input is."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    # --quiet is accepted before or after the subcommand name.
    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors")
    common.add_argument(
        "--log-json", action="store_true", default=argparse.SUPPRESS, help="progress and logs as JSON lines on stderr"
    )
    parser = _Parser(prog="dist-prune", description=__doc__.splitlines()[0], parents=[common])
    commands = parser.add_subparsers(required=True, dest="command")

    prune = commands.add_parser("prune", parents=[common], help="prune a checkpoint and write a new one")
    _add_config_flags(prune)
    prune.set_defaults(handler=_prune)

    grad = commands.add_parser(
        "grad", parents=[common], help="GBLM gradient pass alone; saves the sums for `prune --gradients`"
    )
    _add_config_flags(grad)
    grad.set_defaults(handler=_grad)

    plan = commands.add_parser(
        "plan", parents=[common], help="device, host and scratch-disk bytes per worker, from config.json; loads nothing"
    )
    _add_config_flags(plan)
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(handler=_plan)

    evaluate = commands.add_parser("eval", parents=[common], help="perplexity of a checkpoint on held-out text")
    evaluate.add_argument("--model", required=True, help="smollm2-135m or a checkpoint directory")
    evaluate.add_argument("--seqlen", type=int, default=512, help="window length (non-overlapping windows)")
    evaluate.add_argument("--windows", type=int, default=None, help="evaluate at most this many windows")
    evaluate.add_argument("--text", default="wikipedia", help="wikipedia (evaluation split) or a text file")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="load a checkpoint that ships its own model code (structured output with per-layer sizes); runs it",
    )
    evaluate.add_argument(
        "--tasks",
        default=None,
        help="zero-shot accuracy instead of perplexity, through lm-evaluation-harness: comma-separated task names, "
        "`bigbench` (the offline suite of six BIG-bench tasks, shipped) or any lm-eval task whose data is cached",
    )
    evaluate.add_argument("--limit", type=int, default=None, help="--tasks: at most this many examples per task")
    evaluate.add_argument(
        "--generation", action="store_true", help="greedy decoding speed instead of perplexity (batch 1 and 16)"
    )
    evaluate.add_argument(
        "--against", default=None, help="--tasks/--generation: also this model (the dense one), side by side"
    )
    evaluate.set_defaults(handler=_eval)

    inspect = commands.add_parser(
        "inspect", parents=[common], help="parameters and sparsity per layer and module; optional N:M check"
    )
    inspect.add_argument("model", help="checkpoint directory or .safetensors file")
    inspect.add_argument("--pattern", default=None, help='check every decoder Linear satisfies N:M, e.g. "2:4"')
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument(
        "--verify", action="store_true", help="check every layer file against the size and SHA-256 in its manifest"
    )
    inspect.add_argument(
        "--trust-pickle", action="store_true", help="read a DeepSpeed checkpoint (pickles: loading one runs its code)"
    )
    inspect.add_argument("--ds-tag", default=None, help="DeepSpeed checkpoint: the tag folder instead of `latest`")
    inspect.set_defaults(handler=_inspect)

    compare = commands.add_parser(
        "compare", parents=[common], help="agreement of two checkpoints' pruning masks (streams tensors)"
    )
    compare.add_argument("a", help="checkpoint directory")
    compare.add_argument("b", help="checkpoint directory")
    compare.add_argument("--json", action="store_true", help="print one JSON object")
    compare.set_defaults(handler=_compare)

    assets = commands.add_parser(
        "assets", parents=[common], help="install and cache SmolLM2-135M and the Wikipedia text"
    )
    assets.add_argument(
        "--gemma3", action="store_true", help="also Gemma 3 270M (a second family with real weights; ~240 MB, ~5 min)"
    )
    assets.set_defaults(handler=_assets)
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file (see configs/); flags override it")
    for name, (section, f) in leaf_fields().items():
        if section is None and f.name not in ("model", "out"):
            continue
        hint = leaf_type(section, name)
        flag = "--" + name.replace("_", "-")
        doc = field_doc(section, name).replace("%", "%%")
        if _is_bool(hint):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc)
        else:
            parser.add_argument(flag, type=_scalar_type(hint), default=None, dest=name, help=doc)


def _is_bool(hint: Any) -> bool:
    """bool, or bool | None (unset: a default decided elsewhere)."""
    return set(getattr(hint, "__args__", (hint,))) - {type(None)} == {bool}


def _scalar_type(hint: Any):
    options = [t for t in getattr(hint, "__args__", (hint,)) if t is not type(None)]
    return options[0] if options and options[0] in (int, float) else str


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in leaf_fields() if getattr(args, name, None) is not None}


def _prune(args: argparse.Namespace) -> int:
    from .launch import WorkerDied
    from .pipeline import prune

    config = load_config(args.config, _overrides(args))
    try:
        report = prune(config, args.progress)
    except DistPruneError as err:
        hint = _how_to_resume(config, args.argv)
        if err.exit_code == 2 and hint:  # bad input is one line, how to resume included
            print(f"dist-prune: error: {err}; {hint}", file=sys.stderr)
            return err.exit_code
        code = _report_error(err)
        _say_how_to_resume(config, args.argv)
        return code
    except WorkerDied as err:  # one line: which worker; its traceback died with it
        print(f"dist-prune: error: {err}", file=sys.stderr)
        _say_how_to_resume(config, args.argv)
        return 1
    except BaseException:
        _say_how_to_resume(config, args.argv)
        raise
    if report is not None:  # None on torchrun ranks other than 0, which write nothing
        _print_summary(report, config.out)
    return 0


def _say_how_to_resume(config, argv: list[str]) -> None:
    hint = _how_to_resume(config, argv)
    if hint:
        print(f"dist-prune: {hint}", file=sys.stderr)


def _how_to_resume(config, argv: list[str]) -> str:
    """A run that stopped after finishing some layers kept them: say so, with the command that continues."""
    import shlex

    from .writer import resumable_partial

    partial = resumable_partial(Path(config.out))
    if partial is None:
        return ""
    again = argv if "--resume" in argv else [*argv, "--resume"]
    return f"the finished layers are kept in {partial}; continue with: dist-prune {shlex.join(again)}"


def _grad(args: argparse.Namespace) -> int:
    from .pipeline import compute_gradients

    config = load_config(args.config, _overrides(args))
    path = compute_gradients(config, Path(config.out), args.progress)
    if path is not None:
        print(path)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .memory import format_plan, plan_both, plan_source

    config = load_config(args.config, _overrides(args))
    plans = plan_both(config, plan_source(config))
    if args.json:
        print(json.dumps({residency: plan.to_dict() for residency, plan in plans.items()}))
    else:
        print(format_plan(plans, config.runtime.scratch))
    return 0 if any(plan.fits for plan in plans.values()) else 3


def _eval(args: argparse.Namespace) -> int:
    if args.tasks or args.generation:
        return _eval_downstream(args)
    if args.limit is not None or args.against is not None:
        raise ConfigError("--limit and --against go with --tasks or --generation")
    from .pipeline import evaluate_model

    result = evaluate_model(
        args.model, args.text, args.seqlen, args.windows, args.device, args.progress, args.trust_remote_code
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.3f} over {result['windows']} windows of {result['seqlen']} tokens")
    return 0


def _eval_downstream(args: argparse.Namespace) -> int:
    """Zero-shot accuracy and/or generation speed of --model, and of --against first when given (the dense one)."""
    from .pipeline import generation_model, zero_shot_model
    from .zeroshot import format_zero_shot

    models = list(dict.fromkeys(m for m in (args.against, args.model) if m is not None))
    result: dict = {}
    if args.tasks:
        tasks = args.tasks.split(",")
        result["zero_shot"] = {
            m: zero_shot_model(m, tasks, args.limit, device=args.device, trust_remote_code=args.trust_remote_code)
            for m in models
        }
    if args.generation:
        result["generation"] = {
            m: generation_model(m, device=args.device, trust_remote_code=args.trust_remote_code) for m in models
        }
    if args.json:
        print(json.dumps(result))
        return 0
    if "zero_shot" in result:
        print(format_zero_shot(result["zero_shot"]))
    for model, speed in result.get("generation", {}).items():
        rates = ", ".join(f"batch {b}: {r:.1f}" for b, r in speed["tokens_per_s"].items())
        print(f"{model}: greedy decoding tokens/s ({speed['prompt_tokens']}-token prompt, {speed['new_tokens']} new, "
              f"median of {speed['runs']}): {rates}")  # fmt: skip
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import format_summary, format_zero_summary, summarize_checkpoint, summarize_zero_checkpoint
    from .zero import is_zero_checkpoint

    if is_zero_checkpoint(Path(args.model)):
        if args.pattern or args.verify:
            raise DistPruneError("--pattern and --verify check stored weights: use them on the pruned output")
        summary = summarize_zero_checkpoint(Path(args.model), args.ds_tag, args.trust_pickle)
        print(json.dumps(summary) if args.json else format_zero_summary(summary))
        return 0
    summary = summarize_checkpoint(Path(args.model), args.pattern)
    if args.verify:
        summary["verified"] = _verified(Path(args.model))
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def _verified(path: Path) -> int:
    """The number of layer files that match the manifest; any that does not is an error."""
    from .writer import MANIFEST, read_manifest, verify_output

    if not (path / MANIFEST).exists():
        raise DistPruneError(f"{path} has no {MANIFEST}: only a dist_prune output can be verified")
    failed = verify_output(path)
    if failed:
        raise DistPruneError(f"{len(failed)} file(s) in {path} do not match the manifest: {', '.join(failed)}")
    return len(read_manifest(path)["layers"])


def _compare(args: argparse.Namespace) -> int:
    from .inspection import compare_checkpoints, format_comparison

    comparison = compare_checkpoints(Path(args.a), Path(args.b))
    print(json.dumps(comparison) if args.json else format_comparison(comparison))
    return 0


def _assets(args: argparse.Namespace) -> int:
    from .assets import install_all

    for name, path in install_all(gemma3=args.gemma3).items():
        print(f"{name}: {path}")
    return 0


def _print_summary(report: dict, out: str) -> None:
    ppl = report.get("perplexity") or {}
    rows = [("dense", ppl.get("dense")), (f"{report['method']} ({report['pattern']})", ppl.get("pruned"))]
    width = max(len(r[0]) for r in rows)
    print(f"{'model'.ljust(width)}  perplexity")
    for name, value in rows:
        print(f"{name.ljust(width)}  {'-' if value is None else f'{value:.3f}'}")
    if "parameters" in report:  # structured: what is gone is parameters, not zeros
        p = report["parameters"]
        print(f"removed {report['total_sparsity']:.2%} of decoder-layer parameters ({p['model_before']:,} -> "
              f"{p['model_after']:,} in the model); output: {out}")  # fmt: skip
    else:
        print(f"sparsity {report['total_sparsity']:.4f} of decoder Linear weights; output: {out}")
    if report.get("resumed_layers"):  # said here too: under Ray the workers' own log lines stay with them
        get_logger().info("resumed: layers 0-%d were reused from the interrupted run", report["resumed_layers"] - 1)
    get_logger().info("report: %s/prune_report.json", out)


if __name__ == "__main__":
    sys.exit(main())
