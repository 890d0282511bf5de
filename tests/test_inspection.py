"""Checkpoint inspection: sparsity and N:M checks, and mask comparison, against counts made directly with torch."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_llama
from safetensors.torch import load_file, save_file

from dist_prune.errors import CheckpointError, ConfigError
from dist_prune.inspection import (
    compare_checkpoints,
    format_comparison,
    format_summary,
    read_crop,
    summarize_checkpoint,
    tensor_refs,
)
from dist_prune.methods.masks import prune_n_m

MODULES = [f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")
]
SMALL = dict(vocab_size=512)  # the tests need no tokenizer that matches: a small embedding keeps them fast


def is_decoder_linear(name: str, tensor: torch.Tensor) -> bool:
    return name.startswith("model.layers.") and tensor.dim() == 2


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def write_weights(source: Path, target: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of `source` with its weights replaced: one model.safetensors and the same config."""
    target.mkdir(parents=True)
    shutil.copy2(source / "config.json", target / "config.json")
    save_file({name: t.contiguous() for name, t in tensors.items()}, target / "model.safetensors")
    return target


def random_prune(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Zero a different random fraction of each decoder Linear, so every module has its own sparsity."""
    generator = torch.Generator().manual_seed(seed)
    pruned = {}
    for index, (name, tensor) in enumerate(sorted(tensors.items())):
        if is_decoder_linear(name, tensor):
            fraction = 0.1 + 0.05 * (index % 12)
            tensor = tensor.masked_fill(torch.rand(tensor.shape, generator=generator) < fraction, 0.0)
        pruned[name] = tensor
    return pruned


def prune_2_4(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        name: t.masked_fill(prune_n_m(t.abs(), 2, 4), 0.0) if is_decoder_linear(name, t) else t
        for name, t in tensors.items()
    }


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("dense") / "ckpt", **SMALL)


@pytest.fixture(scope="module")
def pruned(dense, tmp_path_factory) -> Path:
    return write_weights(dense, tmp_path_factory.mktemp("pruned") / "ckpt", random_prune(weights(dense), seed=1))


@pytest.fixture(scope="module")
def pruned_2_4(dense, tmp_path_factory) -> Path:
    return write_weights(dense, tmp_path_factory.mktemp("nm") / "ckpt", prune_2_4(weights(dense)))


def test_summary_counts_match_torch(pruned):
    tensors = weights(pruned)
    summary = summarize_checkpoint(pruned)

    assert summary["total_parameters"] == sum(t.numel() for t in tensors.values())
    assert summary["dtypes"] == {"float32": summary["total_parameters"]}
    assert summary["files"] == ["model.safetensors"]
    assert summary["pattern"] is None
    for layer in summary["layers"]:
        assert list(layer["modules"]) == MODULES
        for module, entry in layer["modules"].items():
            tensor = tensors[f"model.layers.{layer['layer']}.{module}.weight"]
            assert entry["zeros"] == int((tensor == 0).sum())
            assert entry["numel"] == tensor.numel()
            assert entry["sparsity"] == pytest.approx(entry["zeros"] / entry["numel"])
    decoder = [t for name, t in tensors.items() if is_decoder_linear(name, t)]
    zeros, numel = sum(int((t == 0).sum()) for t in decoder), sum(t.numel() for t in decoder)
    assert summary["decoder_linear"] == {"zeros": zeros, "numel": numel, "sparsity": pytest.approx(zeros / numel)}
    assert 0.1 < summary["decoder_linear"]["sparsity"] < 0.7
    assert summary["modules"]["mlp.down_proj"]["zeros"] == sum(
        int((t == 0).sum()) for name, t in tensors.items() if name.endswith("down_proj.weight")
    )
    assert list(summary["other_matrices"]) == ["model.embed_tokens.weight"]


def test_row_chunks_give_the_same_counts(pruned):
    # 100 bytes is less than one row: every matrix is read one row at a time.
    assert summarize_checkpoint(pruned, "2:4", chunk_bytes=100) == summarize_checkpoint(pruned, "2:4")


def test_sharded_checkpoint_matches_single_file(pruned, tmp_path):
    from transformers import LlamaForCausalLM

    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(pruned).save_pretrained(sharded, max_shard_size="100KB")
    summary = summarize_checkpoint(sharded)

    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(summary["files"]) > 2
    single = summarize_checkpoint(pruned)
    for key in ("total_parameters", "dtypes", "decoder_linear", "layers", "modules"):
        assert summary[key] == single[key]


def test_dtype_is_reported(tmp_path):
    summary = summarize_checkpoint(write_tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16, **SMALL))
    assert summary["dtypes"] == {"bfloat16": summary["total_parameters"]}
    assert summary["decoder_linear"]["zeros"] == 0


def test_two_four_pattern_is_satisfied(pruned_2_4):
    verdict = summarize_checkpoint(pruned_2_4, "2:4")["pattern"]
    assert verdict == {"pattern": "2:4", "satisfied": True, "checked": 14, "violations": []}
    assert summarize_checkpoint(pruned_2_4, "4:8")["pattern"]["satisfied"]
    assert not summarize_checkpoint(pruned_2_4, "1:4")["pattern"]["satisfied"]


def test_pattern_violation_names_the_module(dense, pruned_2_4, tmp_path):
    tensors = weights(pruned_2_4)
    name = "model.layers.1.mlp.up_proj.weight"
    first_zero = int((tensors[name][3] == 0).nonzero()[0])
    tensors[name][3, first_zero] = 1.0  # one group of row 3 now keeps 3 of 4
    broken = write_weights(dense, tmp_path / "broken", tensors)

    summary = summarize_checkpoint(broken, "2:4", chunk_bytes=256)

    verdict = summary["pattern"]
    assert not verdict["satisfied"]
    assert [(v["name"], v["layer"], v["module"], v["bad_groups"]) for v in verdict["violations"]] == [
        (name, 1, "mlp.up_proj", 1)
    ]
    assert verdict["violations"][0]["groups"] == tensors[name].numel() // 4
    assert f"{name}: 1 of" in format_summary(summary)


def test_pattern_wider_than_the_inputs_is_a_violation(pruned_2_4):
    verdict = summarize_checkpoint(pruned_2_4, "2:5")["pattern"]
    assert len(verdict["violations"]) == 14
    assert all("not a multiple of 5" in v["reason"] for v in verdict["violations"])


def test_bad_input_is_reported(dense, tmp_path):
    with pytest.raises(ConfigError):
        summarize_checkpoint(dense, "4:2")
    with pytest.raises(CheckpointError, match="does not exist"):
        summarize_checkpoint(tmp_path / "missing")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (dense / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        summarize_checkpoint(truncated)


def test_identical_masks_agree_fully(pruned):
    comparison = compare_checkpoints(pruned, pruned)
    assert comparison["agreement"] == 1.0
    assert comparison["jaccard"] == 1.0
    assert all(entry["agreement"] == 1.0 for entry in comparison["weights"].values())
    assert len(comparison["weights"]) == 14
    assert comparison["only_in_a"] == comparison["only_in_b"] == comparison["shape_mismatches"] == []


def test_different_masks_match_torch(dense, pruned, tmp_path):
    other = write_weights(dense, tmp_path / "other", random_prune(weights(dense), seed=2))
    a, b = weights(pruned), weights(other)

    comparison = compare_checkpoints(pruned, other, chunk_bytes=300)

    agree = both = either = numel = 0
    for name, tensor in a.items():
        if not is_decoder_linear(name, tensor):
            continue
        zero_a, zero_b = tensor == 0, b[name] == 0
        entry = comparison["weights"][name]
        assert entry["agreement"] == pytest.approx(float((zero_a == zero_b).float().mean()))
        assert entry["jaccard"] == pytest.approx(int((zero_a & zero_b).sum()) / int((zero_a | zero_b).sum()))
        agree += int((zero_a == zero_b).sum())
        both, either = both + int((zero_a & zero_b).sum()), either + int((zero_a | zero_b).sum())
        numel += tensor.numel()
    assert comparison["numel"] == numel
    assert comparison["agreement"] == pytest.approx(agree / numel)
    assert comparison["jaccard"] == pytest.approx(both / either)
    assert 0.3 < comparison["agreement"] < 0.95


def test_dense_against_pruned(dense, pruned):
    comparison = compare_checkpoints(dense, pruned)
    summary = summarize_checkpoint(pruned)
    # Nothing is pruned in the dense one: the masks agree exactly where b kept a weight.
    assert comparison["agreement"] == pytest.approx(1 - summary["decoder_linear"]["sparsity"])
    assert comparison["jaccard"] == 0.0
    assert comparison["sparsity_a"] == 0.0


def test_different_shapes_and_names_are_reported(dense, tmp_path):
    wider = write_tiny_llama(tmp_path / "wider", layers=3, intermediate_size=96, **SMALL)

    comparison = compare_checkpoints(dense, wider)

    mismatched = {m["name"] for m in comparison["shape_mismatches"]}
    assert mismatched == {
        f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("gate_proj", "up_proj", "down_proj")
    }
    assert comparison["only_in_a"] == []
    assert comparison["only_in_b"] == sorted(name for name in tensor_refs(wider) if name.startswith("model.layers.2."))
    assert len(comparison["weights"]) == 8  # the attention weights of layers 0 and 1
    text = format_comparison(comparison)
    assert "only in b (9)" in text
    assert "shape differs: model.layers.0.mlp.down_proj.weight a (64, 128) b (64, 96)" in text


def test_formatted_tables(pruned, pruned_2_4):
    text = format_summary(summarize_checkpoint(pruned_2_4, "2:4"))
    assert "2:4: satisfied by all 14 decoder Linear weights" in text
    assert "q_proj" in text and "down_proj" in text
    assert "0.5000" in text

    text = format_comparison(compare_checkpoints(pruned, pruned_2_4))
    assert "mask agreement" in text
    assert text.count("\n") > 5


def test_read_crop_reads_the_top_left_block(pruned):
    ref = tensor_refs(pruned)["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(read_crop(ref, 8, 16), weights(pruned)[ref.name][:8, :16])
    assert read_crop(ref, 1000, 1000).shape == (64, 128)
