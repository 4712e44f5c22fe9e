"""Random-k's index sampler: distinct, sorted, uniform, reproducible with a seed."""

from __future__ import annotations

import pytest
import torch

from thrifty.compressors.sparsifiers import sample_indices


@pytest.mark.parametrize(("numel", "k"), [(1000, 10), (1000, 300), (7, 7), (10, 0), (1, 1)])
def test_distinct_sorted_in_range(numel: int, k: int) -> None:
    got = sample_indices(numel, k, torch.Generator().manual_seed(1), "cpu")
    assert got.numel() == k
    assert torch.equal(got, torch.unique(got))  # sorted and distinct
    assert k == 0 or (got.min() >= 0 and got.max() < numel)


def test_every_index_equally_likely_on_the_sparse_path() -> None:
    numel, k, trials = 60, 6, 6000  # 4k < numel: draw-and-deduplicate path
    counts = torch.zeros(numel)
    gen = torch.Generator().manual_seed(0)
    for _ in range(trials):
        counts[sample_indices(numel, k, gen, "cpu")] += 1
    expected = trials * k / numel
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 110, chi2  # 59 degrees of freedom: p < 1e-4 beyond this


def test_same_seed_same_indices() -> None:
    a = sample_indices(10**6, 1000, torch.Generator().manual_seed(7), "cpu")
    b = sample_indices(10**6, 1000, torch.Generator().manual_seed(7), "cpu")
    c = sample_indices(10**6, 1000, torch.Generator().manual_seed(8), "cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)
