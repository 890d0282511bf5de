"""Reconstruction (methods/reconstruction.py) and OWL layer sparsities (methods/owl.py): the maths, the
settings, and one run of each on a tiny model. Worker-count independence is in test_engine.py."""

import json

import pytest
import torch

from dist_prune.config import ConfigError, build_config, validate
from dist_prune.methods.owl import grid_step, outlier_ratio, owl_sparsities
from dist_prune.methods.reconstruction import reconstruct_group


def problem(rows: int, cols: int, tokens: int = 600, seed: int = 0):
    """Correlated inputs with a few large features (as LLM activations have), a dense W, a 50% mask."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=gen) @ mix
    X[:, :2] *= 20
    W = torch.randn(rows, cols, generator=gen)
    scores = W.abs() * X.square().sum(0).sqrt()
    mask = scores < scores.kthvalue(cols // 2, dim=1, keepdim=True).values
    return X, W, mask


def exact_fit(W, mask, H, B, lam):
    """Row by row, the kept weights that solve the damped normal equations directly."""
    out = torch.zeros_like(W, dtype=torch.float64)
    Hd = H.double() + lam * torch.eye(H.shape[0], dtype=torch.float64)
    b = W.double() @ B.double().T + lam * W.double()
    for i in range(W.shape[0]):
        kept = ~mask[i]
        out[i, kept] = torch.linalg.solve(Hd[kept][:, kept], b[i, kept])
    return out


@pytest.mark.parametrize("cross", [False, True])
def test_the_fit_is_the_least_squares_solution_with_the_mask_kept(cross):
    X, W, mask = problem(12, 40)
    X_reference = X + 0.3 * torch.randn_like(X) if cross else X
    H, B = X.T @ X, X.T @ X_reference
    fit = reconstruct_group([W], [W.masked_fill(mask, 0)], [mask], [0], H, B.T if cross else None, 0.01, 60)[0]
    lam = 0.01 * float(H.diagonal().mean())
    assert torch.allclose(fit.weight.double(), exact_fit(W, mask, H, B, lam), rtol=1e-3, atol=1e-4)
    assert bool((fit.weight[mask] == 0).all())
    # the error it reports is the output error it has: sum ||W' x_p - W x_d||^2 less the target's energy
    energy = float((X_reference @ W.T).square().sum())
    for weight, residual in ((W.masked_fill(mask, 0), fit.residual_before), (fit.weight, fit.residual_after)):
        direct = float((X @ weight.T - X_reference @ W.T).square().sum())
        assert residual + energy == pytest.approx(direct, rel=1e-3)
    assert fit.residual_after < fit.residual_before
    # without a cross term the fit gives the energy itself (tr W H W^T); with one it comes from the outputs
    assert fit.energy is None if cross else fit.energy == pytest.approx(energy, rel=1e-4)


@pytest.mark.parametrize("chunk", [128, 3])
def test_row_shards_give_the_same_bits(chunk, monkeypatch):
    """Each worker fits its own rows: any split gives the whole matrix's bits (chunk 3: shards cut chunks)."""
    monkeypatch.setattr("dist_prune.methods.reconstruction.FIT_CHUNK", chunk)
    X, W, mask = problem(10, 32, seed=3)
    H = X.T @ X
    start = W.masked_fill(mask, 0)
    whole = reconstruct_group([W], [start], [mask], [0], H, None, 0.01, 20)[0].weight
    for cuts in ((0, 4, 10), (0, 1, 5, 10), (0, 7, 10)):
        parts = [
            reconstruct_group([W[a:b]], [start[a:b]], [mask[a:b]], [a], H, None, 0.01, 20)[0].weight
            for a, b in zip(cuts, cuts[1:], strict=False)
        ]
        assert torch.equal(torch.cat(parts), whole)


def test_a_group_fits_each_member_as_alone():
    X, W, mask = problem(10, 32, seed=4)
    H = X.T @ X
    top, bottom = slice(0, 6), slice(6, 10)
    together = reconstruct_group(
        [W[top], W[bottom]], [W[top] * ~mask[top], W[bottom] * ~mask[bottom]], [mask[top], mask[bottom]], [0, 0],
        H, None, 0.01, 20,
    )  # fmt: skip
    for fit, rows in zip(together, (top, bottom), strict=True):
        alone = reconstruct_group([W[rows]], [W[rows] * ~mask[rows]], [mask[rows]], [0], H, None, 0.01, 20)[0]
        assert torch.equal(fit.weight, alone.weight)


def test_block_mode_runs_the_layer_on_the_written_weights_and_leaves_it_as_it_was():
    from dist_prune.reconstruct import _reading

    layer = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    own, x = layer[0].weight, torch.randn(3, 6)
    before = own.detach().clone()
    written = torch.randn(5, 6).to(torch.bfloat16)  # as written: the checkpoint's dtype
    with torch.no_grad(), _reading(layer, {"0": written}):
        inside = layer(x)
    expected = layer[2](torch.relu(x @ written.float().T + layer[0].bias))
    assert torch.allclose(inside, expected)
    assert (
        layer[0].weight is own
        and torch.equal(own, before)
        and dict(layer.named_parameters()).keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    )


# ---- OWL ----


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    W = torch.ones(2, 4)
    W[0, 0] = 100.0  # one score of 8 far above the mean (107 / 8 = 13.4 < 100)
    assert outlier_ratio([W], [torch.ones(4)], 5.0) == pytest.approx(1 / 8)
    assert outlier_ratio([W], [torch.ones(4)], 100.0) == 0.0


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_owl_keeps_the_mean_and_prunes_outlier_layers_less(target):
    ratios = [0.01, 0.05, 0.02, 0.08, 0.03, 0.03, 0.04, 0.06, 0.015, 0.025]
    step = grid_step([576, 1536])
    sparsities = owl_sparsities(ratios, target, 0.08, step)
    assert sum(sparsities) / len(sparsities) == pytest.approx(target, abs=1e-12)
    assert all(abs(s / step - round(s / step)) < 1e-9 for s in sparsities)  # whole weights per row
    assert max(sparsities) - min(sparsities) <= 2 * 0.08 + step
    assert max(abs(s - target) for s in sparsities) <= 2 * 0.08 + step
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    assert [sparsities[i] for i in order] == sorted(sparsities, reverse=True)


def test_owl_with_equal_ratios_is_uniform():
    assert owl_sparsities([0.1] * 6, 0.5, 0.08, 1 / 64) == [0.5] * 6


# ---- settings ----


def config(**prune):
    return build_config({"model": "m", "out": "o", "prune": prune})


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ({"method": "wanda", "pattern": "2:4", "sparsity_profile": "owl"}, "prunes the same share of every layer"),
        ({"method": "saap", "sparsity_profile": "owl"}, "allocates its own ratios"),
        ({"method": "flap", "reconstruct": "block"}, "removes whole heads and channels"),
        ({"method": "wanda", "reconstruct": "sometimes"}, "reconstruct must be one of none, linear, block"),
        ({"method": "wanda", "sparsity": 0.95, "sparsity_profile": "owl"}, "owl_lambda 0.08 could take"),
        ({"method": "wanda", "reconstruct": "linear", "reconstruct_iterations": 0}, "reconstruct_iterations must be"),
    ],
)
def test_settings_that_cannot_work_are_refused(prune, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(**prune))


# ---- runs on a tiny model ----


def test_linear_reconstruction_fits_on_the_statistics_forward(tiny_llama, text_file, tmp_path, monkeypatch):
    """Linear mode needs no forward of its own, for any method (magnitude collects nothing else)."""
    from dist_prune import prune

    def no_forward(*_args, **_kwargs):
        raise AssertionError("linear reconstruction ran the layer again")

    monkeypatch.setattr("dist_prune.reconstruct._group_input", no_forward)
    out = tmp_path / "out"
    cfg = build_config({
        "model": str(tiny_llama), "out": str(out), "prune": {"method": "magnitude", "reconstruct": "linear"},
        "calibration": {"nsamples": 4, "seqlen": 32, "calib_source": str(text_file), "batch_size": 2},
        "evaluation": {"eval_text": str(text_file), "eval_seqlen": 32, "eval_windows": 4},
        "runtime": {"threads": 1},
    })  # fmt: skip
    prune(cfg)
    report = json.loads((out / "prune_report.json").read_text())
    modules = [module for layer in report["layers"] for module in layer["modules"].values()]
    assert all(0 <= m["reconstruction_error_after"] < m["reconstruction_error_before"] for m in modules)


def test_a_run_with_owl_and_block_reconstruction(tiny_llama, text_file, tmp_path):
    from dist_prune import prune

    out = tmp_path / "out"
    cfg = build_config({
        "model": str(tiny_llama), "out": str(out),
        "prune": {"method": "wanda", "sparsity": 0.625, "sparsity_profile": "owl", "owl_lambda": 0.1,
                  "reconstruct": "block"},
        "calibration": {"nsamples": 4, "seqlen": 32, "calib_source": str(text_file), "batch_size": 2},
        "evaluation": {"eval_text": str(text_file), "eval_seqlen": 32, "eval_windows": 4},
        "runtime": {"threads": 1},
    })  # fmt: skip
    prune(cfg)
    report = json.loads((out / "prune_report.json").read_text())
    profile = report["sparsity_profile"]
    assert [round(layer["sparsity"], 6) for layer in report["layers"]] == [
        round(s, 6) for s in profile["layer_sparsity"]
    ]
    assert report["total_sparsity"] == pytest.approx(0.625, abs=1e-12)  # on the grid of 1/64: exact
    assert len(set(profile["layer_sparsity"])) > 1
    for layer in report["layers"]:
        for module in layer["modules"].values():
            assert module["reconstruction_error_after"] <= module["reconstruction_error_before"] + 1e-6
    text = (out / "report.md").read_text()
    assert "report-owl.png" in text and "report-reconstruction.png" in text
    assert (out / "report-owl.png").stat().st_size > 0 and (out / "report-reconstruction.png").stat().st_size > 0
