"""Reconstruction of a pruned Linear's kept weights, its mask fixed: least squares against the dense outputs.

A Linear with dense weights W reads x_p in the pruned model; the reference reads x_d (the dense layer's input
to the same Linear). The kept weights W' minimise sum_t ||W' x_p,t - W x_d,t||^2, zero where pruned. Row by row
(each row has its own kept inputs K) that is the linear system

    (H + lambda I)_KK w'_K = (B w + lambda w)_K,    H = sum_t x_p,t x_p,t^T,   B = sum_t x_p,t x_d,t^T,

with SparseGPT's damping lambda = damp * mean(diag H), pulling w' towards the dense w (not towards zero: a
layer with a few massive activations has a mean diagonal far above most inputs', and a ridge towards zero
shrank every weight of those inputs). When x_p = x_d, B = H and this is the optimal update of
the kept weights that SparseGPT's OBS sweep approximates; when x_p carries the error of Linears pruned before
(o_proj after q/k/v, down_proj after gate/up), the cross term B fits W' to the dense outputs, not to what the
pruned inputs would have given.

The systems are solved by conjugate gradients preconditioned by diag(H), a fixed number of iterations, all rows
of a chunk together (one matrix product per iteration), starting from the method's own pruned weights. Every
product has FIT_CHUNK rows aligned with the whole matrix (aligned.py) and every other operation is row-wise, so
a row's result does not depend on which worker holds it or with which other rows. Factorising each row's own
H_KK exactly would cost rows x |K|^3 (a 70B down_proj: 8192 factorisations of 14336 x 14336).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .aligned import Placement, aligned_chunks, padded_chunk

# Rows fitted together. Fixed (a row's rounding must not depend on its worker), and small enough that padding a
# shard's partial chunk wastes little: SmolLM2's 576-row q_proj in chunks of 1024 did 1.8 times the work.
FIT_CHUNK = 128


@dataclass
class Fit:
    """One matrix's reconstructed rows and its residual before and after: sum_t ||W' x_p - W x_d||^2 less the
    target's energy sum_t ||W x_d||^2, which is given when x_p = x_d (sum_t ||W x||^2 = tr W H W^T); with a
    cross term the caller has it from the dense layer's outputs."""

    weight: Tensor  # fp32, exact zeros where pruned
    residual_before: float
    residual_after: float
    energy: float | None  # None with a cross term


def reconstruct_group(
    dense: list[Tensor],
    pruned: list[Tensor],
    masks: list[Tensor],
    first_rows: list[int],
    H: Tensor,
    C: Tensor | None,
    damp: float,
    iterations: int,
) -> list[Fit]:
    """The matrices (out_j, in) that read one input: dense rows, the method's pruned rows (the start) and masks
    (True where pruned: fixed), each a row block of a whole matrix from `first_rows[j]`. H and C = B^T =
    sum x_d x_p^T: (in, in) fp32 sums, of any common scale; C None means C = H (the Linears' inputs carry no
    error of this layer).
    One matrix at a time (rows are independent): a 13B gate/up pair stacked in fp32 with its start and mask
    would be 1.3 GB more."""
    H = H.float()
    lam = damp * float(H.diagonal().mean())
    right = H if C is None else C.float()  # b = W C, row by row B w
    return [
        _fit_matrix(W, start, mask, first, H, right, lam, iterations)
        for W, start, mask, first in zip(dense, pruned, masks, first_rows, strict=True)
    ]


def _fit_matrix(
    dense: Tensor, pruned: Tensor, mask: Tensor, first_row: int, H: Tensor, right: Tensor, lam: float, iterations: int
) -> Fit:
    fitted = pruned.float().masked_fill(mask, 0.0)
    kept = ~mask
    before = after = energy = 0.0
    for rows, at in aligned_chunks([Placement(slice(0, dense.shape[0]), first_row)], FIT_CHUNK):
        mine = slice(at, at + rows.stop - rows.start)
        w, x, k = (padded_chunk(t, rows, at, FIT_CHUNK) for t in (dense, fitted, kept))
        w = w.float()
        b = w @ right
        energy += float(_row_sums(w, b)[mine].sum())  # w H w^T when right is H
        start_product = x @ H
        before += float(_residual(x, start_product, b)[mine].sum())
        solved = _conjugate_gradients(x, start_product, k, b + lam * w, H, lam, iterations)
        after += float(_residual(solved, solved @ H, b)[mine].sum())
        fitted[rows] = solved[mine]
    return Fit(fitted, before, after, energy if right is H else None)


def _conjugate_gradients(
    x: Tensor, product: Tensor, kept: Tensor, b: Tensor, H: Tensor, lam: float, iterations: int
) -> Tensor:
    """Each row's (H + lam I)_KK w_K = b_K from x (whose x H is `product`), preconditioned by the diagonal;
    rows that have converged (or are padding) stand still."""
    x = x.clone()
    inverse_diagonal = 1.0 / (H.diagonal() + lam)
    residual = (b - (product + lam * x)) * kept
    direction = residual * inverse_diagonal
    rz = (residual * direction).sum(dim=1)
    for _ in range(iterations):
        q = (direction @ H + lam * direction) * kept
        curvature = (direction * q).sum(dim=1)
        alpha = torch.where(curvature > 0, rz / curvature, 0.0)
        x += alpha[:, None] * direction
        residual -= alpha[:, None] * q
        preconditioned = residual * inverse_diagonal
        rz_next = (residual * preconditioned).sum(dim=1)
        beta = torch.where(rz > 0, rz_next / rz, 0.0)
        direction = preconditioned + beta[:, None] * direction
        rz = rz_next
    return x


def _residual(w: Tensor, product: Tensor, b: Tensor) -> Tensor:
    """Per row w^T H w - 2 w^T (B w_dense), from `product` = w H: the fit's squared error less the target's
    energy (undamped H)."""
    return _row_sums(w, product) - 2 * _row_sums(w, b)


def _row_sums(a: Tensor, b: Tensor) -> Tensor:
    """Per row a . b, widened to fp64 for the totals over rows and workers."""
    return (a * b).sum(dim=1).double()
