"""Streaming residency: a worker holds one decoder layer at a time, so a model larger than RAM prunes on it.

Part `big`: a random-weight LLaMA-2-13B-shaped checkpoint (bf16, ~26 GB of sharded safetensors: more than this
machine's RAM), built here one tensor at a time, pruned by one in-process worker with `--residency stream`:
Wanda 50%, SparseGPT 2:4, GBLM 50% (fp16 gradient rows in a scratch directory). Per run: wall time, the
child's peak RSS against the memory plan, peak scratch disk, output size, and a FLOP floor (the run's matmul
FLOPs counted from the shapes, divided by the fp32 matmul rate measured in the same run).

Part `smollm2`: SmolLM2-135M (real weights), Wanda and GBLM (`--sparsegpt` adds SparseGPT), stream against
resident residency, 1 worker (2 threads) and 2 torchrun workers (1 thread each): time of the gradient pass
and of the layer loop, perplexities, masks against the 1-worker stream run, and the achieved share of the
matmul rate.

Writes the `stream-13b` and `stream-smollm2` sections of bench/RESULTS.md; deletes the checkpoint and every
output at the end (`--keep` keeps them).

    python bench/stream.py                      # both parts: ~2-3 h on 2 cores (13B ~2-2.5 h, SmolLM2 ~15-20 min)
    python bench/stream.py --part big [--workdir /tmp/dist_prune_bench_13b] [--big-runs wanda,gblm]
    python bench/stream.py --part smollm2 [--nsamples 16 --seqlen 512 --batch-size 2] [--sparsegpt] [--repeat 3]
"""

import argparse
import datetime
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import machine_line, matmul_gflops, run_child, write_section

from dist_prune.memory import ModelShape
from dist_prune.models import family_of

GiB, MiB = 2**30, 2**20
CORES = os.cpu_count() or 1
# LLaMA-2-13B's decoder with SmolLM2's vocabulary (so its tokenizer fits). "small" is for testing this script.
SHAPES = {
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=49152, max_position_embeddings=4096),
    # 13B's layers, only two of them: a layer's memory and time in minutes (reconstruction's rows)
    "13b-2-layers": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=2, num_attention_heads=40,
                         num_key_value_heads=40, vocab_size=49152, max_position_embeddings=4096),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=49152, max_position_embeddings=4096),
}  # fmt: skip
# ~5 GB shards, as transformers writes them; the small shape gets several tiny shards to exercise the index.
SHARD_BYTES = {"13b": 5 * 10**9, "13b-2-layers": 5 * 10**9, "small": 8 * 10**6}
SHAPE_NAMES = {"13b": "a LLaMA-2-13B-shaped", "13b-2-layers": "a LLaMA-2-13B-shaped (two of its layers)",
               "small": "a small LLaMA-shaped (testing this script)"}  # fmt: skip
INIT_STD = 0.02  # LLaMA's initializer_range: matrices ~ N(0, 0.02), RMSNorm weights 1
BIG_RUNS = {  # name -> settings (config field names; every field is a CLI flag)
    "wanda": dict(method="wanda", sparsity=0.5),
    "sparsegpt": dict(method="sparsegpt", pattern="2:4"),
    "gblm": dict(method="gblm", sparsity=0.5, gradient_dtype="fp16"),
    "wanda-linear": dict(method="wanda", sparsity=0.5, reconstruct="linear"),
    "wanda-block": dict(method="wanda", sparsity=0.5, reconstruct="block"),
}
RSS_TARGET = 6 * GiB
PLAN_TOLERANCE = 0.15
SMOLLM2_SHAPES = (("stream", 1), ("resident", 1), ("stream", 2), ("resident", 2))  # (residency, workers)
STREAM_OVER_RESIDENT_TARGET = 1.2
MATMUL_SHARE_TARGET = 0.5


# ---------------------------------------------------------------------------------------------------------
# FLOPs from the shapes. 2 FLOPs per multiply-add. Only matrix products are counted: sorting and top-k (Wanda,
# GBLM, N:M), element-wise scores, norms, softmax and GBLM's squared-gradient sums are not, so the floor is a
# lower bound on the time a run could take at the measured matmul rate.
# ---------------------------------------------------------------------------------------------------------


class Shape(ModelShape):
    """The model's sizes (dist_prune's own ModelShape), with what the FLOP counts need on top."""

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def matrices(self) -> list[tuple[int, int]]:
        """(out, in) of q, k, v, o, gate, up, down."""
        kv = self.kv_heads * self.head_dim
        q, h = self.attention_width, self.hidden
        return [(q, h), (kv, h), (kv, h), (h, q), (self.mlp, h), (self.mlp, h), (h, self.mlp)]

    @property
    def linear_params(self) -> int:
        return self.layer_linear_params

    @property
    def qkv_params(self) -> int:
        return sum(out * inp for out, inp in self.matrices[:3])

    @property
    def hessian_widths(self) -> tuple[int, ...]:
        """One per group of Linears sharing an input (and a Hessian): q/k/v, o, gate/up, down."""
        return (self.hidden, self.attention_width, self.hidden, self.mlp)


def layer_forward_flops(shape: Shape, sequences: int, seqlen: int) -> float:
    """One decoder layer's forward: every Linear (2 * tokens * params), and attention's QK^T and AV
    (2 * 2 * seqlen^2 * width per sequence, halved because the causal mask leaves half of each)."""
    return 2 * sequences * seqlen * shape.linear_params + 2 * sequences * seqlen**2 * shape.attention_width


def head_flops(shape: Shape, tokens: int) -> float:
    return 2 * tokens * shape.vocab * shape.hidden


def gradient_pass_flops(shape: Shape, sequences: int, seqlen: int) -> float:
    """GBLM's layer-wise gradient pass: a forward through every layer (keeping each layer's input), the head's
    logits and their gradient, then from the top down each layer's forward recomputed (1x) and its backward
    (2x: the weight gradients and the input gradient, one product each); layer 0 skips q/k/v's input gradient."""
    forward = layer_forward_flops(shape, sequences, seqlen)
    head = 2 * head_flops(shape, sequences * seqlen)
    return shape.layers * (forward + 3 * forward) + head - 2 * sequences * seqlen * shape.qkv_params


def hessian_flops(shape: Shape, tokens: int) -> float:
    """SparseGPT's X^T X per input group: 2 * tokens * in^2."""
    return sum(2 * tokens * width**2 for width in shape.hessian_widths)


def obs_flops(shape: Shape) -> float:
    """SparseGPT per matrix (its rows, all on one worker): the inverse Hessian's upper Cholesky factor, computed
    for each matrix (Cholesky n^3/3, inverse from the factor 2n^3/3, Cholesky again n^3/3: 4/3 in^3), and the
    OBS updates: each pruned column's error is pushed once onto every column to its right, in-block as rank-1
    updates and lazily as one product per block, 2 * out * in * in/2 = out * in^2 in all."""
    return sum(4 / 3 * inp**3 + out * inp**2 for out, inp in shape.matrices)


def reconstruction_flops(shape: Shape, settings: dict, tokens: int) -> float:
    """Per layer, `--reconstruct`: each matrix's fit, iterations + 3 products (rows x in) @ (in x in)
    (methods/reconstruction.py); linear mode's X^T X (SparseGPT's Hessians: counted once); block mode's X^T X
    and cross sums per group and its partial forwards, dense and fitted, up to o, gate/up and down (about
    three layer forwards)."""
    mode = settings.get("reconstruct", "none")
    if mode == "none":
        return 0.0
    fits = sum(2 * out * inp**2 * (settings.get("reconstruct_iterations", 8) + 3) for out, inp in shape.matrices)
    if mode == "linear":
        return fits + (hessian_flops(shape, tokens) if settings["method"] != "sparsegpt" else 0.0)
    return fits + 2 * hessian_flops(shape, tokens) + 3 * layer_forward_flops(shape, tokens, 1)


def layer_loop_flops(shape: Shape, settings: dict, eval_windows: int, eval_seqlen: int):
    """Per layer: the statistics forward and the forward through the pruned layer (the next layer's inputs), the
    dense and the pruned evaluation states (when evaluating), SparseGPT's Hessians and OBS work, and
    reconstruction's."""
    sequences, seqlen = settings["nsamples"], settings["seqlen"]
    per_layer = 2 * layer_forward_flops(shape, sequences, seqlen) + 2 * layer_forward_flops(
        shape, eval_windows, eval_seqlen
    )
    if settings["method"] == "sparsegpt":
        per_layer += hessian_flops(shape, sequences * seqlen) + obs_flops(shape)
    per_layer += reconstruction_flops(shape, settings, sequences * seqlen)
    return shape.layers * per_layer


def run_flops(shape: Shape, settings: dict) -> dict[str, float]:
    """The run's FLOPs by phase: `gradients` (GBLM), `layers` (the layer loop), `total` (also the evaluation
    head, dense and pruned, after the loop)."""
    n, s = settings["nsamples"], settings["seqlen"]
    windows = settings.get("eval_windows", 0) if settings.get("eval_after", True) else 0
    eval_seqlen = settings.get("eval_seqlen", 512)
    gradients = gradient_pass_flops(shape, n, s) if settings["method"] == "gblm" else 0.0
    layers = layer_loop_flops(shape, settings, windows, eval_seqlen)
    evaluation_head = 2 * head_flops(shape, windows * eval_seqlen)
    return dict(gradients=gradients, layers=layers, total=gradients + layers + evaluation_head)


# ---------------------------------------------------------------------------------------------------------
# Work done in spawned processes. Python starts children with vfork and Linux carries the starting process's
# peak RSS into the child's, so anything large done here would show up as every later child's peak.
# ---------------------------------------------------------------------------------------------------------


def in_spawned_process(function, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _gemm_rate(m: int, k: int, n: int, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    return matmul_gflops(m, k, n)


def gemm_rate(m: int, k: int, n: int) -> float:
    """fp32 GFLOP/s of an (m x k) @ (k x n) product on all cores (what one worker with every thread, or the
    workers together, can reach)."""
    return in_spawned_process(_gemm_rate, m, k, n, CORES)


def build_random_checkpoint(path: Path, shape_name: str) -> dict:
    """A random-weight bf16 LLaMA checkpoint at `path` (kept if already complete: the index is written last)."""
    if (path / "model.safetensors.index.json").is_file():
        return dict(seconds=0.0, builder_peak=0, reused=True)
    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    peak = in_spawned_process(_write_random_checkpoint, str(path), shape_name)
    return dict(seconds=time.perf_counter() - start, builder_peak=peak, reused=False)


def _write_random_checkpoint(path: str, shape_name: str) -> int:
    """Writes the shards one tensor at a time, so the builder never holds more than one tensor (plus its fp32
    draw); returns the builder's peak RSS in bytes."""
    from transformers import LlamaConfig

    from dist_prune.assets import smollm2_dir

    out = Path(path)
    out.mkdir(parents=True)
    config = LlamaConfig(**SHAPES[shape_name], tie_word_embeddings=False, rms_norm_eps=1e-5, dtype="bfloat16")
    shards = _pack(_tensor_specs(config.to_dict()), SHARD_BYTES[shape_name])
    weight_map, total = {}, 0
    for number, specs in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(out / name, specs)
        weight_map.update({tensor: name for tensor, _ in specs})
    config.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smollm2_dir() / name, out / name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LLaMA checkpoint with its shape, as dist_prune's model family expects them."""
    return list(family_of(config).expected_shapes(config).items())


def _pack(specs: list, limit: int) -> list[list]:
    """Consecutive tensors into shards of at most `limit` bf16 bytes (a larger tensor gets its own)."""
    shards, size = [[]], 0
    for spec in specs:
        nbytes = 2 * _numel(spec[1])
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _write_safetensors(file: Path, specs: list) -> int:
    """The safetensors format by hand: 8-byte header length, JSON header (offsets known from the shapes),
    then the raw bytes in order. safetensors.torch.save_file would need every tensor of the shard at once (and
    a serialized copy of them): ~10 GB per 5 GB shard. Returns the data bytes."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dims in specs:
        nbytes = 2 * _numel(dims)
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    generator = torch.Generator().manual_seed(sum(map(ord, file.name)))
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for _name, dims in specs:
            if len(dims) == 1:
                tensor = torch.ones(dims, dtype=torch.bfloat16)  # RMSNorm weights start at 1
            else:
                tensor = torch.randn(dims, generator=generator).mul_(INIT_STD).to(torch.bfloat16)
            f.write(tensor.view(torch.uint8).numpy().data)
            del tensor
    return offset


# ---------------------------------------------------------------------------------------------------------
# Running one prune.
# ---------------------------------------------------------------------------------------------------------


def flags(settings: dict) -> list[str]:
    """Config fields as CLI flags: `batch_size=2` -> `--batch-size 2`, `eval_after=False` -> `--no-eval-after`."""
    out = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            out += [flag, str(value)]
    return out


def dir_bytes(path: Path) -> int:
    """Apparent size of everything under `path`; files may vanish while we walk (the engine deletes them)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


class PeakSize:
    """The largest size of a directory seen while the block runs, polled from a thread every `interval` s (a
    walk over a handful of files: cheap, and frequent enough not to miss a short gradient pass)."""

    def __init__(self, path: Path | None, interval: float = 0.5):
        self.path, self.interval, self.peak = path, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            if self.path is not None and self.path.exists():
                self.peak = max(self.peak, dir_bytes(self.path))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakSize":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def prune(settings: dict, workers: int, scratch: Path | None = None) -> dict:
    """One `dist-prune prune` child (torchrun when workers > 1): wall s, peak RSS bytes, peak scratch bytes,
    output bytes, and its report. Under torchrun the measured RSS is the largest of the launcher and its ranks."""
    out = Path(settings["out"])
    shutil.rmtree(out, ignore_errors=True)
    launcher = None
    if workers > 1:
        from dist_prune.distributed import free_port

        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(workers), "--master-addr", "127.0.0.1",
                    "--master-port", str(free_port())]  # fmt: skip
    args = ["prune", *flags(settings)]
    print(("$ torchrun ... " if launcher else "$ dist-prune ") + " ".join(args), flush=True)
    with PeakSize(scratch) as disk:
        wall, rss_mib = run_child(args, launcher)
    report = json.loads((out / "prune_report.json").read_text())
    return dict(wall=wall, rss=rss_mib * MiB, scratch_peak=disk.peak, out_bytes=dir_bytes(out), report=report)


def planned(settings: dict) -> dict:
    """The memory plan's per-worker peak and scratch bytes for this run (the plan API lives here alone)."""
    from dist_prune.config import build_config
    from dist_prune.memory import plan_for, plan_source

    config = build_config(overrides=settings)
    plan = plan_for(config, plan_source(config)).to_dict()
    return dict(peak=plan["peak"], scratch=plan["scratch"], storage=plan["activation_storage"])


def peak_phase(worker: dict) -> str:
    """The first phase after which the worker's peak RSS had reached its final value."""
    for phase, peak in worker.get("host_peak_after_phase", {}).items():
        if peak >= worker["peak_bytes"]:
            return phase
    return "end (writing embeddings and head)"


# ---------------------------------------------------------------------------------------------------------
# Part big: the 13B-shaped random model, streamed by one worker.
# ---------------------------------------------------------------------------------------------------------


def shape_config(name: str) -> dict:
    """A shape as the config.json the pruner reads (whose family it names)."""
    return dict(SHAPES[name], model_type="llama")


def big_part(args: argparse.Namespace, command: str) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, scratch = work / f"random-{args.shape}", work / "scratch"
    config = dict(shape_config(args.shape), tie_word_embeddings=False)
    shape = Shape.from_config(config)
    _check_disk(work, model, shape)
    built = build_random_checkpoint(model, args.shape)
    built["shards"] = len(list(model.glob("*.safetensors")))
    checkpoint = dir_bytes(model)
    print(f"checkpoint {model}: {checkpoint / 1e9:.1f} GB, built in {built['seconds']:.0f} s", flush=True)
    base = dict(model=str(model), nsamples=args.big_nsamples, seqlen=args.big_seqlen, batch_size=1, seed=0,
                eval_after=args.big_eval_windows > 0, launcher="local", residency="stream", threads=CORES)  # fmt: skip
    if args.big_eval_windows:
        base.update(eval_windows=args.big_eval_windows, eval_seqlen=args.big_seqlen)
    rates = [gemm_rate(args.big_seqlen, shape.hidden, shape.mlp)]
    rows = []
    for name in args.big_runs.split(","):
        settings = dict(base, **BIG_RUNS[name], out=str(work / f"out-{name}"))
        if name == "gblm":
            settings["scratch"] = str(scratch)
        plan = planned(settings)
        result = prune(settings, 1, scratch)
        shutil.rmtree(settings["out"])  # the disk holds the checkpoint and one output, not three
        rates.append(gemm_rate(args.big_seqlen, shape.hidden, shape.mlp))
        rows.append(_big_row(name, settings, result, plan, shape))
        print(rows[-1], flush=True)
        # Publish after every run, so that a long benchmark leaves what it has measured.
        write_section(
            f"stream-{args.shape}", render_big(rows, args, command, checkpoint, built, max(rates)), args.results
        )
    if not args.keep:
        shutil.rmtree(model)
        shutil.rmtree(scratch, ignore_errors=True)


def _check_disk(work: Path, model: Path, shape: Shape) -> None:
    """The checkpoint, and the larger of one output (the checkpoint's size) and GBLM's fp16 gradient rows: the
    layer loop deletes a layer's rows as it writes the layer, so the two grow and shrink together. 2 GB spare."""
    checkpoint = 2 * shape.total_params
    needed = checkpoint + max(checkpoint, 2 * shape.layers * shape.linear_params) + 2 * 10**9
    have = shutil.disk_usage(work).free + (dir_bytes(model) if model.exists() else 0)
    if have < needed:
        sys.exit(f"{work}: {have / 1e9:.0f} GB free, this part needs about {needed / 1e9:.0f} GB")


def _big_row(name: str, settings: dict, result: dict, plan: dict, shape: Shape) -> dict:
    report = result["report"]
    timings = report["timings_s"]
    return dict(
        name=name, pattern=settings.get("pattern") or f"{settings['sparsity']:.0%}", wall=result["wall"],
        gradients=timings.get("gradients"), layers=timings.get("layers"), rss=result["rss"],
        peak_phase=peak_phase(report["workers"][0]), plan=plan["peak"], plan_scratch=plan["scratch"],
        report_plan=(report.get("memory_plan") or {}).get("peak"), scratch_peak=result["scratch_peak"],
        out_bytes=result["out_bytes"], flops=run_flops(shape, settings)["total"],
        sparsity=report["total_sparsity"],
    )  # fmt: skip


def render_big(rows: list[dict], args, command: str, checkpoint: int, built: dict, rate: float) -> str:
    shape = SHAPES[args.shape]
    lines = [
        "## Stream: a 13B-shaped model larger than RAM, one worker",
        "",
        f"Machine: {machine_line()}; {_ram_gib():.0f} GiB RAM.",
        f"Versions: {_versions()}. Date: {_now()}.",
        f"Command: `{command}`.",
        "",
        f"**The weights are random** (matrices N(0, {INIT_STD}), norms 1): {SHAPE_NAMES[args.shape]} checkpoint "
        f"(hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads, SmolLM2's vocabulary of {shape['vocab_size']}), "
        f"{checkpoint / 1e9:.1f} GB of bf16 safetensors in {built['shards']} shards of at most "
        f"{SHARD_BYTES[args.shape] / 1e9:g} GB, written by this script one tensor at a time ({_built(built)}). "
        "Only time, memory and disk mean anything here.",
        f"Each run: one in-process worker (`--launcher local --residency stream --threads {CORES}`), "
        f"{args.big_nsamples} x {args.big_seqlen} calibration tokens, batch 1, {_big_eval(args)}. "
        "GBLM keeps its fp16 gradient rows in a scratch directory beside the checkpoint.",
        "Peak RSS: the child's own (os.wait4); `set in`: the phase after which the worker's peak was reached. "
        "Plan: `dist_prune.memory.plan_for` with the same config. Scratch: the largest size of the scratch "
        "directory, polled twice a second (plan in brackets).",
        f"Floor: the run's matrix-product FLOPs counted from the shapes (bench/stream.py: `run_flops`) at "
        f"the fp32 matmul rate measured in the same run, {rate:.1f} GFLOP/s (best of the measurements before "
        f"and after each run; {args.big_seqlen}x{shape['hidden_size']} @ "
        f"{shape['hidden_size']}x{shape['intermediate_size']}, {CORES} threads). Not counted: reading and "
        "writing the weights, sorting, element-wise work.",
        "",
        "| method | pattern | wall s | gradient pass s | layer loop s | peak RSS GiB | set in | plan GiB | "
        "plan / measured | scratch peak GiB (plan) | output GB | TFLOP | floor s | wall / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor = r["flops"] / (rate * 1e9)
        lines.append(
            f"| {r['name']} | {r['pattern']} | {r['wall']:.0f} | {_seconds(r['gradients'])} | "
            f"{_seconds(r['layers'])} | {r['rss'] / GiB:.2f} | {r['peak_phase']} | {r['plan'] / GiB:.2f} | "
            f"{r['plan'] / r['rss']:.2f} | {r['scratch_peak'] / GiB:.2f} ({r['plan_scratch'] / GiB:.2f}) | "
            f"{r['out_bytes'] / 1e9:.1f} | {r['flops'] / 1e12:.3g} | {floor:.3g} | {r['wall'] / floor:.1f}x |"
        )
    # two of 13B's layers are held to the whole 13B checkpoint's quarter: a layer's memory does not depend on
    # how many there are
    whole = 2 * Shape.from_config(shape_config("13b")).total_params if args.shape == "13b-2-layers" else checkpoint
    return "\n".join(lines + [""] + _big_verdicts(rows, whole)) + "\n"


def _big_verdicts(rows: list[dict], checkpoint: int) -> list[str]:
    lines = []
    for r in rows:
        rss_ok = r["rss"] <= RSS_TARGET and r["rss"] < checkpoint / 4
        ratio = r["plan"] / r["rss"]
        lines.append(
            f"- {r['name']}: peak RSS {r['rss'] / GiB:.2f} GiB, target <= {RSS_TARGET / GiB:.0f} GiB and < 1/4 of "
            f"the checkpoint ({checkpoint / 4 / GiB:.2f} GiB): {'met' if rss_ok else 'NOT met'}; plan within "
            f"{PLAN_TOLERANCE:.0%} of it: {'met' if abs(ratio - 1) <= PLAN_TOLERANCE else 'NOT met'} ({ratio:.2f}); "
            f"sparsity {r['sparsity']:.4f}."
        )
        if r["report_plan"] is not None and abs(r["report_plan"] - r["plan"]) > 0.01 * r["plan"]:
            lines.append(f"  The run's own plan (prune_report.json) said {r['report_plan'] / GiB:.2f} GiB.")
    return lines


def _big_eval(args) -> str:
    if args.big_eval_windows:
        return f"evaluation on {args.big_eval_windows} windows of {args.big_seqlen} tokens"
    return (
        "evaluation off (`--no-eval-after`: the perplexity of random weights means nothing, and evaluating "
        "would add half again to the forward passes)"
    )


def _built(built: dict) -> str:
    if built["reused"]:
        return "reused from an earlier run"
    return f"{built['seconds']:.0f} s, builder peak RSS {built['builder_peak'] / GiB:.2f} GiB"


# ---------------------------------------------------------------------------------------------------------
# Part smollm2: stream against resident, 1 and 2 workers, on real weights.
# ---------------------------------------------------------------------------------------------------------


def smollm2_part(args: argparse.Namespace, command: str) -> None:
    from dist_prune.assets import smollm2_dir

    work = Path(args.workdir) / "smollm2"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the torchrun ranks rendezvous on loopback
    shape = Shape.from_config(json.loads((smollm2_dir() / "config.json").read_text()))
    rates = [gemm_rate(args.batch_size * args.seqlen, shape.hidden, shape.mlp)]
    base = dict(model="smollm2-135m", sparsity=0.5, nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                batch_size=args.batch_size, eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen)  # fmt: skip
    rows = []
    for method in ["wanda", "gblm"] + (["sparsegpt"] if args.sparsegpt else []):
        rows += _smollm2_method(dict(base, method=method), work, args.repeat, shape)
        rates.append(gemm_rate(args.batch_size * args.seqlen, shape.hidden, shape.mlp))
        write_section("stream-smollm2", render_smollm2(rows, args, command, max(rates)), args.results)
    if not args.keep:
        shutil.rmtree(work)


def _smollm2_method(settings: dict, work: Path, repeat: int, shape: Shape) -> list[dict]:
    """The four runs of one method; masks compared against the 1-worker stream run, then the outputs deleted."""
    rows, outs = [], []
    for residency, workers in SMOLLM2_SHAPES:
        out = work / f"{settings['method']}-{residency}-w{workers}"
        run = dict(settings, residency=residency, out=str(out), threads=max(1, CORES // workers),
                   launcher="local" if workers == 1 else "torchrun")  # fmt: skip
        results = [prune(run, workers) for _ in range(repeat)]
        rows.append(_smollm2_row(run, workers, results, shape))
        outs.append(out)
        print(rows[-1], flush=True)
    for row, out in zip(rows[1:], outs[1:], strict=True):
        row["agreement"] = compare_masks(outs[0], out)
    for out in outs:
        shutil.rmtree(out)
    return rows


def _smollm2_row(settings: dict, workers: int, results: list[dict], shape: Shape) -> dict:
    """Medians over the repeats; perplexities and workers' peaks from the last (they do not vary)."""
    report = results[-1]["report"]

    def median(key: str) -> float | None:
        values = [r["report"]["timings_s"].get(key) for r in results]
        return statistics.median(values) if None not in values else None

    return dict(
        method=settings["method"], residency=settings["residency"], workers=workers, threads=settings["threads"],
        wall=statistics.median(r["wall"] for r in results), gradients=median("gradients"), layers=median("layers"),
        ppl=report.get("perplexity") or {}, peaks=[w["peak_bytes"] for w in report["workers"]],
        flops=run_flops(shape, settings), repeats=len(results),
    )  # fmt: skip


def compare_masks(a: Path, b: Path) -> float:
    """Fraction of decoder weights pruned in both or kept in both (`dist-prune compare`, in a child)."""
    out = subprocess.run([sys.executable, "-m", "dist_prune", "--quiet", "compare", str(a), str(b), "--json"],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["agreement"]


def render_smollm2(rows: list[dict], args, command: str, rate: float) -> str:
    repeats = f"medians of {args.repeat} runs" if args.repeat > 1 else "one run each"
    lines = [
        "## Stream vs resident: SmolLM2-135M (real weights), 1 and 2 workers",
        "",
        f"Machine: {machine_line()}; {_ram_gib():.0f} GiB RAM.",
        f"Versions: {_versions()}. Date: {_now()}.",
        f"Command: `{command}`.",
        "",
        f"50% unstructured; {args.nsamples} x {args.seqlen} calibration tokens, batch {args.batch_size}; "
        f"evaluation on {args.eval_windows} windows of {args.eval_seqlen} tokens (dense and pruned states go "
        f"through each layer inside the layer loop). 1 worker in-process with {CORES} threads; 2 workers under "
        f"torchrun (gloo on loopback) with {max(1, CORES // 2)} thread each. Times: {repeats}, from "
        "prune_report.json's timings_s (`gradients`: GBLM's layer-wise gradient pass; `layers`: the layer loop).",
        "Masks: `dist-prune compare` agreement with the same method's 1-worker stream run (1 = identical). "
        "stream / resident: wall times at the same number of workers. Matmul share: FLOPs of the phase counted "
        f"from the shapes (bench/stream.py: `run_flops`) per second of it, over the fp32 matmul rate measured in "
        f"the same run, {rate:.1f} GFLOP/s ({args.batch_size * args.seqlen}x576 @ 576x1536, {CORES} threads, best "
        "seen); with 2 workers, duplicated work (each worker's Cholesky factors) is not counted.",
        "",
        "| method | residency | workers x threads | wall s | gradient pass s | layer loop s | dense ppl | "
        "pruned ppl | masks vs 1-worker stream | stream / resident | gradient pass of matmul | layer loop of "
        "matmul | peak MiB per worker |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    walls = {(r["method"], r["residency"], r["workers"]): r["wall"] for r in rows}
    for r in rows:
        resident = walls.get((r["method"], "resident", r["workers"]))
        ratio = f"{r['wall'] / resident:.2f}" if r["residency"] == "stream" and resident else "-"
        lines.append(
            f"| {r['method']} | {r['residency']} | {r['workers']} x {r['threads']} | {r['wall']:.0f} | "
            f"{_seconds(r['gradients'])} | {_seconds(r['layers'])} | {_ppl(r['ppl'], 'dense')} | "
            f"{_ppl(r['ppl'], 'pruned')} | {_agreement(r.get('agreement'))} | {ratio} | "
            f"{_share(r, 'gradients', rate)} | {_share(r, 'layers', rate)} | "
            f"{' / '.join(f'{p / MiB:.0f}' for p in r['peaks'])} |"
        )
    return "\n".join(lines + [""] + _smollm2_verdicts(rows, walls, rate)) + "\n"


def _smollm2_verdicts(rows: list[dict], walls: dict, rate: float) -> list[str]:
    ratios = [
        (r["method"], r["workers"], r["wall"] / walls[(r["method"], "resident", r["workers"])])
        for r in rows
        if r["residency"] == "stream" and (r["method"], "resident", r["workers"]) in walls
    ]
    shares = [s for r in rows for s in (_fraction(r, "gradients", rate), _fraction(r, "layers", rate)) if s]
    agreements = [r["agreement"] for r in rows if r.get("agreement") is not None]
    lines = []
    if ratios:
        worst = max(ratio for _, _, ratio in ratios)
        listed = ", ".join(f"{m} {w}w {ratio:.2f}" for m, w, ratio in ratios)
        ok = "met" if worst <= STREAM_OVER_RESIDENT_TARGET else "NOT met"
        lines.append(f"- stream / resident wall <= {STREAM_OVER_RESIDENT_TARGET}: {ok} ({listed}).")
    if shares:
        ok = "met" if min(shares) >= MATMUL_SHARE_TARGET else "NOT met"
        lines.append(
            f"- gradient pass and layer loop at >= {MATMUL_SHARE_TARGET:.0%} of the matmul rate: {ok} "
            f"(from {min(shares):.0%} to {max(shares):.0%})."
        )
    if agreements:
        same = "yes" if min(agreements) == 1 else f"NO (lowest agreement {min(agreements):.6f})"
        lines.append(f"- masks identical to the 1-worker stream run in every residency and worker count: {same}.")
    return lines


def _fraction(row: dict, phase: str, rate: float) -> float | None:
    seconds, flops = row[phase], row["flops"][phase]
    return flops / seconds / (rate * 1e9) if seconds and flops else None


def _share(row: dict, phase: str, rate: float) -> str:
    fraction = _fraction(row, phase, rate)
    return "-" if fraction is None else f"{fraction:.0%}"


def _ppl(ppl: dict, key: str) -> str:
    return f"{ppl[key]:.2f}" if ppl.get(key) is not None else "-"


def _agreement(value: float | None) -> str:
    if value is None:
        return "(reference)"
    return "identical" if value == 1 else f"{value:.6f}"


# ---------------------------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


def _versions() -> str:
    import safetensors

    import dist_prune

    return f"dist_prune {dist_prune.__version__}, safetensors {safetensors.__version__}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("big", "smollm2", "both"), default="both")
    parser.add_argument("--workdir", default="/tmp/dist_prune_bench_13b", help="checkpoint, scratch and outputs")
    parser.add_argument("--keep", action="store_true", help="keep the random checkpoint and the outputs")
    big = parser.add_argument_group("part big")
    big.add_argument("--big-runs", default=",".join(BIG_RUNS), help="comma-separated, of " + ", ".join(BIG_RUNS))
    big.add_argument("--big-nsamples", type=int, default=4)
    big.add_argument("--big-seqlen", type=int, default=128)
    big.add_argument("--big-eval-windows", type=int, default=0, help="0: no evaluation")
    small = parser.add_argument_group("part smollm2")
    small.add_argument("--nsamples", type=int, default=16)
    small.add_argument("--seqlen", type=int, default=512)
    small.add_argument("--batch-size", type=int, default=2)
    small.add_argument("--eval-windows", type=int, default=16)
    small.add_argument("--eval-seqlen", type=int, default=512)
    small.add_argument("--sparsegpt", action="store_true", help="also SparseGPT 50%%")
    small.add_argument("--repeat", type=int, default=1, help="runs per configuration; times are medians")
    # Testing this script: a small random shape, and results away from bench/RESULTS.md.
    parser.add_argument("--shape", choices=tuple(SHAPES), default="13b", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.big_runs.split(",")) - set(BIG_RUNS)
    if unknown:
        parser.error(f"--big-runs: unknown {', '.join(sorted(unknown))}")
    return args


def main() -> None:
    args = parse_args()
    command = ("python bench/stream.py " + " ".join(sys.argv[1:])).strip()
    if args.part in ("big", "both"):
        big_part(args, command)
    if args.part in ("smollm2", "both"):
        smollm2_part(args, command)
    if not args.keep:
        _remove_if_empty(Path(args.workdir))
    print(f"this process's own peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not ours alone, or not there


if __name__ == "__main__":
    main()
