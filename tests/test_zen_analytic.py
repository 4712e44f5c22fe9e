"""The analytic volume model and BP/HC selection (single process).

Measured bytes against this model, on real ranks: ``test_zen_schemes.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from thrifty.zen import SparsityStats, measure_sparsity, predict_wire_bytes
from thrifty.zen.analytic import (
    SCHEME_NAMES,
    densification_ratios,
    eq1_bp_volume,
    eq2_hc_volume,
    gamma_at,
)
from thrifty.zen.selection import choose_bp_or_hc


def _random_model_gammas(n: int, p: float) -> dict[int, float]:
    """gamma^k of k independent random sets of density p: (1 - (1-p)^k) / p."""
    return {k: (1 - (1 - p) ** k) / p for k in range(1, n + 1)}


def test_gamma_interpolation() -> None:
    gammas = {2: 1.8, 4: 3.0}
    assert gamma_at(gammas, 1) == 1.0
    assert gamma_at(gammas, 2) == 1.8
    assert gamma_at(gammas, 3) == pytest.approx(2.4)
    assert gamma_at(gammas, 1.5) == pytest.approx(1.4)
    assert gamma_at(gammas, 8) == 3.0  # held beyond the last measurement


def test_eq1_and_eq2() -> None:
    # 1% of 1M rows, 8-byte COO entries, n = 4.
    assert eq1_bp_volume(2.0, 4, 0.01, 10**6, 8) == pytest.approx(0.75 * 3 * 80_000)
    assert eq2_hc_volume({2: 1.5, 4: 2.0}, 4, 0.01, 10**6, 8) == pytest.approx((1 + 1.5) * 80_000)
    # n = 3: fold (1) + one stage over 1.5 tensors on average + unfold (gamma^3).
    assert eq2_hc_volume({2: 2.0, 3: 3.0}, 3, 1.0, 1, 1.0) == pytest.approx(1 + 1.5 + 3)


def test_selection_follows_eq1_and_eq2() -> None:
    # n = 2: HC is one exchange of d M, BP (1 + gamma) d M / 2: HC unless gamma = 1.
    assert choose_bp_or_hc({2: 1.5}, 2) == "sparcml"
    assert choose_bp_or_hc({2: 1.0}, 2) == "zen"
    # Full overlap favours BP, no overlap favours HC (7 vs 7.875 at n = 8).
    assert choose_bp_or_hc({k: 1.0 for k in (2, 4, 8)}, 8) == "zen"
    assert choose_bp_or_hc({k: float(k) for k in (2, 4, 8)}, 8) == "sparcml"
    # The paper: at n = 16 BP beats HC even at an overlap ratio of 0.05.
    assert choose_bp_or_hc(_random_model_gammas(16, 0.05), 16) == "zen"
    assert choose_bp_or_hc({}, 1) == "zen"


def test_measure_sparsity_on_known_sets() -> None:
    sets = [
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([2, 3, 4, 5]),
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([96, 97, 98, 99]),
    ]
    stats = measure_sparsity(sets, num_rows=100, rows_per_block=10)
    assert stats.density == pytest.approx(0.04)
    # Groups of 2: {0,1} -> 6 rows, {2,3} -> 8 rows; all four -> 10 rows.
    assert stats.gammas == {1: 1.0, 2: pytest.approx(7 / 4), 4: pytest.approx(10 / 4)}
    assert stats.gamma == pytest.approx(2.5)
    assert stats.block_density == pytest.approx(1 / 10)
    assert stats.block_union_density == pytest.approx(2 / 10)
    assert stats.skewness == pytest.approx(6 * 4 / 10)  # 6 of 10 union rows in the first quarter
    assert stats.overlap == pytest.approx((0.5 + 1.0 + 0 + 0.5 + 0 + 0) / 6)
    assert densification_ratios([torch.tensor([1]), torch.tensor([1])]) == {1: 1.0, 2: 1.0}


def test_predicted_volumes_follow_the_formulas() -> None:
    n, m, d, gamma = 4, 1_000_000, 0.01, 3.0
    stats = SparsityStats(m, n, d, {2: 1.9, 4: gamma})
    payload = {s: predict_wire_bytes(s, stats, checked=False).payload_bytes for s in SCHEME_NAMES}
    assert payload["dense"] == n * math.ceil(2 * (n - 1) / n * m * 4)
    assert payload["agsparse"] == pytest.approx(n * (n - 1) * d * m * 8)
    assert payload["sparcml"] == pytest.approx(n * (1 + 1.9) * d * m * 8)
    # Zen: COO Push, then per owner the smaller of COO indices (7,500 x 4 B) and the
    # bitmap (250K bits = 31,250 B): COO, by a little.
    union = gamma * d * m
    pull = (n - 1) * (union * 4 + n * min(union / n * 4, m / n / 8))
    assert payload["zen"] == pytest.approx((n - 1) * d * m * 8 + pull)
    # Eq. 1 is Zen with COO on both phases.
    coo_pull = (n - 1) * union * 8
    assert (n - 1) * d * m * 8 + coo_pull == pytest.approx(n * eq1_bp_volume(gamma, n, d, m, 8))
    # OmniReduce under uniform indices: nearly every 256-row block is non-zero at 1%.
    f_b = 1 - (1 - d) ** 256
    assert payload["omnireduce"] > (n - 1) * f_b * (m / 256) * 1024
    # At n = 4 with little overlap HC sends less than BP (selection must see this) ...
    assert payload["sparcml"] < payload["zen"] <= payload["agsparse"] < payload["dense"]
    # ... and at n = 8 BP wins, as the paper finds.
    eight = SparsityStats(m, 8, d, _random_model_gammas(8, d))
    zen, hc = (predict_wire_bytes(s, eight).total_bytes for s in ("zen", "sparcml"))
    assert zen < hc


def test_predicted_max_rank_reflects_imbalance() -> None:
    stats = SparsityStats(1_000_000, 8, 0.01, {8: 5.0}, skewness=6.0)
    omni = predict_wire_bytes("omnireduce", stats)
    zen = predict_wire_bytes("zen", stats)
    assert omni.max_rank_bytes > 3 * omni.total_bytes / 8
    assert zen.max_rank_bytes == pytest.approx(zen.total_bytes / 8)


def test_unknown_scheme_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown scheme 'ring'"):
        predict_wire_bytes("ring", SparsityStats(10, 2, 0.1))
