"""Failure-trace simulator: costs per membership change, recovery odds, determinism, bad input."""

from __future__ import annotations

import json
import math

import pytest

from thrifty.lazarus import allocate_replicas, place_experts, recovery_probability
from thrifty.lazarus.simulate import (
    SYSTEMS,
    SimConfig,
    departure_recovery_probability,
    poisson_trace,
    simulate,
    simulate_all,
    spot_trace,
)

# Integer times and no checkpoint cost keep every sample count exact.
QUIET = {"step_s": 1.0, "reconfig_s": 5.0, "restart_s": 20.0, "checkpoint_s": 0.0}


def run(cfg, trace, system, seed=0):
    return simulate(cfg, trace, system, seed=seed)


@pytest.mark.parametrize(
    ("nodes", "slots", "ds_nodes"),
    [
        (16, 4, 16),  # EP 16 (or 4, 8)
        (10, 6, 8),  # the paper's GPT-L: DS uses 8 of 10 nodes (EP 4, 4 experts per node)
        (12, 4, 12),  # EP 4 x DP 3
        (12, 2, 8),  # 2 slots need EP >= 8: 12 is no multiple of 8 or 16
    ],
)
def test_no_failures_every_system_trains_on_what_it_can_use(nodes, slots, ds_nodes):
    cfg = SimConfig(nodes=nodes, experts=16, slots=slots, horizon_s=500, **QUIET)
    runs = {system: run(cfg, [], system) for system in SYSTEMS}
    assert runs["lazarus"]["samples"] == runs["ds_ft"]["samples"] == 500 * nodes
    assert runs["ds"]["samples"] == 500 * ds_nodes
    assert all(r["reloads"] == 0 and r["departures"] == 0 for r in runs.values())


def test_single_departure_costs_lazarus_reconfig_plus_the_step_in_flight():
    cfg = SimConfig(nodes=4, experts=4, slots=2, horizon_s=100, checkpoint_every=10**6, **QUIET)
    out = run(cfg, [(10.5, -1)], "lazarus")
    # Steps 1-10 on 4 nodes; step 11 (10 -> 11 s) dies; reconfigure 11 -> 16 s; 84 steps on 3.
    assert out["samples"] == 4 * 10 + 3 * (100 - 10 - cfg.step_s - cfg.reconfig_s)
    assert out["reloads"] == 0 and out["departures"] == 1 and out["expected_reloads"] == 0
    # On a step boundary nothing is in flight: only the reconfiguration is lost.
    on_boundary = run(cfg, [(10.0, -1)], "lazarus")
    assert on_boundary["samples"] == 4 * 10 + 3 * (100 - 10 - cfg.reconfig_s)
    # DS(FT) pays the restart and goes back to the (only) checkpoint: the start.
    ds_ft = run(cfg, [(10.5, -1)], "ds_ft")
    assert ds_ft["reloads"] == 1
    assert ds_ft["samples"] == 3 * (100 - 11 - cfg.restart_s)


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        # 10 steps (checkpoints after steps 4 and 8: 32 samples), step 11 lost, reload to 32,
        # stalled (3 slots < 4 experts) until the join at 50 s, back with 4 nodes.
        ("lazarus", 32 + 4 * (100 - 50 - 5)),  # resumes after reconfig_s (it already reloaded)
        ("ds_ft", 32 + 4 * (100 - 50 - 20)),  # resumes after restart_s
        ("ds", 32 + 4 * (100 - 50 - 20)),
    ],
)
def test_losing_every_holder_of_an_expert_forces_a_reload(system, expected):
    # One slot per node and as many experts as nodes: f is relaxed to 1, every expert has
    # exactly one holder, so any departure loses an expert (P = 0).
    cfg = SimConfig(nodes=4, experts=4, slots=1, horizon_s=100, checkpoint_every=4, **QUIET)
    assert departure_recovery_probability(cfg, alive=4, departed=1) == 0.0
    out = run(cfg, [(10.5, -1), (50.0, +1)], system)
    assert out["reloads"] == 1
    assert out["samples"] == expected


def test_recovery_probability_is_the_placement_thrifty_would_use():
    cfg = SimConfig(nodes=8, experts=16, slots=4, min_replicas=2)
    allocation = allocate_replicas([1] * 16, 8, 4, 2)
    placement = place_experts(allocation.replicas, 8, 4, min_distinct=2)
    for k in range(1, 5):
        expected = recovery_probability(placement, k)
        assert departure_recovery_probability(cfg, 8, k) == expected
    assert departure_recovery_probability(cfg, 8, 1) == 1.0  # k < f: always survivable
    assert 0 < departure_recovery_probability(cfg, 8, 2) < 1
    assert departure_recovery_probability(cfg, 8, 5) == 0.0  # 3 nodes x 4 slots < 16 experts
    with pytest.raises(ValueError, match="departed=9"):
        departure_recovery_probability(cfg, 8, 9)


def test_fatal_departures_happen_with_probability_one_minus_p():
    cfg = SimConfig(nodes=8, experts=16, slots=4, horizon_s=30, **QUIET)
    p = departure_recovery_probability(cfg, 8, 2)
    trace = [(10.5, -2)]
    seeds = range(400)
    fatal = [run(cfg, trace, "lazarus", seed=s)["reloads"] for s in seeds]
    assert set(fatal) == {0, 1}  # not the old "k >= f is always fatal" rule
    rate = sum(fatal) / len(fatal)
    sd = math.sqrt(p * (1 - p) / len(fatal))
    assert abs(rate - (1 - p)) < 4 * sd
    assert run(cfg, trace, "lazarus", seed=0)["expected_reloads"] == pytest.approx(1 - p)


def test_simultaneous_events_are_one_membership_change():
    cfg = SimConfig(nodes=8, experts=16, slots=4, horizon_s=30, **QUIET)
    split = [run(cfg, [(10.5, -1), (10.5, -1)], "lazarus", seed=s) for s in range(20)]
    joint = [run(cfg, [(10.5, -2)], "lazarus", seed=s) for s in range(20)]
    assert split == joint
    assert all(r["departures"] == 1 for r in joint)


def test_ordering_on_a_poisson_trace():
    cfg = SimConfig(nodes=8, experts=16, slots=4, horizon_s=4 * 3600, restart_s=30.0)
    trace = poisson_trace(cfg, mtbf_s=600, seed=1)
    runs = {system: run(cfg, trace, system) for system in SYSTEMS}
    assert runs["ds_ft"]["departures"] > 0
    assert runs["lazarus"]["samples"] > runs["ds_ft"]["samples"] > runs["ds"]["samples"]
    assert runs["lazarus"]["reloads"] < runs["ds_ft"]["reloads"]


def test_simulation_is_deterministic_for_a_seed():
    cfg = SimConfig(nodes=8, experts=16, slots=4, horizon_s=2 * 3600)
    trace = spot_trace(cfg, mean_gap_s=300, seed=2)
    assert run(cfg, trace, "lazarus", seed=7) == run(cfg, trace, "lazarus", seed=7)
    outcomes = {run(cfg, trace, "lazarus", seed=s)["reloads"] for s in range(10)}
    assert len(outcomes) > 1  # the seed does decide which departures are fatal


def test_simulate_all_reports_reloads_per_system():
    cfg = SimConfig(nodes=8, experts=16, slots=4, horizon_s=3600)
    out = simulate_all(cfg, mtbf_s=600, seed=0)
    assert out == simulate_all(cfg, mtbf_s=600, seed=0)
    json.dumps(out)
    for trace in out["traces"].values():
        assert set(trace["reloads"]) == set(SYSTEMS)
        assert set(trace["departures"]) == set(SYSTEMS)
        assert trace["reloads"]["ds_ft"] == trace["departures"]["ds_ft"]
        assert trace["reloads"]["lazarus"] <= trace["departures"]["lazarus"]


def test_poisson_trace_never_fails_more_nodes_than_are_alive():
    cfg = SimConfig(nodes=4, experts=4, slots=2, horizon_s=3600)
    trace = poisson_trace(cfg, mtbf_s=10, repair_s=600, seed=0)
    alive = cfg.nodes
    for _, delta in trace:
        alive += delta
        assert 0 <= alive <= cfg.nodes
    for system in SYSTEMS:
        assert run(cfg, trace, system)["samples"] >= 0


@pytest.mark.parametrize(
    "bad",
    [
        {"nodes": 0},
        {"slots": 0},
        {"experts": 0},
        {"min_replicas": 0},
        {"step_s": 0.0},
        {"step_s": -1.0},
        {"step_s": math.nan},
        {"samples_per_node": 0.0},
        {"reconfig_s": -1.0},
        {"restart_s": -0.5},
        {"checkpoint_s": -1.0},
        {"checkpoint_every": 0},
        {"horizon_s": 0.0},
        {"horizon_s": math.inf},
        {"nodes": 2, "slots": 4, "experts": 16},
    ],
)
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        SimConfig(**bad)


def test_bad_simulate_input_raises():
    cfg = SimConfig(nodes=4, experts=4, slots=2, horizon_s=100)
    with pytest.raises(ValueError, match="system='tutel'"):
        simulate(cfg, [], "tutel")
    with pytest.raises(ValueError, match="removes 5 nodes"):
        simulate(cfg, [(1.0, -5)], "lazarus")
    with pytest.raises(ValueError, match="delta must be an integer"):
        simulate(cfg, [(1.0, -0.5)], "lazarus")
    with pytest.raises(ValueError, match="samples=0"):
        simulate(cfg, [], "ds", samples=0)
    with pytest.raises(ValueError, match="mtbf_s"):
        poisson_trace(cfg, mtbf_s=0)
