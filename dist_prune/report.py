"""report.md and its PNG plots, written into the pruned checkpoint directory.

Figures use matplotlib's object API on an Agg canvas (no pyplot, so no global backend switch and no
windows), at fixed sizes and dpi: every PNG's pixel size is figsize * DPI.
"""

import platform
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
import transformers
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from . import __version__
from .checkpoint import CheckpointInfo
from .config import PruneConfig
from .inspection import TensorRef, read_crop, tensor_refs
from .registry import method
from .safe_io import replace_file, write_text

REPORT_FILE = "report.md"
DPI = 100
LAYER_SPARSITY_FIGSIZE = (8.0, 3.5)
MODULE_HEATMAP_FIGSIZE = (8.0, 6.0)
PERPLEXITY_FIGSIZE = (5.0, 3.5)
MASK_FIGSIZE = (5.0, 5.0)
STRUCTURE_FIGSIZE = (8.0, 5.0)
MASK_CROP = 256
PERPLEXITY, SPARSITY, MASKS, STRUCTURE, TIMINGS = "Perplexity", "Sparsity per layer", "Masks", "Structure", "Timings"
RECOVERY = "Recovery"
PROFILE = "Layer sparsities (OWL)"
RECONSTRUCTION = "Reconstruction"
ZERO_SHOT = "Zero-shot accuracy"
ZERO_SHOT_FIGSIZE = (8.0, 3.5)
ZERO_SHOT_PLOT = "report-zero-shot.png"


class ModuleEntry(TypedDict, total=False):
    """One decoder Linear in prune_report.json's `layers[i].modules`."""

    zeros: int
    numel: int
    sparsity: float
    sparsegpt_damp: float  # SparseGPT: the damping fraction its Hessian needed
    gradient_share: float  # GBLM: the gradient term's share of the whole score, summed over the matrix
    # --reconstruct: sum ||W' x_p - W x_d||^2 / sum ||W x_d||^2 with the method's weights and after the fit
    reconstruction_error_before: float
    reconstruction_error_after: float


class LayerEntry(TypedDict, total=False):
    """One pruned decoder layer in prune_report.json's `layers`."""

    layer: int
    sparsity: float
    modules: dict[str, ModuleEntry]
    seconds: float  # wall time of the layer on the loop's thread
    phases_s: dict[str, float]  # that time by phase (progress.PhaseClock), plus the writer's read/write/hash


@dataclass(frozen=True)
class Plot:
    section: str
    caption: str
    path: Path


def write_report_markdown(out_dir: Path, report: dict, with_plots: bool = True) -> Path:
    """Write report.md and (unless `with_plots` is False) its plots into `out_dir` (the checkpoint directory);
    returns report.md's path."""
    out_dir = Path(out_dir)
    plots = draw_plots(out_dir, report) if with_plots else []
    path = out_dir / REPORT_FILE
    write_text(path, render_markdown(report, plots))
    return path


def draw_plots(out_dir: Path, report: dict) -> list[Plot]:
    """Every plot the report has data for; masks are read from the weights in `out_dir`, a crop at a time."""
    layers = report["layers"]
    plots = [
        Plot(SPARSITY, "sparsity per layer", plot_layer_sparsity(layers, out_dir / "report-layer-sparsity.png")),
        Plot(SPARSITY, "sparsity per module", plot_module_heatmap(layers, out_dir / "report-module-sparsity.png")),
    ]
    perplexities = _perplexities(report)
    if perplexities:
        plots.append(Plot(PERPLEXITY, "perplexity", plot_perplexity(perplexities, out_dir / "report-perplexity.png")))
    if method(report["method"]).mask_pictures:
        for ref in mask_pictured_weights(out_dir, layers):
            path = out_dir / f"report-mask-{ref.name.removesuffix('.weight').replace('.', '-')}.png"
            plots.append(Plot(MASKS, f"mask of {ref.name}", plot_mask(ref, path)))
    if report.get("sparsity_profile"):
        path = plot_sparsity_profile(report["sparsity_profile"], out_dir / "report-owl.png")
        plots.append(Plot(PROFILE, "outlier ratio and sparsity per layer", path))
    if _reconstructed(layers):
        path = plot_reconstruction(layers, out_dir / "report-reconstruction.png")
        plots.append(Plot(RECONSTRUCTION, "output error per layer, before and after the fit", path))
    if report.get("structure"):
        path = plot_structure(report["structure"], out_dir / "report-structure.png")
        plots.append(Plot(STRUCTURE, "kept heads and channels", path))
    if report.get("zero_shot"):
        path = plot_zero_shot(report["zero_shot"], out_dir / ZERO_SHOT_PLOT)
        plots.append(Plot(ZERO_SHOT, "zero-shot accuracy, dense and pruned", path))
    curve = (report.get("recovery") or {}).get("curve")
    if curve:
        path = plot_recovery_curve(curve, report["perplexity"].get("dense"), out_dir / "report-recovery.png")
        plots.append(Plot(RECOVERY, "perplexity against recovery tokens", path))
    return plots


def _perplexities(report: dict) -> dict[str, float]:
    measured = report.get("perplexity") or {}
    return {name: measured[name] for name in ("dense", "pruned") if isinstance(measured.get(name), (int, float))}


def mask_pictured_weights(out_dir: Path, layers: list[LayerEntry]) -> list[TensorRef]:
    """The first layer's q_proj, a middle layer's o_proj and the last layer's down_proj, where stored."""
    indices = sorted(layer["layer"] for layer in layers)
    if not indices:
        return []
    wanted = [
        (indices[0], "self_attn.q_proj"),
        (indices[len(indices) // 2], "self_attn.o_proj"),
        (indices[-1], "mlp.down_proj"),
    ]
    by_position = {ref.decoder_position: ref for ref in tensor_refs(out_dir).values() if ref.decoder_position}
    return [by_position[position] for position in wanted if position in by_position]


def _new_figure(figsize: tuple[float, float]) -> Figure:
    figure = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    # No bbox_inches="tight": it would crop the canvas and make the pixel size depend on the content.
    replace_file(path, lambda staged: figure.savefig(staged, dpi=DPI, format="png"))
    return path


def _module_label(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def plot_layer_sparsity(layers: list[LayerEntry], path: Path) -> Path:
    figure = _new_figure(LAYER_SPARSITY_FIGSIZE)
    ax = figure.add_subplot()
    ax.bar([layer["layer"] for layer in layers], [layer["sparsity"] for layer in layers], color="tab:blue")
    ax.set(xlabel="decoder layer", ylabel="sparsity", ylim=(0, 1), title="Sparsity of decoder Linear weights per layer")
    ax.grid(axis="y", alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(figure, path)


def plot_module_heatmap(layers: list[LayerEntry], path: Path) -> Path:
    modules = list(dict.fromkeys(module for layer in layers for module in layer["modules"]))
    values = np.array(
        [[layer["modules"].get(module, {}).get("sparsity", np.nan) for module in modules] for layer in layers],
        dtype=float,
    )
    figure = _new_figure(MODULE_HEATMAP_FIGSIZE)
    ax = figure.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(modules)), [_module_label(module) for module in modules], rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
    # One label per layer: shrink them as layers multiply so that 80 layers still fit the fixed height.
    ax.tick_params(axis="y", labelsize=max(4, min(10, 300 // max(1, len(layers)))))
    ax.set(xlabel="module", ylabel="decoder layer", title="Sparsity per layer and module")
    figure.colorbar(image, ax=ax, label="sparsity")
    return _save(figure, path)


def plot_perplexity(perplexities: dict[str, float], path: Path) -> Path:
    figure = _new_figure(PERPLEXITY_FIGSIZE)
    ax = figure.add_subplot()
    bars = ax.bar(
        list(perplexities), list(perplexities.values()), color=["tab:gray", "tab:orange"][: len(perplexities)]
    )
    ax.bar_label(bars, fmt="%.2f")
    ax.set(ylabel="perplexity", title="Perplexity, dense vs pruned")
    ax.margins(y=0.15)
    return _save(figure, path)


def plot_recovery_curve(curve: list[dict], dense: float | None, path: Path) -> Path:
    figure = _new_figure(PERPLEXITY_FIGSIZE)
    ax = figure.add_subplot()
    ax.plot([p["tokens"] for p in curve], [p["perplexity"] for p in curve], marker="o", color="tab:orange")
    if dense is not None:
        ax.axhline(dense, color="tab:gray", linestyle="--", label="dense")
        ax.legend(fontsize=8)
    ax.set(xlabel="recovery tokens", ylabel="perplexity", title="Recovery", yscale="log")
    return _save(figure, path)


def plot_sparsity_profile(profile: dict, path: Path) -> Path:
    """OWL: each layer's sparsity (bars) and the outlier ratio it came from (line)."""
    figure = _new_figure(LAYER_SPARSITY_FIGSIZE)
    ax = figure.add_subplot()
    layers = range(len(profile["layer_sparsity"]))
    ax.bar(layers, profile["layer_sparsity"], color="tab:blue", label="sparsity")
    ax.set(xlabel="decoder layer", ylabel="sparsity", ylim=(0, 1), title="OWL: sparsity and outlier ratio per layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ratio_ax = ax.twinx()
    ratio_ax.plot(layers, [100 * r for r in profile["outlier_ratios"]], color="tab:red", marker=".", label="outliers")
    ratio_ax.set_ylabel(f"% of scores above {profile['owl_threshold']:g} x the layer mean", color="tab:red")
    return _save(figure, path)


def _reconstructed(layers: list[LayerEntry]) -> bool:
    return any("reconstruction_error_after" in m for layer in layers for m in layer["modules"].values())


def plot_reconstruction(layers: list[LayerEntry], path: Path) -> Path:
    """Each module's relative output error per layer: with the method's weights (dotted) and fitted (solid)."""
    figure = _new_figure(LAYER_SPARSITY_FIGSIZE)
    ax = figure.add_subplot()
    modules = list(dict.fromkeys(m for layer in layers for m in layer["modules"]))
    for i, module in enumerate(modules):
        entries = [(layer["layer"], layer["modules"][module]) for layer in layers if module in layer["modules"]]
        colour = f"C{i}"
        ax.plot([x for x, _ in entries], [e["reconstruction_error_before"] for _, e in entries], color=colour,
                linestyle="dotted")  # fmt: skip
        ax.plot([x for x, _ in entries], [e["reconstruction_error_after"] for _, e in entries], color=colour,
                label=_module_label(module))  # fmt: skip
    ax.set(xlabel="decoder layer", ylabel="relative output error", yscale="log",
           title="Output error of each Linear: method's weights (dotted), reconstructed (solid)")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=4)
    return _save(figure, path)


def plot_zero_shot(results: dict[str, dict], path: Path) -> Path:
    """Each task's accuracy per model (dense, pruned), bars with their standard errors, chance marked."""
    figure = _new_figure(ZERO_SHOT_FIGSIZE)
    axes = figure.add_subplot()
    tasks = list(next(iter(results.values()))["tasks"])
    width = 0.8 / len(results)
    for offset, (name, result) in enumerate(results.items()):
        entries = [result["tasks"][t] for t in tasks]
        x = np.arange(len(tasks)) + (offset - (len(results) - 1) / 2) * width
        axes.bar(x, [e["acc"] for e in entries], width, yerr=[e["acc_stderr"] for e in entries], label=name)
    for i, task in enumerate(tasks):
        chance = results[next(iter(results))]["tasks"][task]["chance"]
        if chance is not None:
            axes.hlines(chance, i - 0.45, i + 0.45, colors="black", linestyles="dotted")
    axes.set_xticks(np.arange(len(tasks)), [t.removeprefix("bb_") for t in tasks], rotation=20, fontsize=7)
    axes.set_ylabel("accuracy (dotted: chance)")
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_mask(ref: TensorRef, path: Path, crop: int = MASK_CROP) -> Path:
    """A top-left crop of the mask, pruned weights black: row and column patterns show as stripes."""
    pruned = (read_crop(ref, crop, crop) == 0).numpy()
    figure = _new_figure(MASK_FIGSIZE)
    ax = figure.add_subplot()
    ax.imshow(~pruned, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    rows, cols = pruned.shape
    title = f"{ref.name}\nrows 0-{rows - 1}, inputs 0-{cols - 1}: {pruned.mean():.1%} pruned (black)"
    ax.set_title(title, fontsize=9)
    ax.set(xlabel="input", ylabel="output row")
    return _save(figure, path)


def plot_structure(structure: list[dict], path: Path) -> Path:
    """Structured pruning: kept vs total attention heads and MLP channels per layer."""
    figure = _new_figure(STRUCTURE_FIGSIZE)
    heads_ax, channels_ax = figure.subplots(2, 1, sharex=True)
    layer_indices = [entry["layer"] for entry in structure]
    for ax, what in ((heads_ax, "heads"), (channels_ax, "channels")):
        ax.bar(layer_indices, [entry[f"{what}_total"] for entry in structure], color="lightgray", label="total")
        ax.bar(layer_indices, [entry[f"{what}_kept"] for entry in structure], color="tab:green", label="kept")
        ax.set(ylabel=what)
        ax.legend(loc="upper right", fontsize=8)
    channels_ax.set(xlabel="decoder layer")
    channels_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    heads_ax.set_title("Kept attention heads and MLP channels per layer")
    return _save(figure, path)


def render_markdown(report: dict, plots: list[Plot]) -> str:
    """Overview, then one section per topic with its table and its images (linked by relative path)."""
    parts = [_overview(report)]
    for title, body in (
        (PERPLEXITY, _perplexity_text(report)),
        (SPARSITY, _sparsity_table(report)),
        (MASKS, ""),
        (STRUCTURE, ""),
        (PROFILE, _profile_text(report)),
        (RECONSTRUCTION, _reconstruction_text(report)),
        (RECOVERY, _recovery_text(report)),
        (ZERO_SHOT, _zero_shot_text(report)),
        (TIMINGS, _timings_table(report)),
    ):
        images = [f"![{plot.caption}]({plot.path.name})" for plot in plots if plot.section == title]
        if title == MASKS and images:
            body = f"Top-left crops of at most {MASK_CROP}x{MASK_CROP} weights; black marks a pruned weight."
        if body or images:
            parts.append("\n\n".join([f"## {title}", *([body] if body else []), *images]))
    return "\n\n".join(parts) + "\n"


def _overview(report: dict) -> str:
    rows = [
        ("method", report["method"]),
        ("pattern", report["pattern"]),
        ("total sparsity", f"{report['total_sparsity']:.4f}"),
    ]
    if "pruned_weights" in report:
        rows.append(("pruned weights", f"{report['pruned_weights']:,} of {report['decoder_linear_weights']:,}"))
    if report.get("source"):
        rows.append(("source", f"`{report['source']}`"))
    if report.get("calibration"):
        calibration = report["calibration"]
        rows.append(("calibration", f"{calibration['sequences']} sequences x {calibration['seqlen']} tokens"))
    if report.get("peak_rss_mib") is not None:
        rows.append(("peak RSS", f"{report['peak_rss_mib']:,} MiB"))
    title = f"# Pruning report: {report['method']}, {report['pattern']}"
    return title + "\n\n" + _markdown_table(["", ""], rows)


def _profile_text(report: dict) -> str:
    profile = report.get("sparsity_profile")
    if not profile:
        return ""
    s = profile["layer_sparsity"]
    return (f"Outlier-weighted layer sparsities (OWL): outliers are scores above {profile['owl_threshold']:g} x their "
            f"layer's mean Wanda score; lambda {profile['owl_lambda']:g} (the sparsities span at most 2 lambda): from "
            f"{min(s):.4f} to {max(s):.4f}, mean {sum(s) / len(s):.4f}.")  # fmt: skip


def _reconstruction_text(report: dict) -> str:
    layers = report["layers"]
    if not _reconstructed(layers):
        return ""
    p = report["config"]["prune"]
    modules = [m for layer in layers for m in layer["modules"].values() if "reconstruction_error_after" in m]
    before = sum(m["reconstruction_error_before"] for m in modules) / len(modules)
    after = sum(m["reconstruction_error_after"] for m in modules) / len(modules)
    return (f"Kept weights fitted after masking (`{p['reconstruct']}`, "
            f"{p['reconstruct_iterations']} iterations, damping {p['reconstruct_damp']:g}). Relative output error "
            f"sum ||W'x - Wx_dense||^2 / sum ||Wx_dense||^2, mean over modules: {before:.4f} with the method's "
            f"weights, {after:.4f} fitted.")  # fmt: skip


def _zero_shot_text(report: dict) -> str:
    results = report.get("zero_shot")
    if not results:
        return ""
    from .zeroshot import format_zero_shot

    limit = next(iter(results.values()))["limit"]
    cap = f"the first {limit} examples of each task" if limit else "every example"
    return f"Through lm-evaluation-harness, {cap}; accuracy ± standard error.\n\n" + format_zero_shot(results)


def _recovery_text(report: dict) -> str:
    r = report.get("recovery")
    if not r:
        return ""
    lines = [
        f"{r['steps']} steps of {r['batch_size']} windows ({r['tokens']:,} tokens; {r['data']}); rank-{r['rank']} "
        f"adapters, {r['groups']}; lr {r['lr']} ({r['schedule']}).",
    ]
    if r.get("curve"):
        lines += ["", "| recovery tokens | perplexity |", "|---|---|"]
        lines += [f"| {p['tokens']:,} | {p['perplexity']:.2f} |" for p in r["curve"]]
    return "\n".join(lines)


def _perplexity_text(report: dict) -> str:
    perplexities = _perplexities(report)
    if not perplexities:
        return "Not measured (the run had evaluation turned off)."
    measured = report["perplexity"]
    table = _markdown_table(["model", "perplexity"], [(name, f"{value:.3f}") for name, value in perplexities.items()])
    text, windows, seqlen = (measured.get(key, "?") for key in ("text", "windows", "seqlen"))
    where = f"On `{text}`, {windows} windows of {seqlen} tokens."
    return f"{table}\n\n{where}"


def _sparsity_table(report: dict) -> str:
    layers = report["layers"]
    modules = list(dict.fromkeys(module for layer in layers for module in layer["modules"]))
    headers = ["layer", "sparsity", "seconds", *(_module_label(module) for module in modules)]
    rows = [
        (
            layer["layer"],
            f"{layer['sparsity']:.4f}",
            layer.get("seconds", "-"),
            *(f"{layer['modules'][m]['sparsity']:.4f}" if m in layer["modules"] else "-" for m in modules),
        )
        for layer in layers
    ]
    return _markdown_table(headers, rows)


def _timings_table(report: dict) -> str:
    timings = report.get("timings_s") or {}
    if not timings:
        return ""
    return _markdown_table(["phase", "seconds"], [(phase, f"{s:.3f}") for phase, s in timings.items()])


def _markdown_table(headers: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- prune_report.json: what a run did, for machines and for report.md ----


def build_report(
    config: PruneConfig,
    info: CheckpointInfo,
    layers: list[LayerEntry],
    perplexities: dict,
    eval_windows: Tensor | None,
    windows: Tensor | None,
    timings: dict[str, float],
    workers,
) -> dict:
    zeros = sum(layer["modules"][m]["zeros"] for layer in layers for m in layer["modules"])
    numel = sum(layer["modules"][m]["numel"] for layer in layers for m in layer["modules"])
    retried = [
        {"layer": layer["layer"], "module": m, "damp": entry["sparsegpt_damp"]}
        for layer in layers
        for m, entry in layer["modules"].items()
        if entry.get("sparsegpt_damp", config.prune.sparsegpt_damp) != config.prune.sparsegpt_damp
    ]
    return {
        "method": config.prune.method,
        "pattern": config.prune.pattern or f"unstructured {config.prune.sparsity}",
        "source": str(info.path),
        "config": config.to_dict(),
        "calibration": None if windows is None else {"sequences": windows.shape[0], "seqlen": windows.shape[1]},
        "total_sparsity": zeros / numel,
        "pruned_weights": zeros,
        "decoder_linear_weights": numel,
        "perplexity": perplexity_entry(perplexities, eval_windows, config),
        "sparsegpt_damping_retries": retried,
        "gblm_gradient_share": _mean_gradient_share(layers),
        "layers": layers,
        "timings_s": dict(timings),
        **run_environment(workers.world_size),
    }


def run_environment(world_size: int) -> dict:
    """Versions, machine, and worker 0's own peak resident memory (every worker's is under "workers")."""
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "versions": {"dist_prune": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "workers": world_size},
    }


def _mean_gradient_share(layers: list[LayerEntry]) -> float | None:
    """GBLM: average share of the gradient term in the score; near 0 means GBLM ranks like Wanda."""
    shares = [m["gradient_share"] for layer in layers for m in layer["modules"].values() if "gradient_share" in m]
    return sum(shares) / len(shares) if shares else None


def perplexity_entry(perplexities: dict, eval_windows: Tensor | None, config: PruneConfig) -> dict | None:
    if eval_windows is None:
        return None
    e = config.evaluation
    return dict(perplexities, text=e.eval_text, seqlen=e.eval_seqlen, windows=eval_windows.shape[0])


# The layer loop's phases (job.py): on the loop's thread, and in the background (reading ahead, writing behind).
LOOP_THREAD_PHASES = ("read_wait", "h2d", "forward", "statistics", "pruning", "d2h", "write_wait")
BACKGROUND_PHASES = ("read", "write", "hash")
COMPUTE_PHASES = ("forward", "statistics", "pruning")


def phase_report(layers: list[LayerEntry], gradient_pass: dict[str, float]) -> dict:
    """Where the time went: the layer loop's phases summed over the layers this run pruned, its wall time
    against its compute time, and the gradient pass's phases."""
    totals: dict[str, float] = {}
    for layer in layers:
        for phase, seconds in layer.get("phases_s", {}).items():
            totals[phase] = totals.get(phase, 0.0) + seconds
    wall = sum(layer.get("seconds", 0.0) for layer in layers)
    compute = sum(totals.get(phase, 0.0) for phase in COMPUTE_PHASES)
    loop = {
        "layers": len(layers),
        "wall_s": round(wall, 3),
        "compute_s": round(compute, 3),
        "wall_over_compute": round(wall / compute, 3) if compute else None,
    }
    return {
        "layer_phases_s": {phase: round(seconds, 3) for phase, seconds in totals.items()},
        "layer_loop": loop,
        "gradient_pass_phases_s": {phase: round(seconds, 3) for phase, seconds in gradient_pass.items()},
    }
