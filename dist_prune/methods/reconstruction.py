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
product has ROW_CHUNK rows aligned with the whole matrix (aligned.py) and every other operation is row-wise, so
a row's result does not depend on which worker holds it or with which other rows. Factorising each row's own
H_KK exactly would cost rows x |K|^3 (a 70B down_proj: 8192 factorisations of 14336 x 14336).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .aligned import aligned_chunks, padded_chunk, stack_rows

# Rows fitted together. Fixed (a row's rounding must not depend on its worker), and small enough that padding a
# shard's partial chunk wastes little: SmolLM2's 576-row q_proj in chunks of 1024 did 1.8 times the work.
FIT_CHUNK = 128


@dataclass
class Fit:
    """One matrix's reconstructed rows and its residual before and after: sum_t ||W' x_p - W x_d||^2 less the
    target's energy sum_t ||W x_d||^2 (the caller adds it; it comes from the dense layer's outputs)."""

    weight: Tensor  # fp32, exact zeros where pruned
    residual_before: float
    residual_after: float


def reconstruct_group(
    dense: list[Tensor],
    pruned: list[Tensor],
    masks: list[Tensor],
    first_rows: list[int],
    H: Tensor,
    B: Tensor | None,
    damp: float,
    iterations: int,
) -> list[Fit]:
    """The matrices (out_j, in) that read one input: dense rows, the method's pruned rows (the start) and masks
    (True where pruned: fixed), each a row block of a whole matrix from `first_rows[j]`. H, B: (in, in) fp32 sums as
    above; B None means B = H (the Linears' inputs carry no error of this layer)."""
    W, placements = stack_rows(dense, first_rows)
    start, _ = stack_rows(pruned, first_rows)
    kept = ~torch.cat(masks)
    start.masked_fill_(~kept, 0.0)
    H = H.float()
    lam = damp * float(H.diagonal().mean())
    right = (H if B is None else B.float()).T.contiguous()  # b = W B^T, row by row B w
    residuals = [[0.0, 0.0] for _ in placements]
    for j, place in enumerate(placements):
        for rows, at in aligned_chunks([place], FIT_CHUNK):
            size = rows.stop - rows.start
            w, x, k = (padded_chunk(t, rows, at, FIT_CHUNK) for t in (W, start, kept))
            b = w @ right
            solved = _conjugate_gradients(x, k, b + lam * w, H, lam, iterations)
            before, after = (_residual(v, b, H)[at : at + size].sum() for v in (x, solved))
            start[rows] = solved[at : at + size]
            residuals[j][0] += float(before)
            residuals[j][1] += float(after)
    return [Fit(start[p.rows], *residuals[j]) for j, p in enumerate(placements)]


def _conjugate_gradients(x: Tensor, kept: Tensor, b: Tensor, H: Tensor, lam: float, iterations: int) -> Tensor:
    """Each row's (H + lam I)_KK w_K = b_K from x, preconditioned by the diagonal; rows that have converged
    (or are padding) stand still."""
    x = x.clone()
    inverse_diagonal = 1.0 / (H.diagonal() + lam)
    residual = (b - (x @ H + lam * x)) * kept
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


def _residual(w: Tensor, b: Tensor, H: Tensor) -> Tensor:
    """Per row w^T H w - 2 w^T (B w_dense): the fit's squared error less the target's energy (undamped H)."""
    return ((w @ H) * w).sum(dim=1).double() - 2 * (w * b).sum(dim=1).double()
