"""Recovery probability: does every expert keep a live replica after ``k`` node failures?

Model (the paper's, §4.1): ``k`` of the ``N`` nodes fail, every ``k``-subset
equally likely. Training continues without a checkpoint reload exactly when
each expert has a replica on a surviving node, i.e. when no expert's holder
set ``H_e`` (the nodes holding it) lies inside the failed set ``F``.

Exact counts of recoverable failure sets come from one of three methods;
``method="auto"`` takes the cheapest one that fits ``max_exact_work``:

* ``"table"`` - every subset of surviving nodes at once, as a ``2^N``-bit
  integer (bit ``S`` set when survivor set ``S`` keeps every expert); the
  count for ``k`` failures is a popcount. Gives all ``k`` together; ``N <= 22``.
* ``"enumerate"`` - every ``k``-subset of failed nodes, vectorised in chunks.
* ``"inclusion_exclusion"`` - over the fatal holder sets with at most ``k``
  nodes (only minimal ones: if ``H_a ⊆ H_b``, ``b`` dies only when ``a`` does).
  Exact and fast on large clusters when few experts have ``<= k`` holders.

When all three are too costly, ``"monte_carlo"`` samples failure sets and
states its error with Hoeffding's inequality: with ``n`` independent samples,
``P(|p_hat - p| >= eps) <= 2 exp(-2 n eps^2)``, so the half-width at
confidence ``1 - delta`` is ``eps = sqrt(ln(2/delta) / (2n))``; the sample
count is chosen from the requested ``tolerance`` and ``confidence``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from thrifty.lazarus.placement import Placement

__all__ = [
    "RecoveryEstimate",
    "RecoveryScorer",
    "hoeffding_half_width",
    "hoeffding_samples",
    "recoverable_counts",
    "recovery_estimate",
    "recovery_probability",
    "sample_failure_sets",
    "survivor_sets_hitting",
]

Method = Literal["auto", "table", "enumerate", "inclusion_exclusion", "monte_carlo"]

TABLE_MAX_NODES = 22


@dataclass(frozen=True)
class RecoveryEstimate:
    """A recovery probability and how much to trust it.

    ``half_width`` is 0 for exact methods; for Monte Carlo the true value lies
    in ``probability ± half_width`` with probability at least ``confidence``.
    """

    probability: float
    failed: int
    method: str
    exact: bool
    half_width: float = 0.0
    confidence: float = 1.0
    samples: int = 0


def hoeffding_half_width(samples: int, confidence: float) -> float:
    """``eps`` such that ``P(|p_hat - p| >= eps) <= 1 - confidence`` for ``samples`` draws."""
    _check_confidence(confidence)
    if samples < 1:
        raise ValueError(f"samples={samples}: need at least one")
    return math.sqrt(math.log(2 / (1 - confidence)) / (2 * samples))


def hoeffding_samples(tolerance: float, confidence: float) -> int:
    """Fewest samples whose Hoeffding half-width is at most ``tolerance``."""
    _check_confidence(confidence)
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance={tolerance}: expected 0 < tolerance < 1")
    return math.ceil(math.log(2 / (1 - confidence)) / (2 * tolerance**2))


def recovery_probability(
    placement: Placement,
    failed: int,
    *,
    method: Method = "auto",
    tolerance: float = 0.005,
    confidence: float = 0.999,
    samples: int | None = None,
    seed: int = 0,
    max_exact_work: int = 5_000_000,
) -> float:
    """Probability that every expert keeps a live replica when ``failed`` random nodes fail.

    Exact when an exact method fits ``max_exact_work`` (roughly, elementary
    steps), otherwise a Monte Carlo estimate within ``tolerance`` with
    probability ``confidence``; :func:`recovery_estimate` says which.

    Example::

        >>> rotation = Placement.from_nodes([[0, 1], [1, 2], [2, 0]])
        >>> recovery_probability(rotation, failed=1)
        1.0
    """
    return recovery_estimate(
        placement,
        failed,
        method=method,
        tolerance=tolerance,
        confidence=confidence,
        samples=samples,
        seed=seed,
        max_exact_work=max_exact_work,
    ).probability


def recovery_estimate(
    placement: Placement,
    failed: int,
    *,
    method: Method = "auto",
    tolerance: float = 0.005,
    confidence: float = 0.999,
    samples: int | None = None,
    seed: int = 0,
    max_exact_work: int = 5_000_000,
) -> RecoveryEstimate:
    """Like :func:`recovery_probability`, with the method used and the error bound."""
    _check_confidence(confidence)  # checked whichever method ends up used
    nodes = placement.num_nodes
    if not 0 <= failed <= nodes:
        raise ValueError(f"failed={failed}: expected 0 <= failed <= {nodes} nodes")
    total = math.comb(nodes, failed)
    masks = placement.holder_masks
    if method == "auto":
        count, method = _exact_count(placement, failed, max_exact_work)
        if count is not None:
            return RecoveryEstimate(count / total, failed, method, exact=True)
    if method == "table":
        if nodes > TABLE_MAX_NODES:
            raise ValueError(f"method='table' needs at most {TABLE_MAX_NODES} nodes, got {nodes}")
        count = _table_counts(masks, nodes)[failed]
    elif method == "enumerate":
        count = _enumerate_count(placement, failed)
    elif method == "inclusion_exclusion":
        fatal = _fatal_histogram(masks, failed, budget=None)
        assert fatal is not None
        count = total - _fatal_count(fatal, nodes, failed)
    elif method == "monte_carlo":
        n = samples if samples is not None else hoeffding_samples(tolerance, confidence)
        survived = _monte_carlo_survivals(placement, failed, n, np.random.default_rng(seed))
        return RecoveryEstimate(
            probability=survived / n,
            failed=failed,
            method="monte_carlo",
            exact=False,
            half_width=hoeffding_half_width(n, confidence),
            confidence=confidence,
            samples=n,
        )
    else:
        raise ValueError(
            f"method={method!r}: expected auto, table, enumerate, inclusion_exclusion "
            "or monte_carlo"
        )
    return RecoveryEstimate(count / total, failed, method, exact=True)


def recoverable_counts(placement: Placement, failures: Iterable[int]) -> tuple[int, ...]:
    """Exact number of recoverable ``k``-subsets of failed nodes, for each ``k`` in ``failures``.

    Integer counts compare exactly (``count / comb(N, k)`` is the probability),
    which is what the placement search ranks by. Raises when no exact method
    is affordable.
    """
    ks = tuple(failures)
    nodes = placement.num_nodes
    for k in ks:
        if not 0 <= k <= nodes:
            raise ValueError(f"failed={k}: expected 0 <= failed <= {nodes} nodes")
    if nodes <= TABLE_MAX_NODES:
        table = _table_counts(placement.holder_masks, nodes)
        return tuple(table[k] for k in ks)
    out = []
    for k in ks:
        count, _ = _exact_count(placement, k, max_work=50_000_000)
        if count is None:
            raise ValueError(
                f"no exact method is affordable for {nodes} nodes and {k} failures; "
                "use recovery_estimate(..., method='monte_carlo')"
            )
        out.append(count)
    return tuple(out)


# --- exact methods -------------------------------------------------------------


def _exact_count(placement: Placement, failed: int, max_work: int) -> tuple[int | None, Method]:
    """The cheapest exact count within ``max_work`` steps, or ``(None, "monte_carlo")``."""
    nodes, masks = placement.num_nodes, placement.holder_masks
    experts = len(masks)
    table_work = (1 << nodes) * (experts + nodes) // 64 if nodes <= TABLE_MAX_NODES else None
    enumerate_work = math.comb(nodes, failed) * (failed + 1) * experts // 8
    if table_work is not None and table_work <= min(enumerate_work, max_work):
        return _table_counts(masks, nodes)[failed], "table"
    if enumerate_work <= max_work // 10:
        return _enumerate_count(placement, failed), "enumerate"
    fatal = _fatal_histogram(masks, failed, budget=max_work // 50)
    if fatal is not None:
        return math.comb(nodes, failed) - _fatal_count(fatal, nodes, failed), "inclusion_exclusion"
    if enumerate_work <= max_work:
        return _enumerate_count(placement, failed), "enumerate"
    return None, "monte_carlo"


@functools.lru_cache(maxsize=8)
def _levels(nodes: int) -> tuple[int, ...]:
    """``levels[s]``: the ``2^N``-bit integer with bit ``S`` set for every ``S`` of ``s`` nodes."""
    subsets = np.arange(1 << nodes, dtype=np.int64)
    sizes = np.zeros(1 << nodes, dtype=np.int64)
    for bit in range(nodes):
        sizes += (subsets >> bit) & 1
    return tuple(_bits_to_int(sizes == s) for s in range(nodes + 1))


def _bits_to_int(flags: np.ndarray) -> int:
    return int.from_bytes(np.packbits(flags, bitorder="little").tobytes(), "little")


def survivor_sets_hitting(mask: int, nodes: int) -> int:
    """The ``2^N``-bit integer of survivor sets ``S`` with ``S & mask != 0``.

    Built from the subsets of the complement: starting from ``{∅}``, each node
    ``b`` outside ``mask`` doubles the family by a shift of ``2^b`` bits. Then
    "hits ``mask``" is everything else.
    """
    inside = 1  # bit 0: the empty set
    complement = ~mask & ((1 << nodes) - 1)
    for b in range(nodes):
        if complement >> b & 1:
            inside |= inside << (1 << b)
    return ((1 << (1 << nodes)) - 1) ^ inside


def _table_counts(masks: Sequence[int], nodes: int) -> list[int]:
    """Recoverable failure sets for every ``k = 0..N`` by the survivor-set table."""
    alive = (1 << (1 << nodes)) - 1
    for mask in set(masks):
        alive &= survivor_sets_hitting(mask, nodes)
    levels = _levels(nodes)
    return [(alive & levels[nodes - k]).bit_count() for k in range(nodes + 1)]


def _enumerate_count(placement: Placement, failed: int, chunk: int = 16384) -> int:
    nodes = placement.num_nodes
    holds = (placement.replica_matrix() > 0).astype(np.int32)  # [node, expert]
    need = holds.sum(axis=0)
    if failed == 0:
        return int(bool((need > 0).all()))
    combos = itertools.combinations(range(nodes), failed)
    recoverable = 0
    while True:
        block = np.array(list(itertools.islice(combos, chunk)), dtype=np.int64)
        if block.size == 0:
            return recoverable
        lost = holds[block].sum(axis=1)  # [set, expert]: failed holders
        recoverable += int((lost < need).all(axis=1).sum())


def _minimal_sets(masks: Iterable[int], max_size: int) -> list[int]:
    """Distinct holder sets of at most ``max_size`` nodes that contain no other one."""
    small = sorted({m for m in masks if m.bit_count() <= max_size}, key=lambda m: m.bit_count())
    minimal: list[int] = []
    for m in small:
        if not any(m & other == other for other in minimal):
            minimal.append(m)
    return minimal


def _fatal_histogram(
    masks: Sequence[int], failed: int, budget: int | None
) -> dict[int, int] | None:
    """Inclusion-exclusion terms by union size: ``{u: sum of signs of families with |union| = u}``.

    Fatal ``k``-sets are those containing some minimal holder set; the count is
    ``sum_u hist[u] * C(N - u, k - u)``. Families whose union exceeds ``k``
    contribute nothing and are never expanded. ``None`` when more than
    ``budget`` families would be visited.
    """
    sets = _minimal_sets(masks, failed)
    hist: dict[int, int] = {}
    visited = 0
    stack: list[tuple[int, int, int]] = [(0, 0, 0)]  # (next set index, union, family size)
    while stack:
        start, union, size = stack.pop()
        for i in range(start, len(sets)):
            merged = union | sets[i]
            u = merged.bit_count()
            if u > failed:
                continue
            visited += 1
            if budget is not None and visited > budget:
                return None
            hist[u] = hist.get(u, 0) + (1 if size % 2 == 0 else -1)
            stack.append((i + 1, merged, size + 1))
    return hist


def _fatal_count(hist: dict[int, int], nodes: int, failed: int) -> int:
    return sum(sign * math.comb(nodes - u, failed - u) for u, sign in hist.items() if u <= failed)


# --- Monte Carlo ---------------------------------------------------------------


def sample_failure_sets(
    nodes: int, failed: int, samples: int, rng: np.random.Generator
) -> np.ndarray:
    """``samples`` uniform ``failed``-subsets of ``range(nodes)``, as ints ``[samples, failed]``."""
    if failed == 0:
        return np.zeros((samples, 0), dtype=np.int64)
    if failed * 4 <= nodes:
        # Draw with replacement and redraw the rows with a repeat: cheap when k << N.
        out = rng.integers(0, nodes, size=(samples, failed))
        while True:
            ordered = np.sort(out, axis=1)
            bad = np.nonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))[0]
            if bad.size == 0:
                return out
            out[bad] = rng.integers(0, nodes, size=(bad.size, failed))
    keys = rng.random((samples, nodes))
    return np.argpartition(keys, failed - 1, axis=1)[:, :failed]


def _monte_carlo_survivals(
    placement: Placement, failed: int, samples: int, rng: np.random.Generator
) -> int:
    fatal = _fatal_node_lists(placement.holder_masks, failed)
    chunk = max(1, 2_000_000 // placement.num_nodes)
    survived = 0
    for start in range(0, samples, chunk):
        block = sample_failure_sets(placement.num_nodes, failed, min(chunk, samples - start), rng)
        survived += int((~_dead(block, placement.num_nodes, fatal)).sum())
    return survived


def _fatal_node_lists(masks: Sequence[int], failed: int) -> list[np.ndarray]:
    """The minimal holder sets that ``failed`` failures can cover, as node index arrays."""
    return [
        np.array([j for j in range(m.bit_length()) if m >> j & 1], dtype=np.int64)
        for m in _minimal_sets(masks, failed)
    ]


def _dead(sets: np.ndarray, nodes: int, fatal: Sequence[np.ndarray]) -> np.ndarray:
    """Per sampled failure set (rows of ``sets``): does some expert lose every holder?"""
    down = np.zeros((sets.shape[0], nodes), dtype=bool)
    down[np.arange(sets.shape[0])[:, None], sets] = True
    dead = np.zeros(sets.shape[0], dtype=bool)
    for members in fatal:  # an empty holder set is always dead: .all() of nothing is True
        dead |= down[:, members].all(axis=1)
    return dead


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: expected 0 < confidence < 1")


# --- scoring for the placement search --------------------------------------------


class RecoveryScorer:
    """Ranks placements by exact recoverable counts for an ordered tuple of failure counts.

    ``score(masks)`` returns, for each ``k`` in ``failures``, the number of
    ``k``-subsets of failed nodes that every expert survives; tuples compare
    lexicographically, which is the order the search maximises. Up to
    ``TABLE_MAX_NODES`` nodes it uses the survivor-set table (all ``k`` at
    once, holder sets cached); beyond, inclusion-exclusion over the small
    holder sets. Each ``k`` keeps the mode its first placement needed: exact
    while inclusion-exclusion fits ``budget`` families, else a fixed sample of
    failure sets (common random numbers: every placement is scored on the same
    sets, so comparisons stay deterministic; ``exact`` turns False). A later
    placement that an exact-mode ``k`` cannot score within ``10 * budget``
    gets the lowest score, ``(-1, ...)``: it cannot be ranked on the same scale,
    and a placement with that many small fatal sets is a poor one anyway.
    """

    def __init__(
        self,
        nodes: int,
        failures: Sequence[int],
        *,
        budget: int = 200_000,
        samples: int = 20_000,
        seed: int = 0,
    ) -> None:
        self.nodes = nodes
        self.failures = tuple(failures)
        if not self.failures:
            raise ValueError("failures is empty: nothing to score")
        for k in self.failures:
            if not 1 <= k <= nodes:
                raise ValueError(f"failures contains {k}: expected 1 <= k <= {nodes} nodes")
        self.max_failures = max(self.failures)
        self.budget = budget
        self.exact = True
        self.uses_table = nodes <= TABLE_MAX_NODES
        self._hits: dict[int, int] = {}
        if self.uses_table:
            self._full = (1 << (1 << nodes)) - 1
            levels = _levels(nodes)
            self._levels = [levels[nodes - k] for k in self.failures]
        self._samples = samples
        self._seed = seed
        self._sampled: dict[int, np.ndarray] = {}
        self._mode: dict[int, str] = {}

    def hits(self, mask: int) -> int:
        """Survivor sets that keep an expert held on ``mask`` alive (table mode; cached)."""
        bits = self._hits.get(mask)
        if bits is None:
            bits = survivor_sets_hitting(mask, self.nodes)
            if len(self._hits) < 65536:
                self._hits[mask] = bits
        return bits

    def alive(self, masks: Iterable[int]) -> int:
        alive = self._full
        for mask in set(masks):
            alive &= self.hits(mask)
        return alive

    def score_alive(self, alive: int) -> tuple[int, ...]:
        return tuple((alive & level).bit_count() for level in self._levels)

    def score(self, masks: Sequence[int]) -> tuple[int, ...]:
        if self.uses_table:
            return self.score_alive(self.alive(masks))
        out = []
        for k in self.failures:
            mode = self._mode.get(k)
            if mode != "sampled":
                budget = self.budget if mode is None else 10 * self.budget
                fatal = _fatal_histogram(masks, k, budget=budget)
                if fatal is not None:
                    self._mode[k] = "exact"
                    out.append(math.comb(self.nodes, k) - _fatal_count(fatal, self.nodes, k))
                    continue
                if mode == "exact":
                    return tuple(-1 for _ in self.failures)
                self._mode[k] = "sampled"
                self.exact = False
            out.append(self._sampled_survivals(masks, k))
        return tuple(out)

    def critical(self, mask: int) -> bool:
        """Whether an expert held on ``mask`` can die from at most ``max_failures`` failures."""
        return mask.bit_count() <= self.max_failures

    def _sampled_survivals(self, masks: Sequence[int], k: int) -> int:
        sets = self._sampled.get(k)
        if sets is None:
            rng = np.random.default_rng([self._seed, k])
            sets = sample_failure_sets(self.nodes, k, self._samples, rng)
            self._sampled[k] = sets
        dead = _dead(sets, self.nodes, _fatal_node_lists(masks, k))
        # Scaled to the count of k-subsets so it ranks on the same scale as exact counts.
        return round((~dead).mean() * math.comb(self.nodes, k))
