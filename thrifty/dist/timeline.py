"""Timeline: simulate one iteration of (Profile, Plan, NetworkModel) without running it.

The model follows Espresso's simulator (our note, section 1.3), adapted to how
:class:`~thrifty.dist.engine.GradientSync` executes a plan:

* A group is ready when its last tensor is ready (profiled ready times).
* Groups launch in plan order (every rank must issue collectives in the same
  order), so a group also waits for the launch of the group before it.
* Encoding runs in the backward thread: it delays every later gradient by its
  duration (compression contends with backward).
* Offloaded groups (``Strategy.offload``) encode on a separate serial CPU lane
  instead, which does not delay backward.
* One FIFO channel: a collective starts when its payload is ready and the
  previous collective has finished.
* At the end of backward the engine finishes groups in order: wait for the
  collective, decode the payloads (one per rank for all-gather), and for the
  divisible scheme and multi-round all-reduce run the second phase.
* Iteration = forward + that end + optimizer step.

``simulate`` returns the predicted time and the per-group schedule, so a
planner can see where the bubbles are.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from thrifty.compressors import Compressor
from thrifty.dist.network import NetworkModel
from thrifty.dist.plan import Plan, Strategy
from thrifty.dist.profile import Profile

__all__ = [
    "GroupCost",
    "GroupSchedule",
    "Timeline",
    "comm_time",
    "group_cost",
    "payload_bytes",
    "schedule",
    "simulate",
]


@dataclass(frozen=True)
class GroupSchedule:
    index: int
    numel: int
    ready: float  # after backward start, including delays from earlier encodes
    encode_end: float
    comm_start: float
    comm_end: float
    finish: float
    wire_bytes: int  # payload bytes this rank contributes (first phase)


@dataclass(frozen=True)
class Timeline:
    iteration: float
    backward_end: float
    groups: tuple[GroupSchedule, ...]

    @property
    def exposed_comm(self) -> float:
        """Seconds of the iteration spent after backward waiting for synchronisation."""
        return self.groups[-1].finish - self.backward_end if self.groups else 0.0

    def bubbles(self) -> list[int]:
        """Groups whose collective starts on an idle channel (nothing to hide behind)."""
        out, channel = [], 0.0
        for g in self.groups:
            if g.comm_start > channel and g.index > 0:
                out.append(g.index)
            channel = g.comm_end
        return out


@functools.lru_cache(maxsize=256)
def _compressor(strategy: Strategy) -> Compressor | None:
    """One instance per strategy for size queries (sizes do not depend on state)."""
    return strategy.build_compressor()


@functools.lru_cache(maxsize=1 << 17)
def payload_bytes(strategy: Strategy, numel: int) -> int:
    """Bytes one rank contributes for a group of ``numel`` elements."""
    compressor = _compressor(strategy)
    return 4 * numel if compressor is None else compressor.payload_nbytes(numel)


def comm_time(strategy: Strategy, numel: int, n: int, network: NetworkModel) -> tuple[float, float]:
    """(first phase, second phase) seconds of one group's collectives on ``n`` ranks.

    The second phase runs at the end of backward: the re-compressed all-gather
    of the divisible scheme, or the later rounds of a multi-round all-reduce.
    """
    compressor = _compressor(strategy)
    if compressor is None:
        return network.time("all_reduce", 4 * numel, n), 0.0
    if strategy.collective == "all_reduce":
        rounds = [r.spec.nbytes for r in compressor.allreduce_round_specs(numel)]
        times = [network.time("all_reduce", b, n) for b in rounds]
        return times[0], sum(times[1:])
    if strategy.collective == "all_gather":
        return network.time("all_gather", payload_bytes(strategy, numel) * n, n), 0.0
    shard = -(-numel // n)
    per_shard = payload_bytes(strategy, shard)
    return (
        network.time("all_to_all", per_shard * n, n),
        network.time("all_gather", per_shard * n, n),
    )


@dataclass(frozen=True)
class GroupCost:
    """What the timeline needs of one group, independent of the groups around it."""

    numel: int
    ready: float  # when its last tensor is ready, before any encode delays
    encode: float  # sender's work: error feedback + compression
    first: float  # collective launched right after encoding
    post: float  # at the end of backward: decode, second phase
    payload_bytes: int
    offload: bool = False


def group_cost(
    profile: Profile,
    numel: int,
    ready: float,
    strategy: Strategy,
    network: NetworkModel,
    n: int,
) -> GroupCost:
    first, second = comm_time(strategy, numel, n, network)
    if strategy.compressor is None:
        encode = decode = 0.0
    else:
        cost = profile.cost(strategy)
        shard = -(-numel // n)
        if strategy.collective == "all_reduce":
            encode, decode = cost.encode_time(numel), cost.decode_time(numel)
        elif strategy.collective == "all_gather":
            encode, decode = cost.encode_time(numel), n * cost.decode_time(numel)
        else:  # divisible: n shards out; aggregate n, re-encode, decode n gathered shards
            encode = n * cost.encode_time(shard)
            decode = 2 * n * cost.decode_time(shard) + cost.encode_time(shard)
    offload = bool(getattr(strategy, "offload", False))
    return GroupCost(
        numel, ready, encode, first, decode + second, payload_bytes(strategy, numel), offload
    )


def schedule(profile: Profile, costs: Sequence[GroupCost]) -> Timeline:
    """Run the timeline's recurrences over groups in launch order."""
    delay = 0.0  # backward time added by encodes on the backward thread
    launch = 0.0  # plan order: no group launches before the previous one
    cpu_lane = 0.0
    channel = 0.0
    stages = []
    for cost in costs:
        ready = cost.ready + delay
        start = max(ready, launch)
        if cost.offload:
            cpu_lane = max(cpu_lane, start) + cost.encode
            encode_end = cpu_lane
        else:
            encode_end = start + cost.encode
            delay += cost.encode
        launch = start
        comm_start = max(encode_end, channel)
        channel = comm_start + cost.first
        stages.append((ready, encode_end, comm_start, channel))
    backward_end = profile.backward + delay
    t = backward_end
    groups = []
    for i, (cost, (ready, encode_end, comm_start, comm_end)) in enumerate(
        zip(costs, stages, strict=True)
    ):
        t = max(t, comm_end) + cost.post
        groups.append(
            GroupSchedule(
                i, cost.numel, ready, encode_end, comm_start, comm_end, t, cost.payload_bytes
            )
        )
    return Timeline(profile.forward + t + profile.step, backward_end, tuple(groups))


def simulate(
    profile: Profile, plan: Plan, network: NetworkModel, world_size: int | None = None
) -> Timeline:
    """Predict one iteration's time and per-group schedule (see the module docstring)."""
    n = world_size or profile.world_size
    by_name = {t.name: t for t in profile.tensors}
    missing = [name for name in plan.names if name not in by_name]
    if missing:
        raise ValueError(f"plan names tensors the profile lacks: {missing[:5]}")
    costs = []
    for group in plan.groups:
        numel = sum(by_name[name].numel for name in group.names)
        ready = max((by_name[name].ready for name in group.names), default=0.0)
        costs.append(group_cost(profile, numel, ready, group.strategy, network, n))
    return schedule(profile, costs)
