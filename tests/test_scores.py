"""Scores and input statistics against direct, elementwise formulas."""

import math

import pytest
import torch

from dist_prune.config import MethodConfig
from dist_prune.methods import GroupMember
from dist_prune.methods import stats as stats_module
from dist_prune.methods.gblm import accumulate_sample_gradient, gblm_score, gradient_term
from dist_prune.methods.magnitude import magnitude_score
from dist_prune.methods.stats import InputStatistics
from dist_prune.methods.wanda import wanda_score
from dist_prune.registry import method


def prune_weight(W, cfg: MethodConfig, stats, gradient_sums=None):
    """One matrix as a group of one, through its method's plug-in."""
    member = GroupMember(W, gradient_sums=gradient_sums)
    return method(cfg.method).prune({"w": member}, cfg, stats, None)["w"]


@pytest.fixture
def tensors():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 8, generator=gen)
    scaler = torch.rand(8, generator=gen) * 3
    G = torch.rand(4, 8, generator=gen) * 2
    return W, scaler, G


def test_magnitude_score(tensors):
    W, _, _ = tensors
    S = magnitude_score(W)
    for i in range(4):
        for j in range(8):
            assert S[i, j].item() == pytest.approx(abs(W[i, j].item()), rel=1e-6)


def test_wanda_score(tensors):
    W, scaler, _ = tensors
    S = wanda_score(W, scaler)
    assert S.dtype == torch.float32
    for i in range(4):
        for j in range(8):
            expected = abs(W[i, j].item()) * math.sqrt(scaler[j].item())
            assert S[i, j].item() == pytest.approx(expected, rel=1e-6)


def test_wanda_uses_column_not_row_norm():
    # An asymmetric scaler must weight columns: W = ones gives S[i, j] = sqrt(scaler[j]) for every row.
    scaler = torch.tensor([1.0, 4.0, 9.0])
    S = wanda_score(torch.ones(2, 3), scaler)
    assert S.tolist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]


def test_gblm_score(tensors):
    W, scaler, G = tensors
    S = gblm_score(W, scaler, G)
    for i in range(4):
        for j in range(8):
            w = abs(W[i, j].item())
            expected = w * math.sqrt(scaler[j].item()) + w * G[i, j].item()
            assert S[i, j].item() == pytest.approx(expected, rel=1e-6)


def test_scores_are_fp32_from_bf16(tensors):
    W, scaler, G = tensors
    Wb = W.bfloat16()
    assert magnitude_score(Wb).dtype == torch.float32
    assert wanda_score(Wb, scaler).dtype == torch.float32
    S = gblm_score(Wb, scaler, G.bfloat16())
    assert S.dtype == torch.float32
    ref = Wb.float().abs() * scaler.sqrt() + Wb.float().abs() * G.bfloat16().float()
    assert torch.allclose(S, ref, rtol=1e-6, atol=0)


def slow_sums(batches):
    """sum over all tokens of x^2 and of x x^T, plus the number of sequences, by plain loops."""
    d = batches[0].shape[-1]
    sum_sq = [0.0] * d
    sum_xxt = [[0.0] * d for _ in range(d)]
    count = 0
    for x in batches:
        for seq in x:
            count += 1
            for tok in seq.double().tolist():
                for a in range(d):
                    sum_sq[a] += tok[a] ** 2
                    for b in range(d):
                        sum_xxt[a][b] += tok[a] * tok[b]
    return torch.tensor(sum_sq, dtype=torch.float64), torch.tensor(sum_xxt, dtype=torch.float64), count


def make_batches(seed=1, d=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 7, d, generator=gen), torch.randn(2, 7, d, generator=gen)]


def test_input_statistics_scaler_and_hessian():
    batches = make_batches()
    stats = InputStatistics(5, with_hessian=True)
    for x in batches:
        stats.update(x)
    sum_sq, sum_xxt, n = slow_sums(batches)
    assert n == 5 and stats.count == 5  # sequences, not tokens (35)
    assert torch.allclose(stats.scaler_row().double(), sum_sq / n, rtol=1e-5)
    assert torch.allclose(stats.hessian().double(), 2 * sum_xxt / n, rtol=1e-5, atol=1e-5)
    assert stats.hessian().dtype == torch.float32


def test_hessian_is_added_by_blocks_of_rows_and_made_in_place(monkeypatch):
    """X^T X goes in blocks of rows (no whole fp32 product beside the fp64 sum); round_once turns the sum into
    the Hessian without keeping both."""
    monkeypatch.setitem(stats_module.PRODUCT_BLOCK_ELEMENTS, "cpu", 10)  # 2 rows of 5 per block: 3 blocks
    batches = make_batches()
    stats = InputStatistics(5, with_hessian=True)
    for x in batches:
        stats.update(x)
    _, sum_xxt, n = slow_sums(batches)
    torch.testing.assert_close(stats.sum_xxt, sum_xxt, rtol=1e-6, atol=1e-6)
    stats.round_once()
    assert stats.sum_xxt is None and stats.hessian() is stats.hessian()  # one matrix, no copy per call
    torch.testing.assert_close(stats.hessian().double(), 2 * sum_xxt / n, rtol=1e-6, atol=1e-6)


def test_input_statistics_from_bf16_input_is_fp32():
    x = make_batches()[0].bfloat16()
    stats = InputStatistics(5, with_hessian=False)
    stats.update(x)
    assert stats.scaler_row().dtype == torch.float32
    ref = x.float().square().sum(dim=(0, 1)) / 3
    assert torch.allclose(stats.scaler_row(), ref, rtol=1e-6)


def test_input_statistics_batches_merge_like_one_batch():
    batches = make_batches(seed=2)
    split = InputStatistics(5, with_hessian=True)
    for x in batches:
        split.update(x)
    whole = InputStatistics(5, with_hessian=True)
    whole.update(torch.cat(batches))
    assert split.count == whole.count == 5
    assert torch.allclose(split.scaler_row(), whole.scaler_row(), rtol=1e-6)
    assert torch.allclose(split.hessian(), whole.hessian(), rtol=1e-5, atol=1e-6)
    # Raw sums add across workers: two partial statistics summed equal the whole.
    a, b = InputStatistics(5, True), InputStatistics(5, True)
    a.update(batches[0])
    b.update(batches[1])
    merged_sum_sq = a.tensors()[0] + b.tensors()[0]
    assert torch.allclose((merged_sum_sq / (a.count + b.count)).float(), whole.scaler_row(), rtol=1e-6)
    # and not an average of the two averages
    assert not torch.allclose((a.scaler_row() + b.scaler_row()) / 2, whole.scaler_row(), rtol=1e-3)


def test_input_statistics_do_not_depend_on_the_order_of_batches():
    """fp32 batch sums added in fp64 and rounded once: any order (any split over workers) gives the same bits."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 64, 48, generator=g) * scale for scale in (1.0, 3.0, 0.2, 7.0, 0.5, 1.5)]
    results = []
    for order in (range(6), reversed(range(6)), (3, 0, 5, 1, 4, 2)):
        stats = InputStatistics(48, with_hessian=True)
        for i in order:
            stats.update(batches[i])
        results.append((stats.scaler_row(), stats.hessian()))
    for scaler_row, hessian in results[1:]:
        assert torch.equal(scaler_row, results[0][0]) and torch.equal(hessian, results[0][1])
    assert results[0][0].dtype == results[0][1].dtype == torch.float32


def test_input_statistics_without_hessian_refuses_hessian():
    stats = InputStatistics(5, with_hessian=False)
    stats.update(make_batches()[0])
    assert len(stats.tensors()) == 1
    with pytest.raises(ValueError):
        stats.hessian()


def test_gradient_accumulation_l2_and_l1():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(3, 4, generator=gen) * 1e-3 for _ in range(5)]
    scale = 100.0
    acc2 = torch.zeros(3, 4)
    acc1 = torch.zeros(3, 4)
    for g in grads:
        accumulate_sample_gradient(acc2, g * scale, "l2")
        accumulate_sample_gradient(acc1, g * scale, "l1")
    for i in range(3):
        for j in range(4):
            values = [g[i, j].item() for g in grads]
            l2 = math.sqrt(sum((scale * v) ** 2 for v in values))
            l1 = sum(abs(scale * v) for v in values)
            assert gradient_term(acc2, "l2")[i, j].item() == pytest.approx(l2, rel=1e-5)
            assert gradient_term(acc1, "l1")[i, j].item() == pytest.approx(l1, rel=1e-5)
    # not the norm of the summed gradient
    summed = scale * torch.stack(grads).sum(0)
    assert not torch.allclose(gradient_term(acc2, "l2"), summed.abs(), rtol=1e-2)
    # gradient_term l1 returns a copy, not the accumulator itself
    term = gradient_term(acc1, "l1")
    term.zero_()
    assert acc1.abs().sum() > 0


def test_a_bf16_gradients_square_is_added_exactly():
    """The square of a bf16 number is exact in fp32: the fp64 accumulator holds exactly the sum of squares."""
    acc = torch.zeros(2, 2, dtype=torch.float64)
    g = torch.tensor([[0.1, -0.2], [0.3, 0.0]], dtype=torch.bfloat16) * 100
    accumulate_sample_gradient(acc, g, "l2")
    accumulate_sample_gradient(acc, g, "l2")
    assert acc.dtype == torch.float64
    assert torch.equal(acc, 2 * g.double().square())


def test_prune_weight_gblm_uses_both_terms():
    """prune_weight picks the gblm score: a column with zero activations survives on its gradient."""
    W = torch.ones(2, 4)
    stats = InputStatistics(4, with_hessian=False)
    stats.update(torch.tensor([[[1.0, 1.0, 2.0, 0.0]]]))  # column 3 has no activation
    G = torch.tensor([[0.0, 0.0, 0.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    out = prune_weight(W, MethodConfig(method="gblm", sparsity=0.5), stats, G.square())  # the l2 sums give G
    assert out.mask.tolist() == [[True, True, False, False], [True, False, False, True]]
    assert torch.equal(out.weight, W.masked_fill(out.mask, 0.0))
    wanda = prune_weight(W, MethodConfig(method="wanda", sparsity=0.5), stats, None)
    assert wanda.mask.tolist() == [[True, False, False, True], [True, False, False, True]]
