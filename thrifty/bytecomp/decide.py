"""Choosing a strategy per tensor: Espresso's Algorithms 1 and 2 on our timeline.

``decide(profile, compressor, topology)`` returns a :class:`~thrifty.sync.Plan`
whose every group carries the strategy the decision algorithm picked:

1. **Units.** Tensors in backward order, optionally merged into buckets of at
   least ``bucket_bytes`` (on gloo every collective costs a millisecond or more,
   so a hundred bias vectors sent one by one cost more than their bytes). With
   ``bucket_bytes="auto"`` several bucket sizes are decided and the fastest
   predicted plan is kept; 0 keeps one unit per tensor, as the paper does.
2. **Algorithm 1** (compression on the training thread). Start with every unit
   uncompressed. Visit units by size class, largest first, and within a class
   closest to the output first. ``Remove()`` drops every uncompressed unit
   communicated before a bubble of the timeline (compressing it only widens the
   gap). For each remaining unit keep the option that minimises the predicted
   iteration time with all others fixed; re-run ``Remove()`` after each decision.
3. **Algorithm 2** (CPU offload). Group the compressed units by (size, option);
   within a group offload a prefix from one end (``offload_end``: ``"output"``,
   the earliest-ready ones, as the artifact does, or ``"input"``, as the paper's
   text says), and enumerate how many of each group to offload.
4. **Refinement** (not in the paper): a local search over every unit and
   every option, offloaded ones included (single changes, and on small problems
   pairs), restarted from the best uniform settings of each size class (one
   option, a prefix offloaded). The
   greedy passes above can stop in a local optimum; this closes the gap to the
   brute-force optimum (our property test checks 3%).

Every candidate is scored by the same timeline as
:func:`thrifty.sync.timeline.simulate`, evaluated in closed form with numpy over
a batch of candidate strategies at once (the recurrences of the timeline are
max-plus scans), which keeps a 300-tensor decision in milliseconds.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from thrifty.bytecomp.tree import Constraints, gpu_options, options
from thrifty.comm.network import NetworkModel
from thrifty.comm.topology import Topology
from thrifty.sync.plan import Group, Plan, Strategy
from thrifty.sync.profile import Profile
from thrifty.sync.timeline import group_cost

__all__ = [
    "AUTO_BUCKETS",
    "Decision",
    "Unit",
    "brute_force",
    "decide",
    "iteration_times",
    "make_units",
    "zero_cost_profile",
]

log = logging.getLogger(__name__)

AUTO_BUCKETS = (0, 256 << 10, 1 << 20, 4 << 20, 16 << 20)  # bytes of fp32 gradient


@dataclass(frozen=True)
class Unit:
    """Tensors (backward order) that share one strategy."""

    names: tuple[str, ...]
    numel: int
    ready: float


@dataclass(frozen=True)
class Decision:
    plan: Plan
    predicted: float  # seconds per iteration, by the timeline
    baseline: float  # every unit uncompressed fp32 all-reduce, same units
    bucket_bytes: int
    evaluations: int  # candidate strategies scored

    @property
    def speedup(self) -> float:
        return self.baseline / self.predicted


def make_units(profile: Profile, bucket_bytes: int = 0) -> list[Unit]:
    """Consecutive tensors merged until each unit holds ``bucket_bytes`` of fp32."""
    units: list[Unit] = []
    names: list[str] = []
    numel, ready = 0, 0.0
    for t in profile.tensors:
        names.append(t.name)
        numel += t.numel
        ready = max(ready, t.ready)
        if 4 * numel >= bucket_bytes:
            units.append(Unit(tuple(names), numel, ready))
            names, numel, ready = [], 0, 0.0
    if names:
        units.append(Unit(tuple(names), numel, ready))
    return units


@dataclass(frozen=True)
class _Prefix:
    """The timeline's state after the units before ``u`` (see :func:`_suffix_times`)."""

    delay: float = 0.0  # encode seconds spent on the training thread so far
    launch: float = 0.0  # when the previous unit started (plan order)
    cpu: float = 0.0  # when the offload lane is free
    channel: float = 0.0  # when the previous collective ended
    tail: float = -np.inf  # max_{i<u}(comm_end_i + post after i) - post from u on
    post_before: float = 0.0  # post seconds of the units before u


def _suffix_times(
    ready: np.ndarray,
    encode: np.ndarray,
    first: np.ndarray,
    post: np.ndarray,
    offload: np.ndarray,
    prefix: _Prefix,
    backward: float,
) -> tuple[np.ndarray, np.ndarray]:
    """End of synchronisation for a batch (B, L) of strategies of units u..n-1.

    The same recurrences as :func:`thrifty.sync.timeline.schedule`, unrolled:
    ``x_i = max(x_{i-1}, a_i) + b_i`` is ``B_i + max(x_start, max_{j<=i}(a_j - B_{j-1}))``
    for the running sum ``B``, so each lane is a cumulative sum and a running max
    along the units, for all candidates at once. Returns (end per row, comm_end).
    """
    on_thread = np.where(offload, 0.0, encode)
    delay_before = prefix.delay + np.cumsum(on_thread, axis=1) - on_thread
    start = np.maximum(prefix.launch, np.maximum.accumulate(ready + delay_before, axis=1))
    off = np.where(offload, encode, 0.0)
    off_sum = np.cumsum(off, axis=1)
    lane = np.where(offload, start - (off_sum - off), -np.inf)
    cpu_end = off_sum + np.maximum(prefix.cpu, np.maximum.accumulate(lane, axis=1))
    encode_end = np.where(offload, cpu_end, start + encode)
    first_sum = np.cumsum(first, axis=1)
    comm_end = first_sum + np.maximum(
        prefix.channel, np.maximum.accumulate(encode_end - (first_sum - first), axis=1)
    )
    post_suffix = np.cumsum(post[:, ::-1], axis=1)[:, ::-1]
    backward_end = backward + prefix.delay + on_thread.sum(axis=1)
    end = np.maximum(
        backward_end + prefix.post_before + post_suffix[:, 0],
        np.maximum(prefix.tail + post_suffix[:, 0], (comm_end + post_suffix).max(axis=1)),
    )
    return end, comm_end


def iteration_times(
    ready: np.ndarray,
    encode: np.ndarray,
    first: np.ndarray,
    post: np.ndarray,
    offload: np.ndarray,
    backward: float,
    overhead: float,
) -> np.ndarray:
    """The timeline's iteration time for a batch of strategies, shape (B, n) -> (B,)."""
    if ready.shape[1] == 0:
        return np.full(ready.shape[0], overhead + backward)
    end, _ = _suffix_times(ready, encode, first, post, offload, _Prefix(), backward)
    return overhead + end


class _Scorer:
    """Per (unit, option) costs, and batch scoring of candidates near a current choice.

    Candidates that differ from the current choice only from unit ``u`` on are
    scored on units ``u..n-1`` alone, starting from the current choice's
    timeline state before ``u`` (kept in ``_pre``, rebuilt on every change).
    """

    def __init__(
        self, profile: Profile, units: Sequence[Unit], opts: Sequence[Strategy], topo: Topology
    ) -> None:
        self.profile, self.units, self.opts, self.topo = profile, units, list(opts), topo
        n, m = len(units), len(self.opts)
        self.encode, self.first, self.post = np.zeros((m, n)), np.zeros((m, n)), np.zeros((m, n))
        self.offload = np.zeros((m, n), dtype=bool)
        cache: dict[tuple[int, int], tuple[float, float, float, bool]] = {}
        for j, opt in enumerate(self.opts):
            for i, unit in enumerate(units):
                key = (j, unit.numel)  # costs depend on the size, not on the tensor
                if key not in cache:
                    c = group_cost(profile, unit.numel, 0.0, opt, topo.flat, topo.world_size, topo)
                    cache[key] = (c.encode, c.first, c.post, c.offload)
                row = cache[key]
                self.encode[j, i], self.first[j, i], self.post[j, i] = row[:3]
                self.offload[j, i] = row[3]
        self.ready = np.array([u.ready for u in units])
        self.overhead = profile.forward + profile.step
        self.evaluations = 0
        self.choice = np.zeros(n, dtype=np.int64)
        self._pre: tuple[np.ndarray, ...] = ()
        self.comm_end = self.comm_start = np.zeros(0)
        self.current = math.inf

    def _gather(self, choices: np.ndarray, lo: int) -> tuple[np.ndarray, ...]:
        cols = np.arange(lo, lo + choices.shape[1])[None, :]
        return (
            np.broadcast_to(self.ready[lo:], choices.shape),
            self.encode[choices, cols],
            self.first[choices, cols],
            self.post[choices, cols],
            self.offload[choices, cols],
        )

    def times(self, choices: np.ndarray) -> np.ndarray:
        """Iteration time of each row of ``choices`` (B, n): option index per unit."""
        choices = np.atleast_2d(choices)
        self.evaluations += choices.shape[0]
        return iteration_times(*self._gather(choices, 0), self.profile.backward, self.overhead)

    def time(self, choice: np.ndarray) -> float:
        return float(self.times(choice)[0])

    def set_choice(self, choice: np.ndarray) -> float:
        """Make ``choice`` current: record the timeline state before every unit."""
        self.choice = choice.copy()
        n = len(choice)
        if n == 0:
            self.current = self.overhead + self.profile.backward
            return self.current
        ready, enc, first, post, off = (a[0] for a in self._gather(choice[None, :], 0))
        end, comm_end = _suffix_times(
            ready[None],
            enc[None],
            first[None],
            post[None],
            off[None],
            _Prefix(),
            self.profile.backward,
        )
        comm_end = comm_end[0]
        self.comm_end, self.comm_start = comm_end, comm_end - first
        on_thread = np.where(off, 0.0, enc)
        delay = np.concatenate([[0.0], np.cumsum(on_thread)])
        start = np.maximum.accumulate(ready + delay[:-1])
        off_e = np.where(off, enc, 0.0)
        off_sum = np.cumsum(off_e)
        lane = np.where(off, start - (off_sum - off_e), -np.inf)
        cpu = np.maximum.accumulate(np.where(off, off_sum + np.maximum.accumulate(lane), 0.0))
        post_suffix = np.concatenate([np.cumsum(post[::-1])[::-1], [0.0]])
        best = np.maximum.accumulate(comm_end + post_suffix[:-1])
        # State before unit u, for u = 0..n-1 (index 0: nothing happened yet).
        self._pre = (
            delay[:-1],
            np.concatenate([[0.0], start[:-1]]),
            np.concatenate([[0.0], cpu[:-1]]),
            np.concatenate([[0.0], comm_end[:-1]]),
            np.concatenate([[-np.inf], best[:-1] - post_suffix[1:-1]]),
            post_suffix[0] - post_suffix[:-1],
        )
        self.current = self.overhead + float(end[0])
        return self.current

    def times_from(self, rows: np.ndarray, lo: int) -> np.ndarray:
        """Times of candidates equal to the current choice before unit ``lo``: rows (B, n-lo)."""
        self.evaluations += rows.shape[0]
        prefix = _Prefix(*(float(a[lo]) for a in self._pre)) if lo else _Prefix()
        end, _ = _suffix_times(*self._gather(rows, lo), prefix, self.profile.backward)
        return self.overhead + end

    def best_for(self, unit: int, allowed: Sequence[int]) -> tuple[int, float]:
        """The allowed option for ``unit`` that minimises the time, the current choice fixed."""
        rows = np.repeat(self.choice[None, unit:], len(allowed), axis=0)
        rows[:, 0] = allowed
        t = self.times_from(rows, unit)
        k = int(np.argmin(t))
        return int(allowed[k]), float(t[k])

    def before_bubbles(self) -> set[int]:
        """Units of the current choice communicated before the timeline's last bubble."""
        idle = np.nonzero(self.comm_start[1:] > self.comm_end[:-1] + 1e-12)[0]
        return set(range(int(idle[-1]) + 1)) if len(idle) else set()


def _size_order(units: Sequence[Unit]) -> list[int]:
    """Largest size class first; within a class, closest to the output (earliest) first."""
    return sorted(range(len(units)), key=lambda i: (-math.floor(math.log2(units[i].numel + 1)), i))


def _algorithm1(scorer: _Scorer, gpu: Sequence[int], start: np.ndarray) -> np.ndarray:
    scorer.set_choice(start)
    uncompressed = {j for j, o in enumerate(scorer.opts) if o.compressor is None}
    fixed = _removed(scorer, uncompressed)
    for unit in _size_order(scorer.units):
        if unit in fixed:
            continue
        option, _ = scorer.best_for(unit, gpu)
        if option != scorer.choice[unit]:
            choice = scorer.choice.copy()
            choice[unit] = option
            scorer.set_choice(choice)
        fixed |= _removed(scorer, uncompressed)
    return scorer.choice


def _removed(scorer: _Scorer, uncompressed: set[int]) -> set[int]:
    """Remove(): uncompressed units communicated before a bubble stay uncompressed."""
    return {i for i in scorer.before_bubbles() if int(scorer.choice[i]) in uncompressed}


def _algorithm2(scorer: _Scorer, choice: np.ndarray, end: str, max_candidates: int) -> np.ndarray:
    """Offload a prefix of each (size, option) group of compressed units; enumerate counts."""
    twin = {}
    for j, o in enumerate(scorer.opts):
        if o.compressor is not None and not o.offload:
            twin[j] = scorer.opts.index(replace(o, offload=True))
    groups: dict[tuple[int, int], list[int]] = {}
    for i, j in enumerate(choice):
        if int(j) in twin:
            groups.setdefault((scorer.units[i].numel, int(j)), []).append(i)
    if not groups:
        return choice
    members = [g if end == "output" else g[::-1] for g in groups.values()]
    total = math.prod(len(g) + 1 for g in members)
    if total > max_candidates:
        return _offload_greedy(scorer, choice, members, twin)
    best, best_t = choice, scorer.time(choice)
    counts_iter = itertools.product(*(range(len(g) + 1) for g in members))
    while batch_counts := list(itertools.islice(counts_iter, 1024)):
        counts = np.array(batch_counts, dtype=np.int64).reshape(len(batch_counts), len(members))
        batch = np.repeat(choice[None, :], len(batch_counts), axis=0)
        for g, group in enumerate(members):
            for position, i in enumerate(group):  # offloaded iff within the first `count`
                batch[:, i] = np.where(counts[:, g] > position, twin[int(choice[i])], choice[i])
        t = scorer.times(batch)
        k = int(np.argmin(t))
        if t[k] < best_t - 1e-12:
            best, best_t = batch[k].copy(), float(t[k])
    return best


def _offload_greedy(
    scorer: _Scorer, choice: np.ndarray, members: list[list[int]], twin: dict[int, int]
) -> np.ndarray:
    """Too many count vectors to enumerate: best count per group, others fixed, twice."""
    log.info("offload search: %d groups, too many combinations; coordinate search", len(members))
    best = choice.copy()
    for _ in range(2):
        for g in members:
            batch = np.repeat(best[None, :], len(g) + 1, axis=0)
            for c in range(len(g) + 1):
                for pos, i in enumerate(g):
                    base = int(choice[i])
                    batch[c, i] = twin[base] if pos < c else base
            best = batch[int(np.argmin(scorer.times(batch)))].copy()
    return best


def _refine(
    scorer: _Scorer,
    choice: np.ndarray,
    allowed: Sequence[int],
    offload_end: str = "output",
    kicks: int = 4,
    kick_budget: int = 2_000,
    pair_budget: int = 20_000,
) -> np.ndarray:
    """Local search from ``choice``, then from a few uniform settings of a size class.

    The local search (:func:`_descend`) changes one unit at a time, and on small
    problems two. It stops where several units must change together, typically
    equal tensors that Algorithm 1 gave different options, so that Algorithm 2
    (which offloads within (size, option) groups) never saw them as one group.
    So, on problems of at most ``kick_budget`` (unit, option) pairs, the best
    ``kicks`` uniform settings of a size class (:func:`_class_settings`) each
    restart the local search, and the best result is kept.
    """
    values = np.asarray(allowed)
    best = _descend(scorer, choice, values, pair_budget)
    best_t = scorer.current
    if len(best) * len(values) > kick_budget:
        return best
    for _ in range(3):
        improved = False
        rows = _class_settings(scorer, best, offload_end)
        if len(rows) == 0:
            break
        t = scorer.times(rows)
        for k in np.argsort(t, kind="stable")[:kicks]:
            found = _descend(scorer, rows[k], values, pair_budget)
            if scorer.current < best_t - 1e-12:
                best, best_t, improved = found, scorer.current, True
        if not improved:
            break
    scorer.set_choice(best)
    return best


def _descend(
    scorer: _Scorer, choice: np.ndarray, values: np.ndarray, pair_budget: int, block: int = 16
) -> np.ndarray:
    """Best-improvement descent over single changes (in blocks), then pairs, until stuck.

    Units are visited in blocks; every (unit, option) change of a block is scored
    in one batch and the best improving one applied, then the block again. Unlike
    Algorithm 1 it revisits units Remove() froze: a bubble can be made by a later
    unit's own encoding, and then compressing an earlier unit may pay after all.
    """
    best_t = scorer.set_choice(choice)
    n = len(choice)
    for _ in range(20):
        improved = False
        for b in range(0, n, block):
            units = np.repeat(np.arange(b, min(b + block, n)), len(values))
            opts = np.tile(values, len(units) // len(values))
            while True:
                rows = np.repeat(scorer.choice[None, b:], len(units), axis=0)
                rows[np.arange(len(units)), units - b] = opts
                t = scorer.times_from(rows, b)
                k = int(np.argmin(t))
                if t[k] >= best_t - 1e-12:
                    break
                new = scorer.choice.copy()
                new[b:] = rows[k]
                best_t, improved = scorer.set_choice(new), True
        if not improved and not _pair_move(scorer, values, pair_budget):
            break
        best_t = scorer.current
    return scorer.choice.copy()


def _class_settings(scorer: _Scorer, choice: np.ndarray, end: str) -> np.ndarray:
    """Every unit of one size set to one option, the first ``c`` (from ``end``) offloaded."""
    twin: dict[int, int | None] = {}
    for j, o in enumerate(scorer.opts):
        if not o.offload:
            off = replace(o, offload=True)
            twin[j] = scorer.opts.index(off) if off in scorer.opts else None
    classes: dict[int, list[int]] = {}
    for i, u in enumerate(scorer.units):
        classes.setdefault(u.numel, []).append(i)
    batch = []
    for members in classes.values():
        if len(members) < 2:
            continue
        order = members if end == "output" else members[::-1]
        for j, off in twin.items():
            for c in range(len(order) + 1 if off is not None else 1):
                row = choice.copy()
                row[order] = j
                if c:
                    row[order[:c]] = off
                batch.append(row)
    return np.array(batch, dtype=np.int64).reshape(len(batch), len(choice))


def _pair_move(scorer: _Scorer, values: np.ndarray, budget: int) -> bool:
    """Apply the best change of two units at once, if it helps (small problems only).

    Single changes stop where two units must change together, e.g. equal
    tensors that should all take one option so that some can be offloaded.
    All pairs cost (n*m)^2/2 candidates, so this runs only within ``budget``.
    """
    n, m = len(scorer.choice), len(values)
    cells = n * m
    if cells * (cells - 1) // 2 > budget or n < 2:
        return False
    unit = np.repeat(np.arange(n), m)
    opt = np.tile(values, n)
    a, b = np.triu_indices(cells, k=1)
    keep = unit[a] != unit[b]
    a, b = a[keep], b[keep]
    rows = np.repeat(scorer.choice[None, :], len(a), axis=0)
    rows[np.arange(len(a)), unit[a]] = opt[a]
    rows[np.arange(len(b)), unit[b]] = opt[b]
    t = scorer.times(rows)
    k = int(np.argmin(t))
    if t[k] >= scorer.current - 1e-12:
        return False
    scorer.set_choice(rows[k])
    return True


def _bases(
    compressor: str | Strategy | Sequence[Strategy] | None, **opts: object
) -> list[Strategy]:
    if compressor is None:
        return []
    if isinstance(compressor, str):
        return [Strategy.make(compressor, **opts)]
    if isinstance(compressor, Strategy):
        return [compressor]
    return list(compressor)


def _topology(network: Topology | NetworkModel, profile: Profile) -> Topology:
    if isinstance(network, Topology):
        return network
    return Topology.single_node(network, profile.world_size)


def decide(
    profile: Profile,
    compressor: str | Strategy | Sequence[Strategy] | None,
    topology: Topology | NetworkModel,
    *,
    constraints: Constraints | None = None,
    bucket_bytes: int | str = "auto",
    offload_end: str = "output",
    refine: bool = True,
    max_offload_candidates: int = 4096,
    **compressor_options: object,
) -> Decision:
    """The best strategy per unit for this profile, compressor and topology.

    Args:
        profile: from :func:`thrifty.sync.profile.profile_model`, with costs for the
            compressor (and any ``constraints.extra`` compressor).
        compressor: a registry name (with ``compressor_options``), a Strategy, or several.
        topology: a :class:`Topology`, or a NetworkModel for ranks behind one link.
        constraints: user limits on the decision tree.
        bucket_bytes: merge consecutive tensors into units of at least this many
            fp32 bytes; ``"auto"`` tries :data:`AUTO_BUCKETS` and keeps the fastest.
        offload_end: which end of each (size, option) group Algorithm 2 offloads
            first: ``"output"`` (earliest-ready, the artifact) or ``"input"`` (the paper).
        refine: coordinate descent after Algorithms 1 and 2.
    """
    constraints = constraints or Constraints()
    if offload_end not in ("output", "input"):
        raise ValueError(f"offload_end must be 'output' or 'input', got {offload_end!r}")
    topo = _topology(topology, profile)
    if topo.world_size != profile.world_size and profile.world_size > 1:
        raise ValueError(
            f"profile was taken for {profile.world_size} ranks, topology has {topo.world_size}"
        )
    bases = _bases(compressor, **compressor_options)
    bases += [Strategy.make(name) for name in constraints.extra]
    for base in bases:
        profile.cost(base)  # a clear KeyError now rather than deep in the search
    if bucket_bytes == "auto":
        sizes: Sequence[int] = AUTO_BUCKETS
    elif isinstance(bucket_bytes, int) and bucket_bytes >= 0:
        sizes = (bucket_bytes,)
    else:
        raise ValueError(f"bucket_bytes must be 'auto' or a byte count >= 0, got {bucket_bytes!r}")
    # Algorithms 1 and 2 at every bucket size; the refinement only on the best.
    candidates: list[tuple[float, int, _Scorer, np.ndarray, float]] = []
    seen: set[tuple[tuple[str, ...], ...]] = set()
    for size in sizes:
        units = make_units(profile, size)
        key = tuple(u.names for u in units)
        if key in seen:  # a larger bucket size that merges nothing more
            continue
        seen.add(key)
        scorer, choice, baseline = _greedy(
            profile, units, bases, topo, constraints, offload_end, max_offload_candidates
        )
        candidates.append((scorer.time(choice), size, scorer, choice, baseline))
    # Ties go to larger buckets: fewer collectives, and a cheaper refinement.
    candidates.sort(key=lambda c: (c[0], -c[1]))
    predicted, size, scorer, choice, baseline = candidates[0]
    if refine:
        choice = _refine(scorer, choice, list(range(len(scorer.opts))), offload_end=offload_end)
        predicted = scorer.time(choice)
    plan = Plan(
        tuple(
            Group(u.names, scorer.opts[int(j)]) for u, j in zip(scorer.units, choice, strict=True)
        )
    )
    evaluations = sum(c[2].evaluations for c in candidates)
    decision = Decision(plan, predicted, baseline, size, evaluations)
    log.info(
        "ByteComp: %d units, predicted %.4fs vs %.4fs fp32 (%.2fx), %d candidates scored",
        len(plan.groups),
        predicted,
        baseline,
        decision.speedup,
        evaluations,
    )
    return decision


def _greedy(
    profile: Profile,
    units: Sequence[Unit],
    bases: Sequence[Strategy],
    topo: Topology,
    constraints: Constraints,
    offload_end: str,
    max_offload_candidates: int,
) -> tuple[_Scorer, np.ndarray, float]:
    """Algorithms 1 and 2 on these units: (scorer, choice, fp32 baseline time)."""
    every = options(bases, topo, constraints)
    gpu_set = set(gpu_options(bases, topo, constraints))
    scorer = _Scorer(profile, units, every, topo)
    gpu = [j for j, o in enumerate(every) if o in gpu_set]
    start = np.full(len(units), every.index(Strategy()), dtype=np.int64)
    baseline = scorer.time(start)
    choice = _algorithm1(scorer, gpu, start)
    if constraints.offload and bases:
        choice = _algorithm2(scorer, choice, offload_end, max_offload_candidates)
    return scorer, choice, baseline


def brute_force(
    profile: Profile,
    compressor: str | Strategy | Sequence[Strategy] | None,
    topology: Topology | NetworkModel,
    constraints: Constraints | None = None,
    limit: int = 5_000_000,
    **compressor_options: object,
) -> tuple[Plan, float]:
    """The optimum over all |C|^n strategies, one unit per tensor (small n only)."""
    topo = _topology(topology, profile)
    every = options(_bases(compressor, **compressor_options), topo, constraints or Constraints())
    units = make_units(profile, 0)
    total = len(every) ** len(units)
    if total > limit:
        raise ValueError(f"{len(every)}^{len(units)} = {total} strategies exceed limit={limit}")
    scorer = _Scorer(profile, units, every, topo)
    combos = itertools.product(range(len(every)), repeat=len(units))
    best, best_t = np.zeros(len(units), dtype=np.int64), math.inf
    while batch := list(itertools.islice(combos, 65536)):
        rows = np.array(batch, dtype=np.int64).reshape(len(batch), len(units))
        t = scorer.times(rows)
        k = int(np.argmin(t))
        if t[k] < best_t:
            best, best_t = rows[k].copy(), float(t[k])
    plan = Plan(tuple(Group(u.names, every[int(j)]) for u, j in zip(units, best, strict=True)))
    return plan, best_t


def zero_cost_profile(profile: Profile) -> Profile:
    """The same profile with free (de)compression: the paper's "Upper Bound"."""
    free = {
        k: replace(c, encode=[0.0] * len(c.sizes), decode=[0.0] * len(c.sizes))
        for k, c in profile.costs.items()
    }
    return replace(profile, costs=free)
