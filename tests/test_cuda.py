"""The CUDA tier (`pytest -m cuda`; skipped without a GPU, so never in CI's way): every method, pattern and
residency on a tiny model on the GPU, against the same run on the CPU.

With an fp32 checkpoint both devices compute in fp32 (TF32 stays off), so they differ only in the rounding of
their matrix products (cuBLAS and MKL sum in other orders) and of their factorisations (cuSOLVER, LAPACK):
- magnitude reads no activations and Wanda's activation norms are sums of squares that agree to ~1e-7: their
  masks must be identical;
- SparseGPT's masks follow its running OBS updates and GBLM's its per-sample gradient sums; a last-bit
  difference can flip a weight whose score sits at the threshold, so they must agree on >= 99% of the mask
  entries (the flips are near-ties), with perplexities within 1%.
Where weights live (stream, resident) must not change anything on one device: identical outputs.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_llama
from safetensors.torch import load_file

from dist_prune.cli import main

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

METHODS = ("magnitude", "wanda", "sparsegpt", "gblm")
PATTERNS = {"50%": (), "2:4": ("--pattern", "2:4")}
EXACT_ON_BOTH_DEVICES = ("magnitude", "wanda")
MASK_AGREEMENT = 0.99
PERPLEXITY_RTOL = 0.01
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


@pytest.fixture(scope="module")
def fp32_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("cuda") / "fp32", layers=3, **SHAPE)


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("cuda") / "bf16", layers=3, dtype=torch.bfloat16, **SHAPE)


def prune_args(model: Path, out: Path, text: Path, device: str, method: str, *extra: str) -> list[str]:
    return [
        "--quiet", "prune", "--model", str(model), "--out", str(out), "--method", method, "--nsamples", "8",
        "--seqlen", "64", "--batch-size", "4", "--calib-source", str(text), "--eval-text", str(text),
        "--eval-seqlen", "64", "--eval-windows", "4", "--device", device, "--overwrite", *extra,
    ]  # fmt: skip


def masks(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in out.glob("model-layer-*.safetensors"):
        found.update({name: t == 0 for name, t in load_file(file).items() if name.endswith("proj.weight")})
    return found


def weights(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in out.glob("*.safetensors"):
        found.update(load_file(file))
    return found


def agreement(a: Path, b: Path) -> float:
    first, second = masks(a), masks(b)
    assert first.keys() == second.keys()
    same = sum(int((first[n] == second[n]).sum()) for n in first)
    return same / sum(t.numel() for t in first.values())


def report(out: Path) -> dict:
    return json.loads((out / "prune_report.json").read_text())


@pytest.fixture(scope="module")
def runs(fp32_llama, text_file, tmp_path_factory) -> dict:
    """Every method and pattern on the CPU (stream) and on CUDA (stream and resident)."""
    root = tmp_path_factory.mktemp("runs")
    outputs = {}
    for method in METHODS:
        for pattern, extra in PATTERNS.items():
            for device, residency in (("cpu", "stream"), ("cuda", "stream"), ("cuda", "resident")):
                out = root / f"{method}-{pattern.replace(':', 'of').replace('%', '')}-{device}-{residency}"
                args = prune_args(fp32_llama, out, text_file, device, method, "--residency", residency, *extra)
                assert main(args) == 0, (method, pattern, device, residency)
                outputs[(method, pattern, device, residency)] = out
    return outputs


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
def test_cuda_agrees_with_the_cpu_in_fp32(runs, method, pattern):
    cpu, cuda = runs[(method, pattern, "cpu", "stream")], runs[(method, pattern, "cuda", "stream")]
    share = agreement(cpu, cuda)
    if method in EXACT_ON_BOTH_DEVICES:
        assert share == 1.0
    else:
        assert share >= MASK_AGREEMENT
    assert report(cuda)["total_sparsity"] == pytest.approx(report(cpu)["total_sparsity"], abs=1e-9)
    for which in ("dense", "pruned"):
        assert report(cuda)["perplexity"][which] == pytest.approx(report(cpu)["perplexity"][which], rel=PERPLEXITY_RTOL)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
def test_residency_changes_nothing_on_cuda(runs, method, pattern):
    stream, resident = (
        weights(runs[(method, pattern, "cuda", "stream")]),
        weights(runs[(method, pattern, "cuda", "resident")]),
    )
    assert stream.keys() == resident.keys()
    assert all(torch.equal(stream[name], resident[name]) for name in stream)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
def test_a_bf16_checkpoint_prunes_in_bf16_on_cuda(bf16_llama, text_file, tmp_path, method, pattern):
    """Half-precision compute (the tensor-core paths): the pattern holds, the output loads, perplexity is finite,
    and the report splits the layer loop's time by phase."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(prune_args(bf16_llama, out, text_file, "cuda", method, *PATTERNS[pattern])) == 0
    found = report(out)
    assert found["total_sparsity"] == pytest.approx(0.5)
    assert all(torch.isfinite(torch.tensor(list(found["perplexity"].values())[:2])))
    assert {"read", "h2d", "forward", "pruning", "d2h", "write", "hash"} <= found["layer_phases_s"].keys()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["linear", "block"])
def test_reconstruction_and_owl_on_cuda_agree_with_the_cpu(fp32_llama, bf16_llama, text_file, tmp_path, mode):
    """The fit's sums and CG on the GPU give the CPU's perplexity within 1% (fp32); in bf16 (the tensor-core
    sums, block mode's fitted Linears reading bf16 matrices) every Linear's output error goes down."""
    extra = ("--reconstruct", mode, "--sparsity", "0.625", "--sparsity-profile", "owl", "--owl-lambda", "0.1")
    outs = {device: tmp_path / device for device in ("cpu", "cuda")}
    for device, out in outs.items():
        assert main(prune_args(fp32_llama, out, text_file, device, "wanda", *extra)) == 0
    cpu, cuda = report(outs["cpu"]), report(outs["cuda"])
    assert cuda["sparsity_profile"]["layer_sparsity"] == cpu["sparsity_profile"]["layer_sparsity"]
    assert cuda["perplexity"]["pruned"] == pytest.approx(cpu["perplexity"]["pruned"], rel=PERPLEXITY_RTOL)
    half = tmp_path / "bf16"
    assert main(prune_args(bf16_llama, half, text_file, "cuda", "wanda", *extra)) == 0
    modules = [m for layer in report(half)["layers"] for m in layer["modules"].values()]
    assert all(m["reconstruction_error_after"] < m["reconstruction_error_before"] for m in modules)


def test_gblm_stores_layer_inputs_on_disk_or_in_memory_alike_on_cuda(fp32_llama, text_file, tmp_path):
    outs = {}
    for storage in ("memory", "disk"):
        outs[storage] = tmp_path / storage
        args = prune_args(fp32_llama, outs[storage], text_file, "cuda", "gblm", "--residency", "stream",
                          "--activation-storage", storage, "--scratch", str(tmp_path))  # fmt: skip
        assert main(args) == 0
    first, second = weights(outs["memory"]), weights(outs["disk"])
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_saved_gradients_give_the_inline_result_on_cuda(fp32_llama, text_file, tmp_path):
    """`dist-prune grad` on CUDA, then `prune --gradients FILE` on CUDA: the same as the inline pass."""
    sums = tmp_path / "sums.safetensors"
    grad = ["--quiet", "grad", "--model", str(fp32_llama), "--out", str(sums), "--nsamples", "8", "--seqlen", "64",
            "--calib-source", str(text_file), "--device", "cuda"]  # fmt: skip
    assert main(grad) == 0
    inline, from_file = tmp_path / "inline", tmp_path / "file"
    assert main(prune_args(fp32_llama, inline, text_file, "cuda", "gblm")) == 0
    assert main(prune_args(fp32_llama, from_file, text_file, "cuda", "gblm", "--gradients", str(sums))) == 0
    assert agreement(inline, from_file) >= MASK_AGREEMENT  # the file holds fp32 sums, the scratch fp32 too


def test_a_resumed_cuda_run_is_bit_identical(fp32_llama, text_file, tmp_path, monkeypatch):
    import dist_prune.job

    whole, out = tmp_path / "whole", tmp_path / "out"
    for method in ("sparsegpt", "gblm"):
        assert main(prune_args(fp32_llama, whole, text_file, "cuda", method)) == 0
        prune_layer = dist_prune.job._prune_layer

        def crash_at_layer_1(run, layer, index, *rest, prune_layer=prune_layer):
            if index == 1:
                raise RuntimeError("the machine went away")
            return prune_layer(run, layer, index, *rest)

        monkeypatch.setattr(dist_prune.job, "_prune_layer", crash_at_layer_1)
        with pytest.raises(RuntimeError, match="went away"):
            main(prune_args(fp32_llama, out, text_file, "cuda", method, "--scratch", str(tmp_path)))
        monkeypatch.setattr(dist_prune.job, "_prune_layer", prune_layer)
        args = prune_args(fp32_llama, out, text_file, "cuda", method, "--scratch", str(tmp_path), "--resume")
        assert main(args) == 0
        first, second = weights(whole), weights(out)
        assert all(torch.equal(first[name], second[name]) for name in first), method
        assert report(out)["resumed_layers"] == 1


@pytest.mark.parametrize("method", ["saap", "flap"])
def test_structured_pruning_with_recovery_on_cuda(fp32_llama, text_file, tmp_path, method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    extra = ("--ratio", "0.25", "--protect-first", "0", "--protect-last", "1", "--recover-steps", "2",
             "--recover-eval-every", "1", "--residency", "resident")  # fmt: skip
    assert main(prune_args(fp32_llama, out, text_file, "cuda", method, *extra)) == 0
    found = report(out)
    assert found["parameters"]["removed"] > 0
    assert len(found["recovery"]["curve"]) >= 2
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == found["parameters"]["model_after"]


def test_eval_on_cuda_equals_eval_on_the_cpu(fp32_llama, text_file, capsys):
    values = {}
    for device in ("cpu", "cuda"):
        assert main(["eval", "--model", str(fp32_llama), "--text", str(text_file), "--seqlen", "64", "--windows", "4",
                     "--device", device, "--json"]) == 0  # fmt: skip
        values[device] = json.loads(capsys.readouterr().out)["perplexity"]
    assert values["cuda"] == pytest.approx(values["cpu"], rel=1e-4)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize("width", [128, 96])
def test_the_obs_kernel_gives_the_torch_loops_bits(nm, width):
    """The Triton column loop against sparsegpt.obs_columns on the same GPU (96: the padded last block)."""
    from dist_prune.methods.masks import prune_lowest_in_matrix
    from dist_prune.methods.obs_kernel import obs_block
    from dist_prune.methods.sparsegpt import inverse_hessian_factor, obs_columns

    gen = torch.Generator(device="cuda").manual_seed(width)
    X = torch.randn(4 * width, width, device="cuda", generator=gen)
    Hinv, _ = inverse_hessian_factor(X.T @ X, 0.01)
    W = torch.randn(1000, width, device="cuda", generator=gen)
    d = Hinv.diagonal()
    mask = prune_lowest_in_matrix(W.square() / d.square(), 0.5) if nm is None else torch.zeros_like(W, dtype=torch.bool)
    w1, m1, w2, m2 = W.clone(), mask.clone(), W.clone(), mask.clone()
    e1 = obs_columns(w1, Hinv, m1, nm)
    e2 = obs_block(w2, Hinv.contiguous(), m2, nm)
    assert torch.equal(m1, m2) and torch.equal(w1, w2) and torch.equal(e1, e2)


def test_sparsegpt_on_cuda_matches_the_cpu_maths():
    from dist_prune.methods.sparsegpt import sparsegpt_prune

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 512, generator=gen) * (torch.rand(512, generator=gen) + 0.1)
    H, W = 2 / 8 * X.T @ X, torch.randn(700, 512, generator=gen)
    cpu = sparsegpt_prune(W, H, 0.5)
    cuda = sparsegpt_prune(W.cuda(), H.cuda(), 0.5)
    assert (cpu.mask == cuda.mask.cpu()).float().mean() >= 0.999
    assert torch.allclose(cuda.weight.cpu(), cpu.weight, rtol=1e-3, atol=1e-4 * float(W.abs().max()))


def test_tensor_core_hessian_matches_the_fp32_product():
    """bf16 inputs through the tensor cores with an fp32 result: the fp32 product's precision."""
    from dist_prune.methods.stats import InputStatistics

    x = torch.randn(4, 256, 1024, device="cuda").bfloat16()
    half, full = InputStatistics(1024, True, "cuda"), InputStatistics(1024, True, "cuda")
    half.update(x)
    full.update(x.float())
    scale = float(full.sum_xxt.abs().max())
    assert torch.allclose(half.sum_xxt, full.sum_xxt, rtol=0, atol=1e-5 * scale)
    assert torch.equal(half.sum_sq, full.sum_sq)
