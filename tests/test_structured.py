"""SAAP-style structured pruning: group bookkeeping, maths on hand-computed cases, physical removal, loading."""

import json
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_llama
from transformers import AutoModelForCausalLM

from dist_prune.checkpoint import INDEX_FILE
from dist_prune.cli import main
from dist_prune.distributed import Workers
from dist_prune.errors import ConfigError
from dist_prune.models import decoder_layers, family_of, rebuild_unsaved_buffers
from dist_prune.structured.allocation import Module, allocate, solve_ratios, threshold_ratios
from dist_prune.structured.groups import (
    ATTENTION,
    COLUMN_MODULES,
    MLP,
    MODULES,
    LayerKeep,
    LayerShape,
    Steps,
    check_gqa,
    compensation_bias,
    group_sums,
    kept_lines,
    layer_keep,
    removal_steps,
    removed_units,
    slice_weight,
    unit_sums,
)
from dist_prune.structured.importance import (
    channel_variance,
    element_scores,
    finish_measures,
    fluctuation_channels,
    fluctuation_scores,
    fuse,
    group_measures,
    instability,
)
from dist_prune.structured.recovery import LowRankAdapter, recover
from dist_prune.structured.surgery import (
    build_on_meta,
    compensate_layer_state,
    kept_sizes,
    layer_shape,
    output_config,
    slice_layer_state,
)

# SmolLM2-135M's attention layout, scaled down: 9 query heads sharing 3 KV heads.
GQA = LayerShape(hidden=12, num_heads=9, num_kv_heads=3, head_dim=2, intermediate=10)
TINY = LayerShape(hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=128)
ALL_MODULES = MODULES[ATTENTION] + MODULES[MLP]
MODES = ("kv_group", "query_heads")


def weight_shapes(shape: LayerShape) -> dict[str, tuple[int, int]]:
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return {
        "self_attn.q_proj": (q, shape.hidden),
        "self_attn.k_proj": (kv, shape.hidden),
        "self_attn.v_proj": (kv, shape.hidden),
        "self_attn.o_proj": (shape.hidden, q),
        "mlp.gate_proj": (shape.intermediate, shape.hidden),
        "mlp.up_proj": (shape.intermediate, shape.hidden),
        "mlp.down_proj": (shape.hidden, shape.intermediate),
    }


def ones(shape: LayerShape) -> dict[str, torch.Tensor]:
    return {m: torch.ones(s) for m, s in weight_shapes(shape).items()}


# --- groups ---------------------------------------------------------------------------------------------


def test_group_sizes_count_every_coupled_weight():
    hd, hidden = GQA.head_dim, GQA.hidden
    # kv_group: a KV head's k and v rows, its 3 query heads' q rows and o_proj columns
    assert group_sums(ones(GQA), ATTENTION, GQA, "kv_group").tolist() == [(2 + 2 * 3) * hd * hidden] * 3
    # query_heads: one query head's q rows and o_proj columns; k/v belong to no unit
    assert group_sums(ones(GQA), ATTENTION, GQA, "query_heads").tolist() == [2 * hd * hidden] * 9
    assert group_sums(ones(GQA), MLP, GQA, "kv_group").tolist() == [3 * hidden] * 10


def test_removal_steps_match_the_parameters_they_remove():
    for mode in MODES:
        for kind in (ATTENTION, MLP):
            steps = removal_steps(kind, GQA, mode)
            units = group_sums(ones(GQA), kind, GQA, mode)
            assert steps.params * steps.count == units.sum()


def test_row_shards_merge_by_adding_small_vectors():
    torch.manual_seed(0)
    scores = {m: torch.rand(s) for m, s in weight_shapes(GQA).items()}
    for mode in MODES:
        for module, full in scores.items():
            whole = unit_sums(module, full, GQA, mode)
            shards = [unit_sums(module, part, GQA, mode, row_start=start) for start, part in _row_shards(full, 3)]
            torch.testing.assert_close(sum(shards), whole)


def _row_shards(tensor: torch.Tensor, count: int):
    start = 0
    for part in tensor.tensor_split(count):
        yield start, part
        start += part.shape[0]


def test_query_heads_go_evenly_from_every_kv_group():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0, 9.0, 8.0, 7.0])  # heads 0-2 | 3-5 | 6-8
    assert removed_units(scores, 1, ATTENTION, GQA, "query_heads") == [1, 3, 8]
    assert removed_units(scores, 2, ATTENTION, GQA, "query_heads") == [1, 2, 3, 5, 7, 8]
    keep = layer_keep([1, 3, 8], [], GQA, "query_heads")
    assert keep.query_heads == (0, 2, 4, 5, 6, 7) and keep.kv_heads == (0, 1, 2)
    assert len(keep.query_heads) % len(keep.kv_heads) == 0


def test_kv_groups_go_whole():
    keep = layer_keep([1], [0, 9], GQA, "kv_group")
    assert keep.kv_heads == (0, 2) and keep.query_heads == (0, 1, 2, 6, 7, 8)
    assert keep.channels == tuple(range(1, 9))


def test_gqa_invariant_is_enforced():
    with pytest.raises(ValueError):
        check_gqa(LayerKeep(query_heads=(0, 1, 3), kv_heads=(0, 1, 2), channels=(0,)), GQA)


@pytest.mark.parametrize("mode", MODES)
def test_sliced_shapes(mode):
    removed = [0] if mode == "kv_group" else [0, 4, 8]  # one KV group, or one query head per group
    keep = layer_keep(removed, [2, 3, 4], GQA, mode)
    heads, kv = (6, 2) if mode == "kv_group" else (6, 3)
    expected = weight_shapes(LayerShape(GQA.hidden, heads, kv, GQA.head_dim, GQA.intermediate - 3))
    for module, size in weight_shapes(GQA).items():
        assert tuple(slice_weight(module, torch.zeros(size), keep, GQA.head_dim).shape) == expected[module]


# --- importance ------------------------------------------------------------------------------------------


def test_taylor_scores_on_a_hand_computed_group():
    W, g, F = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]]), torch.tensor([[2.0, 4.0]])
    # element-wise: |1*3 - 0.5*1*2| + |-2*1 - 0.5*4*4| = 2 + 10
    assert element_scores(W, g, F).sum() == 12
    shape = LayerShape(hidden=2, num_heads=1, num_kv_heads=1, head_dim=1, intermediate=1)
    weights = {"mlp.gate_proj": W, "mlp.up_proj": W, "mlp.down_proj": W.T}
    grads = {"mlp.gate_proj": g, "mlp.up_proj": -g, "mlp.down_proj": g.T}
    measures = finish_measures(group_measures(weights, grads, {}, {}, MLP, shape, "kv_group", ("vector",)))
    # vector-wise is |sum over the whole group|: (3 - 2) + (-3 + 2) + (3 - 2) = 1, not 1 + 1 + 1
    assert measures["vector"].tolist() == [1.0]


def test_fusion_divides_each_measure_by_its_mean_and_averages():
    fused = fuse({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([10.0, 30.0]), "c": torch.tensor([4.0, 0.0])})
    # a / 2 = [0.5, 1.5]; b / 20 = [0.5, 1.5]; c / 2 = [2, 0]; mean = [1, 1]
    torch.testing.assert_close(fused, torch.tensor([1.0, 1.0]))


def test_fusion_weights_are_the_inverse_squared_instability_of_each_measure():
    from dist_prune.structured.scoring import measure_weights

    def batch(vector: float, element: float) -> dict:
        units = {"vector": torch.tensor([vector, 2.0]), "element": torch.tensor([element, 2.0])}
        return {(0, kind): dict(units, activation=torch.tensor([1.0, 1.0])) for kind in (ATTENTION, MLP)}

    # unit 0 across two batches: vector 1 and 3 (cv 0.5), element 1.5 and 2.5 (cv 0.25), unit 1 constant;
    # activation constant -> cv 0: the instability is undefined, so every weight is 1
    weights = measure_weights([batch(1.0, 1.5), batch(3.0, 2.5)])
    assert weights == dict.fromkeys(weights, 1.0)
    unstable = [batch(1.0, 1.5), batch(3.0, 2.5)]
    for b, activation in zip(unstable, (1.0, 3.0), strict=True):
        for key in b:
            b[key]["activation"] = torch.tensor([activation, activation])
    weights = measure_weights(unstable)  # mean cv: vector 0.25, element 0.125, activation 0.5
    assert weights[(MLP, "vector")] == pytest.approx(16.0)
    assert weights[(MLP, "element")] == pytest.approx(64.0)
    assert weights[(ATTENTION, "activation")] == pytest.approx(4.0)
    fused = fuse({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([4.0, 0.0])}, {"a": 3.0, "b": 1.0})
    torch.testing.assert_close(fused, torch.tensor([(3 * 0.5 + 2.0) / 4, (3 * 1.5 + 0.0) / 4]))


def test_instability_is_the_mean_coefficient_of_variation():
    batches = torch.tensor([[1.0, 2.0], [3.0, 2.0]])  # unit 0: mean 2, std 1 -> 0.5; unit 1: constant -> 0
    assert instability(batches) == pytest.approx(0.25)
    assert instability(batches[:1]) == 0.0


# --- allocation ------------------------------------------------------------------------------------------


def mlp_module(layer: int, instability: float, count: int = 10) -> Module:
    return Module(layer, MLP, Steps(count=count, removable=count - 1, params=1), instability)


def test_adaptive_ratios_follow_instability():
    modules = [mlp_module(0, 1.0), mlp_module(1, 4.0)]
    # weights u / mean(u) = 0.4, 1.6; 10 removed = lam * (0.4 + 1.6) * 10 -> lam = 0.5 -> ratios 0.2, 0.8
    assert solve_ratios(modules, [0.4, 1.6], 10) == pytest.approx([0.2, 0.8])
    assert allocate(modules, 10, "adaptive") == [2, 8]


def test_adaptive_ratio_caps_and_redistributes():
    modules = [mlp_module(0, 1.0), mlp_module(1, 9.0)]  # weights 0.2, 1.8
    # unconstrained 12 -> lam = 0.6 -> 1.08 > cap 0.9: module 1 takes 9, module 0 the other 3
    assert allocate(modules, 12, "adaptive") == [3, 9]


def test_adaptive_ratios_stay_within_the_spread_of_uniform():
    modules = [mlp_module(0, 1.0, count=100), mlp_module(1, 1.0, count=100), mlp_module(2, 10.0, count=100)]
    # unbounded: weights 0.25, 0.25, 2.5; module 2 hits its cap (99 of 100), the others share the other 21
    assert allocate(modules, 120, "adaptive") == [11, 10, 99]
    # uniform is 0.4; spread 0.1: module 2 stops at 0.5, modules 0 and 1 share the other 70
    assert solve_ratios(modules, [0.25, 0.25, 2.5], 120, spread=0.1) == pytest.approx([0.35, 0.35, 0.5])
    assert allocate(modules, 120, "adaptive", spread=0.1) == [35, 35, 50]


def test_uniform_gives_every_module_the_same_count():
    modules = [mlp_module(0, 1.0), mlp_module(1, 9.0)]
    assert allocate(modules, 12, "uniform") == [6, 6]


def test_attention_rounds_first_and_mlp_absorbs_the_rest():
    attention = Steps(count=3, removable=2, params=100)
    modules = [Module(0, ATTENTION, attention, 1.0), mlp_module(0, 1.0, count=1000)]
    # equal ratio r: 300 r + 1000 r = 260 -> r = 0.2 -> 0.6 attention steps -> 1 (100 params); MLP takes 160
    assert allocate(modules, 260, "adaptive") == [1, 160]


def test_a_target_beyond_capacity_is_refused():
    with pytest.raises(ConfigError):
        allocate([mlp_module(0, 1.0)], 10, "adaptive")


# --- FLAP: fluctuation metric, global allocation, bias compensation ------------------------------------------


def slow_wifv(W: torch.Tensor, X: torch.Tensor) -> list[float]:
    """S_j = Var(X_j) * sum_i W_ij^2, one channel at a time in fp64 (population variance over the tokens)."""
    W, X = W.double(), X.double()
    scores = []
    for j in range(W.shape[1]):
        column = X[:, j]
        variance = sum((float(x) - float(column.mean())) ** 2 for x in column) / len(column)
        scores.append(variance * sum(float(w) ** 2 for w in W[:, j]))
    return scores


def test_fluctuation_metric_matches_the_slow_formula_and_row_shards_add_up():
    torch.manual_seed(0)
    X = torch.randn(50, 6) * torch.tensor([0.1, 1.0, 2.0, 0.5, 3.0, 1.5]) + 4.0  # (tokens, in): large means
    W = torch.randn(5, 6)
    variance = channel_variance(X.double().sum(0), X.double().square().sum(0), X.shape[0])
    whole = fluctuation_channels(W, variance)
    torch.testing.assert_close(whole.double(), torch.tensor(slow_wifv(W, X), dtype=torch.float64), rtol=1e-5, atol=0)
    parts = fluctuation_channels(W[:2], variance) + fluctuation_channels(W[2:], variance)
    torch.testing.assert_close(parts, whole)


def test_fluctuation_scores_standardise_per_layer_and_average_heads():
    """Attention: square the channel metric, z-score it over the layer (Bessel's std), mean per query head."""
    channels = torch.arange(1.0, 19.0)  # GQA: 9 query heads of head_dim 2 -> 18 o_proj inputs
    squared = [c * c for c in channels.tolist()]
    mean = sum(squared) / 18
    std = (sum((v - mean) ** 2 for v in squared) / 17) ** 0.5
    z = [(v - mean) / std for v in squared]
    expected = [(z[2 * h] + z[2 * h + 1]) / 2 for h in range(9)]
    got = fluctuation_scores(channels, ATTENTION, GQA, "query_heads")
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    kv = fluctuation_scores(channels, ATTENTION, GQA, "kv_group")  # a KV group: its 3 heads' 6 channels
    torch.testing.assert_close(kv, torch.tensor([sum(z[6 * g : 6 * g + 6]) / 6 for g in range(3)]))
    mlp = fluctuation_scores(torch.tensor([1.0, 2.0, 3.0, 6.0]), MLP, GQA, "query_heads")
    torch.testing.assert_close(mlp, (torch.tensor([1.0, 2.0, 3.0, 6.0]) - 3.0) / torch.tensor(14.0 / 3).sqrt())


def test_global_threshold_weighs_each_unit_by_the_parameters_it_removes():
    heads = Module(0, ATTENTION, Steps(count=2, removable=1, params=10), 0.0)  # 2 units of 10 parameters
    mlp = Module(0, MLP, Steps(count=4, removable=3, params=1), 0.0)  # 4 units of 1
    scores = [torch.tensor([-1.0, 2.0]), torch.tensor([-2.0, -0.5, 0.5, 3.0])]
    # ascending: mlp0 (1), head0 (11), mlp1 (12), mlp2 (13), ...: a target of 12 cuts after mlp1
    assert threshold_ratios([heads, mlp], scores, 12) == [0.5, 0.5]
    assert threshold_ratios([heads, mlp], scores, 2) == [0.0, 0.25]  # |1 - 2| < |11 - 2|
    assert allocate([heads, mlp], 12, "global", scores) == [1, 2]


def test_the_global_cut_compares_gradient_scores_standardised_per_module():
    from dist_prune.structured.scoring import ModuleScores, comparable_scores

    def scored(values: list[float]) -> ModuleScores:
        return ModuleScores(0, MLP, GQA, torch.tensor(values), 0.0, torch.zeros(1))

    # the same ranking at ten times the scale: the same standardised scores, so the cut treats them alike
    modules = [scored([1.0, 2.0, 3.0]), scored([10.0, 20.0, 30.0]), scored([5.0])]
    fused = comparable_scores(modules, "fused")
    torch.testing.assert_close(fused[0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(fused[1], fused[0])
    assert fused[2].tolist() == [0.0]  # one unit: no spread to standardise by
    assert comparable_scores(modules, "fluctuation")[1] is modules[1].scores  # standardised by its definition


def test_compensation_bias_is_the_removed_columns_times_their_mean():
    torch.manual_seed(0)
    W, mean = torch.randn(3, 10), torch.randn(10)
    keep = LayerKeep(query_heads=(0,), kv_heads=(0,), channels=(0, 2, 3, 7))
    expected = [sum(float(W[i, j] * mean[j]) for j in range(10) if j not in keep.channels) for i in range(3)]
    torch.testing.assert_close(compensation_bias("mlp.down_proj", W, mean, keep, 2), torch.tensor(expected))


# --- calibration pass -------------------------------------------------------------------------------------


def test_calibration_sums_are_total_gradient_and_per_sample_squares(tiny_llama):
    """The layer-wise passes as structured scoring asks for them, at one worker (tests/test_distributed.py runs
    the gradient pass at 2 and 3 against the same loop), kept as the worker's FSDP rows: the gradient pass for
    the gradient measures, the forward-only pass for fluctuation; both sum x and x^2 of the inputs."""
    from dist_prune.checkpoint import inspect_checkpoint
    from dist_prune.distributed import init_workers, load_sharded_model, teardown
    from dist_prune.distributed.residency import StreamStore
    from dist_prune.structured.scoring import CalibrationSource, batch_sums

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    windows = torch.randint(0, 49152, (3, 16), generator=torch.Generator().manual_seed(0))
    workers = init_workers(0, 1)
    try:
        sharded = load_sharded_model(inspect_checkpoint(tiny_llama), workers)
        source = CalibrationSource(StreamStore(inspect_checkpoint(tiny_llama)), sharded.config, torch.float32)
        sums = batch_sums(sharded, source, windows, [1], "fused", workers)
        moments = batch_sums(sharded, source, windows, [1], "fluctuation", workers)
    finally:
        teardown()
    assert all(name.startswith("model.layers.1.") for name in sums.plain)
    name = "model.layers.1.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[name]
    per_sample, squares, totals = [], [], []

    def record(_module, args, _output):
        squares.append(args[0].detach().square().sum(dim=(0, 1)))
        totals.append(args[0].detach().sum(dim=(0, 1)))

    hook = model.get_submodule("model.layers.1.mlp.down_proj").register_forward_hook(record)
    for sequence in windows:
        model.zero_grad()
        weight.requires_grad_(True)
        model(input_ids=sequence[None], labels=sequence[None]).loss.backward()
        per_sample.append(weight.grad.clone())
    hook.remove()
    torch.testing.assert_close(sums.plain[name], sum(per_sample))
    torch.testing.assert_close(sums.power[name], sum(g.square() for g in per_sample))
    for found in (sums, moments):  # counted once per sequence
        torch.testing.assert_close(found.input_sq[name].float(), sum(squares))
        torch.testing.assert_close(found.input_sum[name].float(), sum(totals))
        assert (found.sequences, found.tokens) == (3, 48)
    assert not moments.power and set(moments.input_sum) == {
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    }


# --- physical removal -------------------------------------------------------------------------------------


def random_keeps(model, mode: str, seed: int) -> dict[int, LayerKeep]:
    generator = torch.Generator().manual_seed(seed)
    keeps = {}
    for index, layer in enumerate(decoder_layers(model)):
        shape = layer_shape(layer)
        attention = torch.rand(2 if mode == "kv_group" else 4, generator=generator)
        channels = torch.rand(shape.intermediate, generator=generator)
        removed = removed_units(attention, 1, ATTENTION, shape, mode)
        keeps[index] = layer_keep(removed, removed_units(channels, 40 + index, MLP, shape, mode), shape, mode)
    return keeps


@torch.no_grad()
def mask_layer_(layer, keep: LayerKeep) -> None:
    """Zero what pruning would remove, keeping every shape."""
    for module in ALL_MODULES:
        weight = layer.get_submodule(module).weight
        dropped = torch.ones(weight.shape[1 if module in COLUMN_MODULES else 0], dtype=torch.bool)
        dropped[kept_lines(module, keep, layer.self_attn.head_dim)] = False
        if module in COLUMN_MODULES:
            weight[:, dropped] = 0
        else:
            weight[dropped] = 0


@pytest.mark.parametrize("mode", MODES)
def test_sliced_model_equals_masked_model(tiny_llama, mode):
    """Slicing the state and building the architecture of `output_config` is the masked model, smaller."""
    masked = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    keeps = random_keeps(masked, mode, seed=1)
    shapes = [layer_shape(layer) for layer in decoder_layers(masked)]
    state = masked.state_dict()
    for index, keep in keeps.items():
        prefix = f"model.layers.{index}."
        layer_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        state.update({prefix + k: v for k, v in slice_layer_state(layer_state, keep, TINY.head_dim).items()})
        mask_layer_(decoder_layers(masked)[index], keep)
    output = output_config(masked.config.to_dict(), kept_sizes(shapes, keeps), TINY.head_dim)
    pruned = build_on_meta(output)
    pruned.load_state_dict(state, assign=True, strict=False)  # the tied lm_head follows the embeddings
    pruned.tie_weights()
    rebuild_unsaved_buffers(pruned.eval(), family_of(pruned.config), "cpu")  # rotary buffers: not in a state dict
    tokens = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=tokens).logits, masked(input_ids=tokens).logits, atol=1e-5, rtol=0)
    assert layer_shape(decoder_layers(pruned)[0]).num_heads == 2
    assert layer_shape(decoder_layers(pruned)[0]).num_kv_heads == (1 if mode == "kv_group" else 2)


def test_compensated_pruned_model_equals_masked_model_plus_bias(tiny_llama):
    """With compensation, the sliced model with its o_proj / down_proj biases is the masked model whose
    removed channels' mean contribution W[:, removed] @ mean is added to those outputs (stock Llama with
    attention_bias and mlp_bias; the other projections' biases are zero)."""
    masked = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    keeps = random_keeps(masked, "query_heads", seed=3)
    shapes = [layer_shape(layer) for layer in decoder_layers(masked)]
    generator = torch.Generator().manual_seed(4)
    means = {
        index: {
            "self_attn.o_proj": torch.randn(shapes[index].num_heads * TINY.head_dim, generator=generator),
            "mlp.down_proj": torch.randn(shapes[index].intermediate, generator=generator),
        }
        for index in keeps
    }
    state = {name: t.clone() for name, t in masked.state_dict().items()}  # masking below is in place
    output = output_config(masked.config.to_dict(), kept_sizes(shapes, keeps), TINY.head_dim, biases=True)
    pruned = build_on_meta(output)
    for index, keep in keeps.items():
        prefix = f"model.layers.{index}."
        layer_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        compensated = compensate_layer_state(layer_state, keep, TINY.head_dim, means[index])
        state.update({prefix + k: v for k, v in slice_layer_state(compensated, keep, TINY.head_dim).items()})
        layer = decoder_layers(masked)[index]
        mask_layer_(layer, keep)
        for module in COLUMN_MODULES:  # the masked model's plus the bias, computed independently here
            linear = layer.get_submodule(module)
            dropped = torch.ones(linear.in_features, dtype=torch.bool)
            dropped[kept_lines(module, keep, TINY.head_dim)] = False
            original = layer_state[f"{module}.weight"]
            bias = (original * dropped.float()[None, :]) @ means[index][module]
            linear.bias = torch.nn.Parameter(bias)
    absent = [name for name, _ in pruned.named_parameters() if name.endswith("bias") and name not in state]
    pruned.load_state_dict(
        state | {name: torch.zeros(pruned.get_parameter(name).shape) for name in absent}, assign=True, strict=False
    )
    pruned.tie_weights()
    rebuild_unsaved_buffers(pruned.eval(), family_of(pruned.config), "cpu")
    assert output["attention_bias"] and output["mlp_bias"]
    tokens = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=tokens).logits, masked(input_ids=tokens).logits, atol=1e-5, rtol=0)


def test_recovery_windows_use_every_window_once_per_epoch():
    from dist_prune.data import recovery_windows

    tokens = torch.arange(100)
    windows = recovery_windows(tokens, 25, 8, seed=0)  # 12 windows of 8 tokens: two epochs and one more
    assert windows.shape == (25, 8)
    starts = windows[:, 0].tolist()
    assert all(int(w[0]) % 8 == 0 and torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 8)) for w in windows)
    assert sorted(starts[:12]) == sorted(starts[12:24]) == list(range(0, 96, 8))  # each window once per epoch
    assert starts[:12] != starts[12:24]  # a new order each epoch
    assert torch.equal(recovery_windows(tokens, 25, 8, seed=0), windows)
    assert not torch.equal(recovery_windows(tokens, 25, 8, seed=1), windows)


def test_adapter_merge_is_exact():
    torch.manual_seed(0)
    adapter = LowRankAdapter(torch.nn.Linear(6, 5, bias=False), rank=2)
    torch.nn.init.normal_(adapter.B)
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = adapter(x)
        merged = adapter.merged()
        torch.testing.assert_close(merged(x), expected)
    assert isinstance(merged, torch.nn.Linear)


def test_recovery_alternates_groups_and_leaves_plain_linears(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(0))
    workers = Workers(rank=0, world_size=1, device=torch.device("cpu"), mesh=None)  # a plain model: no mesh
    losses = recover(model, windows, layers=[1], steps=1, rank=2, lr=1e-2, batch_size=2, workers=workers)
    after = model.state_dict()
    assert len(losses) == 1 and set(after) == set(before)  # merged: no adapter parameters remain
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # step 0 trains the attention group of layer 1 only
    assert changed == {f"model.layers.1.{m}.weight" for m in MODULES[ATTENTION]}


def test_output_config_is_stock_only_when_every_layer_is_alike():
    source = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    alike = [{"num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 100}] * 2
    stock = output_config(source, alike, head_dim=16)
    assert "auto_map" not in stock and stock["intermediate_size"] == 100 and stock["head_dim"] == 16
    mixed = output_config(source, [alike[0], dict(alike[0], intermediate_size=90)], head_dim=16)
    assert mixed["auto_map"] and mixed["layer_sizes"][1]["intermediate_size"] == 90
    assert mixed["num_attention_heads"] == 4  # global sizes stay the unpruned, valid ones
    # hidden_size % heads fails LlamaConfig's check: bundled even when uniform
    odd = [{"num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 100}] * 2
    assert "auto_map" in output_config(source, odd, head_dim=16)


# --- end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("saap") / "tiny-4", layers=4)


def run_saap(model: Path, out: Path, text_file: Path, *extra: str, method: str = "saap") -> dict:
    argv = [
        "--quiet",
        "prune",
        "--method",
        method,
        "--model",
        str(model),
        "--out",
        str(out),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--calib-source",
        str(text_file),
        "--eval-text",
        str(text_file),
        "--eval-windows",
        "2",
        "--eval-seqlen",
        "64",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "prune_report.json").read_text())


def stored_keys(out: Path) -> set[str]:
    return set(json.loads((out / INDEX_FILE).read_text())["weight_map"])


def test_cli_adaptive_with_recovery_writes_a_smaller_bundled_checkpoint(small_model, text_file, tmp_path):
    out = tmp_path / "adaptive"
    report = run_saap(
        small_model,
        out,
        text_file,
        "--ratio",
        "0.2",
        "--protect-first",
        "1",
        "--protect-last",
        "1",
        "--recover-steps",
        "2",
        "--recover-eval-every",
        "1",
        "--no-bias-compensation",  # the parameter target is exact without the added biases (tested with flap)
    )
    p = report["parameters"]
    assert p["decoder_layers_after"] < p["decoder_layers_before"] and p["model_after"] < p["model_before"]
    # the target is met to within one MLP channel (a gate row, an up row and a down column)
    assert abs(p["removed"] - p["target_removed"]) <= 3 * TINY.hidden
    assert report["total_sparsity"] == pytest.approx(0.2, abs=0.01)
    assert [s["protected"] for s in report["structure"]] == [True, False, False, True]
    for entry in report["structure"]:
        assert entry["heads_kept"] % entry["kv_heads_kept"] == 0
    assert set(report["perplexity"]) >= {"dense", "before_recovery", "pruned"}
    assert len(report["recovery"]["losses"]) == 2
    curve = report["recovery"]["curve"]  # step 0 is the pruned model; batches of 4 windows of 32 tokens
    assert [(point["step"], point["tokens"]) for point in curve] == [(0, 0), (1, 128), (2, 256)]
    assert curve[0]["perplexity"] == report["perplexity"]["before_recovery"]
    assert curve[-1]["perplexity"] == pytest.approx(report["perplexity"]["pruned"], rel=1e-4)  # merged = attached
    assert report["checkpoint_form"].startswith("bundled")
    assert (out / "modeling_pruned_llama.py").is_file() and (out / "report.md").is_file()
    assert not any(k.endswith((".A", ".B")) or ".base." in k for k in stored_keys(out))  # adapters merged
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    sizes = json.loads((out / "config.json").read_text())["layer_sizes"]
    assert [layer_shape(layer).intermediate for layer in decoder_layers(loaded)] == [
        size["intermediate_size"] for size in sizes
    ]
    with pytest.raises(RuntimeError):  # without the bundled code transformers refuses the shapes
        AutoModelForCausalLM.from_pretrained(out)
    generated = loaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_cli_uniform_without_protection_is_stock_llama(small_model, text_file, tmp_path, capsys):
    out = tmp_path / "uniform"
    report = run_saap(
        small_model,
        out,
        text_file,
        "--ratio",
        "0.3",
        "--allocation",
        "uniform",
        "--protect-first",
        "0",
        "--protect-last",
        "0",
        "--importance",
        "element",
    )
    assert "of decoder-layer parameters" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["head_dim"] == 16
    assert len({(s["heads_kept"], s["channels_kept"]) for s in report["structure"]}) == 1
    assert report["total_sparsity"] == pytest.approx(0.3, abs=0.02)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.config.intermediate_size == report["structure"][0]["channels_kept"]


def test_saved_checkpoint_equals_the_in_memory_pruned_model(small_model, text_file, tmp_path):
    """The written weights reproduce the pipeline's own perplexity of the pruned model exactly."""
    from dist_prune.checkpoint import load_tokenizer
    from dist_prune.data import evaluation_windows, load_text, tokenize
    from dist_prune.metrics import perplexity

    out = tmp_path / "saved"
    report = run_saap(
        small_model,
        out,
        text_file,
        "--ratio",
        "0.25",
        "--importance",
        "vector",
        "--protect-first",
        "1",
        "--protect-last",
        "0",
    )
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    windows = evaluation_windows(tokenize(load_tokenizer(out), load_text(str(text_file), "evaluation")), 64, 2)
    assert perplexity(loaded, windows) == pytest.approx(report["perplexity"]["pruned"], rel=1e-6)
    # `dist-prune eval` runs the bundled code only when told to
    evaluate = ["eval", "--model", str(out), "--text", str(text_file), "--seqlen", "64", "--windows", "2", "--json"]
    assert main(evaluate) == 2
    assert main([*evaluate, "--trust-remote-code"]) == 0


def test_flap_writes_a_stock_llama_with_compensation_biases(small_model, text_file, tmp_path):
    """Uniform FLAP over every layer: stock LlamaForCausalLM with attention_bias and mlp_bias, loaded without
    trust_remote_code, reproducing the pipeline's perplexity; only o_proj and down_proj biases are non-zero."""
    from safetensors import safe_open

    from dist_prune.checkpoint import load_tokenizer
    from dist_prune.data import evaluation_windows, load_text, tokenize
    from dist_prune.metrics import perplexity

    out = tmp_path / "flap"
    flags = ("--ratio", "0.3", "--allocation", "uniform", "--protect-first", "0", "--protect-last", "0")
    report = run_saap(small_model, out, text_file, *flags, method="flap")
    assert (report["method"], report["importance"], report["bias_compensation"]) == ("flap", "fluctuation", True)
    assert report["total_sparsity"] == pytest.approx(0.3, abs=0.02)
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"] and "auto_map" not in config
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    windows = evaluation_windows(tokenize(load_tokenizer(out), load_text(str(text_file), "evaluation")), 64, 2)
    assert perplexity(loaded, windows) == pytest.approx(report["perplexity"]["pruned"], rel=1e-6)
    index = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    biases = 0
    for name, file in index.items():
        if name.endswith(".bias"):
            with safe_open(out / file, framework="pt") as f:
                bias = f.get_tensor(name)
            biases += bias.numel()
            assert bool(bias.abs().sum() > 0) == name.endswith(("o_proj.bias", "down_proj.bias")), name
    p = report["parameters"]  # the weights removed meet the target (uniform: to a channel per layer)
    assert abs(p["removed"] + biases - p["target_removed"]) <= 3 * TINY.hidden * len(report["structure"])


def test_protecting_every_layer_is_refused(small_model, text_file, tmp_path):
    code = main(
        [
            "--quiet",
            "prune",
            "--method",
            "saap",
            "--model",
            str(small_model),
            "--out",
            str(tmp_path / "x"),
            "--protect-first",
            "3",
            "--protect-last",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert code == 2 and not (tmp_path / "x").exists()
