"""GBLM's gradient pass against a plain per-sequence loop, and the saved-gradients file."""

import pytest
import torch
from reference import decoder_linear_weights, gradient_pass
from safetensors.torch import save_file

from dist_prune.config import ConfigError
from dist_prune.gradients import (
    check_gradient_file_shapes,
    check_gradient_sums,
    load_gradient_sums,
    save_gradient_sums,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(0))


def reference_sums(model, windows, scale, norm):
    """For each sequence alone: zero grads, forward with labels, backward, accumulate (s g)^2 or |s g|."""
    params = dict(model.named_parameters())
    names = [n for n in params if n.startswith("model.layers.") and n.split(".")[-2] in LINEARS]
    acc = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    for sequence in windows:
        model.zero_grad(set_to_none=True)
        tokens = sequence[None, :]
        model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
        for n in names:
            g = params[n].grad.float() * scale
            acc[n] += g.square() if norm == "l2" else g.abs()
    model.zero_grad(set_to_none=True)
    return acc


def assert_sums_close(got, ref, rtol=1e-6):
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].dtype == torch.float32
        assert torch.allclose(got[name], ref[name], rtol=rtol, atol=rtol * ref[name].abs().max().item()), name


def test_covers_exactly_the_decoder_linears(model):
    names = set(decoder_linear_weights(model))
    layers = model.config.num_hidden_layers
    expected = {
        f"model.layers.{i}.{'self_attn' if p in LINEARS[:4] else 'mlp'}.{p}.weight"
        for i in range(layers)
        for p in LINEARS
    }
    assert names == expected  # no lm_head, no embeddings, no norms


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_gradient_pass_equals_per_sequence_loop(model, windows, norm):
    ref = reference_sums(model, windows, 100.0, norm)
    got = gradient_pass(model, windows, 100.0, norm)
    assert_sums_close(got, ref)
    assert all(ref[n].abs().sum() > 0 for n in ref)  # real gradients, not zeros


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_activation_checkpointing_changes_nothing(model, windows, norm):
    ref = reference_sums(model, windows, 100.0, norm)
    got = gradient_pass(model, windows, 100.0, norm, checkpointing=True)
    assert_sums_close(got, ref, rtol=1e-5)
    assert not model.training  # back in eval mode afterwards


def test_gradient_pass_scale_enters_before_the_square(model, windows):
    a = gradient_pass(model, windows[:2], 100.0, "l2")
    b = gradient_pass(model, windows[:2], 10.0, "l2")
    for name in a:
        assert torch.allclose(a[name], b[name] * 100.0, rtol=1e-5, atol=0)


def test_batched_mean_loss_is_not_the_same(model, windows):
    """The trap the per-sample loop avoids: square of the batch-mean gradient != sum of per-sample squares."""
    got = gradient_pass(model, windows, 100.0, "l2")
    model.zero_grad(set_to_none=True)
    model(input_ids=windows, labels=windows, use_cache=False).loss.backward()
    params = dict(model.named_parameters())
    wrong = {n: (params[n].grad.float() * 100.0).square() for n in got}
    model.zero_grad(set_to_none=True)
    for name in got:
        assert not torch.allclose(got[name], wrong[name], rtol=1e-2, atol=0), name
    # nor the all-reduced (summed) gradient squared
    summed = {n: wrong[n] * windows.shape[0] ** 2 for n in wrong}
    assert not any(torch.allclose(got[n], summed[n], rtol=1e-2, atol=0) for n in got)


def test_gradient_pass_leaves_the_model_as_it_was(model, windows):
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    gradient_pass(model, windows[:1], 100.0, "l2")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_progress_callback_once_per_sequence(model, windows):
    calls = []
    gradient_pass(model, windows[:3], 100.0, "l1", progress=lambda: calls.append(1))
    assert len(calls) == 3


@pytest.fixture(scope="module")
def sums(model, windows):
    return gradient_pass(model, windows[:2], 100.0, "l2")


def test_save_load_round_trip(tmp_path, sums, model):
    path = tmp_path / "gradients.safetensors"
    save_gradient_sums(path, sums, 100.0, "l2", 2, 16)
    assert path.is_file()
    assert not list(tmp_path.glob("*.partial"))
    loaded = load_gradient_sums(path, 100.0, "l2", 2, 16)
    assert set(loaded) == set(sums)
    assert all(torch.equal(loaded[n], sums[n]) for n in sums)
    check_gradient_file_shapes(path, model.config.to_dict())  # matches the model's config.json: no error


@pytest.mark.parametrize("scale,norm", [(100.0, "l1"), (10.0, "l2"), (100.5, "l2"), (1.0, "l1")])
def test_load_with_another_scale_or_norm_is_refused(tmp_path, sums, scale, norm):
    path = tmp_path / "gradients.safetensors"
    save_gradient_sums(path, sums, 100.0, "l2", 2, 16)
    with pytest.raises(ConfigError, match="scale"):
        load_gradient_sums(path, scale, norm, 2, 16)


def test_load_refuses_missing_and_foreign_files(tmp_path, sums):
    with pytest.raises(ConfigError, match="does not exist"):
        load_gradient_sums(tmp_path / "missing.safetensors", 100.0, "l2", 2, 16)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(ConfigError, match="not a gradients file"):
        load_gradient_sums(foreign, 100.0, "l2", 2, 16)


def test_check_gradient_sums_rejects_mismatch(sums, model):
    expected = {name: tuple(p.shape) for name, p in decoder_linear_weights(model).items()}
    missing = dict(sums)
    missing.pop(next(iter(missing)))
    with pytest.raises(ConfigError, match="do not match"):
        check_gradient_sums({n: t.shape for n, t in missing.items()}, expected)
    misshapen = dict(sums)
    name = next(iter(misshapen))
    misshapen[name] = misshapen[name][:, :-1]
    with pytest.raises(ConfigError, match="do not match"):
        check_gradient_sums({n: t.shape for n, t in misshapen.items()}, expected)


@pytest.mark.parametrize("nsamples,seqlen", [(4, 16), (2, 32)])
def test_load_with_another_calibration_size_is_refused(tmp_path, sums, nsamples, seqlen):
    path = tmp_path / "gradients.safetensors"
    save_gradient_sums(path, sums, 100.0, "l2", 2, 16)
    with pytest.raises(ConfigError, match="nsamples=2 x seqlen=16"):
        load_gradient_sums(path, 100.0, "l2", nsamples, seqlen)


def test_the_file_is_written_layer_by_layer_in_any_order(tmp_path, sums):
    """The grad command writes each layer's sums when the pass finishes it, top layer first; the file is an
    ordinary safetensors file, and it appears only once every tensor is in place."""
    from safetensors import safe_open

    from dist_prune.checkpoint import check_safetensors_file
    from dist_prune.gradients import GradientSumsWriter

    path = tmp_path / "g.safetensors"
    names = sorted(sums)
    with GradientSumsWriter(path, {n: list(sums[n].shape) for n in names}, 100.0, "l2", 2, 16) as writer:
        for name in reversed(names):
            assert not path.exists()
            writer.write({name: sums[name].double()})  # the pass's fp64 sums are stored as fp32
    check_safetensors_file(path)
    with safe_open(path, framework="pt") as f:
        assert all(torch.equal(f.get_tensor(n), sums[n].float()) for n in names)
    assert load_gradient_sums(path, 100.0, "l2", 2, 16).keys() == sums.keys()


def test_an_unfinished_file_is_never_left_behind(tmp_path, sums):
    from dist_prune.gradients import GradientSumsWriter

    path = tmp_path / "g.safetensors"
    name = sorted(sums)[0]
    with pytest.raises(ValueError, match="unwritten"):
        with GradientSumsWriter(path, {n: list(t.shape) for n, t in sums.items()}, 100.0, "l2", 2, 16) as writer:
            writer.write({name: sums[name]})
    assert list(tmp_path.iterdir()) == []
