"""SparseGPT (Frantar & Alistarh 2023): prune column blocks and fix the rest with the OBS update.

Given the same Hessian, every output row is processed independently, so the function runs unchanged on a
row shard. Only the unstructured block threshold compares across rows; it is an argument so that a
sharded caller can supply an exact cross-worker selection.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import prune_lowest_in_matrix, prune_n_m

MAX_DAMP_RETRIES = 6


@dataclass
class SparseGPTResult:
    weight: Tensor
    mask: Tensor  # True where pruned
    damp: float  # damping fraction that made H positive definite
    retried: bool  # the configured damping was not enough


def inverse_hessian_factor(H: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of H^-1 after damping; multiplies the damping by 10 until H is definite.

    A known peer bug silently replaces a failed factorisation by the identity, which prunes by magnitude
    without saying so; here a failure retries with more damping and is reported, then raises.
    """
    mean_diag = torch.mean(torch.diag(H))
    fraction = damp
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


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    block_selector: Callable[[Tensor, float], Tensor] = prune_lowest_in_matrix,
) -> SparseGPTResult:
    """W: (out, in), H: (in, in) = (2/N) sum X X^T. Returns the updated weight (in W's dtype) and its mask.

    `block_selector(scores, ratio)` picks the unstructured mask of one (out x blocksize) block: by default
    exactly int(numel * ratio) lowest of w^2 / diag(Hinv)^2 (one threshold over the whole block).
    """
    W = W.float().clone()
    H = H.float()
    dead = torch.diag(H) == 0
    if dead.any():  # a copy only when there is something to change: H is the largest matrix here
        H = H.clone()
        H[dead, dead] = 1
        W[:, dead] = 0
    Hinv, used = inverse_hessian_factor(H, damp)
    mask = torch.zeros_like(W, dtype=torch.bool)
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        _prune_block(W, Hinv, mask, i1, i2, sparsity, nm, block_selector)
    return SparseGPTResult(weight=W, mask=mask, damp=used, retried=used != damp)


def _prune_block(
    W: Tensor,
    Hinv: Tensor,
    mask: Tensor,
    i1: int,
    i2: int,
    sparsity: float,
    nm: tuple[int, int] | None,
    block_selector: Callable[[Tensor, float], Tensor],
) -> None:
    """Prune columns i1:i2 one by one with the OBS update inside the block, then update the rest lazily."""
    W1 = W[:, i1:i2].clone()
    Hinv1 = Hinv[i1:i2, i1:i2]
    d = torch.diag(Hinv1)
    err1 = torch.zeros_like(W1)
    mask1 = torch.zeros_like(W1, dtype=torch.bool)
    if nm is None:
        mask1 = block_selector(W1.square() / d.square()[None, :], sparsity)
    for i in range(i2 - i1):
        if nm is not None and i % nm[1] == 0:
            group = slice(i, i + nm[1])
            mask1[:, group] = prune_n_m(W1[:, group].square() / d[group].square()[None, :], *nm)
        w = W1[:, i]
        q = torch.where(mask1[:, i], torch.zeros_like(w), w)
        err = (w - q) / d[i]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        W1[:, i] = q
        err1[:, i] = err
    W[:, i1:i2] = W1
    mask[:, i1:i2] = mask1
    W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
