"""Timeline: simulate one iteration of (Profile, Plan, NetworkModel) without running it.

The model follows Espresso's simulator (our note, section 1.3), adapted to how
:class:`~thrifty.sync.engine.GradientSync` executes a plan:

* A group is ready when its last tensor is ready (profiled ready times).
* Groups launch in plan order (every rank must issue collectives in the same
  order), so a group also waits for the launch of the group before it.
* Encoding runs in the backward thread: it delays every later gradient by its
  duration (compression contends with backward).
* Offloaded groups (``Strategy.offload``) encode on a separate serial CPU lane
  instead, which does not delay backward.
* Hierarchical groups (``Strategy.hierarchical``, several ranks per node, see
  :class:`~thrifty.comm.topology.Topology`) first reduce-scatter inside the
  node (blocking the launching thread), then run their collective across nodes
  on a 1/k shard (so encode and decode work on the shard), then all-gather
  inside the node at the end of backward.
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
from dataclasses import dataclass, replace

from thrifty.comm.network import NetworkModel
from thrifty.comm.topology import Topology
from thrifty.compressors import Compressor
from thrifty.sync.plan import Plan, Strategy
from thrifty.sync.profile import Profile

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
        if strategy.collective == "all_to_all":  # reduce-scatter + all-gather
            scatter = network.time("all_to_all", 4 * numel, n)
            return scatter, network.time("all_gather", 4 * numel, n)
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


def _work(profile: Profile, strategy: Strategy, numel: int, n: int) -> tuple[float, float]:
    """(encode, decode) seconds of one rank for a group of ``numel`` on ``n`` ranks."""
    if strategy.compressor is None:
        return 0.0, 0.0
    cost = profile.cost(strategy)
    shard = -(-numel // n)
    if strategy.collective == "all_reduce":
        return cost.encode_time(numel), cost.decode_time(numel)
    if strategy.collective == "all_gather":
        return cost.encode_time(numel), n * cost.decode_time(numel)
    # divisible: n shards out; aggregate n, re-encode, decode n gathered shards
    return n * cost.encode_time(shard), 2 * n * cost.decode_time(shard) + cost.encode_time(shard)


def group_cost(
    profile: Profile,
    numel: int,
    ready: float,
    strategy: Strategy,
    network: NetworkModel,
    n: int,
    topology: Topology | None = None,
) -> GroupCost:
    if strategy.hierarchical:
        return _hierarchical_cost(profile, numel, ready, strategy, topology)
    first, second = comm_time(strategy, numel, n, network)
    encode, decode = _work(profile, strategy, numel, n)
    return GroupCost(
        numel,
        ready,
        encode,
        first,
        decode + second,
        payload_bytes(strategy, numel),
        strategy.offload,
    )


def _hierarchical_cost(
    profile: Profile, numel: int, ready: float, strategy: Strategy, topology: Topology | None
) -> GroupCost:
    if topology is None or not topology.hierarchical:
        raise ValueError(
            f"{strategy.label()} is hierarchical: simulate it with a Topology of several "
            "nodes with several ranks each"
        )
    assert topology.intra is not None and topology.inter is not None
    k, nodes = topology.ranks_per_node, topology.nodes
    shard = -(-numel // k)
    across = replace(strategy, hierarchical=False)
    first, second = comm_time(across, shard, nodes, topology.inter)
    encode, decode = _work(profile, across, shard, nodes)
    scatter = topology.intra.time("all_to_all", 4 * numel, k)
    gather = topology.intra.time("all_gather", 4 * numel, k)
    return GroupCost(
        numel,
        ready,
        scatter + encode,
        first,
        decode + second + gather,
        payload_bytes(across, shard),
        strategy.offload,
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
    profile: Profile,
    plan: Plan,
    network: NetworkModel | Topology,
    world_size: int | None = None,
) -> Timeline:
    """Predict one iteration's time and per-group schedule (see the module docstring).

    ``network`` is a NetworkModel (all ranks behind one link) or a Topology.
    """
    topology = network if isinstance(network, Topology) else None
    if topology is not None:
        network = topology.flat
        if world_size not in (None, topology.world_size):
            raise ValueError(
                f"world_size={world_size} contradicts the topology's {topology.world_size} ranks"
            )
        world_size = topology.world_size
    n = world_size or profile.world_size
    by_name = {t.name: t for t in profile.tensors}
    missing = [name for name in plan.names if name not in by_name]
    if missing:
        raise ValueError(f"plan names tensors the profile lacks: {missing[:5]}")
    costs = []
    for group in plan.groups:
        numel = sum(by_name[name].numel for name in group.names)
        ready = max((by_name[name].ready for name in group.names), default=0.0)
        costs.append(group_cost(profile, numel, ready, group.strategy, network, n, topology))
    return schedule(profile, costs)
