"""Every model family dist_prune reads (dist_prune.models), on a tiny random model built with transformers' own
config class (conftest.FAMILY_SETTINGS): the layer-by-layer forward equals transformers' logits; every method
prunes it in both residencies, with the same masks on 1 and 2 workers; the output loads as the same
architecture; `eval`, `inspect` and `plan` work on it; structured pruning is refused with one line where the
family's smaller model cannot be written."""

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_SETTINGS, write_tiny_family
from safetensors.torch import load_file
from test_engine import CALIBRATION, EVALUATION, decoder_masks, prune_on_workers
from transformers import AutoModelForCausalLM

from dist_prune.cli import main
from dist_prune.config import build_config
from dist_prune.layerwise import embed_batches, run_layer
from dist_prune.models import FAMILIES, LINEARS, Shell, family_of, layer_prefix

FAMILY_NAMES = list(FAMILY_SETTINGS)
METHODS = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "gblm": {"method": "gblm"},
    "wanda-block": {"method": "wanda", "reconstruct": "block"},  # each family's layer run in parts by hooks
}
RESIDENCY_STORAGE = {"stream": "disk", "resident": "memory"}
# LLaMA runs every method at 1, 2 and 3 workers in test_engine.py; here the other families, at 1 and 2.
PRUNED_FAMILIES = [t for t in FAMILY_SETTINGS if t != "llama"]
TWO_OF_FOUR = {"method": "wanda", "pattern": "2:4"}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {model_type: write_tiny_family(root / model_type, model_type) for model_type in FAMILY_NAMES}


def test_every_registered_family_is_tested():
    assert set(FAMILIES) == set(FAMILY_SETTINGS)


def read_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_layer_by_layer_forward_equals_transformers_logits(family_models, model_type):
    """The stem, each decoder layer built alone from its tensors, and the head, as the job runs them, give the
    whole model's logits (fp32; tolerance 1e-5 absolute, on logits of size ~1: the same kernels run in the
    same order, so they agree to rounding). 40 tokens cross Gemma 3's 8-token sliding window."""
    path = family_models[model_type]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config, state = model.config, read_state(path)
    family = family_of(config)
    tokens = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    shell = Shell(family, config, {n: state[n] for n in family.rest_shapes(config)}, torch.float32, "cpu")
    inputs = embed_batches(shell, [tokens])
    for index in range(config.num_hidden_layers):
        layer_state = {n: t for n, t in state.items() if n.startswith(layer_prefix(index))}
        inputs = run_layer(family.decoder_layer(config, index, layer_state, torch.float32), inputs)
    with torch.no_grad():
        expected = model(input_ids=tokens).logits.float()
    torch.testing.assert_close(shell.logits(inputs.hidden[0]), expected, atol=1e-5, rtol=0)


def family_config(model: Path, out: Path, text: Path, settings: dict, residency: str):
    return build_config(
        {
            "model": str(model),
            "out": str(out),
            "prune": settings,
            "calibration": dict(CALIBRATION, calib_source=str(text)),
            "evaluation": dict(EVALUATION, eval_text=str(text), eval_after=False, plots=False),  # `eval`: below
            "runtime": {"residency": residency, "activation_storage": RESIDENCY_STORAGE[residency], "threads": 1},
        }
    )


@pytest.fixture(scope="module")
def pruned(family_models, text_file, tmp_path_factory) -> Path:
    """Every family x method in both residencies on one worker (in-process), and streamed on 2 workers; a 2:4
    run of every family for `eval` and `inspect` below."""
    from dist_prune import prune

    root = tmp_path_factory.mktemp("family-runs")
    two_workers = []
    for model_type, model in family_models.items():
        prune(family_config(model, root / f"w1/{model_type}/wanda-2of4-stream", text_file, TWO_OF_FOUR, "stream"))
        if model_type not in PRUNED_FAMILIES:
            continue
        for name, settings in METHODS.items():
            for residency in RESIDENCY_STORAGE:
                prune(family_config(model, root / f"w1/{model_type}/{name}-{residency}", text_file, settings, residency))
            two_workers.append(
                family_config(model, root / f"w2/{model_type}/{name}-stream", text_file, settings, "stream")
            )
    prune_on_workers(2, two_workers)
    return root


@pytest.mark.parametrize("model_type", PRUNED_FAMILIES)
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_prunes_every_family_alike_in_both_residencies_and_on_two_workers(pruned, model_type, name):
    runs = pruned / "w1" / model_type
    stream, resident = decoder_masks(runs / f"{name}-stream"), decoder_masks(runs / f"{name}-resident")
    two_workers = decoder_masks(pruned / "w2" / model_type / f"{name}-stream")
    assert len(stream) == len(LINEARS) * 3  # three decoder layers
    for weight, mask in stream.items():
        assert mask.float().mean().item() == pytest.approx(0.5, abs=0.02), weight
        assert torch.equal(mask, resident[weight]), f"{weight}: stream and resident differ"
        assert torch.equal(mask, two_workers[weight]), f"{weight}: 1 and 2 workers differ"


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_pruned_output_loads_as_the_same_architecture_with_the_rest_untouched(family_models, pruned, model_type):
    source, out = family_models[model_type], pruned / "w1" / model_type / "wanda-2of4-stream"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.architectures == json.loads((source / "config.json").read_text())["architectures"]
    written, original = model.state_dict(), read_state(source)
    for name, tensor in original.items():  # norms, biases, embeddings: copied as they were
        if not name.endswith("proj.weight"):
            assert torch.equal(written[name], tensor), name
    masks = decoder_masks(out)
    assert all(torch.equal(written[name] == 0, mask) for name, mask in masks.items())


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_eval_inspect_and_plan_work_on_every_family(family_models, pruned, text_file, model_type, capsys):
    out = pruned / "w1" / model_type / "wanda-2of4-stream"
    assert main(["eval", "--model", str(out), "--text", str(text_file), "--seqlen", "32", "--windows", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    assert main(["inspect", str(out), "--pattern", "2:4", "--verify", "--json"]) == 0
    capsys.readouterr()
    model = str(family_models[model_type])
    assert main(["plan", "--model", model, "--method", "sparsegpt", "--calib-source", str(text_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model_type", [t for t in FAMILY_NAMES if not FAMILIES[t].structured])
def test_structured_pruning_is_refused_in_one_line_where_the_family_cannot_be_written(
    family_models, tmp_path, text_file, model_type, capsys
):
    argv = ["prune", "--model", str(family_models[model_type]), "--method", "flap", "--ratio", "0.2"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--calib-source", str(text_file)]) != 0
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "llama" in message[0] and model_type in message[0]
    assert not (tmp_path / "out").exists()
