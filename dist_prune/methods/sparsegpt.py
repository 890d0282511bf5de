"""SparseGPT (Frantar & Alistarh 2023): prune column blocks and fix the rest with the OBS update.

Given the same Hessian, every output row is processed independently, so the functions run unchanged on a
row shard. Only the unstructured block threshold compares across rows; it is an argument so that a sharded
caller can supply an exact cross-worker selection.

The Linears that read the same input (q/k/v; gate/up) share H, so they are pruned as one group: H is
factorised once, and their rows are stacked so that each column step of the OBS loop serves all of them.

Given H, the result does not depend on the number of workers or on the threads each uses, bit for bit:
- every worker factorises the same all-reduced H; LAPACK's blocking follows the thread count (a Cholesky
  factor of a 1536-wide H differs in its last bits between 1 and 2 threads), so on the CPU the factorisation
  runs on one thread. (The forward that makes H is another matter: on an AVX-512 CPU MKL splits the reduction
  of some products across threads, so a whole run is bit-identical across worker counts at the same threads
  per worker, not across thread counts.)
- the column loop is element-wise along each row (on CUDA one Triton kernel per block, obs_kernel.py, doing
  the same operations in the same order);
- the lazy update of the later columns is a matrix product, whose rounding can depend on how many rows it
  multiplies; it is made in row chunks aligned with the whole matrix (aligned.py).
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .aligned import Placement, aligned_products, stack_rows
from .base import Method, PruneOutcome
from .masks import prune_lowest_in_matrix, prune_n_m

MAX_DAMP_RETRIES = 6

BlockSelector = Callable[[Tensor, float], Tensor]


@dataclass
class SparseGPTResult:
    weight: Tensor  # fp32
    mask: Tensor  # True where pruned
    damp: float  # damping fraction that made H positive definite
    retried: bool  # the configured damping was not enough


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    block_selector: BlockSelector = prune_lowest_in_matrix,
    first_row: int = 0,
) -> SparseGPTResult:
    """W: (out, in), H: (in, in) = (2/N) sum X X^T. One matrix: a group of one (`sparsegpt_prune_group`)."""
    return sparsegpt_prune_group([W], H, sparsity, nm, blocksize, damp, [block_selector], [first_row])[0]


def sparsegpt_prune_group(
    weights: list[Tensor],
    H: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None,
    blocksize: int,
    damp: float,
    block_selectors: list[BlockSelector],
    first_rows: list[int],
) -> list[SparseGPTResult]:
    """The matrices (out_j, in) that read the input whose H = (2/N) sum X X^T is given; each may be a row
    block of a larger matrix starting at row `first_rows[j]`. Returns each one's updated weight and mask.

    `block_selectors[j](scores, ratio)` picks matrix j's unstructured mask of one (rows x blocksize) block:
    by default exactly int(numel * ratio) lowest of w^2 / diag(Hinv)^2 (one threshold over the block)."""
    stack, placements = stack_rows(weights, first_rows)
    H = H.float()
    dead = torch.diag(H) == 0
    if dead.any():  # a copy only when there is something to change: H is the largest matrix here
        H = H.clone()
        H[dead, dead] = 1
        stack[:, dead] = 0
    Hinv, used = inverse_hessian_factor(H, damp)
    mask = torch.zeros_like(stack, dtype=torch.bool)
    for i1 in range(0, stack.shape[1], blocksize):
        i2 = min(i1 + blocksize, stack.shape[1])
        block_mask = None if nm is not None else _block_mask(stack, Hinv, i1, i2, sparsity, placements, block_selectors)
        err = _prune_block(stack, Hinv, mask, i1, i2, nm, block_mask)
        _subtract_product(stack[:, i2:], err, Hinv[i1:i2, i2:], placements)
    return [SparseGPTResult(stack[p.rows], mask[p.rows], used, used != damp) for p in placements]


def inverse_hessian_factor(H: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of H^-1 after damping; multiplies the damping by 10 until H is definite.

    A known peer bug silently replaces a failed factorisation by the identity, which prunes by magnitude
    without saying so; here a failure retries with more damping and is reported, then raises.
    """
    mean_diag = torch.mean(torch.diag(H))
    fraction = damp
    with _one_thread_on_cpu(H):
        for _ in range(MAX_DAMP_RETRIES):
            # At most three (in x in) matrices at a time besides H (down_proj's is 764 MB at 13B): no identity
            # matrix for the damping, and each factor dropped once the next is made.
            damped = H.clone()
            damped.diagonal().add_(fraction * mean_diag)
            L, info = torch.linalg.cholesky_ex(damped)
            del damped
            if info == 0:
                Hinv = torch.cholesky_inverse(L)
                del L
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if info == 0:
                    return U, fraction
            fraction *= 10
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with damping {fraction / 10:g}")


@contextmanager
def _one_thread_on_cpu(tensor: Tensor) -> Iterator[None]:
    """LAPACK on the CPU splits its work by the thread count, and its rounding with it."""
    if tensor.is_cuda:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _block_mask(
    stack: Tensor,
    Hinv: Tensor,
    i1: int,
    i2: int,
    sparsity: float,
    placements: list[Placement],
    selectors: list[BlockSelector],
) -> Tensor:
    """The unstructured mask of columns i1:i2: one threshold per matrix over its whole block (all workers)."""
    scores = stack[:, i1:i2].square() / torch.diag(Hinv)[i1:i2].square()[None, :]
    mask = torch.empty_like(scores, dtype=torch.bool)
    for place, select in zip(placements, selectors, strict=True):
        mask[place.rows] = select(scores[place.rows], sparsity)
    return mask


def _prune_block(
    W: Tensor, Hinv: Tensor, mask: Tensor, i1: int, i2: int, nm: tuple[int, int] | None, block_mask: Tensor | None
) -> Tensor:
    """Prune columns i1:i2 one by one with the OBS update inside the block; returns the block's errors (for
    the lazy update of the later columns). N:M chooses each group's mask when the loop reaches it."""
    W1 = W[:, i1:i2].clone()
    mask1 = block_mask if block_mask is not None else torch.zeros_like(W1, dtype=torch.bool)
    Hinv1 = Hinv[i1:i2, i1:i2].contiguous()
    if W1.is_cuda and obs_kernel_available():
        from .obs_kernel import obs_block

        err1 = obs_block(W1, Hinv1, mask1, nm)
    else:
        err1 = obs_columns(W1, Hinv1, mask1, nm)
    W[:, i1:i2] = W1
    mask[:, i1:i2] = mask1
    return err1


def obs_columns(W1: Tensor, Hinv1: Tensor, mask1: Tensor, nm: tuple[int, int] | None) -> Tensor:
    """The OBS loop over one block's columns, in place: for each column, err = w / d where pruned (0 where
    kept) and the later columns of the block take err (x) Hinv1[i, i:]; pruned weights end at exactly 0.
    With N:M, each group's mask is chosen from the updated weights when the loop reaches its first column."""
    d = torch.diag(Hinv1)
    err1 = torch.zeros_like(W1)
    # where kept, dividing by infinity gives the zero error of a weight that stays as it is
    divisor = torch.where(mask1, d[None, :], math.inf)
    for i in range(W1.shape[1]):
        if nm is not None and i % nm[1] == 0:
            group = slice(i, i + nm[1])
            mask1[:, group] = prune_n_m(W1[:, group].square() / d[group].square()[None, :], *nm)
            divisor[:, group] = torch.where(mask1[:, group], d[group][None, :], math.inf)
        torch.div(W1[:, i], divisor[:, i], out=err1[:, i])
        W1[:, i:].sub_(err1[:, i, None] * Hinv1[i, i:][None, :])
    W1.masked_fill_(mask1, 0.0)
    return err1


def obs_kernel_available() -> bool:
    """The CUDA kernel of the column loop needs Triton (shipped with CUDA builds of torch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _subtract_product(W: Tensor, err: Tensor, Hinv_rows: Tensor, placements: list[Placement]) -> None:
    """W -= err @ Hinv_rows, in products whose rounding does not depend on the row split (aligned.py)."""
    if W.shape[1] == 0:
        return
    for rows, product in aligned_products(err, Hinv_rows, placements):
        W[rows] -= product


def _prune(members, cfg, stats, nm):
    results = sparsegpt_prune_group(
        [m.weight for m in members.values()], stats.hessian(), cfg.sparsity, nm, cfg.sparsegpt_blocksize,
        cfg.sparsegpt_damp, [m.selector for m in members.values()], [m.first_row for m in members.values()],
    )  # fmt: skip
    return {name: PruneOutcome(r.weight, r.mask, r.damp) for name, r in zip(members, results, strict=True)}


def _check(config) -> None:
    """A block of columns must hold whole N:M groups."""
    p, nm = config.prune, config.nm
    if nm is not None and p.sparsegpt_blocksize % nm[1]:
        raise ValueError(f"sparsegpt_blocksize {p.sparsegpt_blocksize} must be a multiple of M={nm[1]} for N:M")


SPARSEGPT = Method("sparsegpt", statistics="hessian", prune=_prune, check=_check, mask_pictures=True)
