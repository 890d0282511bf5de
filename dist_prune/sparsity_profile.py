"""Per-layer sparsities (`--sparsity-profile owl`), found before the layer loop by one pass of the calibration
batches through the dense model, one layer at a time as the loop holds them: each layer's Wanda scores give
its outlier ratio (methods/owl.py), the ratios give the sparsities. The input statistics are summed over
workers, and every worker holds the whole layer, so every worker finds the same sparsities."""

from dataclasses import dataclass

from .distributed import all_reduce_layer_statistics
from .layerwise import LayerInputs, collect_input_statistics, run_layer
from .methods.owl import grid_step, outlier_ratio, owl_sparsities
from .models import LINEAR_INPUT_OWNER, LINEARS


@dataclass(frozen=True)
class SparsityProfile:
    kind: str
    threshold: float
    spread: float
    outlier_ratios: list[float]
    layer_sparsity: list[float]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "owl_threshold": self.threshold, "owl_lambda": self.spread,
                "outlier_ratios": self.outlier_ratios, "layer_sparsity": self.layer_sparsity}  # fmt: skip


def owl_profile(run, calibration: LayerInputs, advance) -> SparsityProfile:
    """The dense model's outlier ratio of every layer, and the layer sparsities they give."""
    p, ratios = run.config.prune, []
    widths = set()
    for index in range(run.info.num_layers):
        layer = run.layer(index, run.store.layer(index, then=index + 1))
        stats = collect_input_statistics(layer, calibration, with_hessian=False)
        all_reduce_layer_statistics(stats)
        weights = [layer.get_submodule(name).weight for name in LINEARS]
        scalers = [stats[LINEAR_INPUT_OWNER[name]].scaler_row() for name in LINEARS]
        ratios.append(outlier_ratio(weights, scalers, p.owl_threshold))
        widths.update(w.shape[1] for w in weights)
        calibration = run_layer(layer, calibration)
        del layer, stats, weights
        advance()
    sparsities = owl_sparsities(ratios, p.sparsity, p.owl_lambda, grid_step(sorted(widths)))
    return SparsityProfile("owl", p.owl_threshold, p.owl_lambda, ratios, sparsities)
