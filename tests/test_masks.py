"""Mask selection against slow, obviously-correct Python loops (ties broken by lower index first)."""

import pytest
import torch

from dist_prune.methods.masks import prune_lowest_in_matrix, prune_lowest_per_row, prune_n_m, select_mask


def slow_lowest(values: list[float], k: int) -> set[int]:
    """Indices of the k lowest values; a tie goes to the lower index."""
    order = sorted(range(len(values)), key=lambda j: (values[j], j))
    return set(order[:k])


def slow_per_row(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    rows, cols = scores.shape
    k = int(cols * ratio)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for j in slow_lowest(scores[i].tolist(), k):
            mask[i, j] = True
    return mask


def slow_matrix(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    rows, cols = scores.shape
    k = int(rows * cols * ratio)
    flat = [scores[i, j].item() for i in range(rows) for j in range(cols)]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for f in slow_lowest(flat, k):
        mask[f // cols, f % cols] = True
    return mask


def slow_n_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for g in range(0, cols, m):
            for j in slow_lowest(scores[i, g : g + m].tolist(), m - n):
                mask[i, g + j] = True
    return mask


def random_scores(rows: int, cols: int, seed: int, ties: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if ties:
        # Few distinct values: most comparisons are exact ties (like weights dequantised from 4 bits).
        return torch.randint(0, 4, (rows, cols), generator=gen).float() * 0.25
    return torch.rand(rows, cols, generator=gen)


SHAPES = [(1, 7), (3, 10), (5, 16), (8, 33), (4, 64)]
RATIOS = [0.1, 0.25, 0.5, 0.6, 0.9, 0.999]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_per_row_matches_slow_loop(shape, ratio, ties):
    scores = random_scores(*shape, seed=hash((shape, ratio)) % 1000, ties=ties)
    mask = prune_lowest_per_row(scores, ratio)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    k = int(shape[1] * ratio)
    assert (mask.sum(dim=1) == k).all()
    assert torch.equal(mask, slow_per_row(scores, ratio))


def test_per_row_ties_go_to_lower_column():
    scores = torch.zeros(2, 8)
    scores[1, 0] = 1.0  # row 1: column 0 is the only non-tie, so columns 1..4 go first
    mask = prune_lowest_per_row(scores, 0.5)
    assert mask[0].tolist() == [True] * 4 + [False] * 4
    assert mask[1].tolist() == [False, True, True, True, True, False, False, False]


def test_per_row_pruned_are_never_above_kept():
    scores = random_scores(16, 40, seed=3, ties=False)
    mask = prune_lowest_per_row(scores, 0.37)
    for i in range(16):
        assert scores[i][mask[i]].max() <= scores[i][~mask[i]].min()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_matrix_matches_slow_loop(shape, ratio, ties):
    scores = random_scores(*shape, seed=7 + shape[1], ties=ties)
    mask = prune_lowest_in_matrix(scores, ratio)
    assert int(mask.sum()) == int(scores.numel() * ratio)
    assert torch.equal(mask, slow_matrix(scores, ratio))


def test_matrix_is_one_threshold_not_per_row():
    # Row 0 is all small, row 1 all large: a matrix threshold prunes row 0 entirely.
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    mask = prune_lowest_in_matrix(scores, 0.5)
    assert mask.tolist() == [[True] * 4, [False] * 4]
    assert prune_lowest_per_row(scores, 0.5).sum(dim=1).tolist() == [2, 2]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "n,m,cols",
    [(2, 4, 16), (2, 4, 64), (4, 8, 32), (4, 8, 64), (1, 3, 12), (1, 3, 33), (3, 5, 20), (3, 5, 35), (1, 2, 10)],
)
def test_n_m_matches_slow_loop(n, m, cols, ties):
    scores = random_scores(6, cols, seed=n * 100 + m * 10 + cols, ties=ties)
    mask = prune_n_m(scores, n, m)
    groups = mask.view(6, cols // m, m)
    assert (groups.sum(dim=2) == m - n).all()
    # the pruned entries of every group are its lowest
    sgroups = scores.view(6, cols // m, m)
    pruned_max = sgroups.masked_fill(~groups, float("-inf")).amax(dim=2)
    kept_min = sgroups.masked_fill(groups, float("inf")).amin(dim=2)
    assert (pruned_max <= kept_min).all()
    assert torch.equal(mask, slow_n_m(scores, n, m))


@pytest.mark.parametrize("n,m,cols", [(2, 4, 10), (4, 8, 12), (1, 3, 7), (3, 5, 21)])
def test_n_m_rejects_width_not_divisible(n, m, cols):
    with pytest.raises(ValueError, match="divisible"):
        prune_n_m(torch.rand(3, cols), n, m)


def test_select_mask_dispatch():
    scores = random_scores(4, 16, seed=11, ties=True)
    assert torch.equal(select_mask(scores, 0.5, (2, 4)), slow_n_m(scores, 2, 4))
    assert torch.equal(select_mask(scores, 0.3, None), slow_per_row(scores, 0.3))


@pytest.mark.parametrize("select", ["row", "2:4"])
def test_sorting_rows_in_blocks_changes_nothing(select, monkeypatch):
    """Rows are independent: sorting them a few at a time (to bound memory) gives the same mask, ties included."""
    from dist_prune.methods import masks

    scores = torch.randint(0, 5, (37, 24), generator=torch.Generator().manual_seed(4)).float()
    choose = (lambda s: masks.prune_lowest_per_row(s, 0.5)) if select == "row" else (lambda s: masks.prune_n_m(s, 2, 4))
    whole = choose(scores)
    monkeypatch.setattr(masks, "SELECT_BLOCK_ELEMENTS", 50)  # two rows per block, the last block short
    assert torch.equal(choose(scores), whole)
