"""The few cross-worker reductions the pruning maths needs, kept explicit and small.

- Input statistics merge by summing raw sums and sequence counts (never averages).
- A one-threshold-per-matrix selection (SparseGPT's unstructured block, per-matrix magnitude) over row
  shards is made exact by a distributed radix select of the k-th smallest score: four all-reduces of a
  256-bin histogram and one all-gather of two integers per worker, whatever the matrix size.

Every function here is a collective: all workers call it in the same order with the same k / ratio.
Without a process group they compute the single-worker answer.
"""

import resource
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..methods.masks import lowest_in_matrix
from ..methods.stats import InputStatistics
from .shares import local_share

RADIX_BITS = 8
KEY_BITS = 32
# Lower-precision floats are widened to float32 exactly; float64 scores would need 64-bit keys.
SELECTABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def all_reduce_statistics(stats: InputStatistics) -> None:
    """In place: every worker ends with the raw sums and the sequence count of all workers together."""
    if not _distributed():
        return
    for tensor in stats.tensors():
        dist.all_reduce(tensor)
    count = torch.tensor([stats.count], dtype=torch.int64, device=stats.sum_sq.device)
    dist.all_reduce(count)
    stats.count = int(count)


def all_reduce_layer_statistics(stats: dict[str, InputStatistics]) -> None:
    """All of a layer's groups, in sorted name order: dicts built from sets iterate in an order that
    differs between processes, and same-sized groups reduced out of order would mix silently."""
    for name in sorted(stats):
        all_reduce_statistics(stats[name])


@dataclass(frozen=True)
class ShardSelector:
    """SparseGPT's `block_selector(scores, ratio)` for a row shard: prunes exactly the
    int(total_rows * cols * ratio) lowest scores of the whole (all workers') block, ties by flat index."""

    row_offset: int
    total_rows: int

    def __call__(self, scores: Tensor, ratio: float) -> Tensor:
        k = int(self.total_rows * scores.shape[1] * ratio)  # == int(full.numel() * ratio)
        return select_lowest_global(scores, k, self.row_offset)


def select_lowest_global(scores: Tensor, k: int, row_offset: int) -> Tensor:
    """Local mask (True = prune) of this worker's rows [row_offset, row_offset + rows) of a matrix such that
    the union over workers is exactly the k lowest scores of the whole matrix, ties broken by global flat
    (row-major) index: the same as `masks.prune_lowest_in_matrix` on the full matrix.

    Workers must hold disjoint contiguous row blocks with the same number of columns.
    """
    if scores.dtype not in SELECTABLE_DTYPES:
        raise TypeError(f"exact selection supports {SELECTABLE_DTYPES}, not {scores.dtype}")
    if not _distributed():  # one worker holds the whole matrix: one sort, and no host synchronisation
        return lowest_in_matrix(scores.float(), k)
    keys = _order_keys(scores)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    found = _kth_smallest_key(keys, k)
    if found is None:  # k covers the whole matrix
        return torch.ones_like(scores, dtype=torch.bool)
    threshold, ties_to_take = found
    ties = keys == threshold
    take = ties_to_take - _ties_in_earlier_rows(int(ties.sum()), row_offset, scores.device)
    chosen_ties = ties & (ties.cumsum(0) <= take)  # the first `take` ties in this worker's flat order
    return ((keys < threshold) | chosen_ties).view_as(scores)


def _order_keys(scores: Tensor) -> Tensor:
    """Flat int64 keys in [0, 2^32) that order exactly like `torch.sort` orders the scores as float32:
    -0.0 equals 0.0 and NaN sorts after +inf."""
    x = scores.float().flatten() + 0.0  # -0.0 + 0.0 == +0.0: the sort treats them as equal
    x = torch.where(torch.isnan(x), torch.full_like(x, float("nan")), x)  # one NaN bit pattern
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    negative = bits >= 0x80000000
    # Negative floats order backwards by their bits; put them all below the non-negative ones.
    return torch.where(negative, 0xFFFFFFFF - bits, bits | 0x80000000)


def _kth_smallest_key(keys: Tensor, k: int) -> tuple[int, int] | None:
    """Radix select over all workers: the key of the k-th smallest element (1-based) and how many
    elements equal to it belong to the k lowest; None when k >= the number of elements."""
    prefix, remaining, candidates = 0, k, keys
    for shift in range(KEY_BITS - RADIX_BITS, -1, -RADIX_BITS):
        digits = (candidates >> shift) & ((1 << RADIX_BITS) - 1)
        histogram = torch.bincount(digits, minlength=1 << RADIX_BITS)
        _all_reduce(histogram)
        cumulative = histogram.cumsum(0)
        if shift == KEY_BITS - RADIX_BITS and remaining >= int(cumulative[-1]):
            return None
        digit = int(torch.searchsorted(cumulative, remaining))  # first bin reaching the k-th element
        remaining -= int(cumulative[digit - 1]) if digit else 0
        prefix |= digit << shift
        candidates = candidates[digits == digit]
    return prefix, remaining


def _ties_in_earlier_rows(my_ties: int, row_offset: int, device: torch.device) -> int:
    """Ties held by workers whose rows come before ours: global flat order is row-block order."""
    if not _distributed():
        return 0
    mine = torch.tensor([row_offset, my_ties], dtype=torch.int64, device=device)  # NCCL wants it on the GPU
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    me = (row_offset, dist.get_rank())
    # Only empty shards can share an offset; ordering by (offset, rank) keeps the rule total anyway.
    return sum(int(t[1]) for rank, t in enumerate(everyone) if (int(t[0]), rank) < me)


def all_reduce_in_order(tensors: dict[str, Tensor]) -> None:
    """In place: sum each same-shaped-everywhere tensor over workers, one collective for all, in sorted name
    order (dict order can differ between processes)."""
    if not _distributed() or not tensors:
        return
    names = sorted(tensors)
    flat = torch.cat([tensors[name].flatten() for name in names])
    dist.all_reduce(flat)
    for name, part in zip(names, flat.split([tensors[name].numel() for name in names]), strict=True):
        tensors[name].copy_(part.view_as(tensors[name]))


def all_reduce_sums(tensors: list[Tensor]) -> None:
    """In place, one tensor at a time in the given order (no concatenated copy: reconstruction's two X X^T of a
    70B down_proj are 6.6 GB each in fp64)."""
    for tensor in tensors:
        _all_reduce(tensor)


def _all_reduce(tensor: Tensor) -> None:
    if _distributed():
        dist.all_reduce(tensor)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across_workers(values: list[float], device: torch.device) -> list[float]:
    """A handful of scalars summed over workers (fp64, so small report numbers do not lose digits)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    _all_reduce(tensor)
    return tensor.tolist()


def gather_rows(local: Tensor, total_rows: int) -> Tensor:
    """The full tensor on every worker from each worker's `row_block` of its leading dimension (a collective).

    Blocks may differ in size by one row; they are padded to the largest for the all-gather and trimmed."""
    if not _distributed():
        return local
    world = dist.get_world_size()
    blocks = [local_share(total_rows, rank, world) for rank in range(world)]
    largest = max(len(b) for b in blocks)
    padded = local.new_zeros((largest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    everyone = local.new_empty((world * largest, *local.shape[1:]))
    dist.all_gather_single(everyone, padded)
    return torch.cat([everyone[rank * largest : rank * largest + len(b)] for rank, b in enumerate(blocks)])


def broadcast_from_first(tensors: dict[str, Tensor] | None, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Worker 0's tensors on every worker (a collective); the others pass None and `like`, tensors of the same
    names, shapes and dtypes."""
    if not _distributed():
        return tensors
    received = {}
    for name in sorted(like):
        tensor = tensors[name].contiguous() if tensors is not None else torch.empty_like(like[name])
        dist.broadcast(tensor, src=0)
        received[name] = tensor
    return received


def any_worker(flag: bool, device: torch.device) -> bool:
    """True on every worker when it is True on at least one (a collective)."""
    return sum_across_workers([float(flag)], device)[0] > 0


def worker_memory(weight_bytes: int, w, progress) -> list[dict]:
    """Every worker's peak memory, its host peak after each phase so far, and the bytes of its resident
    weights, as seen by worker 0 (a collective)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if w.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(w.device)
    phases = list(progress.host_peaks)  # every worker runs the same phases in the same order
    mine = [float(peak), float(weight_bytes), *(float(progress.host_peaks[phase]) for phase in phases)]
    width = len(mine)
    values = [0.0] * (width * w.world_size)
    values[width * w.rank : width * (w.rank + 1)] = mine
    summed = sum_across_workers(values, w.device)
    return [
        {
            "rank": rank,
            "peak_bytes": int(summed[width * rank]),
            "weight_bytes": int(summed[width * rank + 1]),
            "host_peak_after_phase": {phase: int(summed[width * rank + 2 + i]) for i, phase in enumerate(phases)},
        }
        for rank in range(w.world_size)
    ]
