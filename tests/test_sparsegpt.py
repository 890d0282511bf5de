"""SparseGPT against a plain, slow per-column OBS loop (no lazy block updates), in float64."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_prune.methods import aligned
from dist_prune.methods.masks import prune_lowest_in_matrix
from dist_prune.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune, sparsegpt_prune_group

ROOT = Path(__file__).resolve().parents[1]


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


def global_selector(whole_mask, rows, blocksize, cols):
    """The unstructured block threshold is cross-row: a shard's selector that knows the whole matrix's answer
    (what ShardSelector computes across workers)."""
    calls = iter(range(0, cols, blocksize))

    def select(scores, ratio):
        start = next(calls)
        return whole_mask[rows, start : start + blocksize]

    return select


@pytest.mark.parametrize("chunk", [1024, 3])
@pytest.mark.parametrize("nm", [(2, 4), None])
def test_row_shards_give_the_same_bits(nm, chunk, monkeypatch):
    """Given Hinv, rows are independent, and every product is made ROW_CHUNK rows at a time at each row's place
    in the whole matrix: any split of the rows gives the whole matrix's bits (chunk 3: shards cut chunks)."""
    monkeypatch.setattr(aligned, "ROW_CHUNK", chunk)
    W, H = problem(10, 64, seed=12)
    whole = sparsegpt_prune(W, H, 0.5, nm, 32, 0.01)
    for cuts in ((0, 4, 10), (0, 1, 5, 10), (0, 7, 10)):
        parts = []
        for start, stop in zip(cuts, cuts[1:], strict=False):
            rows = slice(start, stop)
            select = global_selector(whole.mask, rows, 32, 64) if nm is None else prune_lowest_in_matrix
            parts.append(sparsegpt_prune(W[rows], H, 0.5, nm, 32, 0.01, block_selector=select, first_row=start))
        assert torch.equal(torch.cat([p.mask for p in parts]), whole.mask)
        assert torch.equal(torch.cat([p.weight for p in parts]), whole.weight)


@pytest.mark.parametrize("nm", [(2, 4), None])
def test_a_group_gives_each_member_its_own_bits(nm):
    """q/k/v (or gate/up) pruned together share H's factor and the column steps: each gets what it alone gets."""
    W1, H = problem(10, 64, seed=13)
    W2 = torch.randn(6, 64, generator=torch.Generator().manual_seed(14))
    alone = [sparsegpt_prune(W, H, 0.5, nm, 32, 0.01) for W in (W1, W2)]
    together = sparsegpt_prune_group([W1, W2], H, 0.5, nm, 32, 0.01, [prune_lowest_in_matrix] * 2, [0, 0])
    for one, member in zip(alone, together, strict=True):
        assert torch.equal(one.mask, member.mask) and torch.equal(one.weight, member.weight)


THREADS_SCRIPT = """
import sys, torch
from dist_prune.methods.sparsegpt import sparsegpt_prune
torch.set_num_threads(int(sys.argv[1]))
gen = torch.Generator().manual_seed(0)
X = torch.randn(3000, 1536, generator=gen) * (torch.rand(1536, generator=gen) + 0.1)
H = X.T @ X * (2 / 6)
W = torch.randn(576, 1536, generator=gen)
result = sparsegpt_prune(W, H, 0.5, None, 128, 0.01)
torch.save({"weight": result.weight, "mask": result.mask}, sys.argv[2])
"""


def test_the_thread_count_changes_no_bit(tmp_path):
    """SparseGPT's step on SmolLM2's down_proj shape, given H, with 1 and 2 threads: LAPACK's factorisation
    would differ in its last bits (it runs on one thread); the OBS loop's products do not split across threads."""
    results = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}.pt"
        subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(threads), str(out)], check=True, cwd=ROOT)
        results.append(torch.load(out))
    assert torch.equal(results[0]["mask"], results[1]["mask"])
    assert torch.equal(results[0]["weight"], results[1]["weight"])


KERNEL_SCRIPT = """
import torch
from dist_prune.methods.masks import prune_lowest_in_matrix
from dist_prune.methods.obs_kernel import obs_block
from dist_prune.methods.sparsegpt import inverse_hessian_factor, obs_columns

gen = torch.Generator().manual_seed(0)
for rows, width, nm in ((37, 32, None), (37, 32, (2, 4)), (20, 24, (4, 8)), (5, 20, None)):
    X = torch.randn(4 * width, width, generator=gen)
    Hinv, _ = inverse_hessian_factor(X.T @ X, 0.01)
    W = torch.randn(rows, width, generator=gen)
    W[:, ::3] = W[:, 1:2]  # ties
    d = Hinv.diagonal()
    mask = prune_lowest_in_matrix(W.square() / d.square(), 0.5) if nm is None else torch.zeros_like(W, dtype=torch.bool)
    w1, m1, w2, m2 = W.clone(), mask.clone(), W.clone(), mask.clone()
    e1 = obs_columns(w1, Hinv, m1, nm)
    e2 = obs_block(w2, Hinv.contiguous(), m2, nm)
    assert torch.equal(m1, m2) and torch.equal(w1, w2) and torch.equal(e1, e2), (rows, width, nm)
print("same bits")
"""


def test_the_gpu_kernel_does_what_the_loop_does():
    """The Triton kernel of the OBS loop, run by Triton's interpreter on the CPU (tests/test_cuda.py runs it on a
    GPU): the torch loop's bits, with N:M chosen inside the kernel and a padded last block (24, 20 columns)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "same bits" in done.stdout, done.stderr[-2000:]
