"""Malformed checkpoints, configs, token and gradient files and arguments: each one line on stderr, exit 2,
and the file system as it was (source model byte for byte, no output, no hidden sibling)."""

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import prune_args
from test_user_files import refused

from dist_prune.cli import main

WEIGHTS = "model.safetensors"


def raw_safetensors(path: Path, header, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def edit_weights(model: Path, edit) -> None:
    tensors = load_file(model / WEIGHTS)
    edit(tensors)
    save_file(tensors, model / WEIGHTS, metadata={"format": "pt"})


def config_is_a_list(model: Path) -> None:
    (model / "config.json").write_text("[1, 2]")


def config_not_utf8(model: Path) -> None:
    (model / "config.json").write_bytes(b"\xff\xfe{\x00")


def config_without_sizes(model: Path) -> None:
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))


def header_is_a_list(model: Path) -> None:
    raw_safetensors(model / WEIGHTS, [], b"")


def header_overlaps(model: Path) -> None:
    entry = {"dtype": "F32", "shape": [2]}
    header = {"a": dict(entry, data_offsets=[0, 8]), "b": dict(entry, data_offsets=[4, 12])}
    raw_safetensors(model / WEIGHTS, header, bytes(12))


def header_entry_without_offsets(model: Path) -> None:
    raw_safetensors(model / WEIGHTS, {"a": {"dtype": "F32", "shape": [2]}}, bytes(8))


def tensor_in_the_wrong_file(model: Path) -> None:
    tensors = load_file(model / WEIGHTS)
    first = {n: t for n, t in tensors.items() if n != "model.norm.weight"}
    save_file(first, model / "part-a.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, model / "part-b.safetensors")
    weight_map = dict.fromkeys(first, "part-a.safetensors") | {"model.norm.weight": "part-a.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (model / WEIGHTS).unlink()


def weight_map_not_a_mapping(model: Path) -> None:
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))


def nan_weights(model: Path) -> None:
    edit_weights(model, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), math.nan))


def misshapen_weight(model: Path) -> None:
    edit_weights(model, lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight", torch.zeros(3, 3)))


CHECKPOINTS = {  # name -> (how to break a copy of the tiny model, what the one line says)
    "config is a list": (config_is_a_list, "JSON object"),
    "config not utf-8": (config_not_utf8, "not valid JSON"),
    "config without sizes": (config_without_sizes, "hidden_size must be a positive integer"),
    "int8 dtype": (lambda m: edit_config(m, dtype="int8"), "dtype 'int8'"),
    "kv heads not dividing": (lambda m: edit_config(m, num_key_value_heads=3), "num_key_value_heads"),
    "header is a list": (header_is_a_list, "corrupt header"),
    "overlapping offsets": (header_overlaps, "overlap"),
    "entry without offsets": (header_entry_without_offsets, "corrupt header"),
    "tensor in the wrong file": (tensor_in_the_wrong_file, "has no tensor model.norm.weight in part-a"),
    "weight map not a mapping": (weight_map_not_a_mapping, "weight_map"),
    "misshapen weight": (misshapen_weight, "config.json implies"),
    "nan weights": (nan_weights, "NaN or Inf"),
}
SCAN_ONLY = {"nan weights"}  # found while reading a layer's values, not from headers: prune only
# `inspect` reports whatever tensors the files hold, with their shapes and files (it also reads structured
# outputs, whose per-layer shapes differ from config.json's): a wrong shape or file is its answer, not an error.
INSPECT_REPORTS = {"tensor in the wrong file", "misshapen weight"}


@pytest.fixture
def model(tiny_llama, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_malformed_checkpoint_is_refused_by_every_command(case, model, text_file, tmp_path, capsys):
    breaks, phrase = CHECKPOINTS[case]
    breaks(model)
    refused(capsys, prune_args(model, tmp_path / "out", text_file), tmp_path, phrase)
    if case in SCAN_ONLY:
        return
    grad = ["--quiet", "grad", "--model", str(model), "--out", str(tmp_path / "g.safetensors"),
            "--nsamples", "2", "--seqlen", "16", "--calib-source", str(text_file)]  # fmt: skip
    refused(capsys, grad, tmp_path, phrase)
    refused(capsys, ["eval", "--model", str(model)], tmp_path, phrase)
    refused(capsys, ["plan", "--model", str(model)], tmp_path, phrase)
    if case not in INSPECT_REPORTS:
        refused(capsys, ["inspect", str(model)], tmp_path, phrase)


def test_biases_are_read_only_when_the_files_hold_them(model, text_file, tmp_path, capsys):
    """A LLaMA with attention_bias and mlp_bias (FLAP writes such checkpoints; Qwen2 always has q/k/v biases):
    it prunes, the biases kept as they were; a config that claims biases its files lack is refused, where
    transformers would fill them with random values."""
    from conftest import write_tiny_llama
    from safetensors.torch import load_file

    biased = write_tiny_llama(tmp_path / "biased", attention_bias=True, mlp_bias=True)
    out = tmp_path / "out"
    assert main(prune_args(biased, out, text_file)) == 0
    source, pruned = load_file(biased / "model.safetensors"), {}
    for file in out.glob("model-layer-*.safetensors"):
        pruned.update(load_file(file))
    biases = [name for name in pruned if name.endswith(".bias")]
    assert len(biases) == 2 * 7 and all(torch.equal(pruned[name], source[name]) for name in biases)
    evaluate = ["eval", "--text", str(text_file), "--seqlen", "32", "--windows", "1", "--json"]
    capsys.readouterr()
    edit_config(model, attention_bias=True)
    refused(capsys, [*evaluate, "--model", str(model)], tmp_path, "has no tensor model.layers.0.self_attn.")


@pytest.mark.parametrize(
    "flags,phrase",
    [
        (["--threads", "-1"], "threads must be a positive number"),
        (["--gblm-scale", "nan"], "gblm_scale must be a positive number"),
        (["--sparsity", "nan"], "sparsity"),
        (["--workers", "0"], "workers must be a positive number"),
        (["--sparsegpt-damp", "inf"], "sparsegpt_damp"),
        (["--residency", "everywhere"], "residency must be one of"),
        (["--gradient-dtype", "int4"], "gradient_dtype must be one of"),
    ],
)
def test_bad_arguments(flags, phrase, model, text_file, tmp_path, capsys):
    refused(capsys, prune_args(model, tmp_path / "out", text_file, *flags), tmp_path, phrase)


def test_config_naming_a_directory(model, text_file, tmp_path, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    refused(
        capsys, [*prune_args(model, tmp_path / "out", text_file), "--config", str(folder)], tmp_path, "cannot be read"
    )


def test_token_ids_beyond_the_vocabulary(model, text_file, tmp_path, capsys):
    tokens = tmp_path / "tokens.safetensors"
    save_file({"input_ids": torch.full((4, 32), 10**6, dtype=torch.int64)}, tokens)
    argv = prune_args(model, tmp_path / "out", text_file, "--calib-tokens", str(tokens))
    refused(capsys, argv, tmp_path, "vocabulary")


def test_garbage_gradients_file(model, text_file, tmp_path, capsys):
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00\x01garbage" * 10)
    argv = prune_args(model, tmp_path / "out", text_file, "--method", "gblm", "--gradients", str(garbage))
    refused(capsys, argv, tmp_path, "not a gradients file")


@pytest.mark.parametrize("flags", [["--seqlen", "0"], ["--seqlen", "1"], ["--windows", "0"]])
def test_eval_with_impossible_windows(flags, model, tmp_path, capsys):
    refused(capsys, ["eval", "--model", str(model), *flags], tmp_path, "eval needs")
