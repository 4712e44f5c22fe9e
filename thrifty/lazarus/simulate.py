"""Goodput under failure traces: Lazarus, checkpoint-restart (DS), checkpoint + reconfig (DS(FT)).

A time-stepped model of a training job on a cluster whose node count changes
(failures, spot departures, joins). Per step every running node trains
``samples_per_node`` samples; the systems differ in what a membership change
costs:

* **Lazarus**: pause ``reconfig_s`` (detection + regroup + transfer, measured
  by ``thrifty lazarus train``), lose only the in-flight step, continue on
  every live node. Joins are absorbed at a step boundary for the same cost.
  Falls back to the checkpoint when more than ``f - 1`` nodes fail at once
  (some expert may have lost every replica).
* **DS(FT)**: roll back to the last checkpoint and restart (``restart_s``) on
  every live node; a join is picked up by a restart at the next checkpoint.
* **DS** (DeepSpeed-MoE, expert parallel): like DS(FT) but only on a node
  count that divides the number of experts (the largest such count <= live).

Everyone pays ``checkpoint_s`` every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SimConfig", "poisson_trace", "simulate", "simulate_all", "spot_trace"]

SYSTEMS = ("lazarus", "ds_ft", "ds")


@dataclass(frozen=True)
class SimConfig:
    """Defaults: step and recovery times measured with ``thrifty lazarus train`` (see README)."""

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


def poisson_trace(
    cfg: SimConfig, mtbf_s: float, repair_s: float = 1800.0, seed: int = 0
) -> list[tuple[float, int]]:
    """(time, delta): a node fails at Poisson times (cluster MTBF), back after ``repair_s``."""
    rng = random.Random(seed)
    events: list[tuple[float, int]] = []
    t = 0.0
    while True:
        t += rng.expovariate(1.0 / mtbf_s)
        if t >= cfg.horizon_s:
            break
        events += [(t, -1), (t + repair_s, +1)]
    return sorted(e for e in events if e[0] < cfg.horizon_s)


def spot_trace(cfg: SimConfig, mean_gap_s: float = 600.0, seed: int = 0) -> list[tuple[float, int]]:
    """Spot-like: every ~``mean_gap_s`` 1-3 nodes leave at once or 1-3 join (bounded 25%..100%)."""
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


def _ds_nodes(alive: int, cfg: SimConfig) -> int:
    for n in range(alive, 0, -1):
        if cfg.experts % n == 0 or n % cfg.experts == 0:
            return n
    return 0


def simulate(
    cfg: SimConfig, trace: list[tuple[float, int]], system: str, samples: int = 200
) -> dict[str, Any]:
    """Samples trained over time for one system; ``series`` has ``samples`` points."""
    if system not in SYSTEMS:
        raise ValueError(f"system={system!r}: expected one of {SYSTEMS}")
    events = sorted(trace)
    t, progress, committed, steps = 0.0, 0.0, 0.0, 0
    alive = cfg.nodes
    used = alive if system != "ds" else _ds_nodes(alive, cfg)
    pending_join = False
    reloads = 0
    i = 0
    series: list[tuple[float, float]] = []
    every = cfg.horizon_s / samples
    next_sample = 0.0
    while t < cfg.horizon_s:
        while i < len(events) and events[i][0] <= t:
            delta = sum(d for _, d in events[i : i + 1])
            alive += delta
            i += 1
            if system == "lazarus":
                fatal = delta <= -cfg.min_replicas or alive * cfg.slots < cfg.experts
                if fatal:
                    progress = committed
                    reloads += 1
                    t += cfg.restart_s
                else:
                    t += cfg.reconfig_s
                used = alive if alive * cfg.slots >= cfg.experts else 0
            elif delta < 0:
                progress = committed
                reloads += 1
                t += cfg.restart_s
                used = alive if system == "ds_ft" else _ds_nodes(alive, cfg)
            else:
                pending_join = True
        while t >= next_sample and len(series) < samples:
            series.append((next_sample, progress))
            next_sample += every
        if used == 0:
            t += cfg.step_s
            continue
        t += cfg.step_s
        progress += used * cfg.samples_per_node
        steps += 1
        if steps % cfg.checkpoint_every == 0:
            t += cfg.checkpoint_s
            committed = progress
            if pending_join and system != "lazarus":
                pending_join = False
                t += cfg.restart_s
                used = alive if system == "ds_ft" else _ds_nodes(alive, cfg)
    while len(series) < samples:
        series.append((next_sample, progress))
        next_sample += every
    return {"system": system, "samples": progress, "reloads": reloads, "series": series}


def simulate_all(
    cfg: SimConfig, mtbf_s: float = 1200.0, seed: int = 0, plot_path: str | None = None
) -> dict[str, Any]:
    """Both traces, all three systems; ratios of Lazarus over DS and DS(FT)."""
    traces = {
        f"poisson_mtbf{mtbf_s:g}s": poisson_trace(cfg, mtbf_s, seed=seed),
        "spot": spot_trace(cfg, seed=seed),
    }
    out: dict[str, Any] = {"config": asdict(cfg), "mtbf_s": mtbf_s, "traces": {}}
    for name, trace in traces.items():
        runs = {s: simulate(cfg, trace, s) for s in SYSTEMS}
        out["traces"][name] = {
            "events": len(trace),
            "samples": {s: r["samples"] for s, r in runs.items()},
            "reloads": {s: r["reloads"] for s, r in runs.items()},
            "lazarus_over_ds": runs["lazarus"]["samples"] / max(runs["ds"]["samples"], 1e-9),
            "lazarus_over_ds_ft": runs["lazarus"]["samples"] / max(runs["ds_ft"]["samples"], 1e-9),
            "series": {s: r["series"] for s, r in runs.items()},
        }
    if plot_path:
        _plot(out, plot_path)
    return out


def _plot(out: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
