"""SparseGPT's OBS loop over one column block as one GPU kernel (Triton).

`sparsegpt.obs_columns` walks a block's columns with three small tensor operations each: on a GPU that is
launch-bound (about 50 us a column on an H200, 2.6 s a LLaMA-2-70B layer). Here each program holds ROWS rows
of the block in registers and walks all its columns, so a block costs one launch (0.1-0.6 ms a block of 128
columns). It does the same operations in the same order as `obs_columns`: IEEE division (`div_rn`), and no
fused multiply-add (`enable_fp_fusion=False`), so both give the same bits; a row's result does not depend on
the other rows of its program, so it does not depend on how rows are split between workers.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS = 16  # rows per program: three (ROWS x 128) fp32 tiles stay in registers


@triton.jit
def _obs_block_kernel(W, MASK, HINV, ERR, rows, B: tl.constexpr, ROWS: tl.constexpr, N: tl.constexpr, M: tl.constexpr):
    """W, MASK (int8), ERR: (rows, B) contiguous; HINV: (B, B) contiguous upper triangular. M == 0: MASK is the
    given unstructured mask; else each group of M columns prunes its M - N lowest w^2 / d^2 per row when the
    loop reaches it, and MASK receives the result."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, B)
    inside = (row < rows)[:, None]
    at = row[:, None] * B + col[None, :]
    w = tl.load(W + at, mask=inside, other=0.0)
    d = tl.load(HINV + col * B + col)  # (B,) the diagonal
    if M == 0:
        pruned = tl.load(MASK + at, mask=inside, other=0)  # int8: 1 where pruned
    else:
        pruned = tl.zeros((ROWS, B), dtype=tl.int8)
    err = tl.zeros((ROWS, B), dtype=tl.float32)
    for i in range(B):
        if M > 0:
            if i % M == 0:
                pruned = _choose_group(w, d, col, i, pruned, N, M)
        column = (col == i)[None, :]
        w_i = tl.sum(tl.where(column, w, 0.0), axis=1)  # (ROWS,) column i: a sum of one value and zeros
        pruned_i = tl.sum(tl.where(column & (pruned != 0), 1, 0), axis=1) > 0
        d_i = tl.load(HINV + i * B + i)
        err_i = tl.where(pruned_i, tl.math.div_rn(w_i, tl.zeros_like(w_i) + d_i), 0.0)
        w = w - err_i[:, None] * tl.load(HINV + i * B + col)[None, :]  # row i of Hinv1 is 0 left of i
        err = tl.where(column, err_i[:, None], err)
    w = tl.where(pruned != 0, 0.0, w)
    tl.store(W + at, w, mask=inside)
    tl.store(ERR + at, err, mask=inside)
    if M > 0:
        tl.store(MASK + at, pruned, mask=inside)


@triton.jit
def _choose_group(w, d, col, i, pruned, N: tl.constexpr, M: tl.constexpr):
    """Columns i..i+M-1: prune the M - N lowest w^2 / d^2 of each row, ties to the lower column (a stable
    sort's order): column j's rank counts the group's columns below it, and the equal ones left of it."""
    score = tl.math.div_rn(w * w, tl.zeros_like(w) + (d * d)[None, :])
    rank = tl.zeros(w.shape, dtype=tl.int32)
    for k in tl.static_range(M):
        other = tl.sum(tl.where((col == i + k)[None, :], score, 0.0), axis=1)[:, None]
        rank += ((other < score) | ((other == score) & ((i + k) < col)[None, :])).to(tl.int32)
    group = ((col >= i) & (col < i + M))[None, :]
    return tl.where(group, (rank < M - N).to(tl.int8), pruned)


def obs_block(W1: Tensor, Hinv1: Tensor, mask1: Tensor, nm: tuple[int, int] | None) -> Tensor:
    """In place as `sparsegpt.obs_columns`: W1 (rows, B) fp32 updated with exact zeros where pruned, mask1
    filled for N:M; returns the block's errors."""
    rows, width = W1.shape
    block = triton.next_power_of_2(width)
    if block != width or not W1.is_contiguous():  # Triton tiles are powers of two: pad the last block
        padded = W1.new_zeros(rows, block)
        padded[:, :width] = W1
        padded_hinv = Hinv1.new_zeros(block, block)
        padded_hinv[:width, :width] = Hinv1
        padded_hinv.diagonal()[width:] = 1.0
        padded_mask = mask1.new_zeros(rows, block)
        padded_mask[:, :width] = mask1
        err = obs_block(padded, padded_hinv, padded_mask, nm)
        W1.copy_(padded[:, :width])
        mask1.copy_(padded_mask[:, :width])
        return err[:, :width].contiguous()
    mask = mask1.to(torch.int8)
    err = W1.new_empty(rows, width)
    n, m = nm if nm is not None else (0, 0)
    grid = (triton.cdiv(rows, ROWS),)
    _obs_block_kernel[grid](
        W1, mask, Hinv1.contiguous(), err, rows, B=width, ROWS=ROWS, N=n, M=m, enable_fp_fusion=False
    )
    mask1.copy_(mask != 0)
    return err
