"""Goodput under failure traces: Lazarus, checkpoint-restart (DS), checkpoint + reconfig (DS(FT)).

A time-stepped model of a training job on a cluster whose node count changes
(failures, spot departures, joins). Per step every running node trains
``samples_per_node`` samples; the systems differ in what a membership change
costs:

* **Lazarus**: pause ``reconfig_s`` (detection + regroup + transfer, measured
  by ``thrifty lazarus train``) and continue on every live node. Joins are
  absorbed at a step boundary for the same cost. When ``k`` nodes leave at
  once out of ``alive``, the event is fatal (checkpoint reload,
  ``restart_s``) with probability ``1 - P(k)``: ``P(k)`` is the exact
  recovery probability (:func:`~thrifty.lazarus.recovery_estimate`) of the
  placement thrifty would use on ``alive`` nodes, i.e. Eq. 1 on uniform loads
  (``cfg.slots``, ``cfg.min_replicas``) placed by
  :func:`~thrifty.lazarus.place_experts`; see
  :func:`departure_recovery_probability`. Whether a given event is fatal is
  drawn from ``random.Random(seed)``, so a run is deterministic.
* **DS(FT)**: roll back to the last checkpoint and restart (``restart_s``) on
  every live node; a join is picked up by a restart at the next checkpoint.
* **DS** (DeepSpeed-MoE, expert parallel): like DS(FT) but only on node counts
  DeepSpeed's expert parallelism accepts: an EP size ``ep`` dividing both the
  number of experts and the node count, with ``experts / ep <= slots``; it
  uses the largest such count <= live (e.g. 8 of 10 nodes for 16 experts and
  6 slots, as in the paper's GPT-L runs).

Common rules:

* A departure kills the step in flight: a step that a node leaves during
  (``t < departure < t + step_s``) trains nothing, and recovery starts when it
  would have ended. So a survivable departure costs Lazarus exactly
  ``step_s + reconfig_s`` of time (only ``reconfig_s`` on a step boundary).
* Events with the same time are one membership change (``k`` simultaneous
  departures, joins taken after them).
* No system can train while ``live nodes * slots < experts`` (some expert has
  no slot); such a departure is fatal for everyone. While stalled, departures
  cost nothing more (nothing is running) and the join that restores capacity
  restarts the job (``reconfig_s`` for Lazarus, which already reloaded;
  ``restart_s`` for DS and DS(FT)).
* Everyone pays ``checkpoint_s`` every ``checkpoint_every`` trained steps; a
  reload goes back to the progress at the last checkpoint.
"""

from __future__ import annotations

import functools
import heapq
import math
import operator
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from thrifty.lazarus.allocation import allocate_replicas
from thrifty.lazarus.placement import Placement
from thrifty.lazarus.placement_search import FULL_VECTOR_MAX_NODES, place_experts
from thrifty.lazarus.recovery import recovery_estimate

__all__ = [
    "SimConfig",
    "departure_recovery_probability",
    "poisson_trace",
    "simulate",
    "simulate_all",
    "spot_trace",
]

SYSTEMS = ("lazarus", "ds_ft", "ds")
# Local-search budget of place_experts above 16 nodes. There every evaluation
# ANDs 2^N-bit survivor tables, and the default 2,000 evaluations take 2-10 s
# per node count at 20-22 nodes; on uniform loads they improved nothing over
# the constructions at 18-22 nodes (measured), so the simulator uses 200.
LARGE_CLUSTER_EVALUATIONS = 200


@dataclass(frozen=True)
class SimConfig:
    """Defaults: step and recovery times measured with ``thrifty lazarus train`` (see README).

    ``nodes`` is the cluster at the start (and the most a spot trace brings
    back); ``slots`` expert replica slots per node; ``min_replicas`` is Eq. 1's
    ``f``. Times are seconds; ``checkpoint_every`` counts trained steps.
    """

    nodes: int = 16
    experts: int = 16
    slots: int = 4
    min_replicas: int = 2
    step_s: float = 1.0
    samples_per_node: float = 1.0
    reconfig_s: float = 1.0
    restart_s: float = 30.0
    checkpoint_s: float = 5.0
    checkpoint_every: int = 100
    horizon_s: float = 6 * 3600.0

    def __post_init__(self) -> None:
        for name in ("nodes", "experts", "slots", "min_replicas", "checkpoint_every"):
            value = getattr(self, name)
            try:
                count = operator.index(value)
            except TypeError:
                count = 0
            if isinstance(value, bool) or count < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        for name in ("step_s", "samples_per_node", "horizon_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r}: expected a finite number > 0")
        for name in ("reconfig_s", "restart_s", "checkpoint_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}: expected a finite cost >= 0 seconds")
        if self.nodes * self.slots < self.experts:
            raise ValueError(
                f"{self.experts} experts do not fit in {self.nodes} nodes x {self.slots} slots: "
                "nothing could train"
            )


def poisson_trace(
    cfg: SimConfig, mtbf_s: float, repair_s: float = 1800.0, seed: int = 0
) -> list[tuple[float, int]]:
    """(time, delta): a node fails at Poisson times (cluster MTBF), back after ``repair_s``.

    A failure that would find no live node is skipped (it happens only when
    ``repair_s`` is many MTBFs long).
    """
    if not mtbf_s > 0:
        raise ValueError(f"mtbf_s={mtbf_s}: expected > 0 seconds")
    if not repair_s >= 0:
        raise ValueError(f"repair_s={repair_s}: expected >= 0 seconds")
    rng = random.Random(seed)
    events: list[tuple[float, int]] = []
    repairs: list[float] = []
    alive = cfg.nodes
    t = 0.0
    while True:
        t += rng.expovariate(1.0 / mtbf_s)
        if t >= cfg.horizon_s:
            break
        while repairs and repairs[0] <= t:
            heapq.heappop(repairs)
            alive += 1
        if alive == 0:
            continue
        alive -= 1
        heapq.heappush(repairs, t + repair_s)
        events += [(t, -1), (t + repair_s, +1)]
    return sorted(e for e in events if e[0] < cfg.horizon_s)


def spot_trace(cfg: SimConfig, mean_gap_s: float = 600.0, seed: int = 0) -> list[tuple[float, int]]:
    """Spot-like: every ~``mean_gap_s`` 1-3 nodes leave at once or 1-3 join (bounded 25%..100%)."""
    if not mean_gap_s > 0:
        raise ValueError(f"mean_gap_s={mean_gap_s}: expected > 0 seconds")
    rng = random.Random(seed)
    events: list[tuple[float, int]] = []
    t, alive = 0.0, cfg.nodes
    while True:
        t += rng.expovariate(1.0 / mean_gap_s)
        if t >= cfg.horizon_s:
            return events
        size = rng.randint(1, 3)
        leave = rng.random() < 0.5
        delta = -min(size, alive - cfg.nodes // 4) if leave else min(size, cfg.nodes - alive)
        if delta:
            events.append((t, delta))
            alive += delta


def departure_recovery_probability(cfg: SimConfig, alive: int, departed: int) -> float:
    """``P(k)``: chance that ``departed`` of ``alive`` nodes leaving at once loses no expert.

    The placement is the one thrifty would run on ``alive`` nodes with no load
    information: Eq. 1 on uniform loads, then
    :func:`~thrifty.lazarus.place_experts` (with a smaller local-search budget
    above 16 nodes, see ``LARGE_CLUSTER_EVALUATIONS``). The probability is
    exact whenever :func:`~thrifty.lazarus.recovery_estimate`'s ``auto``
    finds an affordable exact method (always up to 22 nodes), otherwise its
    Monte Carlo estimate. 0 when the survivors have fewer slots than there
    are experts. Cached per ``(experts, slots, min_replicas, alive, departed)``.
    """
    if not 0 <= departed <= alive:
        raise ValueError(f"departed={departed}: expected 0 <= departed <= alive={alive}")
    if departed == 0:
        return 1.0
    if (alive - departed) * cfg.slots < cfg.experts:
        return 0.0
    return _recovery_probability(cfg.experts, cfg.slots, cfg.min_replicas, alive, departed)


@functools.lru_cache(maxsize=4096)
def _recovery_probability(
    experts: int, slots: int, min_replicas: int, alive: int, departed: int
) -> float:
    placement = _uniform_placement(experts, slots, min_replicas, alive)
    return recovery_estimate(placement, departed).probability


@functools.lru_cache(maxsize=256)
def _uniform_placement(experts: int, slots: int, min_replicas: int, nodes: int) -> Placement:
    # Relax f here as allocate_replicas would, without its warning for every small cluster.
    feasible = min(min_replicas, nodes * slots // experts, nodes)
    allocation = allocate_replicas([1] * experts, nodes, slots, feasible)
    evaluations = 2_000 if nodes <= FULL_VECTOR_MAX_NODES else LARGE_CLUSTER_EVALUATIONS
    return place_experts(
        allocation.replicas,
        nodes,
        slots,
        min_distinct=allocation.min_replicas,
        max_evaluations=evaluations,
    )


def _ds_nodes(alive: int, cfg: SimConfig) -> int:
    """Largest ``n <= alive`` with an EP size dividing ``experts`` and ``n``, within the slots."""
    sizes = [
        ep
        for ep in range(1, cfg.experts + 1)
        if cfg.experts % ep == 0 and cfg.experts // ep <= cfg.slots
    ]
    for n in range(alive, 0, -1):
        if any(n % ep == 0 for ep in sizes):
            return n
    return 0


def _usable_nodes(system: str, alive: int, cfg: SimConfig) -> int:
    if alive * cfg.slots < cfg.experts:
        return 0
    return _ds_nodes(alive, cfg) if system == "ds" else alive


def _membership_changes(trace: Sequence[tuple[float, int]]) -> list[tuple[float, int, int]]:
    """``(time, departures, joins)`` per distinct event time, sorted."""
    grouped: dict[float, list[int]] = {}
    for n, event in enumerate(trace):
        try:
            time, delta = event
        except (TypeError, ValueError):
            raise ValueError(f"trace[{n}]={event!r}: expected (time, delta)") from None
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise ValueError(f"trace[{n}]={event!r}: delta must be an integer node count")
        if not (isinstance(time, int | float) and math.isfinite(time)):
            raise ValueError(f"trace[{n}]={event!r}: time must be a finite number of seconds")
        counts = grouped.setdefault(float(time), [0, 0])
        counts[0 if delta < 0 else 1] += abs(delta)
    return [(t, leave, join) for t, (leave, join) in sorted(grouped.items()) if leave or join]


def simulate(
    cfg: SimConfig,
    trace: Sequence[tuple[float, int]],
    system: str,
    samples: int = 200,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Samples trained over time for one system under ``trace`` (``(time, delta)`` pairs).

    Returns ``samples`` (trained), ``reloads`` (fatal departures: checkpoint
    reloads), ``departures`` (membership changes that removed nodes from a
    running job), ``expected_reloads`` (the sum of ``1 - P(k)`` over them for
    Lazarus, equal to ``departures`` for DS and DS(FT)), and ``series``,
    ``samples`` points of (time, samples trained). ``seed`` drives Lazarus's
    draws of which departures are fatal.
    """
    if system not in SYSTEMS:
        raise ValueError(f"system={system!r}: expected one of {SYSTEMS}")
    if samples < 1:
        raise ValueError(f"samples={samples}: expected at least one series point")
    changes = _membership_changes(trace)
    rng = random.Random(seed)
    t, progress, committed, steps = 0.0, 0.0, 0.0, 0
    alive = cfg.nodes
    used = _usable_nodes(system, alive, cfg)
    pending_join = False
    reloads = departures = 0
    expected_reloads = 0.0
    i = 0
    series: list[tuple[float, float]] = []
    every = cfg.horizon_s / samples
    next_sample = 0.0
    while t < cfg.horizon_s:
        while i < len(changes) and changes[i][0] <= t:
            when, leave, join = changes[i]
            i += 1
            if leave > alive:
                raise ValueError(
                    f"trace removes {leave} nodes at t={when:g} s but only {alive} are alive"
                )
            before, running = alive, used > 0
            alive += join - leave
            if leave and running:
                departures += 1
                if system == "lazarus":
                    p = departure_recovery_probability(cfg, before, leave)
                    expected_reloads += 1.0 - p
                    fatal = rng.random() >= p
                else:
                    expected_reloads += 1.0
                    fatal = True
                if fatal:
                    progress = committed
                    reloads += 1
                    t += cfg.restart_s
                else:
                    t += cfg.reconfig_s
                pending_join = False  # a restart or reconfiguration takes the joins too
                used = _usable_nodes(system, alive, cfg)
            elif join:
                now = _usable_nodes(system, alive, cfg)
                if not running and now:  # capacity is back: start again from the checkpoint
                    t += cfg.reconfig_s if system == "lazarus" else cfg.restart_s
                    used = now
                elif running and system == "lazarus":
                    t += cfg.reconfig_s
                    used = now
                elif running:
                    pending_join = True
            else:  # departures while stalled: nothing is running, nothing to lose
                used = _usable_nodes(system, alive, cfg)
        while t >= next_sample and len(series) < samples:
            series.append((next_sample, progress))
            next_sample += every
        end = t + cfg.step_s
        if used == 0 or _departure_before(changes, i, end):
            t = end  # stalled, or a node leaves mid-step: the step trains nothing
            continue
        t = end
        progress += used * cfg.samples_per_node
        steps += 1
        if steps % cfg.checkpoint_every == 0:
            t += cfg.checkpoint_s
            committed = progress
            if pending_join:
                pending_join = False
                t += cfg.restart_s
                used = _usable_nodes(system, alive, cfg)
    while len(series) < samples:
        series.append((next_sample, progress))
        next_sample += every
    return {
        "system": system,
        "samples": progress,
        "reloads": reloads,
        "departures": departures,
        "expected_reloads": expected_reloads,
        "series": series,
    }


def _departure_before(changes: Sequence[tuple[float, int, int]], start: int, end: float) -> bool:
    """Whether a change from index ``start`` on, before time ``end``, removes nodes."""
    for n in range(start, len(changes)):
        when, leave, _ = changes[n]
        if when >= end:
            return False
        if leave:
            return True
    return False


def simulate_all(
    cfg: SimConfig, mtbf_s: float = 1200.0, seed: int = 0, plot_path: str | None = None
) -> dict[str, Any]:
    """Both traces, all three systems; ratios of Lazarus over DS and DS(FT).

    ``seed`` draws the traces and Lazarus's fatal-or-not outcomes.
    """
    traces = {
        f"poisson_mtbf{mtbf_s:g}s": poisson_trace(cfg, mtbf_s, seed=seed),
        "spot": spot_trace(cfg, seed=seed),
    }
    out: dict[str, Any] = {"config": asdict(cfg), "mtbf_s": mtbf_s, "seed": seed, "traces": {}}
    for name, trace in traces.items():
        runs = {s: simulate(cfg, trace, s, seed=seed) for s in SYSTEMS}
        out["traces"][name] = {
            "events": len(trace),
            "samples": {s: r["samples"] for s, r in runs.items()},
            "reloads": {s: r["reloads"] for s, r in runs.items()},
            "departures": {s: r["departures"] for s, r in runs.items()},
            "expected_reloads": {s: r["expected_reloads"] for s, r in runs.items()},
            "lazarus_over_ds": runs["lazarus"]["samples"] / max(runs["ds"]["samples"], 1e-9),
            "lazarus_over_ds_ft": runs["lazarus"]["samples"] / max(runs["ds_ft"]["samples"], 1e-9),
            "series": {s: r["series"] for s, r in runs.items()},
        }
    if plot_path:
        _plot(out, plot_path)
    return out


def _plot(out: dict[str, Any], path: str) -> None:
    import matplotlib  # optional: [bench] matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: [bench] matplotlib

    names = list(out["traces"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4))
    for ax, name in zip(axes, names, strict=True):
        for system, series in out["traces"][name]["series"].items():
            ax.plot([p[0] / 3600 for p in series], [p[1] for p in series], label=system)
        ax.set_title(name)
        ax.set_xlabel("hours")
        ax.set_ylabel("samples trained")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
