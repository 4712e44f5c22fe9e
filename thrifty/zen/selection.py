"""Choosing between BP (Zen) and HC (SparCML) from the densification gamma (Zen §3).

Theorem 1 says the optimum is one of the two; which one depends on how much
the ranks' indices overlap. Zen profiles the first iterations and compares
Eq. 1 with Eq. 2 (:mod:`thrifty.zen.analytic`); both scale with
``d M (s_i + s_v) / b``, so only the gamma terms matter:

    BP:  (n-1)/n * (gamma^n + 1)        HC:  sum_{i=1..log n} gamma^(2^(i-1))

Overlap (small gamma) favours BP; disjoint indices at small ``n`` favour HC
(``gamma^k = k`` gives ``n - 1`` for HC against ``(n-1)(n+1)/n`` for BP), and
at ``n = 2`` HC wins unless the two ranks' indices coincide. With random
indices BP overtakes HC between 4 and 8 ranks.

Eq. 1 prices BP's Pull in COO; Zen actually sends a hash bitmap when that is
smaller, and HC switches to dense. ``criterion="bytes"`` compares the full
byte model (:func:`thrifty.zen.analytic.predict_wire_bytes`) instead, which
sees both.

``criterion="time"`` measures instead of predicting: the first calls try each
candidate in turn (by default BP, HC, AGsparse and dense), and the scheme whose
slowest rank was fastest is kept. It sees what the byte model cannot: the
(de)compression work of each scheme on the machine at hand (on CPUs sharing
cores, AGsparse's single all-gather often beats BP's two phases at equal bytes).

With the ``paper`` and ``bytes`` criteria :class:`AutoScheme` measures gamma
without sending the tensors: every rank
keeps the indices whose (shared-seed) hash falls in a ``1/S`` slice of the hash
range, the same slice on every rank, and all-gathers just those (about
``samples_per_rank`` indices each). Unions of samples estimate unions of sets.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
import torch.distributed as dist

from thrifty.comm import collectives
from thrifty.zen.analytic import (
    SparsityStats,
    densification_ratios,
    eq1_bp_volume,
    eq2_hc_volume,
    gamma_at,
    predict_wire_bytes,
)
from thrifty.zen.owner_hash import DEFAULT_SEED, keyed_hash32
from thrifty.zen.schemes.agsparse import AllGatherSparse
from thrifty.zen.schemes.balanced_parallelism import BalancedParallelism
from thrifty.zen.schemes.base import Reduced, SparseScheme, group_rank_and_size
from thrifty.zen.schemes.block_parallelism import ContiguousBlockParallelism
from thrifty.zen.schemes.dense_allreduce import DenseAllReduce
from thrifty.zen.schemes.hierarchical_centralization import HierarchicalCentralization
from thrifty.zen.sparse_rows import SparseRows, wire_index_dtype

__all__ = [
    "AutoScheme",
    "Criterion",
    "choose_bp_or_hc",
    "choose_bp_or_hc_by_bytes",
    "estimate_sparsity",
]

Criterion = Literal["paper", "bytes", "time"]
_CRITERIA: tuple[Criterion, ...] = ("paper", "bytes", "time")
_BP = BalancedParallelism.name
_HC = HierarchicalCentralization.name
TIMED_CANDIDATES = (_BP, _HC, AllGatherSparse.name, DenseAllReduce.name)
"""What ``criterion="time"`` tries by default (OmniReduce-like only on request)."""
_OTHERS: dict[str, type[SparseScheme]] = {
    cls.name: cls for cls in (AllGatherSparse, DenseAllReduce, ContiguousBlockParallelism)
}


def choose_bp_or_hc(gammas: Mapping[int, float], n: int) -> str:
    """``"zen"`` when Eq. 1 (BP) is no larger than Eq. 2 (HC), else ``"sparcml"``.

    ``gammas`` maps a number of summed tensors ``k`` to ``gamma^k``; missing
    sizes are interpolated. Both equations share the factor ``d M (s_i+s_v)``.
    """
    if n <= 1:
        return _BP
    bp = eq1_bp_volume(gamma_at(gammas, n), n, 1.0, 1, 1.0)
    hc = eq2_hc_volume(gammas, n, 1.0, 1, 1.0)
    return _BP if bp <= hc else _HC


def choose_bp_or_hc_by_bytes(
    stats: SparsityStats, index_bytes: int = 4, value_bytes: int = 4, values_per_index: int = 1
) -> str:
    """The scheme with fewer predicted bytes, Zen's hash bitmap and HC's dense switch included."""
    if stats.world_size <= 1:
        return _BP
    sizes = {
        "index_bytes": index_bytes,
        "value_bytes": value_bytes,
        "values_per_index": values_per_index,
    }
    bp = predict_wire_bytes(_BP, stats, **sizes).max_rank_bytes
    hc = predict_wire_bytes(_HC, stats, **sizes).max_rank_bytes
    return _BP if bp <= hc else _HC


def estimate_sparsity(
    rows: SparseRows,
    group: dist.ProcessGroup | None = None,
    samples_per_rank: int = 1024,
    seed: int = DEFAULT_SEED,
) -> SparsityStats:
    """Density and ``gamma^k`` of all ranks' indices from a shared-hash sample.

    Two small all-gathers (every rank's nnz, then the sampled indices); every
    rank computes the same result from the same data.
    """
    _, n = group_rank_and_size(group)
    counts = collectives.all_gather(torch.tensor([rows.nnz], dtype=torch.int64), group=group)
    mean = sum(int(c) for c in counts) / n  # type: ignore[union-attr]
    slices = 1
    while mean / slices > samples_per_rank:
        slices *= 2
    keep = (keyed_hash32(rows.indices, seed) & (slices - 1)) == 0
    sampled = collectives.all_gather_v(rows.indices[keep], group=group)
    density = mean / rows.num_rows if rows.num_rows else 0.0
    return SparsityStats(rows.num_rows, n, density, densification_ratios(list(sampled)))  # type: ignore[arg-type]


class AutoScheme(SparseScheme):
    """Zen's scheme selection: profile gamma for a few calls, then stick with BP or HC.

    Keep one instance per tensor (its state is the profile). Every rank
    decides from the same gathered samples, so all ranks choose alike.

    Args:
        profile_steps: calls that measure gamma before the choice is fixed; with
            ``criterion="time"``, rounds in which every candidate runs once
            (each candidate's best round counts).
        samples_per_rank: about how many indices per rank each measurement gathers.
        criterion: ``"paper"`` (Eq. 1 vs Eq. 2), ``"bytes"`` (the full byte
            model) or ``"time"`` (measured, see the module docstring).
        candidates: scheme names ``criterion="time"`` tries, in order (default
            :data:`TIMED_CANDIDATES`).
    """

    name: ClassVar[str] = "auto"
    code: ClassVar[int] = 6

    def __init__(
        self,
        profile_steps: int = 3,
        samples_per_rank: int = 1024,
        criterion: Criterion = "paper",
        zen: BalancedParallelism | None = None,
        sparcml: HierarchicalCentralization | None = None,
        candidates: Sequence[str] | None = None,
    ) -> None:
        if profile_steps < 1:
            raise ValueError(f"profile_steps must be >= 1, got {profile_steps}")
        if criterion not in _CRITERIA:
            raise ValueError(f"criterion must be one of {_CRITERIA}, got {criterion!r}")
        names = list(candidates or TIMED_CANDIDATES) if criterion == "time" else [_BP, _HC]
        known = (_BP, _HC, *_OTHERS)
        unknown = [c for c in names if c not in known]
        if unknown or not names or len(set(names)) < len(names):
            raise ValueError(f"candidates must be distinct names of {known}, got {names}")
        self.profile_steps = profile_steps
        self.samples_per_rank = samples_per_rank
        self.criterion: Criterion = criterion
        self.candidates: dict[str, SparseScheme] = {_BP: zen or BalancedParallelism()}
        for name in names:
            if name == _HC:
                self.candidates[name] = sparcml or HierarchicalCentralization()
            elif name != _BP:
                self.candidates[name] = _OTHERS[name]()
        self.order = names
        self.profile: list[SparsityStats] = []
        self.timings: list[tuple[str, float]] = []  # (candidate, slowest rank's seconds)
        self.chosen: str | None = None

    def key(self) -> tuple[int, int, int]:
        _, seed, pull_format = self.candidates[_BP].key()
        return (self.code, seed, pull_format * 4 + _CRITERIA.index(self.criterion))

    def mean_stats(self) -> SparsityStats:
        """The profile so far, averaged over calls."""
        first, count = self.profile[0], len(self.profile)
        sizes = sorted(set().union(*(p.gammas for p in self.profile)))
        gammas = {k: sum(gamma_at(p.gammas, k) for p in self.profile) / count for k in sizes}
        density = sum(p.density for p in self.profile) / count
        return SparsityStats(first.num_rows, first.world_size, density, gammas)

    def _choose(self, rows: SparseRows) -> str:
        stats = self.mean_stats()
        if self.criterion == "paper":
            return choose_bp_or_hc(stats.gammas, stats.world_size)
        index_bytes = wire_index_dtype(rows.num_rows).itemsize
        return choose_bp_or_hc_by_bytes(stats, index_bytes, rows.dtype.itemsize, rows.row_numel)

    def reduce(self, rows: SparseRows, group: dist.ProcessGroup | None = None) -> Reduced:
        if self.chosen is not None:
            return self.candidates[self.chosen].reduce(rows, group)
        if self.criterion == "time":
            return self._timed_reduce(rows, group)
        self.profile.append(estimate_sparsity(rows, group, self.samples_per_rank))
        choice = self._choose(rows)
        if len(self.profile) >= self.profile_steps:
            self.chosen = choice
        return self.candidates[choice].reduce(rows, group)

    def _timed_reduce(self, rows: SparseRows, group: dist.ProcessGroup | None) -> Reduced:
        """Run the next candidate; after the last round keep the fastest (same on every rank)."""
        name = self.order[len(self.timings) % len(self.order)]
        start = time.perf_counter()
        result = self.candidates[name].reduce(rows, group)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        collectives.all_reduce(
            elapsed, dist.ReduceOp.MAX, group
        )  # every rank sees the slowest rank
        self.timings.append((name, float(elapsed)))
        if len(self.timings) >= self.profile_steps * len(self.order):
            best = {n: min(t for m, t in self.timings if m == n) for n in self.order}
            self.chosen = min(self.order, key=best.__getitem__)
        return result
