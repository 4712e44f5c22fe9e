"""Smoke tests: `thrifty zen bench` and `thrifty marconi simulate` as real processes, end to end.

Each runs the command at its smallest setting with at least two
configurations where it takes a list, writes its results to a temporary
``THRIFTY_RESULTS`` and is checked for the JSON rows and the plot. ``thrifty
zen analyze`` and ``thrifty marconi serve-trace`` already run end to end in
tests/test_zen_bench.py and tests/test_marconi_cli.py. The emulated-rate
variant needs root and ``tc`` (marked ``netem``, skipped with the reason
otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from thrifty.bench import netem
from thrifty.marconi import synthetic_trace, write_jsonl

# The `thrifty` command in a new interpreter (no console script needed).
THRIFTY = [sys.executable, "-c", "from thrifty.cli import app; app(prog_name='thrifty')"]


def _thrifty(results: Path, *args: str, timeout: float = 240) -> dict[str, Any]:
    """Run ``thrifty *args`` with results under ``results``; its output, or fail with it."""
    env = {**os.environ, "THRIFTY_RESULTS": str(results), "COLUMNS": "200"}
    done = subprocess.run(
        [*THRIFTY, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"thrifty {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return {"stdout": done.stdout}


def _zen_bench(results: Path, *rates: str) -> dict[str, Any]:
    out = _thrifty(
        results,
        "zen",
        "bench",
        "--nodes=2",
        f"--rates={','.join(rates)}",
        "--densities=0.1%,1%",
        "--sources=uniform",
        "--schemes=dense,agsparse,zen,auto",
        "--reps=1",
        "--train-iters=0",
    )
    payload = json.loads((results / "zen_bench.json").read_text())
    assert list(payload["runs"]) == [f"{rate}/2" for rate in rates]
    rows = payload["summary"]
    assert [(r["rate"], r["source"], r["density"]) for r in rows] == [
        (rate, "uniform", d) for rate in rates for d in (0.001, 0.01)
    ]
    for row in rows:
        assert set(row["seconds"]) == {"dense", "agsparse", "zen", "auto"}
        assert row["auto_chose"] in ("dense", "agsparse", "zen", "sparcml")
        assert all(t > 0 for t in row["seconds"].values())
        assert row["max_error"] < 1e-5, row  # every scheme is lossless
    assert all("holds" in goal for goal in payload["goals"].values())
    assert (results / "zen_bench.png").stat().st_size > 10_000
    assert "zen vs agsparse" in out["stdout"]
    return payload


def test_zen_bench_on_plain_loopback(tmp_path: Path) -> None:
    """``--rates loopback``: both ranks on the plain loopback, no rate limit, no root.

    Where the emulated NICs are available, the test below runs this same loopback
    job before its 1 Gbit/s one, so this one would only repeat it.
    """
    try:
        netem.check_available()
    except netem.NetemUnavailable:
        _zen_bench(tmp_path, "loopback")
    else:
        pytest.skip("covered by test_zen_bench_on_emulated_nics (loopback, then 1 Gbit/s)")


@pytest.mark.netem
def test_zen_bench_on_emulated_nics(tmp_path: Path) -> None:
    """One emulated 1 Gbit/s NIC per node, after a loopback run: the simulator is validated.

    The dense all-reduce of 16 MB takes > 0.1 s (the limit is real); the
    network fitted from the job's own timed all-to-alls has about the NIC's
    rate; every scheme of the 1 Gbit/s run gets a prediction, from the local
    work fitted on loopback. (How close they are is the benchmark's result,
    in the README, not a test's: two reps on a loaded machine prove nothing.)
    """
    try:
        netem.check_available()
    except netem.NetemUnavailable as exc:
        pytest.skip(str(exc))
    payload = _zen_bench(tmp_path, "loopback", "1gbit")
    dense = [row["seconds"]["dense"] for row in payload["summary"] if row["rate"] == "1gbit"]
    assert min(dense) > 0.1, dense  # 4M fp32 rows at 1 Gbit/s: the limit is real
    simulator = payload["simulator"]
    # The fitted rate is of the NIC's order (tbf's burst lets a few MB pass faster; gloo's
    # TCP on 2 shared cores reaches less), far below the plain loopback's.
    fitted = simulator["networks"]["1gbit/2"]["rate"]
    loopback = payload["runs"]["loopback/2"]["primitives"][-1]  # the largest all-reduce
    assert 0.2 * 125e6 < fitted < 2 * 125e6
    assert loopback["node_bytes"] / loopback["seconds"] > 2 * 125e6 > fitted
    predicted = {(r["density"], r["scheme"]) for r in simulator["rows"]}
    # auto is predicted as its choice, when the choice also ran as a fixed scheme
    fixed = {(d, s) for d in (0.001, 0.01) for s in ("dense", "agsparse", "zen")}
    assert fixed <= predicted <= fixed | {(0.001, "auto"), (0.01, "auto")}
    assert all(r["predicted_s"] > 0 for r in simulator["rows"])


def test_marconi_simulate_two_policies_two_sizes_in_worker_processes(tmp_path: Path) -> None:
    trace = write_jsonl(synthetic_trace(num_sessions=6, seed=3), tmp_path / "trace.jsonl")
    results = tmp_path / "results"
    out = _thrifty(
        results,
        "marconi",
        "simulate",
        f"--trace={trace}",
        "--policies=sglang+,marconi",
        "--sizes-gb=0.2,2",
        "--workers=2",
        "--ttft=paper",
        "--name=smoke_sweep",
    )
    payload = json.loads((results / "smoke_sweep.json").read_text())
    cells = sorted((r["policy"], r["capacity_gb"]) for r in payload["results"])
    assert cells == [("marconi", 0.2), ("marconi", 2.0), ("sglang+", 0.2), ("sglang+", 2.0)]
    assert all(0 <= r["token_hit_rate"] <= 1 for r in payload["results"])
    assert payload["workers"] == 2
    assert "marconi_never_below_sglang" in payload["goals"]
    assert (results / "smoke_sweep.png").stat().st_size > 10_000
    assert "goal marconi_never_below_sglang" in out["stdout"]


def test_zen_simulate_sweeps_real_sparsity_and_reports_crossovers(tmp_path: Path) -> None:
    """``thrifty zen simulate`` at a small setting: two sources, two rates, n up to 8."""
    out = _thrifty(
        tmp_path,
        "zen",
        "simulate",
        "--sources=deepfm,uniform",
        "--density=1%",
        "--nodes=2,4,8",
        "--rates=1gbit,25gbit",
    )
    payload = json.loads((tmp_path / "zen_simulate.json").read_text())
    assert set(payload["sources"]) == {"deepfm", "uniform"}
    for source, data in payload["sources"].items():
        assert set(data["sweeps"]) == {"1gbit", "25gbit"}
        for sweep in data["sweeps"].values():
            assert sweep["nodes"] == [2, 4, 8]
            assert set(sweep["seconds"]) == {"dense", "agsparse", "sparcml", "omnireduce", "zen"}
            assert all(t > 0 for times in sweep["seconds"].values() for t in times)
            # uniform rows barely overlap: gamma(n) ~ n, so Zen never gets 2x AGsparse there
            if source == "uniform":
                assert sweep["crossover_2x"]["agsparse"] is None
    assert payload["machine"]["load_average_at_start"]
    assert (tmp_path / "zen_simulate.png").stat().st_size > 10_000
    assert "2x AGsparse from" in out["stdout"]
