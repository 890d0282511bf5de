"""`dist-prune prune / grad / eval` in-process on a tiny random LLaMA, checked against independent references."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_llama
from reference import gradient_pass
from safetensors import safe_open
from safetensors.torch import load_file

from dist_prune.checkpoint import INDEX_FILE, load_tokenizer
from dist_prune.cli import main
from dist_prune.data import load_text, sample_windows, tokenize
from dist_prune.methods.gblm import gblm_score
from dist_prune.methods.magnitude import magnitude_score
from dist_prune.methods.sparsegpt import sparsegpt_prune
from dist_prune.methods.stats import InputStatistics
from dist_prune.methods.wanda import wanda_score

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
NSAMPLES, SEQLEN = 4, 32

# name -> extra flags
VARIANTS = {
    "magnitude-row": ["--method", "magnitude", "--magnitude-scope", "row"],
    "magnitude-matrix": ["--method", "magnitude"],
    "magnitude-2:4": ["--method", "magnitude", "--pattern", "2:4"],
    "wanda": ["--method", "wanda"],
    "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt": ["--method", "sparsegpt"],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "gblm": ["--method", "gblm"],
    "gblm-2:4": ["--method", "gblm", "--pattern", "2:4"],
}
PER_ROW = {"magnitude-row", "wanda", "gblm"}


def common_args(model: Path, out: Path, text_file: Path) -> list[str]:
    return [
        "--model",
        str(model),
        "--out",
        str(out),
        "--nsamples",
        str(NSAMPLES),
        "--seqlen",
        str(SEQLEN),
        "--calib-source",
        str(text_file),
        "--no-eval-after",
        "--device",
        "cpu",
    ]


def partial_siblings(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def load_weights(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / INDEX_FILE).read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out / file))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def masks(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t == 0 for name, t in weights.items() if name.split(".")[-2] in {n.split(".")[1] for n in LINEARS}}


def load_hf(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def dense(tiny_llama):
    return load_hf(tiny_llama, dtype=torch.float32)


@pytest.fixture(scope="module")
def run(tiny_llama, text_file, workdir):
    """Runs each variant once (cached): returns (exit code, output dir, argv)."""
    done = {}

    def go(name: str):
        if name not in done:
            out = workdir / name.replace(":", "_")
            argv = ["--quiet", "prune", *common_args(tiny_llama, out, text_file), *VARIANTS[name]]
            done[name] = (main(argv), out, argv)
        return done[name]

    return go


def test_dense_tiny_model_has_no_zeros(dense):
    # otherwise counting zeros would not count pruned weights
    for layer in dense.model.layers:
        for name in LINEARS:
            assert (layer.get_submodule(name).weight != 0).all()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_sparsity_pattern_of_every_decoder_linear(name, run, dense):
    _, out, _ = run(name)
    weights = load_weights(out)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["total_sparsity"] == pytest.approx(0.5)
    for i in range(dense.config.num_hidden_layers):
        for linear in LINEARS:
            W = weights[f"model.layers.{i}.{linear}.weight"]
            rows, cols = W.shape
            zeros = W == 0
            if name.endswith("2:4"):
                assert (zeros.view(rows, cols // 4, 4).sum(dim=2) == 2).all(), linear
            elif name in PER_ROW:
                assert (zeros.sum(dim=1) == int(cols * 0.5)).all(), linear
            else:  # magnitude-matrix, and sparsegpt (whole matrix fits one 128-column block here)
                assert int(zeros.sum()) == int(W.numel() * 0.5), linear
    # everything outside the decoder Linears is untouched
    dense_state = dense.state_dict()
    for key, value in weights.items():
        if not any(f".{linear}." in key for linear in LINEARS):
            assert torch.equal(value, dense_state[key]), key


def _layer_input_statistics(model, windows, index, with_hessian):
    """Hook every Linear of decoder layer `index` during one full forward: its own statistics each."""
    stats, handles = {}, []
    layer = model.model.layers[index]
    for name in LINEARS:
        linear = layer.get_submodule(name)
        stats[name] = InputStatistics(linear.in_features, with_hessian)
        handles.append(linear.register_forward_hook(lambda _m, args, _o, s=stats[name]: s.update(args[0])))
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def _stable_lowest_per_row(scores, ratio):
    k = int(scores.shape[1] * ratio)
    idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def _stable_lowest_in_matrix(scores, ratio):
    k = int(scores.numel() * ratio)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.sort(scores.flatten(), stable=True).indices[:k]] = True
    return mask.view_as(scores)


def _stable_n_m(scores, n, m):
    rows, cols = scores.shape
    g = scores.view(rows, cols // m, m)
    idx = torch.sort(g, dim=2, stable=True).indices[:, :, : m - n]
    return torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True).view(rows, cols)


def reference_weights(name, out, tiny_llama, dense) -> dict[str, torch.Tensor]:
    """Each decoder Linear's expected weight, rebuilt without the pipeline: statistics from a full forward of a
    model whose earlier layers are the pruned ones (as written) and whose current layer is still dense, then the
    method's formula on the dense weight."""
    method = VARIANTS[name][1]
    nm = (2, 4) if name.endswith("2:4") else None
    windows = None
    if method != "magnitude":
        windows = load_file(out / "calibration.safetensors")["input_ids"]
        assert windows.shape == (NSAMPLES, SEQLEN)
    G = None
    if method == "gblm":
        G = gradient_pass(load_hf(tiny_llama, dtype=torch.float32), windows, 100.0, "l2")
    probe = load_hf(out, dtype=torch.float32)  # earlier layers pruned
    dense_state = dense.state_dict()
    expected = {}
    for i in range(dense.config.num_hidden_layers):
        layer = probe.model.layers[i]
        pruned_layer_state = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.load_state_dict({k: dense_state[f"model.layers.{i}.{k}"] for k in pruned_layer_state})
        stats = _layer_input_statistics(probe, windows, i, method == "sparsegpt") if windows is not None else None
        for linear in LINEARS:
            key = f"model.layers.{i}.{linear}.weight"
            W = dense_state[key]
            if method == "sparsegpt":
                expected[key] = sparsegpt_prune(W, stats[linear].hessian(), 0.5, nm, 128, 0.01).weight
                continue
            if method == "magnitude":
                scores = magnitude_score(W)
            elif method == "wanda":
                scores = wanda_score(W, stats[linear].scaler_row())
            else:
                scores = gblm_score(W, stats[linear].scaler_row(), G[key].sqrt())
            if nm is not None:
                mask = _stable_n_m(scores, *nm)
            elif name == "magnitude-matrix":
                mask = _stable_lowest_in_matrix(scores, 0.5)
            else:
                mask = _stable_lowest_per_row(scores, 0.5)
            expected[key] = W.masked_fill(mask, 0.0)
        layer.load_state_dict(pruned_layer_state)
    return expected


@pytest.fixture(scope="module")
def reference(run, tiny_llama, dense):
    done = {}

    def get(name):
        if name not in done:
            done[name] = reference_weights(name, run(name)[1], tiny_llama, dense)
        return done[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_layer_sequential_reference(name, run, reference):
    got = load_weights(run(name)[1])
    expected = reference(name)
    assert len(expected) == 7 * 2
    for key, W in expected.items():
        assert torch.equal(got[key] == 0, W == 0), key
        if name.startswith("sparsegpt"):
            assert torch.allclose(got[key], W, rtol=1e-3, atol=1e-5), key
        else:
            assert torch.equal(got[key], W), key


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prune_writes_a_loadable_checkpoint_equal_to_the_in_memory_model(name, run, reference, dense):
    """The output loads with transformers and computes what the reference model built in memory computes."""
    code, out, _ = run(name)
    assert code == 0
    assert out.is_dir() and not partial_siblings(out)
    for required in ("config.json", INDEX_FILE, "prune_report.json", "prune_config.yaml", "tokenizer.json"):
        assert (out / required).is_file(), required
    loaded = load_hf(out)
    assert loaded.dtype == torch.float32
    # loading both ways (transformers, raw safetensors) gives the same tensors
    raw = load_weights(out)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, raw[key] if key in raw else raw["model.embed_tokens.weight"]), key
    in_memory = copy.deepcopy(dense)
    in_memory.load_state_dict(reference(name), strict=False)
    tokens = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = in_memory(input_ids=tokens).logits
        got = loaded(input_ids=tokens).logits
        dense_logits = dense(input_ids=tokens).logits
    if name.startswith("sparsegpt"):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(got, expected)
    assert not torch.allclose(got, dense_logits, rtol=1e-3)  # pruning changed the model


def test_calibration_file_holds_the_windows_used(run, text_file):
    _, out, _ = run("wanda")
    saved = load_file(out / "calibration.safetensors")
    assert list(saved) == ["input_ids"]
    tokenizer = load_tokenizer(out)
    expected = sample_windows(tokenize(tokenizer, load_text(str(text_file), "calibration")), NSAMPLES, SEQLEN, 0)
    assert torch.equal(saved["input_ids"], expected)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["calibration"] == {"sequences": NSAMPLES, "seqlen": SEQLEN}


def test_magnitude_writes_no_calibration_file(run):
    _, out, _ = run("magnitude-row")
    assert not (out / "calibration.safetensors").exists()


@pytest.mark.parametrize("name", ["wanda", "sparsegpt-2:4"])
def test_calib_tokens_reproduce_the_masks(name, run, tiny_llama, workdir, tmp_path):
    _, out, _ = run(name)
    again = workdir / f"again-{name.replace(':', '_')}"
    # a text source that cannot work: only the token file may be used
    bogus = tmp_path / "tiny.txt"
    bogus.write_text("too short")
    argv = ["--quiet", "prune", *common_args(tiny_llama, again, bogus), *VARIANTS[name]]
    argv += ["--calib-tokens", str(out / "calibration.safetensors")]
    assert main(argv) == 0
    first, second = load_weights(out), load_weights(again)
    assert set(first) == set(second)
    for key in masks(first):
        assert torch.equal(first[key] == 0, second[key] == 0), key
        assert torch.equal(first[key], second[key]), key


def test_different_seed_gives_different_windows_and_masks(run, tiny_llama, text_file, workdir):
    _, out, _ = run("wanda")
    other = workdir / "wanda-seed1"
    assert (
        main(["--quiet", "prune", *common_args(tiny_llama, other, text_file), *VARIANTS["wanda"], "--seed", "1"]) == 0
    )
    a = load_file(out / "calibration.safetensors")["input_ids"]
    b = load_file(other / "calibration.safetensors")["input_ids"]
    assert not torch.equal(a, b)
    wa, wb = load_weights(out), load_weights(other)
    assert any(not torch.equal(wa[k] == 0, wb[k] == 0) for k in masks(wa))


@pytest.fixture(scope="module")
def grad_file(tiny_llama, text_file, workdir) -> Path:
    """`dist-prune grad` once, on the same calibration windows as the prune runs."""
    path = workdir / "grads.safetensors"
    assert main(["--quiet", "grad", *common_args(tiny_llama, path, text_file)]) == 0
    assert path.is_file()
    return path


def test_grad_writes_gradient_sums(grad_file, tiny_llama, text_file, dense):
    with safe_open(grad_file, framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert meta["norm"] == "l2" and float(meta["scale"]) == 100.0
    assert int(meta["nsamples"]) == NSAMPLES and int(meta["seqlen"]) == SEQLEN
    expected = {f"model.layers.{i}.{n}.weight" for i in range(dense.config.num_hidden_layers) for n in LINEARS}
    assert names == expected
    # the grad command refuses to overwrite its file
    assert main(["--quiet", "grad", *common_args(tiny_llama, grad_file, text_file)]) == 2


@pytest.mark.parametrize("name", ["gblm", "gblm-2:4"])
def test_prune_with_gradients_file_equals_gblm_computing_them(name, grad_file, run, tiny_llama, text_file, workdir):
    _, out, _ = run(name)
    reused = workdir / f"reused-{name.replace(':', '_')}"
    argv = ["--quiet", "prune", *common_args(tiny_llama, reused, text_file), *VARIANTS[name]]
    assert main([*argv, "--gradients", str(grad_file)]) == 0
    first, second = load_weights(out), load_weights(reused)
    for key in masks(first):
        assert torch.equal(first[key] == 0, second[key] == 0), key
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("flags", [["--gblm-scale", "10"], ["--gblm-norm", "l1"]])
def test_gradients_file_with_other_scale_or_norm_is_refused(flags, grad_file, tiny_llama, text_file, workdir, capsys):
    out = workdir / "wrong-scale"
    capsys.readouterr()
    argv = ["--quiet", "prune", *common_args(tiny_llama, out, text_file), "--method", "gblm"]
    assert main([*argv, "--gradients", str(grad_file), *flags]) == 2
    assert "scale" in capsys.readouterr().err
    assert not out.exists() and not partial_siblings(out)


def test_gradients_file_from_other_nsamples_is_refused(grad_file, tiny_llama, text_file, workdir, capsys):
    out = workdir / "n8-with-n4-grads"
    argv = ["--quiet", "prune", *common_args(tiny_llama, out, text_file), "--method", "gblm", "--nsamples", "8"]
    capsys.readouterr()
    code = main([*argv, "--gradients", str(grad_file)])
    assert code == 2
    assert "nsamples" in capsys.readouterr().err
    assert not out.exists()


def test_bfloat16_checkpoint_stays_bfloat16(tmp_path, text_file):
    source = write_tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16, layers=1)
    out = tmp_path / "bf16-pruned"
    assert (
        main(["--quiet", "prune", *common_args(source, out, text_file), "--method", "wanda", "--pattern", "2:4"]) == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype") == "bfloat16" or config.get("torch_dtype") == "bfloat16"
    weights = load_weights(out)
    assert weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    for key, W in masks(weights).items():
        rows, cols = W.shape
        assert (W.view(rows, cols // 4, 4).sum(dim=2) == 2).all(), key
    model = load_hf(out)
    assert model.dtype == torch.bfloat16
    source_state = load_hf(source).state_dict()
    for key, value in model.state_dict().items():
        if not any(f".{linear}." in key for linear in LINEARS):
            assert torch.equal(value, source_state[key]), key


def test_eval_command_prints_json(run, capsys):
    _, out, _ = run("wanda-2:4")
    capsys.readouterr()
    assert (
        main(["--quiet", "eval", "--model", str(out), "--json", "--seqlen", "32", "--windows", "2", "--device", "cpu"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
    assert result["windows"] == 2 and result["seqlen"] == 32


def test_eval_after_reports_perplexities(tiny_llama, text_file, tmp_path):
    out = tmp_path / "with-eval"
    argv = [a for a in common_args(tiny_llama, out, text_file) if a != "--no-eval-after"]
    assert main(["--quiet", "prune", *argv, "--method", "magnitude", "--eval-seqlen", "32", "--eval-windows", "1"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    ppl = report["perplexity"]
    assert ppl["windows"] == 1 and ppl["seqlen"] == 32
    assert math.isfinite(ppl["dense"]) and math.isfinite(ppl["pruned"]) and ppl["dense"] != ppl["pruned"]
    assert not partial_siblings(out)


def test_overwrite_replaces_a_complete_output(tiny_llama, text_file, tmp_path):
    out = tmp_path / "replaced"
    argv = ["--quiet", "prune", *common_args(tiny_llama, out, text_file), "--method", "magnitude", "--pattern", "2:4"]
    assert main(argv) == 0
    before = load_weights(out)
    assert main([*argv, "--overwrite", "--pattern", "4:8"]) == 0
    after = load_weights(out)
    assert not partial_siblings(out)
    assert [p.name for p in tmp_path.iterdir()] == ["replaced"]  # no old copy left aside either
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(before[key], after[key])
    rows, cols = after[key].shape
    assert ((after[key] == 0).view(rows, cols // 8, 8).sum(dim=2) == 4).all()


def test_untied_lm_head_is_written_and_unchanged(tmp_path, text_file):
    source = write_tiny_llama(tmp_path / "untied", layers=1, tie_word_embeddings=False)
    out = tmp_path / "untied-pruned"
    assert main(["--quiet", "prune", *common_args(source, out, text_file), "--method", "magnitude"]) == 0
    weights = load_weights(out)
    source_state = load_hf(source, dtype=torch.float32).state_dict()
    assert torch.equal(weights["lm_head.weight"], source_state["lm_head.weight"])
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert torch.equal(load_hf(out).lm_head.weight, source_state["lm_head.weight"])


def test_batch_size_does_not_change_the_result(run, tiny_llama, text_file, workdir):
    """Statistics are exact sums: uneven batches (3 + 1 sequences) give the same masks as one batch of 4."""
    _, out, _ = run("wanda")
    other = workdir / "wanda-batch3"
    assert (
        main(["--quiet", "prune", *common_args(tiny_llama, other, text_file), *VARIANTS["wanda"], "--batch-size", "3"])
        == 0
    )
    first, second = load_weights(out), load_weights(other)
    for key in masks(first):
        assert torch.equal(first[key], second[key]), key
