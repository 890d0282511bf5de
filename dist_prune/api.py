"""The Python API for pipelines: the same jobs as the CLI, without argument parsing or Ray at import time.

import dist_prune
report = dist_prune.prune("configs/demo.yaml", out="/data/pruned", nsamples=64)
report.out, report.total_sparsity, report.perplexity
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import PruneConfig, build_config, load_config
from .progress import Progress

ConfigLike = PruneConfig | str | Path | dict | None


@dataclass(frozen=True)
class Report:
    """What a prune job produced; `data` is the full prune_report.json."""

    out: Path
    data: dict

    @property
    def method(self) -> str:
        return self.data["method"]

    @property
    def total_sparsity(self) -> float:
        return self.data["total_sparsity"]

    @property
    def perplexity(self) -> dict | None:
        return self.data.get("perplexity")

    @classmethod
    def load(cls, out: str | Path) -> "Report":
        return cls(Path(out), json.loads((Path(out) / "prune_report.json").read_text()))


def resolve_config(config: ConfigLike = None, **overrides: Any) -> PruneConfig:
    """A PruneConfig from a config object, a YAML path, a mapping or nothing, with leaf-name overrides."""
    if isinstance(config, PruneConfig):
        config = config.to_dict()
    if isinstance(config, dict):
        return build_config(config, overrides)
    return load_config(config, overrides)


def prune(config: ConfigLike = None, *, progress: str = "quiet", **overrides: Any) -> Report:
    """Prune a checkpoint; raises DistPruneError (with one clear message) on bad input."""
    from .pipeline import prune as run_prune

    resolved = resolve_config(config, **overrides)
    run_prune(resolved, Progress(progress))
    return Report.load(resolved.out)


def evaluate(
    model: str, text: str = "wikipedia", seqlen: int = 512, windows: int | None = None, device: str = "auto"
) -> dict:
    """Perplexity of a checkpoint on the evaluation split (or a text file): {perplexity, windows, ...}."""
    from .pipeline import evaluate_model

    return evaluate_model(model, text, seqlen, windows, device)


def plan(config: ConfigLike = None, **overrides: Any):
    """Per-worker memory of each phase, from the model's config.json alone (returns a MemoryPlan)."""
    from .memory import plan_for, plan_source

    resolved = resolve_config(config, **overrides)
    return plan_for(resolved, plan_source(resolved))
