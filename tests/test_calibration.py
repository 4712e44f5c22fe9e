"""Calibration on real gloo ranks: time collectives, fit the network model and topology."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from thrifty.bench import run_ranks
from thrifty.comm.calibration import (
    CollectiveTiming,
    compute_load,
    fit_network,
    fit_report,
    fit_timings,
    measure_topology,
    time_collectives,
)
from thrifty.comm.network import PRIMITIVES, NetworkModel

SIZES = (4096, 65536, 1 << 20)


def _calibrate() -> dict:
    # Under load, as the training benchmark calibrates: the ranks must still agree.
    timings = time_collectives(PRIMITIVES, SIZES, under_load=True)
    network = fit_network("here", ["all_reduce"], SIZES)
    topology = measure_topology(SIZES, budget_s=0.0, ranks_per_node=1)
    return {
        "rows": [t.to_dict() for t in timings],
        "network": network.to_dict(),
        "topology": topology.to_dict(),
        "world": dist.get_world_size(),
    }


def test_two_ranks_fit_the_same_network_model() -> None:
    results = run_ranks(_calibrate, 2, timeout=120)
    first = results[0]
    # Every rank gets the same timings and models: decisions taken from them agree.
    assert all(r == first for r in results)
    timings = [CollectiveTiming.from_dict(r) for r in first["rows"]]
    assert [(t.primitive, t.nbytes) for t in timings] == [(p, s) for p in PRIMITIVES for s in SIZES]
    assert all(t.world_size == 2 and t.seconds > 0 and len(t.reps) == 3 for t in timings)
    network = NetworkModel.from_dict(first["network"])
    assert network.name == "here" and set(network.fits) == {"all_reduce"}
    assert network.time("all_reduce", 1 << 20, 2) > 0
    # Two nodes of one rank: a flat model only, nothing hierarchical to price.
    topology = first["topology"]
    assert (topology["nodes"], topology["ranks_per_node"]) == (2, 1)
    assert topology["intra"] is None and topology["inter"] is None
    report = fit_report(fit_timings("rows", timings), timings)
    assert report["max_abs_rel_error"] >= 0 and report["max_abs_rel_error_ge_1MB"] is not None


def test_timing_round_trips_through_its_json_row() -> None:
    timing = CollectiveTiming("all_gather", 4, 1 << 20, 0.01, (0.01, 0.02, 0.009))
    row = {**timing.to_dict(), "rate": "1gbit"}  # benchmarks add their own keys
    assert CollectiveTiming.from_dict(row) == timing
    assert timing.measurement.seconds == 0.01


def test_unknown_primitive_is_refused_before_any_collective() -> None:
    with pytest.raises(ValueError, match="broadcast"):
        time_collectives(["broadcast"], SIZES)  # raises before touching a process group


def test_compute_load_keeps_a_thread_busy_and_stops_it() -> None:
    """What the under-load calibration runs beside each collective (tested above on 2 ranks)."""

    def loaders() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "thrifty-compute-load"]

    with compute_load():
        started = time.process_time()
        time.sleep(0.2)  # this thread sleeps; the CPU time is the load's
        busy = time.process_time() - started
        assert len(loaders()) == 1
    assert busy > 0.05, busy
    assert loaders() == []
