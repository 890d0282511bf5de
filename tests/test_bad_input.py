"""Bad input: exit code 2, one message on stderr, and nothing written (no output, no partial sibling)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dist_prune.cli import main


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny model saved as several shards with an index."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("sharded") / "sharded-llama"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(path, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_llama / name, path / name)
    return path


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def prune_args(model: Path, out: Path, text: Path, *extra: str) -> list[str]:
    return [
        "--quiet",  # only the error may reach stderr; see test_one_message_without_quiet for the default
        "prune",
        "--model",
        str(model),
        "--out",
        str(out),
        "--method",
        "wanda",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--calib-source",
        str(text),
        "--no-eval-after",
        "--device",
        "cpu",
        *extra,
    ]


def assert_refused(capsys, argv: list[str], out: Path, phrase: str) -> str:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("dist-prune: error:")
    assert phrase.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in captured.err
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


def test_sharded_fixture_is_sound(sharded_llama, text_file, tmp_path):
    # the unbroken sharded checkpoint prunes fine, so the failures below are due to the damage alone
    index = json.loads((sharded_llama / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert main(prune_args(sharded_llama, tmp_path / "ok", text_file)) == 0


def test_missing_shard(sharded_llama, text_file, tmp_path, capsys):
    model = copy_model(sharded_llama, tmp_path / "model")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (model / victim).unlink()
    out = tmp_path / "out"
    line = assert_refused(capsys, prune_args(model, out, text_file), out, "missing shard")
    assert victim in line


@pytest.mark.parametrize("keep", ["half", "header_only", "8_bytes", "empty"])
def test_truncated_shard(tiny_llama, text_file, tmp_path, capsys, keep):
    model = copy_model(tiny_llama, tmp_path / "model")
    shard = model / "model.safetensors"
    data = shard.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    size = {"half": len(data) // 2, "header_only": header_end, "8_bytes": 8, "empty": 0}[keep]
    shard.write_bytes(data[:size])
    out = tmp_path / "out"
    assert_refused(capsys, prune_args(model, out, text_file), out, "truncated")


def test_truncated_shard_of_sharded_checkpoint(sharded_llama, text_file, tmp_path, capsys):
    model = copy_model(sharded_llama, tmp_path / "model")
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    assert_refused(capsys, prune_args(model, out, text_file), out, "truncated")


def test_corrupt_header(tiny_llama, text_file, tmp_path, capsys):
    model = copy_model(tiny_llama, tmp_path / "model")
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe\x00\x01"
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_refused(capsys, prune_args(model, out, text_file), out, "corrupt")


def test_gpt2_config(tiny_llama, text_file, tmp_path, capsys):
    model = copy_model(tiny_llama, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_refused(
        capsys,
        prune_args(model, out, text_file),
        out,
        "unsupported model_type 'gpt2'; dist_prune reads gemma3_text, llama, mistral, qwen2, qwen3",
    )


def test_real_tiny_gpt2(tiny_llama, text_file, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(model)
    out = tmp_path / "out"
    line = assert_refused(
        capsys,
        prune_args(model, out, text_file),
        out,
        "unsupported model_type 'gpt2'; dist_prune reads gemma3_text, llama, mistral, qwen2, qwen3",
    )
    assert "gpt2" in line


def test_missing_model_directory(text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, prune_args(tmp_path / "nowhere", out, text_file), out, "does not exist")


def test_missing_weights(tiny_llama, text_file, tmp_path, capsys):
    model = copy_model(tiny_llama, tmp_path / "model")
    (model / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert_refused(capsys, prune_args(model, out, text_file), out, "no safetensors weights")


@pytest.mark.parametrize("sparsity", ["0", "1.0", "1.5", "-0.1"])
def test_sparsity_out_of_range(sparsity, tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, prune_args(tiny_llama, out, text_file, "--sparsity", sparsity), out, "sparsity")


@pytest.mark.parametrize("pattern,phrase", [("4:2", "impossible"), ("2:2", "impossible"), ("x:4", "N:M")])
def test_impossible_pattern(pattern, phrase, tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, prune_args(tiny_llama, out, text_file, "--pattern", pattern), out, phrase)


@pytest.mark.parametrize("pattern", ["2:7", "1:3", "4:24"])
def test_pattern_not_dividing_the_widths(pattern, tiny_llama, text_file, tmp_path, capsys):
    # hidden 64 and intermediate 128: neither is a multiple of 7, 3 or 24
    out = tmp_path / "out"
    line = assert_refused(capsys, prune_args(tiny_llama, out, text_file, "--pattern", pattern), out, "impossible")
    assert "not a multiple of" in line


def test_too_little_calibration_text(tiny_llama, tmp_path, capsys):
    text = tmp_path / "few.txt"
    text.write_text("Only a few words of text here.")
    out = tmp_path / "out"
    argv = prune_args(tiny_llama, out, text, "--nsamples", "8", "--seqlen", "64")
    line = assert_refused(capsys, argv, out, "calibration text")
    assert "8 x 64" in line


def test_missing_calibration_source(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, prune_args(tiny_llama, out, tmp_path / "missing.txt"), out, "text source")


@pytest.mark.parametrize("kind", ["missing", "float", "too_small", "two_tensors", "not_safetensors"])
def test_bad_calibration_tokens(kind, tiny_llama, text_file, tmp_path, capsys):
    tokens = tmp_path / "tokens.safetensors"
    if kind == "float":
        save_file({"input_ids": torch.zeros(4, 32)}, tokens)
    elif kind == "too_small":
        save_file({"input_ids": torch.zeros(2, 32, dtype=torch.int64)}, tokens)
    elif kind == "two_tensors":
        save_file({"a": torch.zeros(4, 32, dtype=torch.int64), "b": torch.zeros(4, 32, dtype=torch.int64)}, tokens)
    elif kind == "not_safetensors":
        tokens.write_text("hello")
    out = tmp_path / "out"
    assert_refused(capsys, prune_args(tiny_llama, out, text_file, "--calib-tokens", str(tokens)), out, str(tokens))


def test_existing_output_without_overwrite(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    capsys.readouterr()
    code = main(prune_args(tiny_llama, out, text_file))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and "already exists" in lines[0] and "--overwrite" in lines[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial sibling


def test_missing_gradients_file(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = prune_args(tiny_llama, out, text_file, "--method", "gblm", "--gradients", str(tmp_path / "g.safetensors"))
    assert_refused(capsys, argv, out, "does not exist")


def test_unknown_key_in_config_file(tiny_llama, text_file, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("prune:\n  methd: wanda\n")
    out = tmp_path / "out"
    assert_refused(
        capsys, [*prune_args(tiny_llama, out, text_file), "--config", str(config)], out, "unknown config key"
    )


def test_eval_of_missing_model(tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "nowhere"), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert [line for line in captured.err.splitlines() if line.strip()] == [
        f"dist-prune: error: model directory {tmp_path / 'nowhere'} does not exist"
    ]


@pytest.mark.parametrize(
    "case",
    [
        "sparsity",
        "too_little_text",
        "existing_output",
    ],
)
def test_one_message_without_quiet(case, tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    text = text_file
    extra = []
    if case == "sparsity":
        extra = ["--sparsity", "1.5"]
    elif case == "too_little_text":
        text = tmp_path / "few.txt"
        text.write_text("Only a few words.")
    else:
        out.mkdir()
    argv = [a for a in prune_args(tiny_llama, out, text, *extra) if a != "--quiet"]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()]
    assert err.startswith("dist-prune: error:")
