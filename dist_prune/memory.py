"""Memory plan: per-worker bytes of each phase, from a model's config.json alone (no weights needed).

The numbers model the engine as built: fp32 compute copies of the weights sharded by rows over the
workers, fp32 gradient sums sharded the same way, each worker holding its share of the calibration
sequences, and one decoder layer gathered at a time. They are estimates; bench/scale.py puts them beside
measurements.
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import PruneConfig, parse_bytes
from .errors import CheckpointError, ConfigError

FP32 = 4
# Interpreter, torch and transformers, measured on the CPU machines here (resident after import).
RUNTIME_BASELINE = 450 * 2**20
HF_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size
EVAL_BATCH = 2  # evaluation windows per forward (worker.py)
# Copies of the (batch, tokens, vocab) fp32 logits alive in an evaluation step: the logits, the flattened
# copy, log-softmax inside cross-entropy, and what the allocator keeps from earlier steps (measured on
# SmolLM2: about 6 x the logits above the loaded model).
EVAL_LOGITS_COPIES = 6
# Activations autograd keeps per token and layer for one backward, in units of hidden / intermediate size:
# norms, q/k/v and their rotated copies, attention output, residuals (~10 x hidden); gate, up, act, product.
SAVED_PER_TOKEN_HIDDEN = 10
SAVED_PER_TOKEN_MLP = 4


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        heads = config["num_attention_heads"]
        return cls(
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            mlp=config["intermediate_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def layer_linear_params(self) -> int:
        q_and_o = 2 * self.hidden * self.heads * self.head_dim
        k_and_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_and_o + k_and_v + 3 * self.hidden * self.mlp

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden  # + two RMSNorm weights

    @property
    def total_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings + self.hidden


@dataclass(frozen=True)
class MemoryPlan:
    workers: int
    parameters: int
    phases: dict[str, int]  # bytes per worker on top of the sharded weights, by phase
    weights: int  # bytes per worker: the sharded fp32 weights
    baseline: int
    limit: int | None

    @property
    def peak(self) -> int:
        return self.baseline + self.weights + max(self.phases.values(), default=0)

    @property
    def fits(self) -> bool:
        return self.limit is None or self.peak <= self.limit

    def to_dict(self) -> dict:
        return dict(asdict(self), peak=self.peak, fits=self.fits)


def plan_memory(
    config: PruneConfig, model_config: dict, limit: int | None = None, largest_file: int | None = None
) -> MemoryPlan:
    """`largest_file`: bytes of the checkpoint's largest safetensors file (HF's default 5 GB shard if unknown)."""
    shape = ModelShape.from_config(model_config)
    w = config.runtime.workers
    method = config.prune.method
    c = config.calibration
    sequences = -(-c.nsamples // w)  # the largest share when N does not divide evenly
    checkpointing = config.runtime.activation_checkpointing
    source_bytes = shape.total_params * _dtype_bytes(model_config)
    # Loading reads this worker's rows through mmap, one file at a time: those pages count as resident
    # until the file is closed.
    phases = {"load": min(largest_file or HF_SHARD_BYTES, source_bytes) // w}
    if method == "gblm":
        phases["gradient_pass"] = _gradient_pass(shape, w, c.seqlen, checkpointing, sum_sets=1)
    if method == "saap":
        # plain and squared sums, for the batch and the running totals, and the plain reduce-scatter buffers
        phases["gradient_pass"] = _gradient_pass(shape, w, c.seqlen, checkpointing, sum_sets=5)
        phases.update(_structured_phases(shape, w, config))
    elif method != "magnitude":
        phases["layer_loop"] = _layer_loop(shape, method, sequences, c.seqlen, c.batch_size)
    if config.evaluation.eval_after:
        phases["evaluation"] = _evaluation(shape, config.evaluation.eval_seqlen)
    # Every worker gathers the embeddings, final norm and lm_head in fp32 at the end; worker 0 converts them
    # to the saved dtype to write them.
    rest = (shape.total_params - shape.layers * shape.layer_params) * (FP32 + _dtype_bytes(model_config))
    phases["write"] = max(_gathered_layer(shape), rest)
    return MemoryPlan(
        workers=w,
        parameters=shape.total_params,
        phases=phases,
        weights=-(-shape.total_params * FP32 // w),
        baseline=RUNTIME_BASELINE,
        limit=limit,
    )


def _gathered_layer(shape: ModelShape) -> int:
    """FSDP unshards one decoder layer at a time (fp32), and the writer holds one more copy."""
    return 2 * shape.layer_params * FP32


def _gradient_pass(shape: ModelShape, workers: int, seqlen: int, checkpointing: bool, sum_sets: int) -> int:
    sharded_sums = -(-shape.layers * shape.layer_linear_params * FP32 // workers)  # one fp32 set, sharded
    sharded_grads = sharded_sums  # FSDP's sharded .grad between reduce-scatters
    unsharded_layer_grad = shape.layer_linear_params * FP32
    backward = _backward_activations(shape, seqlen, checkpointing)
    return sum_sets * sharded_sums + sharded_grads + unsharded_layer_grad + backward + _gathered_layer(shape)


def _backward_activations(shape: ModelShape, tokens: int, checkpointing: bool) -> int:
    per_layer = tokens * (SAVED_PER_TOKEN_HIDDEN * shape.hidden + SAVED_PER_TOKEN_MLP * shape.mlp) * FP32
    # With checkpointing only each layer's input survives the forward; one layer is recomputed at a time.
    saved = shape.layers * tokens * shape.hidden * FP32 + per_layer if checkpointing else shape.layers * per_layer
    logits = 3 * tokens * shape.vocab * FP32  # logits, log-softmax, their gradient
    return saved + logits


def _structured_phases(shape: ModelShape, workers: int, config: PruneConfig) -> dict[str, int]:
    """The smaller sharded model is filled while the original still exists; recovery trains with batches."""
    s, c = config.structured, config.calibration
    smaller = -(-int((1 - s.ratio) * shape.layers * shape.layer_params * FP32) // workers)
    phases = {"rebuild_smaller": smaller + _gathered_layer(shape)}
    if s.recover_steps:
        sequences = -(-c.batch_size // workers)
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        sides = 4 * shape.hidden + 2 * q + 2 * kv + 3 * (shape.hidden + shape.mlp)  # in + out of the 7 Linears
        adapters = 4 * s.recover_rank * sides * shape.layers * FP32  # A and B, their grads, AdamW's two states
        backward = _backward_activations(shape, sequences * c.seqlen, checkpointing=False)
        phases["recovery"] = adapters + backward + _gathered_layer(shape)  # the original model is gone by then
    return phases


def _evaluation(shape: ModelShape, seqlen: int) -> int:
    """A sharded forward of EVAL_BATCH windows: FSDP unshards the root (embeddings, lm_head) and one layer."""
    logits = EVAL_LOGITS_COPIES * EVAL_BATCH * seqlen * shape.vocab * FP32
    root = shape.vocab * shape.hidden * (1 if shape.tied else 2) * FP32
    return logits + root + _gathered_layer(shape)


def _dtype_bytes(model_config: dict) -> int:
    name = model_config.get("dtype") or model_config.get("torch_dtype") or "float32"
    return 2 if name in ("bfloat16", "float16") else 4


def _layer_loop(shape: ModelShape, method: str, sequences: int, seqlen: int, batch: int) -> int:
    hidden_states = 2 * sequences * seqlen * shape.hidden * FP32  # this layer's inputs and outputs
    stem = shape.vocab * shape.hidden * FP32  # the full embedding, while computing layer 0's inputs
    batch_tokens = min(batch, sequences) * seqlen
    transient = batch_tokens * (4 * shape.hidden + 3 * shape.mlp) * FP32
    stats = 0
    if method == "sparsegpt":
        widths = (shape.hidden, shape.heads * shape.head_dim, shape.hidden, shape.mlp)
        stats = sum(n * n for n in widths) * FP32 + 2 * max(widths) ** 2 * FP32  # H per input group, Hinv
        stats += 2 * shape.hidden * shape.mlp * FP32  # the fp32 working copy of the widest weight
    else:
        stats = 3 * shape.hidden * shape.mlp * FP32  # score and mask of the widest weight
    return hidden_states + max(stem, transient + stats + _gathered_layer(shape))


def available_memory(device: str) -> int | None:
    """The limit to plan against when none is given: a CUDA device's total, or the host's available RAM."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    if os.path.exists("/proc/meminfo"):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def plan_for(config: PruneConfig, model_path: Path) -> MemoryPlan:
    config_file = model_path / "config.json" if model_path.is_dir() else model_path
    if not config_file.is_file():
        raise CheckpointError(f"no config.json at {model_path}")
    model_config = json.loads(config_file.read_text())
    r = config.runtime
    limit = parse_bytes(r.device_memory) if r.device_memory else available_memory(r.device)
    files = list(model_path.glob("*.safetensors")) if model_path.is_dir() else []
    return plan_memory(config, model_config, limit, max((f.stat().st_size for f in files), default=None))


def check_fits(plan: MemoryPlan) -> None:
    if not plan.fits:
        raise ConfigError(
            f"this run needs about {gib(plan.peak)} per worker but {gib(plan.limit or 0)} is available; "
            f"use more workers (--workers), fewer calibration sequences, or a larger --device-memory"
        )


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(plan: MemoryPlan) -> str:
    lines = [
        f"model: {plan.parameters / 1e9:.3f}B parameters; {plan.workers} worker(s); per worker:",
        f"  {'runtime (python, torch)':<28} {gib(plan.baseline):>12}",
        f"  {'weights (fp32, row shard)':<28} {gib(plan.weights):>12}",
    ]
    lines += [f"  {'+ ' + phase:<28} {gib(extra):>12}" for phase, extra in plan.phases.items()]
    limit = "unknown" if plan.limit is None else gib(plan.limit)
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'peak':<28} {gib(plan.peak):>12}   limit {limit}: {verdict}")
    return "\n".join(lines)
