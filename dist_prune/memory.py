"""Memory plan: per-worker bytes of each phase, from a model's config.json alone (no weights needed).

The unstructured methods walk the model one decoder layer at a time. Under the `stream` residency a worker
holds at most one decoder layer (as read from the checkpoint, plus a copy in the compute dtype); under
`resident` each worker also keeps its row block of every decoder layer in the checkpoint's dtype. The
structured methods (saap, flap) run on FSDP: fp32 row shards of the whole model, always resident.

Three budgets are planned: the device (GPU memory, or host memory on a CPU run), the host (what a CUDA run
keeps in RAM: the stored layer inputs of GBLM's gradient pass when they are kept in memory), and the scratch
disk (GBLM's per-layer gradient rows, and the stored layer inputs when they go to disk). They are
estimates; bench/scale.py puts them beside measurements.
"""

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .assets import resolve_model
from .checkpoint import CheckpointInfo, has_weights, open_checkpoint, read_model_config
from .config import EVAL_BATCH, PruneConfig, parse_bytes
from .errors import CheckpointError, ConfigError
from .methods.stats import PRODUCT_BLOCK_ELEMENTS
from .models import family_of, head_dim
from .precision import compute_bytes
from .registry import Method, layer_statistics, method, runs_calibration
from .structured.importance import IMPORTANCES
from .zero import is_zero_checkpoint

FP32, FP64, BOOL = 4, 8, 1
GRADIENT_BYTES = {"fp32": 4, "fp16": 2}
# Interpreter, torch and transformers, measured on the CPU machines here (resident after import).
RUNTIME_BASELINE = 450 * 2**20
# A CUDA worker's host process: the runtime plus the CUDA context and pinned staging buffers.
CUDA_HOST_BASELINE = 2 * RUNTIME_BASELINE
HF_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size
# Reading one parameter of a DeepSpeed ZeRO checkpoint holds, beyond its copy in the output dtype, the pages of
# its fp32 master weights (memory-mapped, counted in RSS while mapped) and the fp32 copy gathered from them.
ZERO_READ_EXTRA = 2 * FP32
# How many evaluation windows to plan for when eval_windows is None: the count depends on the text, which
# the plan does not read (set eval_windows for an exact plan).
DEFAULT_EVAL_WINDOWS = 64
# Copies of the (batch, tokens, vocab) fp32 logits alive in an evaluation step: the logits, the flattened
# copy, log-softmax inside cross-entropy, and what the allocator keeps from earlier steps (measured on
# SmolLM2: about 6 x the logits above the loaded model).
EVAL_LOGITS_COPIES = 6
# Activations autograd keeps per token and layer for one backward, in units of hidden / intermediate size:
# norms, q/k/v and their rotated copies, attention output, residuals (~10 x hidden); gate, up, act, product.
SAVED_PER_TOKEN_HIDDEN = 10
SAVED_PER_TOKEN_MLP = 4
# Workers on one host share its memory: one worker per GPU, and GPU hosts carry at most 8 GPUs.
GPUS_PER_HOST = 8
# Stored layer inputs stay in host memory only while they take at most this share of what is available:
# the rest is for the page cache that reads the checkpoint, and for everything else on the host.
HOST_SHARE_FOR_STORED_INPUTS = 0.5
RESIDENCY_PREFERENCE = ("resident", "stream")  # auto: the first that fits (resident reads the checkpoint once)
RESIDENCY_DESCRIPTIONS = {
    "resident": "each worker keeps its row block of every decoder layer for the whole run",
    "stream": "a worker holds one decoder layer at a time, read from the checkpoint when its turn comes",
}


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
    layer_small_params: int  # a layer's norms and biases (by its family)

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        heads = config["num_attention_heads"]
        layer = family_of(config).layer_shapes(config, 0)
        return cls(
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            mlp=config["intermediate_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim(config),
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            layer_small_params=sum(math.prod(shape) for shape in layer.values() if len(shape) == 1),
        )

    @property
    def layer_linear_params(self) -> int:
        q_and_o = 2 * self.hidden * self.heads * self.head_dim
        k_and_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_and_o + k_and_v + 3 * self.hidden * self.mlp

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + self.layer_small_params

    @property
    def total_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings + self.hidden

    @property
    def input_widths(self) -> tuple[int, ...]:
        """Inputs of a decoder layer's Linears, one per group sharing an input, in pruning order: q/k/v, o,
        gate/up, down."""
        return (self.hidden, self.heads * self.head_dim, self.hidden, self.mlp)

    @property
    def widest_matrix(self) -> int:
        return self.hidden * self.mlp  # gate, up and down


@dataclass(frozen=True)
class MemoryPlan:
    residency: str  # "resident" or "stream"
    activation_storage: str  # where GBLM's gradient pass keeps each layer's inputs: "memory" or "disk"
    device: str  # "cuda" or "cpu"
    workers: int
    parameters: int
    checkpoint_bytes: int  # bytes per value of the checkpoint's dtype
    phases: dict[str, int]  # device bytes per worker on top of the runtime and the resident weights, by phase
    weights: int  # device bytes per worker: the resident weights (0 when streaming)
    baseline: int
    host_peak: int  # host bytes per worker; on a CPU run the host is the device
    writer_host: int  # a CUDA run's worker 0 alone: page-locked copies of the layers it writes (once per job)
    stored_inputs: int  # bytes per worker of the layer inputs GBLM's gradient pass keeps, wherever they are
    scratch: int  # scratch-disk bytes per worker
    limit: int | None  # device bytes one worker may use
    host_limit: int | None  # the host's available memory

    @property
    def peak(self) -> int:
        """The device peak per worker."""
        return self.baseline + self.weights + max(self.phases.values(), default=0)

    @property
    def workers_per_host(self) -> int:
        return min(self.workers, GPUS_PER_HOST) if self.device == "cuda" else self.workers

    @property
    def host_total(self) -> int:
        """Host bytes of the workers that share one host (the one with worker 0)."""
        return self.host_peak * self.workers_per_host + self.writer_host

    @property
    def host_fits(self) -> bool:
        """On a CPU run the device limit already is host memory; a CUDA run also needs its host's RAM."""
        if self.device == "cpu" or self.host_limit is None:
            return True
        return self.host_total <= self.host_limit

    @property
    def fits(self) -> bool:
        return (self.limit is None or self.peak <= self.limit) and self.host_fits

    def to_dict(self) -> dict:
        return dict(asdict(self), peak=self.peak, fits=self.fits)


@dataclass(frozen=True)
class _Run:
    """The sizes every formula of a layer-by-layer run uses, for one worker."""

    shape: ModelShape
    method: Method
    device: str
    workers: int
    sequences: int  # calibration sequences this worker holds (0: the method needs none)
    seqlen: int
    batch: int  # calibration sequences per forward
    eval_windows: int  # this worker's evaluation windows (0: no evaluation)
    eval_seqlen: int
    stored: int  # bytes per value of the checkpoint's dtype
    compute: int  # bytes per value of the compute dtype
    read_extra: int  # bytes per value held while one tensor is read, beyond its stored copy (ZERO_READ_EXTRA)
    gradient: int  # bytes per value of the gradient rows kept in the scratch directory
    gradient_pass: bool
    reconstruct: str  # "none", "linear" or "block" (reconstruct.py)
    statistics: str | None  # what the layer loop collects of each Linear's input (registry.layer_statistics)
    overlap: bool  # a layer read ahead and one written behind while a layer computes (background.py)

    @property
    def layer(self) -> int:
        """One decoder layer as read (or gathered) in the checkpoint's dtype, and its compute copy."""
        return self.shape.layer_params * (self.stored + self.compute)

    @property
    def hidden_states(self) -> int:
        """This worker's calibration hidden states at one layer boundary."""
        return self.sequences * self.seqlen * self.shape.hidden * self.compute

    @property
    def eval_hidden_states(self) -> int:
        """This worker's evaluation hidden states at one layer boundary, for the dense and the pruned model."""
        return 2 * self.eval_windows * self.eval_seqlen * self.shape.hidden * self.compute

    @property
    def stored_inputs(self) -> int:
        """The gradient pass keeps every layer's input for the backward that comes down the layers."""
        return self.shape.layers * self.hidden_states if self.gradient_pass else 0

    def own_rows(self, params: int, value_bytes: int) -> int:
        return math.ceil(params * value_bytes / self.workers)


def plan_memory(
    config: PruneConfig,
    model_config: dict,
    limit: int | None = None,
    largest_file: int | None = None,
    host_limit: int | None = None,
    read_extra: int = 0,
) -> MemoryPlan:
    """The plan of the run as it will go: "auto" residency and activation storage resolved.

    `largest_file`: bytes of the checkpoint's largest safetensors file (HF's default 5 GB shard if unknown);
    `read_extra`: bytes per value held while one tensor is read, beyond its copy (ZERO_READ_EXTRA for ZeRO)."""
    return _chosen(_plans(config, model_config, limit, largest_file, host_limit, read_extra))


def check_residency(config: PruneConfig) -> None:
    if method(config.prune.method).structured and config.runtime.residency == "stream":
        raise ConfigError(
            f"{config.prune.method} runs resident only (FSDP keeps each worker's fp32 row shard of the whole model); "
            "use --residency resident or auto"
        )


def _plans(
    config: PruneConfig,
    model_config: dict,
    limit: int | None,
    largest_file: int | None,
    host_limit: int | None,
    read_extra: int = 0,
) -> dict[str, MemoryPlan]:
    """The plan of each residency the config leaves open, in order of preference."""
    check_residency(config)
    if method(config.prune.method).structured:
        return {"resident": _fsdp_plan(config, model_config, limit, largest_file, host_limit)}
    asked = config.runtime.residency
    residencies = RESIDENCY_PREFERENCE if asked == "auto" else (asked,)
    return {r: _with_storage(config, model_config, r, (limit, host_limit), read_extra) for r in residencies}


def _chosen(plans: dict[str, MemoryPlan]) -> MemoryPlan:
    """The first that fits; else the last (streaming: the least device memory), for check_fits to refuse."""
    return next((plan for plan in plans.values() if plan.fits), list(plans.values())[-1])


def _with_storage(
    config: PruneConfig, model_config: dict, residency: str, limits: tuple[int | None, int | None], read_extra: int
) -> MemoryPlan:
    """Activation storage "auto": host memory when the stored inputs leave room there, else the scratch disk."""
    asked = config.runtime.activation_storage
    run = _run(config, model_config, read_extra)
    in_memory = _layerwise_plan(run, residency, "memory" if asked == "auto" else asked, *limits)
    if asked != "auto" or _stored_inputs_leave_room(in_memory):
        return in_memory
    return _layerwise_plan(run, residency, "disk", *limits)


def _stored_inputs_leave_room(plan: MemoryPlan) -> bool:
    """On a CPU run the stored inputs also count against the device limit."""
    on_host = plan.stored_inputs * plan.workers_per_host
    host_share = plan.host_limit is None or on_host <= HOST_SHARE_FOR_STORED_INPUTS * plan.host_limit
    return host_share and (plan.device == "cuda" or plan.fits)


def _run(config: PruneConfig, model_config: dict, read_extra: int = 0) -> _Run:
    c, e, w = config.calibration, config.evaluation, config.runtime.workers
    needs, device = method(config.prune.method), compute_device(config)
    stored = dtype_bytes(model_config)
    p = config.prune
    sequences = worker_sequences(c.nsamples, c.batch_size, w) if runs_calibration(needs, p) else 0
    eval_windows = math.ceil((e.eval_windows or DEFAULT_EVAL_WINDOWS) / w) if e.eval_after else 0
    return _Run(
        shape=ModelShape.from_config(model_config),
        method=needs,
        device=device,
        workers=w,
        sequences=sequences,
        seqlen=c.seqlen,
        batch=min(c.batch_size, sequences),
        eval_windows=eval_windows,
        eval_seqlen=e.eval_seqlen,
        stored=stored,
        compute=compute_bytes(device, stored),
        read_extra=read_extra,
        gradient=GRADIENT_BYTES[config.prune.gradient_dtype],
        gradient_pass=needs.gradients and not config.prune.gradients,
        reconstruct=p.reconstruct,
        statistics=layer_statistics(needs, p),
        overlap=overlaps(config),
    )


def worker_sequences(nsamples: int, batch_size: int, workers: int) -> int:
    """Batches go whole to workers: the largest share is the rounded-up number of batches per worker."""
    batches_per_worker = math.ceil(math.ceil(nsamples / batch_size) / workers)
    return min(nsamples, batches_per_worker * batch_size)


def _layerwise_plan(run: _Run, residency: str, storage: str, limit: int | None, host_limit: int | None) -> MemoryPlan:
    shape = run.shape
    in_host_memory = run.stored_inputs if storage == "memory" else 0
    streaming = residency == "stream"
    phases = {"stem": _stem(run)}
    if run.gradient_pass:
        on_device = in_host_memory if run.device == "cpu" else 0  # a CPU run's host is its device
        on_device += _read_ahead(run, streaming) if run.device == "cpu" else 0
        phases["gradient_pass"] = _layerwise_gradient_pass(run) + on_device
    phases["layer_loop"] = _layer_loop(run) + (
        _read_ahead(run, streaming) + _written_behind(run) if run.device == "cpu" else 0
    )
    phases["head"] = _head(run)
    weights = run.own_rows(shape.layers * shape.layer_params, run.stored) if residency == "resident" else 0
    return MemoryPlan(
        residency=residency,
        activation_storage=storage,
        device=run.device,
        workers=run.workers,
        parameters=shape.total_params,
        checkpoint_bytes=run.stored,
        phases=phases,
        weights=weights,
        baseline=RUNTIME_BASELINE,
        host_peak=_host_peak(run.device, weights, phases, in_host_memory + _page_locked(run, streaming)),
        writer_host=_page_locked_writer(run),
        stored_inputs=run.stored_inputs,
        scratch=run.stored_inputs - in_host_memory + _gradient_rows(run),
        limit=limit,
        host_limit=host_limit,
    )


def _read_ahead(run: _Run, streaming: bool) -> int:
    """Streaming reads the next layer while the current one computes (background.py): one more layer as read."""
    return run.shape.layer_params * run.stored if streaming and run.overlap else 0


def _written_behind(run: _Run) -> int:
    """Worker 0 writes the finished layer while the next computes: its host copy in the checkpoint's dtype."""
    return run.shape.layer_params * run.stored if run.overlap else 0


def _page_locked(run: _Run, streaming: bool) -> int:
    """A CUDA worker's page-locked host buffers, which torch's host allocator keeps and hands out again: two
    layers read ahead (the one copied to the device, the next) when streaming, and two layers' gradient rows
    (written to the scratch directory, read back). The allocator rounds each buffer up to a power of two.
    Counted as overlapping even when the run does not (an upper bound then: unmeasured on a GPU)."""
    if run.device == "cpu":
        return 0
    rows = sum(
        _pinned(math.ceil(rows / run.workers) * cols * run.gradient) for rows, cols in _layer_matrices(run.shape)
    )
    return (2 * _pinned_layer(run) if streaming else 0) + (2 * rows if run.gradient_pass else 0)


def _page_locked_writer(run: _Run) -> int:
    """Worker 0 of a CUDA run writes: two layers' page-locked copies (the one being written, the next one's)."""
    return 2 * _pinned_layer(run) if run.device == "cuda" else 0


def _pinned_layer(run: _Run) -> int:
    layer = sum(_pinned(rows * cols * run.stored) for rows, cols in _layer_matrices(run.shape))
    return layer + 2 * _pinned(run.shape.hidden * run.stored)  # and the two norms


def _pinned(nbytes: int) -> int:
    return 1 << max(nbytes - 1, 0).bit_length()


def _layer_matrices(shape: ModelShape) -> list[tuple[int, int]]:
    """(out, in) of a decoder layer's seven Linears."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    h, m = shape.hidden, shape.mlp
    return [(q, h), (kv, h), (kv, h), (h, q), (m, h), (m, h), (h, m)]


def _host_peak(device: str, weights: int, phases: dict[str, int], in_host_memory: int) -> int:
    """A CPU run's host is its device; a CUDA worker keeps its process, the stored inputs and its page-locked
    buffers in memory."""
    if device == "cpu":
        return RUNTIME_BASELINE + weights + max(phases.values())
    return CUDA_HOST_BASELINE + in_host_memory


def _gradient_rows(run: _Run) -> int:
    """Each worker writes its rows of every layer's gradient sums; the layer loop reads and deletes them."""
    if not run.gradient_pass:
        return 0
    return run.own_rows(run.shape.layers * run.shape.layer_linear_params, run.gradient)


def _stem(run: _Run) -> int:
    """The embedding (as read, and its compute copy), and the hidden states it makes: layer 0's inputs
    (evaluation: dense and pruned)."""
    embedding = run.shape.vocab * run.shape.hidden * (run.stored + run.compute + run.read_extra)
    return embedding + run.hidden_states + run.eval_hidden_states


def _head(run: _Run) -> int:
    """Final norm and lm_head, on the last layer's evaluation outputs, and the logits of one step."""
    # As read, and its compute copy (writing the rest of the weights at the end reads as much).
    head = run.shape.vocab * run.shape.hidden * (run.stored + run.compute + run.read_extra)
    logits = EVAL_LOGITS_COPIES * EVAL_BATCH * run.eval_seqlen * run.shape.vocab * FP32 if run.eval_windows else 0
    return head + run.eval_hidden_states + logits


def _layer_loop(run: _Run) -> int:
    """One layer: its inputs and outputs, one forward's activations, the statistics, and the pruning of the
    widest matrix (scores and masks of this worker's rows, then the whole pruned matrix gathered)."""
    shape = run.shape
    boundaries = 2 * (run.hidden_states + run.eval_hidden_states)
    tokens = max(run.batch * run.seqlen, EVAL_BATCH * run.eval_seqlen if run.eval_windows else 0)
    activations = tokens * (4 * shape.hidden + 3 * shape.mlp) * run.compute
    if run.method.statistics == "hessian":  # SparseGPT's OBS: its stack of rows and their masks
        pruning = run.own_rows(2 * shape.widest_matrix, FP32 + BOOL)
    else:  # scores and masks of this worker's rows of the widest matrix, then the whole pruned matrix gathered
        pruning = 3 * run.own_rows(shape.widest_matrix, FP32) + shape.widest_matrix * (run.compute + run.read_extra)
    step = max(pruning, _reconstruction(run))  # a group is fitted once its masks are chosen
    if run.statistics == "hessian":  # the Hessians' phases count the step with them (_hessians)
        return run.layer + boundaries + activations + _hessians(run, step)
    return run.layer + boundaries + activations + _statistics(run) + step


def _reconstruction(run: _Run) -> int:
    """Fitting one input group (reconstruct.py, methods/reconstruction.py): the method's outcome for the group
    (its pruned rows and masks, held meanwhile) and the group's fitted rows, one matrix at a time. Linear mode
    fits on the layer's Hessians (_hessians counts them). Block mode collects its own sums: X X^T in fp64 and
    the cross sum, each rounded to fp32 in turn, from one batch's input to the group in the layer being fitted
    and in the dense layer, whose fitted Linears convert their stored weights one at a time."""
    if run.reconstruct == "none":
        return 0
    shape = run.shape
    rows = run.own_rows(2 * shape.widest_matrix, 2 * FP32 + BOOL) + run.own_rows(shape.widest_matrix, BOOL)
    if run.reconstruct == "linear":
        return rows
    sums = max(shape.input_widths) ** 2 * (2 * FP64 + FP32)
    captured = 2 * run.batch * run.seqlen * max(shape.input_widths) * (run.compute + FP32)
    converted = shape.widest_matrix * run.compute
    return sums + rows + captured + converted


def _statistics(run: _Run) -> int:
    """What scoring needs beyond the layer, without Hessians. Wanda's and GBLM's per-column sums of x^2 are
    negligible."""
    if run.method.gradients:
        # this layer's gradient rows as kept, and one matrix's widened to fp32 and its gradient term
        shape = run.shape
        return run.own_rows(shape.layer_linear_params, run.gradient) + 2 * run.own_rows(shape.widest_matrix, FP32)
    return 0


def _hessians(run: _Run, step: int) -> int:
    """The Hessians' phases (SparseGPT's, or the layer's for linear reconstruction), with the pruning `step`."""
    widths = [width * width for width in run.shape.input_widths]  # elements of each group's X X^T
    # Collecting: X X^T per input group in fp64, plus one block of one batch's product (fp32 and widened).
    collecting = sum(widths) * FP64 + PRODUCT_BLOCK_ELEMENTS[run.device] * (FP32 + FP64)
    # Rounding, group by group (InputStatistics.round_once): groups before in fp32, this one in fp64 and
    # fp32 side by side, groups after still fp64.
    rounding = max(
        sum(widths[:g]) * FP32 + widths[g] * (FP64 + FP32) + sum(widths[g + 1 :]) * FP64 for g in range(len(widths))
    )
    # Pruning, group by group in order: the Hessians of the groups not yet done (job._prune_rows drops each
    # group's); SparseGPT's two factors of this group's at a time while H^-1's Cholesky factor is made
    # (methods/sparsegpt.py), then the step (its OBS stack, a method's masks or a fit). The pruned matrices
    # already gathered are in run.layer's stored copy (the layer as read is gone).
    factors = 2 if run.method.statistics == "hessian" else 0
    pruning = max((sum(widths[g:]) + factors * widths[g]) * FP32 for g in range(len(widths)))
    gradients = _statistics(run)
    return max(collecting + gradients, rounding + gradients, pruning + gradients + step)


def _layerwise_gradient_pass(run: _Run) -> int:
    """The top-down backward, one layer and one sequence at a time (distributed/layer_gradients.py)."""
    shape = run.shape
    linear = shape.layer_linear_params
    # The fp64 sums; each weight's fp32 gradient (and its scaled square) is added the moment backward makes
    # it and dropped, so only the widest matrix's is counted.
    sums = linear * FP64 + 2 * shape.widest_matrix * FP32
    own_rows = run.own_rows(linear, run.gradient)  # kept until written to the scratch directory
    hidden_and_gradients = 2 * run.hidden_states
    recompute = run.seqlen * (SAVED_PER_TOKEN_HIDDEN * shape.hidden + SAVED_PER_TOKEN_MLP * shape.mlp) * run.compute
    # The head's logits for one sequence; the head's weights are smaller than the layer counted here.
    logits = 3 * run.seqlen * shape.vocab * FP32
    # The layer as read is dropped once its compute copy is built, before the sums exist.
    compute_copy = shape.layer_params * run.compute
    backward = max(shape.layer_params * run.stored, sums + own_rows + recompute)
    return compute_copy + backward + hidden_and_gradients + logits


def _fsdp_plan(
    config: PruneConfig, model_config: dict, limit: int | None, largest_file: int | None, host_limit: int | None
) -> MemoryPlan:
    """Structured methods: fp32 compute copies of the weights sharded by rows over the workers (FSDP), fp32 gradient sums
    sharded the same way, one decoder layer gathered at a time."""
    shape = ModelShape.from_config(model_config)
    w = config.runtime.workers
    source_bytes = shape.total_params * dtype_bytes(model_config)
    # Loading reads this worker's rows through mmap, one file at a time: those pages count as resident
    # until the file is closed.
    phases = {"load": min(largest_file or HF_SHARD_BYTES, source_bytes) // w}
    # the phase names of structured/pipeline.py
    calibration = "statistics" if IMPORTANCES[config.structured.importance].forward_only else "gradient_pass"
    phases[calibration] = _structured_calibration_pass(config, model_config)
    phases.update(_structured_phases(shape, w, config))
    if config.evaluation.eval_after:
        phases["evaluation"] = _fsdp_evaluation(shape, config.evaluation.eval_seqlen)
    # Every worker gathers the embeddings, final norm and lm_head in fp32 at the end; worker 0 converts them
    # to the saved dtype to write them.
    rest = (shape.total_params - shape.layers * shape.layer_params) * (FP32 + dtype_bytes(model_config))
    phases["write"] = max(_gathered_layer(shape), rest)
    device = compute_device(config)
    weights = -(-shape.total_params * FP32 // w)
    return MemoryPlan(
        residency="resident",
        activation_storage="memory",
        device=device,
        workers=w,
        parameters=shape.total_params,
        checkpoint_bytes=dtype_bytes(model_config),
        phases=phases,
        weights=weights,
        baseline=RUNTIME_BASELINE,
        host_peak=_host_peak(device, weights, phases, 0),
        writer_host=0,
        stored_inputs=0,
        scratch=0,
        limit=limit,
        host_limit=host_limit,
    )


def _gathered_layer(shape: ModelShape) -> int:
    """FSDP unshards one decoder layer at a time (fp32), and the writer holds one more copy."""
    return 2 * shape.layer_params * FP32


def _structured_calibration_pass(config: PruneConfig, model_config: dict) -> int:
    """The calibration pass of structured pruning. The gradient measures: one layer-wise pass per stability
    batch (all of the batch's stored layer inputs in host memory, the fp64 squared and plain sums of one layer),
    while each worker keeps its fp32 rows of the squared and plain sums for the batch and for the running totals
    (four sets, sharded). Fluctuation: a forward pass holding one layer's compute copy and this worker's
    hidden states twice (a layer's inputs and outputs)."""
    run = _run(config, model_config)
    c, s = config.calibration, config.structured
    if IMPORTANCES[s.importance].forward_only:
        sequences = math.ceil(c.nsamples / run.workers)
        return run.shape.layer_params * FP32 + 2 * sequences * c.seqlen * run.shape.hidden * FP32
    batch_sequences = math.ceil(math.ceil(c.nsamples / min(s.stability_batches, c.nsamples)) / run.workers)
    run = replace(run, sequences=batch_sequences, gradient_pass=True, gradient=FP32)
    shape = run.shape
    sharded_sets = 4 * run.own_rows(shape.layers * shape.layer_linear_params, FP32)
    plain = shape.layer_linear_params * FP64  # the pass's plain sums, beside the squared ones
    return sharded_sets + plain + _layerwise_gradient_pass(run) + run.stored_inputs


def _backward_activations(shape: ModelShape, tokens: int) -> int:
    """Activations autograd keeps for one backward of every layer, and the logits."""
    per_layer = tokens * (SAVED_PER_TOKEN_HIDDEN * shape.hidden + SAVED_PER_TOKEN_MLP * shape.mlp) * FP32
    logits = 3 * tokens * shape.vocab * FP32  # logits, log-softmax, their gradient
    return shape.layers * per_layer + logits


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
        backward = _backward_activations(shape, sequences * c.seqlen)
        phases["recovery"] = adapters + backward + _gathered_layer(shape)  # the original model is gone by then
    return phases


def _fsdp_evaluation(shape: ModelShape, seqlen: int) -> int:
    """A sharded forward of EVAL_BATCH windows: FSDP unshards the root (embeddings, lm_head) and one layer."""
    logits = EVAL_LOGITS_COPIES * EVAL_BATCH * seqlen * shape.vocab * FP32
    root = shape.vocab * shape.hidden * (1 if shape.tied else 2) * FP32
    return logits + root + _gathered_layer(shape)


def dtype_bytes(model_config: dict) -> int:
    name = model_config.get("dtype") or model_config.get("torch_dtype") or "float32"
    return 2 if name in ("bfloat16", "float16") else 4


def compute_device(config: PruneConfig) -> str:
    """The device the workers compute on; "auto" is CUDA only where this process sees one."""
    device = config.runtime.device
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def available_memory(device: str) -> int | None:
    """A CUDA device's total memory, or the host's available RAM ("cpu"); None when unknown."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    if os.path.exists("/proc/meminfo"):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def plan_source(config: PruneConfig) -> CheckpointInfo | Path:
    """The checkpoint `config.model` names, checked as prune would check it when its weights are there (HF or
    DeepSpeed); else the path of its config.json alone (a plan for a model not yet downloaded)."""
    path = resolve_model(config.model)
    if is_zero_checkpoint(path) or has_weights(path):
        return open_checkpoint(config)
    return path


def plan_inputs(model: CheckpointInfo | Path) -> tuple[dict, int | None, int]:
    """config.json, the bytes of the checkpoint's largest safetensors file (None without them), and the bytes
    per value a read holds beyond the copy it returns."""
    if isinstance(model, CheckpointInfo):
        # Weights rest and are written in the run's dtype (--out-dtype, bf16 for a ZeRO input), not config.json's.
        config = {**model.config, "dtype": str(model.weight_dtype).removeprefix("torch.")}
        if model.zero is not None:
            return config, None, ZERO_READ_EXTRA
        return config, max(f.stat().st_size for f in model.weight_files), 0
    config_file = model / "config.json" if model.is_dir() else model
    if not config_file.is_file():
        raise CheckpointError(f"no config.json at {model}")
    return read_model_config(config_file), None, 0


def _limits(config: PruneConfig) -> tuple[int | None, int | None]:
    """(device limit per worker, the host's available memory)."""
    r = config.runtime
    limit = parse_bytes(r.device_memory) if r.device_memory else available_memory(compute_device(config))
    return limit, available_memory("cpu")


def plan_both(config: PruneConfig, model: CheckpointInfo | Path) -> dict[str, MemoryPlan]:
    """The plans `dist-prune plan` shows: resident and stream for "auto" (saap: resident only), else the one
    asked for; each with its activation storage resolved."""
    model_config, largest_file, read_extra = plan_inputs(model)
    limit, host_limit = _limits(config)
    return _plans(config, model_config, limit, largest_file, host_limit, read_extra)


def plan_for(config: PruneConfig, model: CheckpointInfo | Path) -> MemoryPlan:
    """The plan of the run as it will go: "auto" residency and activation storage resolved."""
    return _chosen(plan_both(config, model))


def resolve_runtime(config: PruneConfig, model: CheckpointInfo | Path) -> PruneConfig:
    """The config with residency, activation storage (resident and host memory when they fit) and overlap
    decided; the driver calls this once and hands the result to every worker."""
    plan = plan_for(config, model)
    runtime = replace(
        config.runtime,
        residency=plan.residency,
        activation_storage=plan.activation_storage,
        overlap=overlaps(config),
    )
    return replace(config, runtime=runtime)


def overlaps(config: PruneConfig) -> bool:
    """Whether reading and writing run in threads beside the compute: as asked, else on CUDA only. On a CPU
    they are about 1% of a layer's compute (bench/RESULTS.md `overlap`) but would hold two more layers."""
    asked = config.runtime.overlap
    return asked if asked is not None else compute_device(config) == "cuda"


def check_fits(plan: MemoryPlan) -> None:
    if plan.fits:
        return
    if not plan.host_fits:
        raise ConfigError(
            f"this run keeps {gib(plan.host_total)} in host memory ({gib(plan.host_peak)} per worker, "
            f"{plan.workers_per_host} worker(s) per host), but {gib(plan.host_limit or 0)} is available; "
            f"use --activation-storage disk (or auto)"
        )
    raise ConfigError(
        f"this run needs about {gib(plan.peak)} per worker but {gib(plan.limit or 0)} is available; "
        f"use --residency stream, more workers (--workers), fewer calibration sequences, or a larger --device-memory"
    )


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(plans: dict[str, MemoryPlan], scratch_dir: str | None = None) -> str:
    """A table per residency, then the one the run would use."""
    first = next(iter(plans.values()))
    dtype = {2: "16-bit", 4: "fp32"}[first.checkpoint_bytes]
    header = f"model: {first.parameters / 1e9:.3f}B parameters ({dtype}); {first.workers} worker(s) on {first.device}"
    tables = [_format_one(plan, scratch_dir) for plan in plans.values()]
    chosen = _chosen(plans)
    verdict = f"the run would use: {chosen.residency}" if chosen.fits else "nothing fits"
    return "\n\n".join([header, *tables, verdict])


def _format_one(plan: MemoryPlan, scratch_dir: str | None) -> str:
    lines = [
        f"residency {plan.residency}: {RESIDENCY_DESCRIPTIONS[plan.residency]}",
        f"  {'per worker':<32} {'GiB':>9}",
        _row("runtime (python, torch)", plan.baseline),
        _row("resident weights (row block)", plan.weights),
        *(_row("+ " + phase, extra) for phase, extra in plan.phases.items()),
        _row("device peak", plan.peak, f"limit {_maybe_gib(plan.limit)}"),
        _row("host memory", plan.host_peak, _host_note(plan)),
        _row("scratch disk", plan.scratch, _scratch_note(plan, scratch_dir)),
        f"  verdict: {'fits' if plan.fits else 'DOES NOT FIT'}",
    ]
    return "\n".join(lines)


def _row(label: str, value: int, note: str = "") -> str:
    return f"  {label:<32} {value / 2**30:>9.2f}" + (f"   {note}" if note else "")


def _maybe_gib(value: int | None) -> str:
    return "unknown" if value is None else gib(value)


def _host_note(plan: MemoryPlan) -> str:
    in_memory = plan.stored_inputs if plan.activation_storage == "memory" else 0
    stored = f"incl. stored layer inputs {gib(in_memory)}; " if in_memory else ""
    if plan.device == "cpu":
        return f"{stored}the host is the device"
    writer = f" with worker 0's page-locked layer copies {gib(plan.writer_host)}" if plan.writer_host else ""
    on_host = f"{plan.workers_per_host} worker(s) per host{writer}: {gib(plan.host_total)}"
    return f"{stored}{on_host}, {_maybe_gib(plan.host_limit)} available"


def _scratch_note(plan: MemoryPlan, scratch_dir: str | None) -> str:
    if not plan.scratch:
        return ""
    stored = plan.stored_inputs if plan.activation_storage == "disk" else 0
    parts = [f"gradient rows {gib(plan.scratch - stored)}"] + ([f"stored layer inputs {gib(stored)}"] if stored else [])
    return f"{' + '.join(parts)}, in {scratch_dir or 'the directory holding the output'}"
