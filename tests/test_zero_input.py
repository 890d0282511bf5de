"""Pruning straight from DeepSpeed ZeRO checkpoints written by DeepSpeed itself (2 ranks under torchrun, CPU,
bf16, a tiny LLaMA trained for two steps): the same masks and weights as pruning the same weights exported to
an HF folder, at 1 and 2 workers; refusals that load nothing and write nothing."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_llama
from test_bad_input import prune_args
from test_end_to_end import load_weights
from test_engine import prune_on_workers
from test_user_files import refused

from dist_prune.cli import main

pytest.importorskip("deepspeed")

STAGES = (2, 3)
# Stage 2 keeps the tied embedding of SmolLM2-style models (a shared parameter in the checkpoint), stage 3 an
# untied head, as LLaMA-2 has.
TIED = {2: True, 3: False}
METHODS = {2: "sparsegpt", 3: "gblm"}


@pytest.fixture(scope="session")
def zero_checkpoints(tmp_path_factory) -> dict[int, Path]:
    """{stage: the folder DeepSpeed's save_checkpoint wrote, with config.json and tokenizer beside `latest`}."""
    from dist_prune.distributed import free_port

    root = tmp_path_factory.mktemp("zero")
    checkpoints = {}
    for stage in STAGES:
        init = write_tiny_llama(root / f"init{stage}", seed=stage, tie_word_embeddings=TIED[stage])
        out = root / f"zero{stage}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        script = str(Path(__file__).with_name("zero_training.py"))
        done = subprocess.run(
            [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
             script, str(stage), str(init), str(out)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        checkpoints[stage] = out
    return checkpoints


@pytest.fixture(scope="session")
def hf_exports(zero_checkpoints, tmp_path_factory) -> dict[int, Path]:
    """The same fp32 master weights, gathered whole by DeepSpeed's own reader and saved as an ordinary HF folder
    (its converter refuses to write a tied head to safetensors, so the tied copy is dropped here, as HF does)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    exports = {}
    for stage, checkpoint in zero_checkpoints.items():
        out = tmp_path_factory.mktemp("export") / f"hf{stage}"
        out.mkdir()
        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
        if TIED[stage]:
            del weights["lm_head.weight"]
        save_file({name: t.contiguous() for name, t in weights.items()}, out / "model.safetensors")
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, out / name)
        exports[stage] = out
    return exports


def zero_args(model: Path, out: Path, text: Path, *extra: str) -> list[str]:
    return prune_args(model, out, text, "--trust-pickle", *extra)


def assert_identical(a: Path, b: Path) -> None:
    first, second = load_weights(a), load_weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype == torch.bfloat16, name
        assert torch.equal(first[name], second[name]), f"{name} differs"


@pytest.mark.parametrize("stage", STAGES)
def test_zero_checkpoint_prunes_like_its_hf_export_at_1_and_2_workers(
    stage, zero_checkpoints, hf_exports, text_file, tmp_path
):
    from dist_prune.config import load_config

    from_zero, from_hf = tmp_path / "zero", tmp_path / "hf"
    # One BLAS thread, as each of the two workers below has: SparseGPT's rounding depends on the thread count.
    method = ("--method", METHODS[stage], "--pattern", "2:4", "--threads", "1")
    assert main(zero_args(zero_checkpoints[stage], from_zero, text_file, *method)) == 0
    assert main(prune_args(hf_exports[stage], from_hf, text_file, *method, "--out-dtype", "bf16")) == 0
    assert_identical(from_zero, from_hf)
    assert json.loads((from_zero / "config.json").read_text())["dtype"] == "bfloat16"  # the default for ZeRO input

    # Two workers, each reading only its own rows of every layer (resident) from the partitions.
    config = load_config(None, _overrides(zero_args(zero_checkpoints[stage], tmp_path / "zero-w2", text_file)))
    config = replace(config, prune=replace(config.prune, method=METHODS[stage], pattern="2:4"))
    config = replace(config, runtime=replace(config.runtime, residency="resident", activation_storage="memory"))
    prune_on_workers(2, [config])
    assert_identical(tmp_path / "zero-w2", from_hf)


def _overrides(argv: list[str]) -> dict:
    """The CLI's config overrides for `argv` (a prune command line)."""
    from dist_prune.cli import _overrides as cli_overrides
    from dist_prune.cli import _parser

    return cli_overrides(_parser().parse_args(argv))


def test_a_tag_folder_and_a_separate_config_folder_are_accepted(zero_checkpoints, hf_exports, text_file, tmp_path):
    checkpoint = zero_checkpoints[2]
    tag = (checkpoint / "latest").read_text().strip()
    by_tag = prune_args(checkpoint / tag, tmp_path / "by-tag", text_file, "--trust-pickle")
    assert main([*by_tag, "--ds-config-dir", str(hf_exports[2])]) == 0
    assert main(zero_args(checkpoint, tmp_path / "by-latest", text_file, "--ds-tag", tag)) == 0
    assert_identical(tmp_path / "by-tag", tmp_path / "by-latest")


def test_without_trust_pickle_nothing_is_loaded(zero_checkpoints, text_file, tmp_path, capsys, monkeypatch):
    model = Path(shutil.copytree(zero_checkpoints[3], tmp_path / "ckpt"))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called without --trust-pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    refused(capsys, prune_args(model, tmp_path / "out", text_file), tmp_path, "--trust-pickle")
    refused(capsys, ["--quiet", "plan", "--model", str(model)], tmp_path, "--trust-pickle")
    refused(capsys, ["--quiet", "inspect", str(model)], tmp_path, "--trust-pickle")


def _rank_file(checkpoint: Path, rank: int) -> Path:
    tag = checkpoint / (checkpoint / "latest").read_text().strip()
    return next(tag.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))


def missing_partition(checkpoint: Path) -> None:
    _rank_file(checkpoint, 1).unlink()


def extra_partition(checkpoint: Path) -> None:
    """A third rank's file from another run: the world size no longer matches the partition count."""
    source = _rank_file(checkpoint, 1)
    shutil.copy2(source, source.with_name(source.name.replace("rank_1", "rank_2")))


def truncated_partition(checkpoint: Path) -> None:
    file = _rank_file(checkpoint, 0)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "phrase"),
    [(missing_partition, "written by 2 ranks"), (extra_partition, "holds 3"), (truncated_partition, "truncated")],
)
@pytest.mark.parametrize("stage", STAGES)
def test_a_damaged_zero_checkpoint_is_refused_and_nothing_written(
    damage, phrase, stage, zero_checkpoints, text_file, tmp_path, capsys
):
    model = Path(shutil.copytree(zero_checkpoints[stage], tmp_path / "ckpt"))
    damage(model)
    refused(capsys, zero_args(model, tmp_path / "out", text_file), tmp_path, phrase)


def test_inspect_and_plan_read_shapes_and_sizes_only(zero_checkpoints, capsys):
    checkpoint = zero_checkpoints[3]
    capsys.readouterr()
    assert main(["--quiet", "inspect", str(checkpoint), "--trust-pickle", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "deepspeed-zero3" and summary["world_size"] == 2
    assert len(summary["layers"]) == 2
    assert summary["layers"][0]["modules"]["self_attn.k_proj"]["shape"] == [32, 64]  # 2 kv heads x 16
    assert summary["other"]["lm_head.weight"]["shape"] == [49152, 64]
    assert main(["--quiet", "plan", "--model", str(checkpoint), "--trust-pickle", "--method", "wanda"]) == 0
    assert "stream" in capsys.readouterr().out


def test_structured_pruning_reads_a_zero_checkpoint_like_its_hf_export(
    zero_checkpoints, hf_exports, text_file, tmp_path
):
    """saap loads its row shards through the same reader: identical smaller models."""
    saap = ("--method", "saap", "--ratio", "0.2", "--protect-first", "0", "--protect-last", "0", "--threads", "1")
    assert main(zero_args(zero_checkpoints[3], tmp_path / "zero", text_file, *saap)) == 0
    assert main(prune_args(hf_exports[3], tmp_path / "hf", text_file, *saap, "--out-dtype", "bf16")) == 0
    assert_identical(tmp_path / "zero", tmp_path / "hf")
