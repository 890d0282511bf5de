"""User files and arguments that used to hang a command or end it in a traceback: YAML alias bombs, deep nesting,
FIFOs and devices, a billion layers, headers whose bytes do not match, token ids beyond the vocabulary, loops of
links, numbers past any machine, full, blocked or read-only disks, odd ZeRO structures. Each is one line on
stderr, exit 2, in every command that reads it, with the file system as it was."""

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_llama
from test_bad_input import prune_args
from test_hostile_input import raw_safetensors
from test_resume import ROOT
from test_user_files import refused

from dist_prune.cli import main

WEIGHTS = "model.safetensors"


@pytest.fixture
def model(tiny_llama, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def alias_bomb() -> str:
    """Nine levels of nine aliases: a few hundred bytes that expand to 9^9 (387 million) strings."""
    value = "&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"
    for level in range(1, 9):
        value = f"&a{level} [{value}" + f", *a{level - 1}" * 8 + "]"
    return f"prune:\n  sparsity: {value}\n"


CONFIGS = {  # a --config file's text -> what the one line says
    "alias bomb in a typed field": (alias_bomb(), "sparsity must be float"),
    "nested a hundred thousand deep": ("sparsity: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
    "a key half a megabyte long": ("? " + "x" * 500_000 + "\n: 1\n", "unknown config key"),
    "over a megabyte": ("# padding\n" * 200_000, "larger than"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_hostile_config_file_is_refused_at_once(case, model, text_file, tmp_path, capsys):
    text, phrase = CONFIGS[case]
    config = tmp_path / "run.yaml"
    config.write_text(text)
    start = time.monotonic()
    line = refused(capsys, [*prune_args(model, tmp_path / "out", text_file), "--config", str(config)], tmp_path, phrase)
    assert time.monotonic() - start < 20 and len(line) < 1000


@pytest.mark.parametrize("source", ["/dev/zero", "fifo", "loop"])
def test_a_config_that_is_no_regular_file_is_refused_without_waiting(source, model, text_file, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    if source == "fifo":
        os.mkfifo(config)  # nobody ever writes to it: opening it the usual way would wait forever
    elif source == "loop":
        config.symlink_to(config)
    else:
        config = Path(source)
    refused(
        capsys, [*prune_args(model, tmp_path / "out", text_file), "--config", str(config)], tmp_path, "cannot be read"
    )


def a_billion_layers(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    (model / "config.json").write_text(json.dumps(config))


def header_bytes_do_not_match_shape(model: Path) -> None:
    """A tensor whose offsets span 8 bytes where its shape and dtype need 16."""
    raw_safetensors(model / WEIGHTS, {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, bytes(8))


def unknown_dtype(model: Path) -> None:
    raw_safetensors(model / WEIGHTS, {"a": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}, bytes(4))


def header_nested_deep(model: Path) -> None:
    encoded = b"[" * 200_000 + b"]" * 200_000
    (model / WEIGHTS).write_bytes(struct.pack("<Q", len(encoded)) + encoded)


def header_claims_a_terabyte(model: Path) -> None:
    (model / WEIGHTS).write_bytes(struct.pack("<Q", 10**12) + bytes(64))


def config_nested_deep(model: Path) -> None:
    (model / "config.json").write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")


def shard_is_a_link_loop(model: Path) -> None:
    (model / WEIGHTS).unlink()
    (model / "model-00001.safetensors").symlink_to(model / "model-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def weights_are_a_fifo(model: Path) -> None:
    (model / WEIGHTS).unlink()
    os.mkfifo(model / WEIGHTS)


HOSTILE = {
    "a billion layers": (a_billion_layers, "has no tensor model.layers.2"),
    "header bytes do not match its shape": (header_bytes_do_not_match_shape, "do not match its dtype and shape"),
    "unknown dtype": (unknown_dtype, "do not match its dtype and shape"),
    "header nested deep": (header_nested_deep, "nested too deeply"),
    "header claims a terabyte": (header_claims_a_terabyte, "truncated"),
    "config.json nested deep": (config_nested_deep, "nested too deeply"),
    "shard is a loop of links": (shard_is_a_link_loop, "cannot be followed"),
    "weights are a FIFO": (weights_are_a_fifo, "not a regular file"),
}
INSPECT_SKIPS = {
    "a billion layers"
}  # inspect reads whatever tensors the files hold (the config's count is not its business)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_checkpoint_is_refused_by_every_command(case, model, text_file, tmp_path, capsys):
    """prune, grad, eval, plan, inspect and compare: one line each, at once."""
    breaks, phrase = HOSTILE[case]
    breaks(model)
    start = time.monotonic()
    refused(capsys, prune_args(model, tmp_path / "out", text_file), tmp_path, phrase)
    grad = ["--quiet", "grad", "--model", str(model), "--out", str(tmp_path / "g.safetensors"),
            "--nsamples", "2", "--seqlen", "16", "--calib-source", str(text_file)]  # fmt: skip
    refused(capsys, grad, tmp_path, phrase)
    refused(capsys, ["eval", "--model", str(model)], tmp_path, phrase)
    refused(capsys, ["plan", "--model", str(model)], tmp_path, phrase)
    if case not in INSPECT_SKIPS:
        refused(capsys, ["inspect", str(model)], tmp_path, phrase)
        refused(capsys, ["compare", str(model), str(model)], tmp_path, "")
    assert time.monotonic() - start < 60


def test_inspect_of_a_folder_whose_shard_is_a_fifo(tmp_path, capsys):
    folder = tmp_path / "half-written"
    folder.mkdir()
    os.mkfifo(folder / "model-00001-of-00002.safetensors")
    refused(capsys, ["inspect", str(folder)], tmp_path, "not a regular file")


def test_token_ids_beyond_the_vocabulary_of_the_text(tmp_path, text_file, capsys):
    """A model whose vocabulary is smaller than its tokenizer's (SmolLM2's tokenizer, 1000 rows): prune, grad
    and eval refuse it in one line instead of an IndexError in a worker."""
    small = write_tiny_llama(tmp_path / "small-vocab", vocab_size=1000)
    phrase = "this model's vocabulary has ids 0 to 999"
    refused(capsys, prune_args(small, tmp_path / "out", text_file), tmp_path, phrase)
    grad = ["--quiet", "grad", "--model", str(small), "--out", str(tmp_path / "g.safetensors"),
            "--nsamples", "2", "--seqlen", "16", "--calib-source", str(text_file)]  # fmt: skip
    refused(capsys, grad, tmp_path, phrase)
    refused(capsys, ["eval", "--model", str(small), "--text", str(text_file), "--seqlen", "16"], tmp_path, phrase)
    evaluate_later = prune_args(small, tmp_path / "out", text_file, "--method", "magnitude", "--eval-after",
                                "--eval-text", str(text_file), "--eval-seqlen", "16")  # fmt: skip
    refused(capsys, evaluate_later, tmp_path, phrase)


@pytest.mark.parametrize("where", ["--out", "--model", "--scratch", "--calib-tokens", "inspect"])
def test_a_loop_of_links_is_one_line(where, model, text_file, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    argv = {
        "--out": prune_args(model, loop, text_file),
        "--model": prune_args(loop, tmp_path / "out", text_file),
        "--scratch": prune_args(model, tmp_path / "out", text_file, "--method", "gblm", "--scratch", str(loop / "s")),
        "--calib-tokens": prune_args(model, tmp_path / "out", text_file, "--calib-tokens", str(loop)),
        "inspect": ["inspect", str(loop)],
    }[where]
    refused(capsys, argv, tmp_path, "")


@pytest.mark.parametrize("out", [".", "..", "", "/"])
def test_an_output_that_names_no_folder(out, model, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, prune_args(model, Path(out), text_file), tmp_path, "names no folder")
    grad = ["--quiet", "grad", "--model", str(model), "--out", out, "--nsamples", "2", "--seqlen", "16",
            "--calib-source", str(text_file)]  # fmt: skip
    refused(capsys, grad, tmp_path, "names no folder")


@pytest.mark.parametrize(
    "flags,phrase",
    [
        (["--device-memory", "1e400"], "beyond any machine"),
        (["--seed", "1e23"], "invalid int value"),
        (["--seed", str(10**23)], "fit in 64 bits"),
        (["--threads", "1e11"], "invalid int value"),
        (["--threads", str(10**11)], "threads must be at most"),
        (["--workers", str(10**9), "--launcher", "ray"], "workers must be at most"),
        (["--nsamples", str(10**30)], "fit in 64 bits"),
        (["--heartbeat-timeout", "1e300"], "heartbeat_timeout must be at most"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_numbers_past_any_machine(flags, phrase, model, text_file, tmp_path, capsys):
    refused(capsys, prune_args(model, tmp_path / "out", text_file, *flags), tmp_path, phrase)


def test_numbers_past_any_machine_in_a_config_file(model, text_file, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"calibration:\n  seed: {10**23}\nruntime:\n  threads: {2**40}\n")
    refused(capsys, [*prune_args(model, tmp_path / "out", text_file), "--config", str(config)], tmp_path, "64 bits")


def gblm_args(model: Path, out: Path, text: Path, scratch: Path) -> list[str]:
    return prune_args(model, out, text, "--method", "gblm", "--scratch", str(scratch), "--activation-storage", "disk")


def test_a_blocked_scratch_folder(model, text_file, tmp_path, capsys):
    """--scratch under a file: refused by the driver, before any work."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    refused(capsys, gblm_args(model, tmp_path / "out", text_file, blocker / "scratch"), tmp_path, "is not a folder")


def test_a_scratch_folder_the_system_will_not_let_anyone_write(model, text_file, tmp_path, capsys):
    """/proc takes no new folders, not even from root (and has no free space to offer)."""
    refused(capsys, gblm_args(model, tmp_path / "out", text_file, Path("/proc/dist-prune-scratch")), tmp_path, "/proc")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_scratch_folder(model, text_file, tmp_path, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o555)
    refused(capsys, gblm_args(model, tmp_path / "out", text_file, scratch), tmp_path, "read-only")


def almost_full(monkeypatch, folder: Path) -> None:
    """`folder`'s disk made to look almost full (1000 bytes free) to the driver's check."""
    usage = shutil.disk_usage

    def reported(path):
        real = usage(path)
        return real._replace(free=1000) if Path(path) == folder else real

    monkeypatch.setattr(shutil, "disk_usage", reported)


def test_an_output_disk_without_room_for_the_plan(model, text_file, tmp_path, capsys, monkeypatch):
    """The output's bytes (13 MB here) against the free space of its disk, before any worker starts."""
    almost_full(monkeypatch, tmp_path)
    refused(capsys, prune_args(model, tmp_path / "out", text_file), tmp_path, "GiB free")


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second file system for --scratch")
def test_a_scratch_disk_without_room_for_the_plan(model, text_file, tmp_path, capsys, monkeypatch):
    """The scratch bytes the plan counts (GBLM's stored inputs and gradient rows), on the scratch folder's own
    disk: refused before the folder is even made."""
    almost_full(monkeypatch, Path("/dev/shm"))
    scratch = Path("/dev/shm") / f"dist-prune-test-{os.getpid()}"
    refused(capsys, gblm_args(model, tmp_path / "out", text_file, scratch), tmp_path, "under /dev/shm")
    assert not scratch.exists()


def test_an_output_disk_that_fills_during_the_run(model, text_file, tmp_path):
    """A real write error in the middle of the run (a file-size limit of 1 MB: the layer files fit, the
    embeddings do not): one line, exit 2, and the finished layers kept for --resume."""
    out = tmp_path / "out"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    argv = [sys.executable, "-m", "dist_prune", *prune_args(model, out, text_file)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "cannot write" in lines[0] and "model-rest.safetensors: File too large" in lines[0]
    assert "--resume" in lines[0] and not out.exists()
    kept = sorted(p.name for p in (tmp_path / ".out.partial").iterdir())
    assert kept == [
        "dist_prune.json",
        "model-layer-00000-of-00002.safetensors",
        "model-layer-00001-of-00002.safetensors",
    ]
    assert main(prune_args(model, out, text_file, "--resume")) == 0


def zero_checkpoint(root: Path, model_states: object, optim_states: object) -> Path:
    """A DeepSpeed-shaped folder whose pickles (the user trusts them) hold `model_states` and `optim_states`."""
    tag = root / "global_step1"
    tag.mkdir(parents=True)
    (root / "latest").write_text("global_step1")
    torch.save(model_states, tag / "mp_rank_00_model_states.pt")
    torch.save(optim_states, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return root


GOOD_OPTIM = {"optimizer_state_dict": {"zero_stage": 2, "partition_count": 1}}
ZERO_STATES = {  # (model states, optimizer states)
    "param_shapes a string": ({"param_shapes": "garbage"}, GOOD_OPTIM),
    "a shape of words": ({"param_shapes": [{"model.norm.weight": ["x"]}]}, GOOD_OPTIM),
    "a negative size": ({"param_shapes": [{"model.norm.weight": [-4]}]}, GOOD_OPTIM),
    "partition count of lists": (
        {"param_shapes": [{"model.norm.weight": [4]}]},
        {"optimizer_state_dict": {"zero_stage": 2, "partition_count": [[1]]}},
    ),
    "zero stage a word": (
        {"param_shapes": [{"model.norm.weight": [4]}]},
        {"optimizer_state_dict": {"zero_stage": "two", "partition_count": 1}},
    ),
}


@pytest.mark.parametrize("case", list(ZERO_STATES))
def test_an_unexpected_structure_in_a_trusted_zero_checkpoint(case, model, text_file, tmp_path, capsys):
    model_states, optim_states = ZERO_STATES[case]
    folder = zero_checkpoint(tmp_path / "zero", model_states, optim_states)
    shutil.copy(model / "config.json", folder / "config.json")
    refused(capsys, ["inspect", str(folder), "--trust-pickle"], tmp_path, "structure of a DeepSpeed checkpoint")
    argv = prune_args(folder, tmp_path / "out", text_file, "--trust-pickle")
    refused(capsys, argv, tmp_path, "structure of a DeepSpeed checkpoint")


def test_no_gloo_thread_outlives_a_job(tiny_llama, text_file, tmp_path):
    """Teardown joins gloo's worker threads instead of sleeping past them: after a layer-wise job and an FSDP
    one (whose DTensor caches held the process group), no thread of the group is left when the process exits."""
    script = f"""
import os, dist_prune
for method, out in (("wanda", "a"), ("flap", "b")):
    dist_prune.prune(model={str(tiny_llama)!r}, out={str(tmp_path)!r} + "/" + out, method=method, nsamples=4,
                     seqlen=32, calib_source={str(text_file)!r}, eval_after=False, device="cpu", ratio=0.2,
                     protect_first=0, recover_steps=0)
names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sorted(n for n in names if "gloo" in n))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
