"""What each compressor's decompress(compress(x)) must satisfy, per its paper."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from thrifty.compressors import Compressor
from thrifty.compressors.low_precision import BF16, FP16
from thrifty.compressors.powersgd import PowerSGD
from thrifty.compressors.quantizers import QSGD, TernGrad
from thrifty.compressors.sign import EFSignSGD, OneBit, SignSGD, Signum
from thrifty.compressors.sparsifiers import DGC, RandomK, SparsityWarmup, TopK


def _roundtrip(compressor: Compressor, x: torch.Tensor, key: str = "g") -> torch.Tensor:
    return compressor.decompress(compressor.compress(x, key), x.numel(), key)


@pytest.mark.parametrize(
    ("compressor", "dtype", "unit_roundoff"),
    [(FP16(), torch.float16, 2.0**-11), (BF16(), torch.bfloat16, 2.0**-8)],
)
def test_half_precision_is_exact_within_its_precision(
    compressor: Compressor, dtype: torch.dtype, unit_roundoff: float
) -> None:
    torch.manual_seed(0)
    # Magnitudes 1e-4 .. 1e4 stay in float16's normal range.
    x = torch.logspace(-4, 4, 2000) * torch.where(torch.rand(2000) < 0.5, -1.0, 1.0)
    out = _roundtrip(compressor, x)
    assert torch.equal(out, x.to(dtype).float())
    assert torch.all((out - x).abs() <= unit_roundoff * x.abs())
    assert not torch.equal(out, x)  # it did round


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.3])
def test_topk_keeps_exactly_the_k_largest(ratio: float) -> None:
    torch.manual_seed(1)
    x = torch.randn(5000)
    compressor = TopK(ratio)
    values, indices = compressor.compress(x)
    k = math.ceil(ratio * 5000)
    expected = torch.topk(x.abs(), k).indices.sort().values
    assert torch.equal(indices.long(), expected)
    assert torch.equal(values, x[expected])
    out = compressor.decompress((values, indices), 5000)
    assert int((out != 0).sum()) == k
    assert torch.equal(out[expected], x[expected])


@pytest.mark.parametrize("seed", range(8))
def test_dgc_sends_k_entries_all_above_the_kth_largest(seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.randn(100_000) * torch.rand(100_000) ** 3  # heavy-ish tail
    compressor = DGC(0.01)
    values, indices = compressor.compress(x)
    k = 1000
    assert values.numel() == k and indices.unique().numel() == k
    kth_largest = torch.topk(x.abs(), k).values.min()
    assert torch.all(values.abs() >= kth_largest)
    assert torch.equal(values, x[indices.long()])
    assert compressor.exact_fallbacks == 0  # the sampled threshold did the work


def test_dgc_without_threshold_margin_still_sends_exactly_k() -> None:
    torch.manual_seed(9)
    compressor = DGC(0.01, threshold_margin=0.0)
    for _ in range(20):
        values, _ = compressor.compress(torch.randn(50_000))
        assert values.numel() == 500
    assert compressor.exact_fallbacks > 0  # an underestimated count happened and was handled


def test_dgc_warmup_schedule_follows_the_paper() -> None:
    compressor = DGC(0.001, warmup_steps_per_stage=2)
    densities = []
    for step in range(11):
        compressor.set_step(step)
        densities.append(compressor.density)
    assert densities == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.004, 0.004] + [0.001] * 3
    compressor.set_step(0)
    assert compressor.payload_spec(1000)[0].shape == (250,)
    compressor.set_step(8)
    assert compressor.payload_spec(1000)[0].shape == (1,)
    # Stages sparser than the final density are skipped.
    densities = [SparsityWarmup(1).density(s, 0.01) for s in range(5)]
    assert densities == [0.25, 0.0625, 0.015625, 0.01, 0.01]


def test_randomk_sends_k_distinct_true_values() -> None:
    torch.manual_seed(10)
    x = torch.randn(1000)
    values, indices = RandomK(0.02).compress(x)
    assert indices.unique().numel() == 20
    assert torch.equal(values, x[indices.long()])
    scaled, scaled_indices = RandomK(0.02, scale=True).compress(x)
    assert torch.allclose(scaled, x[scaled_indices.long()] * 50)


# Per-element standard deviation of one decompress(compress(x)) sample.
def _sd_randomk(x: torch.Tensor) -> torch.Tensor:
    d, k = x.numel(), math.ceil(0.1 * x.numel())
    return x.abs() * math.sqrt(d / k - 1)


def _sd_qsgd(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float(x.norm()) / (2 * 3))  # s = 3


def _sd_terngrad(x: torch.Tensor) -> torch.Tensor:
    s = float(x.abs().max())
    return (x.abs() * (s - x.abs())).sqrt()


@pytest.mark.parametrize(
    ("factory", "sd"),
    [
        (lambda: RandomK(0.1, scale=True), _sd_randomk),
        (lambda: QSGD(3), _sd_qsgd),
        (TernGrad, _sd_terngrad),
    ],
    ids=["randomk_scaled", "qsgd", "terngrad"],
)
def test_stochastic_compressors_are_unbiased(
    factory: Callable[[], Compressor], sd: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    torch.manual_seed(11)
    x = torch.randn(40)
    compressor, trials = factory(), 3000
    mean = sum(_roundtrip(compressor, x) for _ in range(trials)) / trials
    bound = 5 * sd(x) / math.sqrt(trials) + 1e-6
    assert torch.all((mean - x).abs() <= bound + 1e-5 * x.abs())


def test_unbiasedness_bound_catches_a_biased_quantizer() -> None:
    # The same bound rejects the bias of top-k, so the test above can fail.
    torch.manual_seed(11)
    x = torch.randn(40)
    out = _roundtrip(TopK(0.1), x)
    assert not torch.all((out - x).abs() <= 5 * _sd_randomk(x) / math.sqrt(3000) + 1e-6)


@pytest.mark.parametrize("levels", [1, 3, 127, 255])
def test_qsgd_values_lie_on_the_level_grid(levels: int) -> None:
    torch.manual_seed(12)
    x = torch.randn(500)
    out = _roundtrip(QSGD(levels), x)
    grid = out * levels / x.norm()
    assert torch.allclose(grid, grid.round(), atol=1e-3)
    assert grid.abs().max() <= levels
    assert torch.all((out == 0) | (torch.sign(out) == torch.sign(x)))


def test_qsgd_of_zeros_is_zeros() -> None:
    assert torch.equal(_roundtrip(QSGD(), torch.zeros(10)), torch.zeros(10))


def test_terngrad_values_are_ternary_times_the_max() -> None:
    torch.manual_seed(13)
    x = torch.randn(500)
    out = _roundtrip(TernGrad(), x)
    s = x.abs().max()
    assert set(torch.unique(out / s).tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.all((out == 0) | (torch.sign(out) == torch.sign(x)))
    assert out[x.abs().argmax()] == x[x.abs().argmax()]  # |x| = s is always kept


def test_signsgd_sends_signs_with_zero_as_plus_one() -> None:
    x = torch.tensor([0.5, -2.0, 0.0, -1e-9, 3.0, 1.0, -1.0, 2.0, -4.0])
    out = _roundtrip(SignSGD(), x)
    assert out.tolist() == [1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0]


def test_majority_vote_on_a_hand_example() -> None:
    ranks = [
        torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5]),
        torch.tensor([2.0, -1.0, -3.0, 4.0, -0.5]),
        torch.tensor([-1.0, -5.0, 2.0, 1.0, -0.1]),
    ]
    compressor = SignSGD()
    payloads = [compressor.compress(x) for x in ranks]
    assert compressor.aggregate(payloads, 5).tolist() == [3.0, -3.0, 3.0, 3.0, -3.0]
    # Two ranks tie on the third element: the vote is 0 there.
    assert compressor.aggregate(payloads[:2], 5).tolist() == [2.0, -2.0, 0.0, 0.0, 0.0]


def test_signum_sends_the_sign_of_its_momentum() -> None:
    compressor = Signum(momentum=0.5)
    _roundtrip(compressor, torch.tensor([1.0, -1.0]))  # m = [0.5, -0.5]
    out = _roundtrip(compressor, torch.tensor([-0.4, 0.4]))  # m = [0.05, -0.05]
    assert out.tolist() == [1.0, -1.0]  # signSGD would send [-1, 1]
    momentum = compressor.momentum_buffer("g")
    assert momentum is not None and torch.allclose(momentum, torch.tensor([0.05, -0.05]))
    compressor.reset_state("g")
    assert compressor.momentum_buffer("g") is None


def test_signum_keeps_momentum_per_key() -> None:
    compressor = Signum(momentum=0.5)
    _roundtrip(compressor, torch.tensor([1.0]), key="a")
    assert _roundtrip(compressor, torch.tensor([-0.4]), key="b").tolist() == [-1.0]
    with pytest.raises(ValueError, match="'a' changed size"):
        compressor.compress(torch.ones(3), key="a")


def test_efsignsgd_scales_signs_by_the_mean_magnitude() -> None:
    out = _roundtrip(EFSignSGD(), torch.tensor([1.0, -2.0, 3.0, -6.0]))
    assert out.tolist() == [3.0, -3.0, 3.0, -3.0]


def test_onebit_sends_the_mean_of_each_side() -> None:
    out = _roundtrip(OneBit(), torch.tensor([1.0, -2.0, 3.0, -6.0, 0.0]))
    assert torch.allclose(out, torch.tensor([4 / 3, -4.0, 4 / 3, -4.0, 4 / 3]))
    assert _roundtrip(OneBit(), torch.tensor([2.0, 4.0])).tolist() == [3.0, 3.0]


def test_powersgd_reconstructs_a_rank_one_matrix_exactly() -> None:
    torch.manual_seed(14)
    matrix = torch.outer(torch.randn(12), torch.randn(9))
    compressor = PowerSGD(1, shape=(12, 9))
    assert compressor.compresses(108)
    assert torch.allclose(_roundtrip(compressor, matrix), matrix.reshape(-1), atol=1e-5)


def test_powersgd_picks_a_near_square_padded_view() -> None:
    compressor = PowerSGD(2)
    assert compressor.matrix_shape(1000) == (32, 32)
    assert compressor.matrix_shape(1024) == (32, 32)
    assert compressor.matrix_shape(1025) == (33, 32)
    assert compressor.matrix_shape(7) == (3, 3)
    assert not compressor.compresses(20)  # 2 * (5 + 4) * 2 >= 20: sent raw
    x = torch.randn(20)
    assert torch.equal(_roundtrip(compressor, x), x)


def test_powersgd_warm_start_converges_to_the_best_low_rank_approximation() -> None:
    torch.manual_seed(15)
    u, v = torch.randn(40, 2), torch.randn(2, 30)
    matrix = u @ v + 0.01 * torch.randn(40, 30)
    compressor = PowerSGD(2, shape=(40, 30))
    for _ in range(10):  # each step is one power iteration from the previous Q
        out = _roundtrip(compressor, matrix).view(40, 30)
    s = torch.linalg.svdvals(matrix)
    best = float(s[2:].square().sum().sqrt())
    assert float((out - matrix).norm()) <= 1.05 * best
