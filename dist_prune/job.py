"""The prune job one worker runs, identical under every launcher (in-process, torchrun rank, Ray actor).

A worker never holds more than one decoder layer in compute precision. Where the other layers rest is the
residency (distributed/residency.py): nowhere (stream: read from the checkpoint when their turn comes) or
as this worker's row block in the checkpoint's dtype (resident). Per decoder layer:

    dense layer -> dense evaluation states through it -> input statistics of this worker's calibration
    batches (summed over workers) -> score + mask this worker's rows of every Linear (pure maths) ->
    all-gather the pruned rows -> calibration and pruned-evaluation states through the pruned layer ->
    worker 0 writes the layer's file

Reading the next layer and writing the finished one overlap the compute (background.py): the layer is read
ahead while the previous one computes, and written and hashed behind while the next one does. Each layer's
time is split by phase (progress.PhaseClock) into prune_report.json: read, read_wait, h2d, forward,
statistics, pruning, d2h, write_wait on this thread; read, write and hash in the background.

GBLM's gradient sums come first, from the layer-wise gradient pass (distributed/layer_gradients.py) or a
saved file, and each worker keeps only its rows of them, in the scratch directory.
"""

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from .background import Background, Prefetcher, page_locked, to_host, to_host_dict
from .checkpoint import CheckpointInfo, load_tokenizer
from .config import EVAL_BATCH, PruneConfig
from .data import (
    calibration_windows,
)
from .distributed import ShardSelector, StopRequest, Workers, all_reduce_layer_statistics, batch_share, local_share
from .distributed.collectives import any_worker, broadcast_from_first, gather_rows, sum_across_workers, worker_memory
from .distributed.layer_gradients import ActivationStore, GradientRequest, LayerSums, Scratch, layerwise_gradient_pass
from .distributed.residency import ResidentStore, StreamStore
from .errors import CheckpointError, DistPruneError
from .gradients import GradientSumsWriter, gradient_shapes, read_layer_gradient_rows
from .layerwise import LayerInputs, collect_input_statistics, embed_batches, run_layer
from .log import get_logger
from .methods import GroupMember
from .models import EMBEDDING, INPUT_GROUPS, LINEARS, Shell, layer_prefix, linear_weight_name
from .precision import compute_dtype
from .progress import PhaseClock, Progress, rounded
from .provenance import ReadRecord
from .reconstruct import LayerReconstruction
from .registry import layer_statistics, method, runs_calibration
from .report import LayerEntry, ModuleEntry, build_report, phase_report
from .resolved import Resolved
from .safe_io import read_json, resolved, write_text
from .sparsity_profile import SparsityProfile, owl_profile
from .windows import calibration_stream_checked, token_windows
from .writer import CheckpointWriter, Interrupted, finish_run

log = get_logger()
GRADIENT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class Run:
    """What every step of one worker's job needs: the config, the checkpoint, the weights, the workers."""

    def __init__(self, resolved: Resolved, workers: Workers, progress: Progress, scratch: Scratch | None):
        config = resolved.config
        r = config.runtime
        if r.residency == "auto" or r.activation_storage == "auto" or r.overlap is None:
            raise ValueError("the driver resolves residency, activation storage and overlap (pipeline.resolve)")
        self.resolved, self.config, self.info = resolved, config, resolved.info
        self.workers, self.progress, self.scratch = workers, progress, scratch
        self.family, self.method, self.nm = resolved.family, resolved.method, resolved.nm
        self.reconstructs = config.prune.reconstruct != "none"
        self.profile: SparsityProfile | None = None  # per-layer sparsities (OWL), found before the layer loop
        self.statistics = layer_statistics(self.method, config.prune)
        self.calibrates = runs_calibration(self.method, config.prune)
        self.model_config = self.info.transformers_config()
        self.dtype = compute_dtype(workers.device, self.info.weight_dtype)
        self.clock = PhaseClock(workers.device)  # the layer loop's phases
        self.gradient_clock = PhaseClock(workers.device)  # the gradient pass's
        with progress.phase("load"):
            if r.residency == "resident":
                self.store = ResidentStore(self.info, workers)
            else:
                self.store = StreamStore(self.info, workers.device, r.overlap)

    def stem(self) -> Shell:
        return self.shell([EMBEDDING])

    def shell(self, names: list[str]) -> Shell:
        """The model around its layers, with the tensors `names` (outside the layers) read."""
        return Shell(self.family, self.model_config, self.store.read(names), self.dtype, self.workers.device)

    def layer(self, index: int, state: dict[str, Tensor]):
        return self.family.decoder_layer(self.model_config, index, state, self.dtype).to(self.workers.device)

    def close(self) -> None:
        self.store.close()


def prune_on_worker(resolved: Resolved, workers: Workers, progress: Progress) -> dict | None:
    """The whole prune job on this worker; worker 0 writes the output and returns the report."""
    started, config = time.perf_counter(), resolved.config
    with ExitStack() as stack:
        scratch = stack.enter_context(_scratch(config, workers)) if _needs_scratch(config) else None
        stop = stack.enter_context(StopRequest())
        run = Run(resolved, workers, progress, scratch)
        stack.callback(run.close)
        windows, eval_windows, _ = token_windows(config, run.info, progress)
        writer = stack.enter_context(_writer(config, run.info)) if workers.is_main else None
        finished = _finished_layers(run, writer)
        done = int(sum_across_workers([float(len(finished))], workers.device)[0])  # worker 0 alone knows
        gradients = stack.enter_context(_gradient_rows(run, windows, done)) if run.method.gradients else None
        with progress.phase("stem"):  # layer 0's inputs, from the embedding
            stem = run.stem() if run.calibrates or eval_windows is not None else None  # read once for both
            calibration = _embedded(run, stem, windows, config.calibration.batch_size) if run.calibrates else None
            evaluation = Evaluation(run, stem, eval_windows) if eval_windows is not None else None
            del stem
        if config.prune.sparsity_profile == "owl":
            with progress.phase("owl", total=run.info.num_layers) as advance:
                run.profile = owl_profile(run, calibration, advance)
        with progress.phase("layers", total=run.info.num_layers) as advance:
            layers = prune_layers(run, calibration, evaluation, gradients, writer, done, stop, advance)
        perplexities = evaluation.perplexities() if evaluation is not None else {}
        memory = worker_memory(run.store.resident_bytes, workers, progress)
        if writer is None:
            return None
        writer.write_rest(run.store.rest())
        progress.timings["total"] = round(time.perf_counter() - started, 3)
        layers = finished + layers
        report = build_report(config, run.info, layers, perplexities, eval_windows, windows, progress.timings, workers)
        report.update(workers=memory, memory_plan=resolved.plan.to_dict(), resumed_layers=done)
        if run.profile is not None:
            report["sparsity_profile"] = run.profile.to_dict()
        report.update(phase_report(layers[done:], run.gradient_clock.totals))
        finish_run(writer, config, report, windows, run.info.model_files, run.info.config, run.info.weight_dtype)
    log.info("wrote %s", config.out)
    return report


def _writer(config: PruneConfig, info: CheckpointInfo) -> CheckpointWriter:
    r = config.runtime
    settings = run_settings(config, info)
    return CheckpointWriter(Path(config.out), info.num_layers, settings, r.overwrite, r.resume, overlap=r.overlap)


def _finished_layers(run: Run, writer: CheckpointWriter | None) -> list[LayerEntry]:
    """Worker 0: the interrupted run's layers that verify, said in the log; from here on every part of the
    model it reads is checked against what that run read (provenance.py)."""
    if writer is None:
        return []
    recorded = len(writer.manifest["layers"])
    finished = writer.verified_layers()
    if finished:
        log.info("resuming: layers 0-%d of the interrupted run verify and are reused", len(finished) - 1)
    if recorded > len(finished):
        log.info("resuming: layer %d's file does not verify: the interrupted run's layers %d-%d are done again",
                 len(finished), len(finished), recorded - 1)  # fmt: skip
    run.store.record = ReadRecord(writer.manifest["reads"], run.config.model)
    return finished


# Runtime settings that change where and how fast a run computes, not what it computes: a run may resume
# with other values. (The thread count can change BLAS rounding: resume with the same threads for bit-identity.)
RUN_ONLY = ("workers", "launcher", "threads", "device_memory", "residency", "activation_storage", "overlap",
            "scratch", "overwrite", "resume")  # fmt: skip


def run_settings(config: PruneConfig, info: CheckpointInfo) -> dict:
    """What --resume must match: the settings that decide the result, and the source model's fingerprint."""
    return {**result_settings(config), "source": info.fingerprint}


def result_settings(config: PruneConfig) -> dict:
    """Every setting that decides the result, as flat `section.key` names (what --resume must match)."""
    flat = {}
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            flat.update(
                {f"{section}.{k}": v for k, v in values.items() if not (section == "runtime" and k in RUN_ONLY)}
            )
        elif section != "out":
            flat[section] = values
    return flat


def prune_layers(
    run: Run,
    calibration: LayerInputs | None,
    evaluation: "Evaluation | None",
    gradients: Prefetcher | None,
    writer: CheckpointWriter | None,
    done: int,
    stop: StopRequest,
    advance: Callable[[], None],
) -> list[LayerEntry]:
    """Stats -> score -> mask -> apply -> propagate -> write, one decoder layer at a time. The first `done`
    layers were finished by an interrupted run: their written weights are propagated, not pruned again."""
    layers, clock = [], run.clock
    for index in range(run.info.num_layers):
        start = time.perf_counter()
        layer = _read_layer(run, index)  # one layer in memory (and the next one being read)
        if evaluation is not None:
            with clock("forward"):
                evaluation.dense = run_layer(layer, evaluation.dense)
        if index < done:
            like = _saved_state(run, layer, index, {})  # the names, shapes and dtypes worker 0 sends
            with clock("h2d"):
                state = _on_device(broadcast_from_first(_replayed(writer, index, run), like=like), run)
            notes = None
        else:
            rows = _gradient_rows_of(run, gradients, index)
            state, notes = _prune_layer(run, layer, index, calibration, rows)
        with torch.no_grad():
            for name in LINEARS:
                layer.get_submodule(name).weight.copy_(state[linear_weight_name(index, name)])
        with clock("forward"):
            if calibration is not None:
                calibration = run_layer(layer, calibration)
            if evaluation is not None:
                evaluation.pruned = run_layer(layer, evaluation.pruned)
        run.store.commit(index, state)
        if notes is None:
            clock.take()  # a replayed layer: its time is not a pruned layer's
        else:
            layers.append(_finish_layer(run, writer, index, state, notes, start))
        _release_gradient_rows(run, index)
        del layer, state  # before the next layer is read: one layer in memory, not two
        advance()
        if index + 1 < run.info.num_layers and stop.agreed(run.workers.device):
            raise Interrupted(f"stopped after layer {index} of {run.info.num_layers - 1} on a signal")
    if writer is not None and layers:
        waited = writer.wait()  # the last layer's file: the entry is this thread's again once it is written
        last = layers[-1]
        last["phases_s"]["write_wait"] = round(last["phases_s"].get("write_wait", 0.0) + waited, 3)
        last["seconds"] = round(last["seconds"] + waited, 3)
    return layers


def _finish_layer(
    run: Run, writer: CheckpointWriter | None, index: int, state: dict[str, Tensor], notes: dict, start: float
) -> LayerEntry:
    """The layer's report entry with its phases; worker 0 hands the layer to the writer's thread, which adds
    its write and hash seconds to the entry (the entry is that thread's until the next layer's turn)."""
    entry = _layer_entry(index, state, notes)
    if writer is not None:
        with run.clock("d2h"):
            host = to_host_dict(state, recycled=True)
        run.clock.add("write_wait", writer.wait())
    entry.update(seconds=round(time.perf_counter() - start, 3), phases_s=rounded(run.clock.take()))
    if writer is not None:
        writer.write_layer(index, host, entry)
    return entry


def _gradient_rows_of(run: Run, gradients: Prefetcher | None, index: int) -> dict[str, Tensor]:
    """GBLM: this worker's rows of layer `index`'s gradient sums (the next layer's read ahead); else nothing."""
    if gradients is None:
        return {}
    with run.clock("read_wait"):
        rows = gradients.get(index, then=index + 1 if index + 1 < run.info.num_layers else None)
    run.clock.add("read", gradients.load_seconds)
    return rows


def _read_layer(run: Run, index: int):
    """Layer `index` in the compute dtype on the device; layer index + 1 is read ahead meanwhile."""
    with run.clock("read_wait"):
        state = run.store.layer(index, then=index + 1)
    run.clock.add("read", run.store.read_seconds)
    with run.clock("h2d"):
        layer = run.layer(index, state)
        # checked where it is fast (a GPU reads 1.7 GB of a 70B layer in a millisecond; a CPU without native
        # bf16 took a second); the compute copy holds every NaN or Inf of the weights as read
        prefix = layer_prefix(index)
        _finite({prefix + name: t for name, t in layer.state_dict().items()}, "the checkpoint's weight")
        return layer


def _replayed(writer, index: int, run: Run) -> dict[str, Tensor] | None:
    """Worker 0's written weights of a finished layer (read back for a resumed run)."""
    return writer.read_layer(index) if writer is not None else None


def _on_device(state: dict[str, Tensor], run: Run) -> dict[str, Tensor]:
    return {name: t.to(run.workers.device) for name, t in state.items()}


def _prune_layer(run: Run, layer, index: int, calibration, gradient_rows: dict) -> tuple[dict, dict]:
    """This layer's statistics (summed over workers), then score and mask (and reconstruct); the state to write
    and notes."""
    stats, clock = {}, run.clock
    if run.statistics:
        with clock("forward"):
            stats = collect_input_statistics(layer, calibration, run.statistics == "hessian", clock)
        with clock("statistics"):
            all_reduce_layer_statistics(stats)
            _finite({f"layer {index} {name}": group.sum_sq for name, group in stats.items()}, "the input statistics of")
            for group in stats.values():
                group.round_once()
    with clock("h2d"):
        gradient_rows = _on_device(gradient_rows, run)
    with clock("pruning"):
        fitting = None
        if run.reconstructs:
            fitting = LayerReconstruction(layer, calibration, run.config.prune, run.workers.device)
        pruned, notes = _prune_rows(run, layer, index, stats, gradient_rows, fitting)
        return _saved_state(run, layer, index, pruned), notes


def _finite(tensors: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """NaN or Inf would prune at random and write it on: refuse, naming the first tensor that holds one."""
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{what} {name} holds NaN or Inf values; nothing was written")
    return tensors


def _saved_state(run: Run, layer, index: int, pruned: dict[str, Tensor]) -> dict[str, Tensor]:
    """The layer as written: the pruned Linears, and the other tensors back in the checkpoint's dtype (exact:
    they were widened from it)."""
    prefix = layer_prefix(index)
    rest = {prefix + name: t for name, t in layer.state_dict().items() if prefix + name not in pruned}
    return {**{name: t.detach().to(run.info.weight_dtype) for name, t in rest.items()}, **pruned}


def _prune_rows(run: Run, layer, index: int, stats: dict, gradient_rows: dict[str, Tensor], fitting):
    """Score and mask this worker's rows of every Linear of the layer, one input group at a time (q/k/v, o,
    gate/up, down), fit the kept weights (`fitting`, reconstruct.py) and gather the pruned matrices.

    The selectors and gathers are collectives: every worker walks the groups and Linears in the same order."""
    w, p = run.workers, run.config.prune
    if run.profile is not None:
        p = replace(p, sparsity=run.profile.layer_sparsity[index])
    pruned, notes = {}, {}
    for owner, names in INPUT_GROUPS.items():
        members = {}
        for name in names:
            full_name = linear_weight_name(index, name)
            weight = layer.get_submodule(name).weight
            mine = local_share(weight.shape[0], w.rank, w.world_size)
            members[name] = GroupMember(
                weight[mine.start : mine.stop], mine.start, ShardSelector(mine.start, weight.shape[0]),
                gradient_rows.get(full_name),
            )  # fmt: skip
        # A group's statistics go once it is pruned: SparseGPT's X X^T of q/k/v, o and gate/up (315 MB at 13B)
        # are not held while down_proj's Hessian is inverted.
        group_stats = stats.pop(owner, None)
        outcomes = run.method.prune(members, p, group_stats, run.nm)
        errors = {}
        if fitting is not None:
            with run.clock("reconstruction"):
                outcomes, errors = fitting.fit(owner, members, outcomes, group_stats)
        for name, outcome in outcomes.items():
            rows = layer.get_submodule(name).weight.shape[0]
            # Round to the saved dtype now, so the next layer calibrates on exactly the weights we write.
            full = pruned[linear_weight_name(index, name)] = gather_rows(outcome.weight.to(run.info.weight_dtype), rows)
            notes[name] = {**_notes(outcome, w.device), **errors.get(name, {})}
            if fitting is not None:
                fitting.use(name, full)
        del members, outcomes, group_stats
    return pruned, notes


def _notes(outcome, device) -> dict:
    notes = {}
    if outcome.damp is not None:
        notes["sparsegpt_damp"] = outcome.damp
    if outcome.score_sum is not None:
        gradient, total = sum_across_workers([outcome.gradient_score_sum, outcome.score_sum], device)
        notes["gradient_share"] = gradient / total
    return notes


def _embedded(run: Run, stem: Shell, windows: Tensor, batch_size: int) -> LayerInputs:
    """Layer 0's inputs for this worker's batches of `windows`."""
    w = run.workers
    batches = [windows[b.start : b.stop] for b in batch_share(windows.shape[0], batch_size, w.rank, w.world_size)]
    return embed_batches(stem, batches)


class Evaluation:
    """Perplexity of the dense and of the pruned model, computed on the way: the evaluation windows' states
    go through each dense layer before it is pruned and through the pruned layer after, so evaluation
    costs no extra reading of the weights."""

    def __init__(self, run: Run, stem: Shell, windows: Tensor):
        self.run, self.windows = run, windows
        w = run.workers
        self.batches = batch_share(windows.shape[0], EVAL_BATCH, w.rank, w.world_size)
        self.dense = self.pruned = _embedded(run, stem, windows, EVAL_BATCH)

    def perplexities(self) -> dict[str, float]:
        run = self.run
        head = run.shell(run.family.head_tensor_names(run.model_config))
        values = {}
        for name, states in (("dense", self.dense), ("pruned", self.pruned)):
            nll = sum(float(head.nll(h, self.windows[b.start : b.stop]).double().sum())
                      for h, b in zip(states.hidden, self.batches, strict=True))  # fmt: skip
            (total,) = sum_across_workers([nll], self.run.workers.device)
            values[name] = math.exp(total / self.windows[:, 1:].numel())
            log.info("%s perplexity %.3f", name, values[name])
        return values


@contextmanager
def _gradient_rows(run: Run, windows: Tensor, done: int) -> Iterator[Prefetcher]:
    """GBLM: `get(i, then=j)` gives this worker's rows of layer i's gradient sums (layer j's are read ahead),
    from a saved file or from a layer-wise gradient pass whose per-layer results wait in the scratch
    directory (`_release`d once the layer is pruned). The pass covers the layers from `done` on (a resumed
    run has the layers below)."""
    p, w = run.config.prune, run.workers
    if p.gradients:
        read = lambda index: read_layer_gradient_rows(Path(p.gradients), index, w.rank, w.world_size)  # noqa: E731
    else:
        _run_gradient_pass_unless_kept(run, windows, done)
        read = lambda index: run.scratch.load(f"gradients-{index}")  # noqa: E731

    def load(index: int) -> dict[str, Tensor]:
        """Read in this thread (not when first used), page-locked for a GPU (the same shapes every layer)."""
        rows = read(index)
        return page_locked(rows) if w.device.type == "cuda" else {k: t.clone() for k, t in rows.items()}

    rows = Prefetcher(load, "gradient-rows", run.config.runtime.overlap)
    try:
        yield rows
    finally:
        rows.close()


def _run_gradient_pass_unless_kept(run: Run, windows: Tensor, done: int) -> None:
    """Each worker's rows of the layers from `done` on, in the scratch directory: from a gradient pass, or kept
    there by a killed run made with the same settings."""
    needed = range(done, run.info.num_layers)
    # A resumed run reuses the rows a killed run left, when every worker has all it needs (the pass is a
    # collective: all run it or none) and they were made with the same settings and model; the scratch name
    # carries the output, the rank and the world size. Worker 0's file also holds what the pass read of the
    # model, which the layer loop checks as it reads each layer again (provenance.py).
    made_for = run.scratch.dir / "gradients-settings.json"
    settings = run_settings(run.config, run.info)
    found = _read_scratch_json(made_for) if run.scratch.has_file(made_for.name) else {}
    reusable = found.get("settings") == json.loads(json.dumps(settings))  # as JSON gives it back
    missing = not (reusable and all(run.scratch.has(f"gradients-{index}") for index in needed))
    if needed and any_worker(missing, run.workers.device):
        with _rows_kept_in_scratch(run) as keep_my_rows:
            _gradient_pass(run, windows, keep_my_rows, frozenset(needed))
        reads = run.store.record.reads if run.store.record is not None else {}
        write_text(made_for, json.dumps({"settings": settings, "reads": reads}, sort_keys=True))
    elif needed:
        log.info("resuming: the gradient rows of layers %d-%d are reused", needed.start, needed.stop - 1)
        if run.store.record is not None:
            for part, digest in found.get("reads", {}).items():
                run.store.record.reads.setdefault(part, digest)


@contextmanager
def _rows_kept_in_scratch(run: Run) -> Iterator:
    """`keep_my_rows(index, sums)`: this worker's rows of a layer's summed sums, rounded once to the gradient
    dtype, written to the scratch directory behind the pass (all of them written when the context ends)."""
    w, clock = run.workers, run.gradient_clock
    dtype = GRADIENT_DTYPES[run.config.prune.gradient_dtype]
    behind = Background("gradient-rows", run.config.runtime.overlap)

    def save(name: str, rows: dict[str, Tensor]) -> None:
        start = time.perf_counter()
        run.scratch.save(name, rows)
        clock.add("scratch_write", time.perf_counter() - start)

    def keep_my_rows(index: int, sums: LayerSums) -> None:
        with clock("d2h"):
            rows = {}
            for name, total in sums.power.items():
                mine = local_share(total.shape[0], w.rank, w.world_size)
                rows[name] = to_host(total[mine.start : mine.stop].to(dtype), recycled=True)  # rounded once
        clock.add("write_wait", behind.submit(save, f"gradients-{index}", rows))

    try:
        yield keep_my_rows
    finally:
        behind.close()


def _read_scratch_json(path: Path) -> dict:
    """A file of this run's scratch folder; one a kill cut short counts as absent."""
    try:
        found = read_json(path, "scratch file", DistPruneError)
    except DistPruneError:
        return {}
    return found if isinstance(found, dict) else {}


def _release_gradient_rows(run: Run, index: int) -> None:
    """Layer `index` is written: its gradient rows are not needed again, even by a resumed run."""
    if run.scratch is not None and run.scratch.has(f"gradients-{index}"):
        run.scratch.remove(f"gradients-{index}")


def _gradient_pass(run: Run, windows: Tensor, on_layer, layers: frozenset[int] | None = None) -> None:
    p, r = run.config.prune, run.config.runtime
    on_disk = run.scratch if r.activation_storage == "disk" else None
    activations = ActivationStore(on_disk, run.workers.device, r.overlap)
    try:
        with run.progress.phase("gradients", total=2 * run.info.num_layers) as advance:
            request = GradientRequest(scale=p.gblm_scale, norm=p.gblm_norm, layers=layers)
            loss = layerwise_gradient_pass(
                run.store, run.model_config, windows, request, run.workers, activations, run.dtype, on_layer, advance,
                timer=run.gradient_clock,
            )  # fmt: skip
    finally:
        activations.close()
    log.info("gradient pass: mean calibration loss %.4f", loss)


def gradients_on_worker(resolved: Resolved, out: Path, workers: Workers, progress: Progress) -> Path | None:
    """`dist-prune grad`: the layer-wise gradient pass alone; worker 0 writes each layer's summed sums into
    the output file as the pass finishes it, holding one layer at a time."""
    config = resolved.config
    p, c = config.prune, config.calibration
    with ExitStack() as stack:
        scratch = stack.enter_context(_scratch(config, workers)) if _needs_scratch(config) else None
        run = Run(resolved, workers, progress, scratch)
        stack.callback(run.close)
        stream = calibration_stream_checked(config, load_tokenizer(run.info.model_files), run.info)
        windows = calibration_windows(config, stream)
        writer = None
        if workers.is_main:
            shapes = gradient_shapes(run.info.config)
            writer = stack.enter_context(
                GradientSumsWriter(out, shapes, p.gblm_scale, p.gblm_norm, c.nsamples, c.seqlen)
            )
        _gradient_pass(run, windows, lambda _index, sums: writer.write(sums.power) if writer is not None else None)
    return out if workers.is_main else None


def _needs_scratch(config: PruneConfig) -> bool:
    return method(config.prune.method).gradients and not config.prune.gradients


def scratch_root(config: PruneConfig) -> Path:
    return Path(config.runtime.scratch) if config.runtime.scratch else Path(config.out).absolute().parent


def _scratch(config: PruneConfig, workers: Workers) -> Scratch:
    """This worker's scratch folder: its name carries the output (its name, for people, and a hash of its
    whole path, so runs into a/x and b/x under one --scratch never share one), the rank and the world size;
    the output's lock keeps a second run for the same output away."""
    out = Path(config.out)
    where = hashlib.sha256(str(resolved(out)).encode()).hexdigest()[:12]
    tag = f"{out.name}-{where}-rank{workers.rank}-of-{workers.world_size}"
    return Scratch(scratch_root(config), tag, resume=config.runtime.resume, kept=("gradients-",))


def _layer_entry(index: int, state: dict[str, Tensor], notes: dict[str, dict]) -> LayerEntry:
    modules: dict[str, ModuleEntry] = {}
    for name, extra in notes.items():
        weight = state[linear_weight_name(index, name)]
        zeros = int((weight == 0).sum())
        modules[name] = {"zeros": zeros, "numel": weight.numel(), "sparsity": zeros / weight.numel(), **extra}
    zeros = sum(m["zeros"] for m in modules.values())
    numel = sum(m["numel"] for m in modules.values())
    return {"layer": index, "sparsity": zeros / numel, "modules": modules}
