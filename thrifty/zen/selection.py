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

``criterion="model"`` predicts each candidate's time with the simulator
(:func:`thrifty.zen.simulator.simulate`): the bytes of every collective on a
per-node NIC (alpha-beta, incast) plus, given a
:class:`~thrifty.zen.simulator.ComputeModel`, the local work. The network is
the one given, or measured on the first call (two timed all-to-alls). After
the choice, every ``recheck_every`` calls the ranks compare the density with
the profiled one (one all-gather of a count); when it has drifted by more
than ``drift`` times either way, the profile starts again.

With the ``paper``, ``bytes`` and ``model`` criteria :class:`AutoScheme` measures gamma
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
from thrifty.zen.simulator import ComputeModel, NicNetwork, simulate
from thrifty.zen.sparse_rows import SparseRows, wire_index_dtype

__all__ = [
    "AutoScheme",
    "Criterion",
    "choose_bp_or_hc",
    "choose_bp_or_hc_by_bytes",
    "estimate_sparsity",
    "measure_network",
]

Criterion = Literal["paper", "bytes", "time", "model"]
_CRITERIA: tuple[Criterion, ...] = ("paper", "bytes", "time", "model")
_BP = BalancedParallelism.name
_HC = HierarchicalCentralization.name
TIMED_CANDIDATES = (_BP, _HC, AllGatherSparse.name, DenseAllReduce.name)
"""What ``criterion="time"`` and ``"model"`` try by default (OmniReduce-like only on request)."""
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
            model), ``"time"`` (measured) or ``"model"`` (simulated time), see
            the module docstring.
        candidates: scheme names ``criterion="time"`` and ``"model"`` choose
            from, in order (default :data:`TIMED_CANDIDATES`).
        network: the per-node network ``"model"`` predicts with; None measures
            it on the first call.
        compute: the local work ``"model"`` adds (None: network only).
        recheck_every: with ``"paper"``, ``"bytes"`` and ``"model"``, calls
            between density checks once a scheme is chosen (0: never).
        drift: the density ratio (either way) that starts a new profile.
        margin: with ``"model"``, candidates predicted within ``margin`` times
            the best are timed (``profile_steps`` rounds) and the fastest kept;
            1.0 trusts the model alone.
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
        network: NicNetwork | None = None,
        compute: ComputeModel | None = None,
        recheck_every: int = 50,
        drift: float = 2.0,
        margin: float = 1.25,
    ) -> None:
        if profile_steps < 1:
            raise ValueError(f"profile_steps must be >= 1, got {profile_steps}")
        if criterion not in _CRITERIA:
            raise ValueError(f"criterion must be one of {_CRITERIA}, got {criterion!r}")
        if network is not None and not isinstance(network, NicNetwork):
            raise TypeError(f"network must be a NicNetwork, got {type(network).__name__}")
        if compute is not None and not isinstance(compute, ComputeModel):
            raise TypeError(f"compute must be a ComputeModel, got {type(compute).__name__}")
        if (
            isinstance(recheck_every, bool)
            or not isinstance(recheck_every, int)
            or recheck_every < 0
        ):
            raise ValueError(f"recheck_every must be an int >= 0, got {recheck_every!r}")
        if not isinstance(drift, (int, float)) or not drift > 1:
            raise ValueError(f"drift must be a number > 1, got {drift!r}")
        if not isinstance(margin, (int, float)) or not margin >= 1:
            raise ValueError(f"margin must be a number >= 1, got {margin!r}")
        chooses = criterion in ("time", "model")
        names = list(candidates or TIMED_CANDIDATES) if chooses else [_BP, _HC]
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
        self.network = network
        self.compute = compute
        self.recheck_every = recheck_every
        self.drift = float(drift)
        self.margin = float(margin)
        self.shortlist: list[str] = []  # criterion="model": the close calls being timed
        self.predicted: dict[str, float] = {}  # criterion="model": seconds per candidate
        self.choices: list[str] = []  # every choice made, re-profiles included
        self._calls_since_choice = 0
        self._chosen_density = 0.0

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
        if self.criterion == "model":
            assert self.network is not None
            sizes = {
                "index_bytes": index_bytes,
                "value_bytes": rows.dtype.itemsize,
                "values_per_index": rows.row_numel,
            }
            self.predicted = {
                name: simulate(name, stats, self.network, self.compute, **sizes).seconds
                for name in self.order
            }
            return min(self.order, key=self.predicted.__getitem__)
        return choose_bp_or_hc_by_bytes(stats, index_bytes, rows.dtype.itemsize, rows.row_numel)

    def reduce(self, rows: SparseRows, group: dist.ProcessGroup | None = None) -> Reduced:
        if self.chosen is not None:
            if self.criterion != "time" and self.recheck_every:
                self._recheck(rows, group)
            if self.chosen is not None:
                return self.candidates[self.chosen].reduce(rows, group)
        if self.criterion == "time":
            return self._timed_reduce(rows, group, self.order)
        if self.shortlist:  # criterion="model": the clock decides between close predictions
            result = self._timed_reduce(rows, group, self.shortlist)
            if self.chosen is not None:
                self._settle(self.chosen)
            return result
        if self.criterion == "model" and self.network is None:
            self.network = measure_network(group)
        self.profile.append(estimate_sparsity(rows, group, self.samples_per_rank))
        choice = self._choose(rows)
        if len(self.profile) >= self.profile_steps:
            close = [
                s
                for s in self.order
                if self.predicted.get(s, 0.0) <= self.margin * self.predicted.get(choice, 0.0)
            ]
            if self.criterion == "model" and len(close) > 1:
                self.shortlist, self.timings = close, []
            else:
                self._settle(choice)
        return self.candidates[choice].reduce(rows, group)

    def _settle(self, choice: str) -> None:
        self.chosen = choice
        self.choices.append(choice)
        self.shortlist = []
        self._calls_since_choice = 0
        self._chosen_density = self.mean_stats().density

    def _recheck(self, rows: SparseRows, group: dist.ProcessGroup | None) -> None:
        """Every ``recheck_every`` calls: has the mean density drifted from the profiled one?"""
        self._calls_since_choice += 1
        if self._calls_since_choice < self.recheck_every:
            return
        self._calls_since_choice = 0
        _, n = group_rank_and_size(group)
        counts = collectives.all_gather(torch.tensor([rows.nnz], dtype=torch.int64), group=group)
        density = sum(int(c) for c in counts) / n / max(rows.num_rows, 1)  # type: ignore[union-attr]
        before = self._chosen_density
        if density == before:
            return
        ratio = density / before if before > 0 else float("inf")
        if ratio > self.drift or ratio < 1 / self.drift:  # every rank sees the same counts
            self.chosen = None
            self.profile = []

    def _timed_reduce(
        self, rows: SparseRows, group: dist.ProcessGroup | None, order: Sequence[str]
    ) -> Reduced:
        """Run the next candidate; after the last round keep the fastest (same on every rank)."""
        name = order[len(self.timings) % len(order)]
        start = time.perf_counter()
        result = self.candidates[name].reduce(rows, group)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        collectives.all_reduce(
            elapsed, dist.ReduceOp.MAX, group
        )  # every rank sees the slowest rank
        self.timings.append((name, float(elapsed)))
        if len(self.timings) >= self.profile_steps * len(order):
            best = {n: min(t for m, t in self.timings if m == n) for n in order}
            self.chosen = min(order, key=best.__getitem__)
        return result


def measure_network(
    group: dist.ProcessGroup | None = None,
    sizes: Sequence[int] = (1 << 10, 1 << 18),
    reps: int = 3,
) -> NicNetwork:
    """``alpha`` and the per-node rate from timed all-to-alls of two sizes (bytes per peer).

    Every rank gets the same model: each call's slowest rank counts, and the
    fastest of ``reps`` calls per size (the least disturbed by other work).
    """
    _, n = group_rank_and_size(group)
    best = []
    for size in sizes:
        chunks = list(torch.zeros(size * n, dtype=torch.uint8).split(size))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            collectives.all_to_all_v(chunks, group=group, recv_sizes=[size] * n)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            collectives.all_reduce(elapsed, dist.ReduceOp.MAX, group)
            times.append(float(elapsed))
        best.append(min(times))
    small, large = (size * (n - 1) for size in sizes)
    slope = (best[1] - best[0]) / (large - small)
    rate = 1 / slope if slope > 0 else 1e12  # no measurable cost per byte: a very fast link
    return NicNetwork(rate=rate, alpha=max(0.0, best[0] - small / rate))
