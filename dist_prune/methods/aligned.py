"""Matrix products whose rounding does not depend on how the rows are split between workers.

BLAS picks its kernels by shape, so a row multiplied alone can round differently from the same row among 350.
Products are therefore made ROW_CHUNK rows at a time, each matrix's rows placed at their index in the whole
matrix modulo ROW_CHUNK: every row meets a product of the same shape at the same place whichever worker
holds it. A chunk that a worker holds only part of is padded with zero rows.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

ROW_CHUNK = 1024  # rows of one product


@dataclass(frozen=True)
class Placement:
    """Where one matrix's rows sit in a stack of matrices, and the index of its first row in the whole matrix."""

    rows: slice
    first_row: int


def stack_rows(weights: list[Tensor], first_rows: list[int]) -> tuple[Tensor, list[Placement]]:
    """The matrices' rows one after another in one fp32 matrix (a copy: the inputs are not modified)."""
    stack = torch.cat([W.float() for W in weights]) if len(weights) > 1 else weights[0].float().clone()
    placements, start = [], 0
    for W, first in zip(weights, first_rows, strict=True):
        placements.append(Placement(slice(start, start + W.shape[0]), first))
        start += W.shape[0]
    return stack, placements


def aligned_chunks(placements: list[Placement], chunk: int | None = None) -> Iterator[tuple[slice, int]]:
    """(rows of the stack, their offset in a block of `chunk` rows, default ROW_CHUNK) for every chunk, aligned
    with the whole matrices."""
    chunk = chunk or ROW_CHUNK
    for place in placements:
        first = place.rows.start - place.first_row % chunk  # where the whole matrix's chunk starts
        for start in range(first, place.rows.stop, chunk):
            rows = slice(max(start, place.rows.start), min(start + chunk, place.rows.stop))
            yield rows, max(0, place.rows.start - start)


def padded_chunk(stack: Tensor, rows: slice, at: int, chunk: int | None = None) -> Tensor:
    """stack[rows] in a block of `chunk` rows (zeros around it), or the rows themselves when they fill one."""
    chunk = chunk or ROW_CHUNK
    if rows.stop - rows.start == chunk:
        return stack[rows]
    padded = stack.new_zeros(chunk, *stack.shape[1:])
    padded[at : at + rows.stop - rows.start] = stack[rows]
    return padded


def aligned_products(left: Tensor, right: Tensor, placements: list[Placement]) -> Iterator[tuple[slice, Tensor]]:
    """(rows, left[rows] @ right) for every chunk of the stacked `left`."""
    for rows, at in aligned_chunks(placements):
        yield rows, (padded_chunk(left, rows, at) @ right)[at : at + rows.stop - rows.start]
