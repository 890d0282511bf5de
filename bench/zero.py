"""Pruning straight from a DeepSpeed ZeRO-3 checkpoint: peak resident memory against the checkpoint's size.

A random-weight ~1.2B LLaMA (TinyLlama-1.1B's decoder with SmolLM2's vocabulary, so its tokenizer fits) is
partitioned over 2 ranks by DeepSpeed itself (torchrun, CPU, gloo, bf16, `deepspeed.zero.Init`, SGD so there
are no Adam moments to hold) and saved with `save_checkpoint`: fp32 master weights in one flat partition per
rank. Then, each in its own child process with its peak RSS from os.wait4:

- `dist-prune prune --model CKPT --trust-pickle --residency stream` (Wanda 50%, 1 worker);
- for comparison, what users do today before pruning: DeepSpeed's `zero_to_fp32.py` conversion (default mode)
  to a safetensors folder.

Writes the `zero-1b` section of bench/RESULTS.md and deletes the checkpoint and outputs (`--keep` keeps them).

    python bench/zero.py [--workdir /tmp/dist_prune_bench_zero] [--nsamples 4 --seqlen 128]
"""

import argparse
import datetime
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import machine_line, run_child, run_measured, write_section
from stream import dir_bytes, flags, planned

GiB = 2**30
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
RANKS = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_rank(out: Path) -> None:
    """One rank of the writer (run under torchrun by `build`)."""
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # Skip JIT-compiling DeepSpeed's shared-memory CPU collectives (a minute of g++; gloo does the same job).
    # `deepspeed.comm.torch` as an attribute is the torch package it re-exports: patch the module itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    settings = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
    }
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, dtype="bfloat16")
    with deepspeed.zero.Init(config_dict_or_path=settings):  # each parameter partitioned as it is built
        model = LlamaForCausalLM(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=settings)
    engine.save_checkpoint(str(out))
    if engine.global_rank == 0:
        config.save_pretrained(out)


def build(out: Path) -> float:
    from dist_prune.assets import smollm2_dir
    from dist_prune.distributed import free_port

    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), __file__, "--build-rank", str(out)]  # fmt: skip
    subprocess.run(command, env=env, check=True)
    for name in TOKENIZER_FILES:
        if (smollm2_dir() / name).is_file():
            shutil.copy2(smollm2_dir() / name, out / name)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dist_prune_bench_zero"))
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--build-rank", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_rank:
        build_rank(args.build_rank)
        return
    command = "python bench/zero.py " + " ".join(sys.argv[1:])
    work = args.workdir
    if work.exists() and any(work.iterdir()):
        parser.error(f"--workdir {work} is not empty: this script writes (and then deletes) its files there")
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, pruned, exported = work / "ckpt", work / "pruned", work / "exported"
    print("building the ZeRO-3 checkpoint ...", flush=True)
    built_s = build(checkpoint)
    tag = checkpoint / (checkpoint / "latest").read_text().strip()
    sizes = dict(checkpoint=dir_bytes(tag), fp32=_fp32_bytes(tag))

    settings = dict(model=str(checkpoint), trust_pickle=True, method="wanda", sparsity=0.5, residency="stream",
                    nsamples=args.nsamples, seqlen=args.seqlen, batch_size=1, eval_after=False,
                    threads=os.cpu_count(), out=str(pruned))  # fmt: skip
    print("$ dist-prune prune " + " ".join(flags(settings)), flush=True)
    prune_s, prune_mib = run_child(["prune", *flags(settings)])
    report = json.loads((pruned / "prune_report.json").read_text())
    convert = [sys.executable, str(checkpoint / "zero_to_fp32.py"), str(checkpoint), str(exported),
               "--safe_serialization"]  # fmt: skip
    print("$ " + " ".join(convert), flush=True)
    convert_s, convert_peak = run_measured(convert, stdout=subprocess.DEVNULL)
    rows = dict(
        prune=dict(wall=prune_s, peak=prune_mib * 2**20, out=dir_bytes(pruned), report=report,
                   plan=planned(settings)["peak"]),
        convert=dict(wall=convert_s, peak=convert_peak, out=dir_bytes(exported)),
    )  # fmt: skip
    write_section("zero-1b", render(rows, sizes, built_s, args, command))
    if not args.keep:
        for made in (checkpoint, pruned, exported):
            shutil.rmtree(made, ignore_errors=True)
        if created:
            work.rmdir()
    print(json.dumps({k: {n: v for n, v in r.items() if n != "report"} for k, r in rows.items()}, indent=1))


def _fp32_bytes(tag: Path) -> int:
    from dist_prune.zero import read_layout

    layout = read_layout(tag)
    return 4 * sum(math.prod(shape) for name, shape in layout.shapes.items() if name not in layout.aliases)


def render(rows: dict, sizes: dict, built_s: float, args, command: str) -> str:
    prune, convert = rows["prune"], rows["convert"]
    gb = 1e9
    worker = prune["report"]["workers"][0] if prune["report"].get("workers") else {}
    lines = [
        "## Pruning from a DeepSpeed ZeRO-3 checkpoint: memory against size",
        "",
        f"Machine: {machine_line()}. Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.",
        f"Command: `{command}`.",
        "",
        f"Checkpoint: RANDOM weights (not a trained model), TinyLlama-1.1B's decoder shape with SmolLM2's "
        f"vocabulary ({SHAPE['num_hidden_layers']} layers, hidden {SHAPE['hidden_size']}, untied head), "
        f"partitioned and saved by DeepSpeed itself (ZeRO-3, {RANKS} ranks under torchrun on CPU, bf16, "
        f"`deepspeed.zero.Init`, SGD: no Adam moments) in {built_s:.0f} s. Its tag folder holds "
        f"{sizes['checkpoint'] / gb:.2f} GB, of which the fp32 master weights are {sizes['fp32'] / gb:.2f} GB.",
        f"Prune: Wanda 50%, 1 in-process worker, `--residency stream`, {args.nsamples} x {args.seqlen} "
        f"calibration tokens, no evaluation; output bf16. Peak RSS: the child process's own (os.wait4), which "
        f"includes the pages of the memory-mapped partition files while they are mapped.",
        "",
        "| run | wall s | peak RSS GB | peak / fp32 weights | output GB |",
        "|---|---|---|---|---|",
        f"| dist-prune prune from the ZeRO-3 folder (plan {prune['plan'] / gb:.2f} GB) | {prune['wall']:.0f} | "
        f"{prune['peak'] / gb:.2f} | {prune['peak'] / sizes['fp32']:.2f} | {prune['out'] / gb:.2f} |",
        f"| DeepSpeed `zero_to_fp32.py` to safetensors (the step it replaces) | {convert['wall']:.0f} | "
        f"{convert['peak'] / gb:.2f} | {convert['peak'] / sizes['fp32']:.2f} | {convert['out'] / gb:.2f} |",
        "",
    ]
    if worker:
        lines.append(f"Worker 0's own peak as the report gives it: {worker.get('peak_bytes', 0) / gb:.2f} GB.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
