"""Shared fixtures: tiny random LLaMA checkpoints built in-process, with the real SmolLM2 tokenizer; spawned
workers that keep their stderr (`spawn_workers`)."""

import faulthandler
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def smollm2_path() -> Path:
    from dist_prune.assets import smollm2_dir

    return smollm2_dir()


def write_tiny_llama(
    path: Path, *, layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides
) -> Path:
    """A random LLaMA with grouped-query attention, saved as an ordinary HF checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**settings)).to(dtype)
    model.save_pretrained(path)
    _copy_tokenizer(path)
    return path


# One tiny model per family, each built with transformers' own config class; every family's particulars on:
# Llama 3's rope scaling, Qwen2's q/k/v biases, Qwen3's q/k norms, Gemma 3's extra norms, scaled embedding,
# sliding-window layers (a window shorter than the test sequences) and final-logit soft cap; Mistral untied.
TINY_SHAPE = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16
)
FAMILY_SETTINGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
    )),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=30.0, query_pre_attn_scalar=16,
    )),
}  # fmt: skip


def write_tiny_family(path: Path, model_type: str, *, layers: int = 3, seed: int = 0) -> Path:
    """A random model of one family, saved as an ordinary HF checkpoint with the SmolLM2 tokenizer. Norm
    weights and biases are randomised too: transformers starts them at one or zero, where a wrong norm or a
    lost bias would go unseen."""
    import transformers

    config_class, model_class, settings = FAMILY_SETTINGS[model_type]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**TINY_SHAPE, num_hidden_layers=layers, **settings)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(path)
    _copy_tokenizer(path)
    return path


def _copy_tokenizer(path: Path) -> None:
    for name in TOKENIZER_FILES:
        if (smollm2_path() / name).is_file():
            shutil.copy2(smollm2_path() / name, path / name)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    from dist_prune.assets import wikipedia_text

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(wikipedia_text("calibration")[:60_000])
    return path


RAY_ENV = {"GLOO_SOCKET_IFNAME": "lo", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="session")
def ray_head():
    """A single-machine Ray cluster on loopback, as `ray start --head` makes it, shared by every test module."""
    import subprocess
    import sys

    ray = str(Path(sys.executable).with_name("ray"))
    port = 6390

    def cli(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(args, env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=600)

    started = cli([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "4",
                   "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"])  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    yield f"127.0.0.1:{port}"
    cli([ray, "stop", "--force"])


def spawn_workers(fn, world: int, args: tuple, log_dir: Path) -> None:
    """`fn(rank, *args)` in `world` spawned processes, each with its stderr in log_dir/rank<r>.log and Python's
    fault handler on, so a worker that aborts inside C++ (gloo, a BLAS) leaves its last words and the Python
    stacks of every thread. A failure is raised with those words on one line: CI shows only the summary."""
    import torch.multiprocessing as mp

    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.spawn(_logged_worker, args=(fn, args, log_dir), nprocs=world, join=True)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as failure:
        last_line = [line for line in str(failure).splitlines() if line.strip()][-1]  # the exception or signal
        raise RuntimeError(f"{last_line}; {_stderr_tails(log_dir, world)}\n{failure}") from failure


def _logged_worker(rank: int, fn, args: tuple, log_dir: Path) -> None:
    # The file descriptor itself: C++ writes there too, and so do sys.stderr and the fault handler.
    log = os.open(log_dir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 2)
    os.close(log)
    faulthandler.enable(all_threads=True)
    fn(rank, *args)


def _stderr_tails(log_dir: Path, world: int) -> str:
    return "; ".join(f"rank {rank} stderr: {_last_words(log_dir / f'rank{rank}.log')}" for rank in range(world))


def _last_words(log: Path, lines: int = 5) -> str:
    """The lines before a fault dump (the C++ 'what()') and the top of the aborting thread's stack, or the
    last lines when there was no fault."""
    if not log.is_file():  # the worker was stopped before it started
        return "(empty)"
    text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    text = [line for line in text if not line.startswith("Extension modules")]
    current = next((i for i, line in enumerate(text) if line.startswith("Current thread")), None)
    words = text[-lines:] if current is None else text[max(current - lines, 0) : current + lines]
    return " | ".join(line.strip() for line in words) or "(empty)"
