"""SparseGPT against a plain, slow per-column OBS loop (no lazy block updates), in float64."""

import pytest
import torch

from dist_prune.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune


def slow_lowest(values: list[float], k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda j: (values[j], j))[:k]


def slow_sparsegpt(W, H, sparsity, nm=None, blocksize=128, damp=0.01):
    """Column by column: choose the mask, zero the weight, spread the error over the later columns."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    for i in range(cols):
        if H[i, i] == 0:
            H[i, i] = 1
            W[:, i] = 0
    damped = H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(cols):
        if nm is None and i % blocksize == 0:
            end = min(i + blocksize, cols)
            # one threshold over the whole block, with the block's current (already updated) weights
            flat = [W[r, c].item() ** 2 / Hinv[c, c].item() ** 2 for r in range(rows) for c in range(i, end)]
            width = end - i
            for f in slow_lowest(flat, int(len(flat) * sparsity)):
                mask[f // width, i + f % width] = True
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            for r in range(rows):
                group = [W[r, c].item() ** 2 / Hinv[c, c].item() ** 2 for c in range(i, i + m)]
                for j in slow_lowest(group, m - n):
                    mask[r, i + j] = True
        w = W[:, i].clone()
        q = torch.where(mask[:, i], torch.zeros_like(w), w)
        err = (w - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        W[:, i] = q
    return W, mask


def problem(rows, cols, tokens=None, seed=0, dead=()):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(tokens or 2 * cols, cols, generator=gen)
    X = X * (torch.rand(cols, generator=gen) * 2 + 0.1)  # uneven input scales make the OBS update matter
    for c in dead:
        X[:, c] = 0
    nseq = 4
    H = 2.0 / nseq * X.T @ X
    return W, H


def assert_close(got, ref, rel=1e-4):
    assert torch.allclose(got.double(), ref, rtol=rel, atol=rel * ref.abs().max().item()), (
        (got.double() - ref).abs().max().item()
    )


CASES = [
    # (rows, cols, sparsity, nm, blocksize)
    (12, 64, 0.5, None, 128),
    (12, 200, 0.5, None, 128),  # a partial last block
    (12, 200, 0.5, None, 16),
    (8, 96, 0.3, None, 32),
    (12, 64, 0.5, (2, 4), 128),
    (12, 200, 0.5, (2, 4), 128),
    (12, 200, 0.5, (2, 4), 16),
    (8, 96, 0.5, (4, 8), 32),
]


@pytest.mark.parametrize("rows,cols,sparsity,nm,blocksize", CASES)
def test_matches_slow_obs_loop(rows, cols, sparsity, nm, blocksize):
    W, H = problem(rows, cols, seed=cols + blocksize)
    result = sparsegpt_prune(W, H, sparsity, nm, blocksize, 0.01)
    ref_W, ref_mask = slow_sparsegpt(W, H, sparsity, nm, blocksize, 0.01)
    assert torch.equal(result.mask, ref_mask)
    assert_close(result.weight, ref_W)
    assert result.damp == 0.01 and result.retried is False
    # exact zeros wherever pruned, and the count is what was asked
    assert (result.weight[result.mask] == 0).all()
    if nm is None:
        for start in range(0, cols, blocksize):
            block = result.mask[:, start : start + blocksize]
            assert int(block.sum()) == int(block.numel() * sparsity)
    else:
        groups = result.mask.view(rows, cols // nm[1], nm[1])
        assert (groups.sum(dim=2) == nm[1] - nm[0]).all()
    # the update really changed kept weights (otherwise this would be magnitude pruning)
    assert not torch.allclose(result.weight[~result.mask], W[~result.mask])


def test_unstructured_threshold_is_per_block_not_per_row():
    # A block whose first rows have much larger weights: one threshold over the block prunes unevenly per row.
    W, H = problem(8, 32, seed=5)
    W[:4] *= 10
    result = sparsegpt_prune(W, H, 0.5, None, 32, 0.01)
    per_row = result.mask.sum(dim=1)
    assert int(result.mask.sum()) == 8 * 32 // 2
    assert (per_row[:4] < 16).all() and (per_row[4:] > 16).all()


def test_inputs_are_not_modified_in_place():
    W, H = problem(4, 32, seed=2)
    W0, H0 = W.clone(), H.clone()
    sparsegpt_prune(W, H, 0.5, None, 16, 0.01)
    assert torch.equal(W, W0) and torch.equal(H, H0)  # inputs are not modified in place


def test_bf16_weight_input():
    W, H = problem(8, 64, seed=4)
    result = sparsegpt_prune(W.bfloat16(), H, 0.5, (2, 4), 32, 0.01)
    ref_W, ref_mask = slow_sparsegpt(W.bfloat16().float(), H, 0.5, (2, 4), 32, 0.01)
    assert torch.equal(result.mask, ref_mask)
    assert_close(result.weight, ref_W)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_dead_input_column_is_zeroed(nm):
    W, H = problem(6, 32, seed=9, dead=(3, 17))
    assert H[3, 3] == 0 and H[17, 17] == 0
    result = sparsegpt_prune(W, H, 0.5, nm, 16, 0.01)
    assert (result.weight[:, 3] == 0).all() and (result.weight[:, 17] == 0).all()
    assert torch.isfinite(result.weight).all()
    ref_W, ref_mask = slow_sparsegpt(W, H, 0.5, nm, 16, 0.01)
    assert torch.equal(result.mask, ref_mask)
    assert_close(result.weight, ref_W)


def non_positive_definite(cols=16, seed=0, negative=-0.05):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    eigs = torch.ones(cols, dtype=torch.float64)
    eigs[0] = negative
    return (Q @ torch.diag(eigs) @ Q.T).float()


def test_non_positive_definite_hessian_is_retried_with_more_damping():
    H = non_positive_definite()
    assert torch.linalg.eigvalsh(H.double()).min() < 0
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(H + 0.01 * torch.diag(H).mean() * torch.eye(16))
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    result = sparsegpt_prune(W, H, 0.5, None, 128, 0.01)
    assert result.retried is True
    assert result.damp > 0.01
    # damping multiplies by 10: 0.1 is the first that lifts an eigenvalue of -0.05 (mean diag ~0.94)
    assert result.damp == pytest.approx(0.1)
    assert torch.isfinite(result.weight).all()
    ref_W, ref_mask = slow_sparsegpt(W, H, 0.5, None, 128, result.damp)
    assert torch.equal(result.mask, ref_mask)
    assert_close(result.weight, ref_W)
    # and not the identity: the kept weights were updated
    assert not torch.allclose(result.weight[~result.mask], W[~result.mask])


@pytest.mark.parametrize("kind", ["negative", "nan_diagonal"])
def test_hopeless_hessian_raises(kind):
    if kind == "negative":
        H = -torch.eye(8)  # mean diag < 0: more damping only makes it worse
    else:
        H = torch.eye(8)
        H[2, 2] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        sparsegpt_prune(torch.randn(3, 8), H, 0.5)
    with pytest.raises(torch.linalg.LinAlgError):
        inverse_hessian_factor(H, 0.01)


def test_inverse_hessian_factor_matches_definition():
    _, H = problem(1, 24, seed=3)
    U, used = inverse_hessian_factor(H, 0.01)
    damped = H.double() + 0.01 * torch.diag(H.double()).mean() * torch.eye(24, dtype=torch.float64)
    assert used == 0.01
    assert torch.equal(U, torch.triu(U))
    assert torch.allclose((U.T @ U).double(), torch.linalg.inv(damped), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("nm", [(2, 4), None])
def test_row_shards_give_the_same_result(nm):
    """Given Hinv, rows are independent: N:M on row shards equals the whole; unstructured with a global selector."""
    W, H = problem(10, 64, seed=12)
    whole = sparsegpt_prune(W, H, 0.5, nm, 32, 0.01)
    if nm is None:
        # the block threshold is cross-row: a shard with a selector that knows the global answer agrees
        def selector_for(rows):
            calls = iter(range(0, 64, 32))

            def select(scores, ratio):
                start = next(calls)
                return whole.mask[rows, start : start + 32]

            return select

        parts = [
            sparsegpt_prune(W[rows], H, 0.5, nm, 32, 0.01, block_selector=selector_for(rows))
            for rows in (slice(0, 4), slice(4, 10))
        ]
    else:
        parts = [sparsegpt_prune(W[rows], H, 0.5, nm, 32, 0.01) for rows in (slice(0, 4), slice(4, 10))]
    assert torch.equal(torch.cat([p.mask for p in parts]), whole.mask)
    assert torch.allclose(torch.cat([p.weight for p in parts]), whole.weight, rtol=1e-5, atol=1e-6)
