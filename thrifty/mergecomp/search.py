"""Model-based search: the best partition of backward-ordered tensors into contiguous groups.

MergeComp compresses each group of consecutive gradient tensors once. Few large
groups amortise the per-call cost (kernel launches, one collective each) but
wait longer for their last gradient; many small groups overlap with backward
but pay the fixed cost often. The timeline (:mod:`thrifty.sync.timeline`)
prices any partition; this module finds the cheapest one.

Dynamic programming over split points. After placing the groups that end at
tensor ``j``, the timeline's future depends on the past only through four
numbers: ``D`` (backward delay from encodes so far), ``S`` (decode work queued
for the end of backward), ``C`` (when the channel frees) and ``P`` (the
finishing time the groups so far impose). The final iteration time is
``max(backward + D + S, P)``, nondecreasing in all four, and each group's
update is nondecreasing in them too, so only Pareto-minimal states need
keeping: with every such state kept the search is exact. For speed at most
``frontier`` states are kept per split point (the ones with the lowest lower
bound on the final time); the property test checks the result against brute
force over all 2^(n-1) partitions.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from thrifty.comm.network import NetworkModel
from thrifty.sync.plan import Plan, Strategy
from thrifty.sync.profile import Profile
from thrifty.sync.timeline import GroupCost, group_cost, schedule

__all__ = [
    "Partition",
    "candidate_partitions",
    "optimal_partition",
    "partition_costs",
    "partition_time",
    "plan_for",
    "schedule_plan",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partition:
    """Group lengths in backward order, and the timeline's predicted iteration time."""

    lengths: tuple[int, ...]
    predicted: float
    search_seconds: float = 0.0


class _Costs:
    """Group costs of contiguous ranges, cached by size (ready comes from the last tensor)."""

    def __init__(
        self, profile: Profile, strategy: Strategy, network: NetworkModel, world_size: int | None
    ) -> None:
        # Every search entry point builds one: its arguments are checked here, once.
        if not isinstance(network, NetworkModel):
            raise TypeError(
                f"network must be a NetworkModel, got {type(network).__name__} {network!r}"
            )
        if world_size is not None and (
            isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1
        ):
            raise ValueError(
                f"world_size must be an int >= 1 (or None for the profile's), got {world_size!r}"
            )
        world_size = world_size or profile.world_size
        self.profile, self.strategy, self.network, self.n = profile, strategy, network, world_size
        self.ready = [t.ready for t in profile.tensors]
        self.prefix = [0, *itertools.accumulate(t.numel for t in profile.tensors)]

    @functools.cache  # noqa: B019 - one instance per search, freed with it
    def _by_numel(self, numel: int) -> GroupCost:
        return group_cost(self.profile, numel, 0.0, self.strategy, self.network, self.n)

    def matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """encode, first and post of every group ``i .. j-1`` as ``[i, j]`` matrices."""
        n = len(self.ready)
        encode, first, post = (np.zeros((n + 1, n + 1)) for _ in range(3))
        prefix = np.array(self.prefix)
        for j in range(1, n + 1):
            for i, numel in enumerate((prefix[j] - prefix[:j]).tolist()):
                g = self._by_numel(numel)
                encode[i, j], first[i, j], post[i, j] = g.encode, g.first, g.post
        return encode, first, post

    def __call__(self, i: int, j: int) -> GroupCost:
        """Cost of the group of tensors ``i .. j-1``."""
        base = self._by_numel(self.prefix[j] - self.prefix[i])
        return GroupCost(
            base.numel, self.ready[j - 1], base.encode, base.first, base.post, base.payload_bytes
        )


def partition_costs(
    profile: Profile,
    strategy: Strategy,
    network: NetworkModel,
    lengths: Sequence[int],
    world_size: int | None = None,
) -> list[GroupCost]:
    costs = _Costs(profile, strategy, network, world_size)
    bounds = [0, *itertools.accumulate(lengths)]
    return [costs(a, b) for a, b in itertools.pairwise(bounds)]


def partition_time(
    profile: Profile,
    strategy: Strategy,
    network: NetworkModel,
    lengths: Sequence[int],
    world_size: int | None = None,
) -> float:
    """The timeline's iteration time for one partition."""
    if sum(lengths) != len(profile.tensors):
        raise ValueError(f"lengths {list(lengths)} do not cover {len(profile.tensors)} tensors")
    return schedule(
        profile, partition_costs(profile, strategy, network, lengths, world_size)
    ).iteration


def optimal_partition(
    profile: Profile,
    strategy: Strategy,
    network: NetworkModel,
    world_size: int | None = None,
    frontier: int = 32,
) -> Partition:
    """The partition the timeline predicts fastest (exact when no frontier was truncated)."""
    started = time.perf_counter()
    n_tensors = len(profile.tensors)
    if n_tensors == 0:
        return Partition((), profile.forward + profile.backward + profile.step)
    costs = _Costs(profile, strategy, network, world_size)
    backward = profile.backward
    # Every Pareto state kept so far, flat: D, S, C, P, the split point it ends
    # at (``owner``) and a back-pointer to the state it extends.
    d_all, s_all, c_all, p_all = [np.zeros(1)], [np.zeros(1)], [np.zeros(1)], [np.zeros(1)]
    owner_all, back_all = [np.zeros(1, dtype=np.int64)], [np.full(1, -1, dtype=np.int64)]
    encode_m, first_m, post_m = costs.matrices()  # [i, j]: tensors i .. j-1 as one group
    for j in range(1, n_tensors + 1):
        d, s, c, p = (np.concatenate(x) for x in (d_all, s_all, c_all, p_all))
        owner = np.concatenate(owner_all)
        encode, first, post = encode_m[owner, j], first_m[owner, j], post_m[owner, j]
        d, s = d + encode, s + post
        c = np.maximum(profile.tensors[j - 1].ready + d, c) + first
        p = np.maximum(p, c) + post
        bound = np.maximum(backward + d + s, p)  # the future only adds to both
        keep = np.argsort(bound, kind="stable")[: frontier * 2]
        keep = _pareto(keep, d, s, c, p)[:frontier]
        d_all.append(d[keep])
        s_all.append(s[keep])
        c_all.append(c[keep])
        p_all.append(p[keep])
        owner_all.append(np.full(len(keep), j, dtype=np.int64))
        back_all.append(keep)  # indices into the concatenation as it was at step j
    # Walk back: state k of step j extends state back[k] of the flat list at step j.
    sizes = [len(x) for x in d_all]
    starts = np.cumsum([0, *sizes])
    final = np.maximum(backward + d_all[n_tensors] + s_all[n_tensors], p_all[n_tensors])
    best = int(np.argmin(final))
    owners = np.concatenate(owner_all)
    lengths = []
    j, flat_index = n_tensors, int(starts[n_tensors]) + best
    while j > 0:
        prev = int(back_all[j][flat_index - starts[j]])  # index into states of steps < j
        i = int(owners[prev])
        lengths.append(j - i)
        j, flat_index = i, prev
    lengths.reverse()
    predicted = profile.forward + float(final[best]) + profile.step
    return Partition(tuple(lengths), predicted, time.perf_counter() - started)


def _pareto(order: np.ndarray, *axes: np.ndarray) -> np.ndarray:
    """Indices of ``order`` (kept in that order) not dominated by another index of ``order``."""
    pts = np.stack([a[order] for a in axes], axis=1)
    le = np.all(pts[:, None, :] <= pts[None, :, :], axis=2)  # le[a, b]: a <= b everywhere
    lt = np.any(pts[:, None, :] < pts[None, :, :], axis=2)
    dominated = np.any(le & lt, axis=0)
    # Exact duplicates: keep the first.
    same = np.all(pts[:, None, :] == pts[None, :, :], axis=2)
    dup = np.triu(same, k=1).any(axis=0)
    return order[~(dominated | dup)]


def _even(n: int, groups: int) -> tuple[int, ...]:
    groups = max(1, min(groups, n))
    base, extra = divmod(n, groups)
    return tuple(base + (1 if g < extra else 0) for g in range(groups))


def candidate_partitions(
    profile: Profile,
    strategy: Strategy,
    network: NetworkModel,
    world_size: int | None = None,
    limit: int = 4,
) -> list[Partition]:
    """The optimum and other plausible partitions, best predicted first, without duplicates.

    Besides the optimum: layer-wise, whole-model, and equal-count splits into
    2, 4 and 8 groups (Cupcake's baseline), so that online measurement can
    correct a model that is wrong about this machine.
    """
    n = len(profile.tensors)
    best = optimal_partition(profile, strategy, network, world_size)
    others = [(1,) * n, (n,), _even(n, 2), _even(n, 4), _even(n, 8)]
    found = {best.lengths: best}
    for lengths in others:
        if n and lengths not in found:
            found[lengths] = Partition(
                lengths, partition_time(profile, strategy, network, lengths, world_size)
            )
    return sorted(found.values(), key=lambda p: p.predicted)[:limit]


def plan_for(names: Sequence[str], lengths: Sequence[int], strategy: Strategy) -> Plan:
    return Plan.contiguous(list(names), list(lengths), strategy)


def schedule_plan(
    profile: Profile,
    compressor: str | Strategy | None,
    network: NetworkModel,
    world_size: int | None = None,
    **options: object,
) -> Plan:
    """``thrifty.mergecomp.schedule``: the model's best partition as a Plan, for offline use."""
    strategy = (
        compressor if isinstance(compressor, Strategy) else Strategy.make(compressor, **options)
    )
    best = optimal_partition(profile, strategy, network, world_size)
    log.info(
        "MergeComp: %d groups %s, predicted %.4fs (searched in %.3fs)",
        len(best.lengths),
        list(best.lengths),
        best.predicted,
        best.search_seconds,
    )
    return plan_for(profile.names, best.lengths, strategy)
