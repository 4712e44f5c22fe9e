"""Where Zen wins: the simulator fed with real sparsity, and checked against real runs.

Library code behind ``thrifty zen simulate`` and the validation in ``thrifty
zen bench`` (:mod:`thrifty.zen.benchmark` runs both and writes the files):

* :func:`measure_source` and :func:`sweep_source` measure the sparsity of real
  gradients for up to 256 ranks (many per-rank batches of one process stand in for many ranks:
  :func:`~thrifty.zen.workloads.index_sets_at_density` gives worker ``w`` the
  rows of its own shard), then predicts every scheme's sync time for
  n = 2 ... 256 nodes at 1, 10 and 25 Gbit/s with
  :func:`~thrifty.zen.simulator.simulate`, and finds the crossover ``n`` from
  which Zen is at least 2x faster than AGsparse, HC (SparCML) and
  OmniReduce.
* :func:`validate_simulator` checks the model against real runs of
  ``thrifty zen bench`` (n = 2, 4, 8, one emulated NIC per node): the network
  is fitted from the primitive timings each job takes before its cells, the
  local work from the ``loopback`` runs, and every scheme of every cell at
  every other rate is then predicted, never fitted.

The network of the sweep is a NIC of the given rate with the per-call and
per-peer latencies fitted here (``--calibration results/zen_bench.json``) or
datacenter defaults; local work is left out unless a calibration gives it
(then every node has one core of this machine): the paper's accounting is
network only.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from thrifty.zen.analytic import SCHEME_NAMES, SparsityStats, measure_sparsity
from thrifty.zen.hierarchical_hashing import h0_imbalance
from thrifty.zen.schemes.block_parallelism import OMNIREDUCE_BLOCK_SIZE, rows_per_block
from thrifty.zen.simulator import (
    ComputeModel,
    ComputeSample,
    NicNetwork,
    PrimitiveTiming,
    crossover,
    fit_compute,
    fit_network,
    scheme_work,
    simulate,
)
from thrifty.zen.sparse_rows import wire_index_dtype

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_ALPHA_PEER",
    "KNOWN_SOURCES",
    "SIM_NODES",
    "SIM_RATES",
    "SIM_SOURCES",
    "compute_from_runs",
    "describe_crossover",
    "load_calibration",
    "measure_source",
    "network_from_runs",
    "stats_from_record",
    "stats_record",
    "sweep_source",
    "validate_simulator",
]

log = logging.getLogger(__name__)

SIM_NODES = (2, 4, 8, 16, 32, 64, 128, 256)
SIM_RATES = ("1gbit", "10gbit", "25gbit")
SIM_SOURCES = ("lstm", "deepfm", "gpt_dgc", "transformer")
KNOWN_SOURCES = (*SIM_SOURCES, "uniform")
"""What ``thrifty zen simulate`` accepts: the default four and the adversarial ``uniform``."""
DEFAULT_ALPHA = 30e-6
"""Seconds per collective call without a calibration (a datacenter NIC and TCP stack)."""
DEFAULT_ALPHA_PEER = 5e-6
"""Seconds per peer message without a calibration."""
VALIDATION_LIMIT = 0.15
BEATS = ("agsparse", "sparcml", "omnireduce")


# --------------------------------------------------------------------------- stats as JSON


def stats_record(stats: SparsityStats, push: float = 1.0, pull: float = 1.0) -> dict[str, Any]:
    """A JSON-able record of the sparsity (``gammas`` keys as strings) and h0's imbalance."""
    return {
        "num_rows": stats.num_rows,
        "world_size": stats.world_size,
        "density": stats.density,
        "gammas": {str(k): v for k, v in stats.gammas.items()},
        "block_density": stats.block_density,
        "block_union_density": stats.block_union_density,
        "skewness": stats.skewness,
        "overlap": stats.overlap,
        "block_skew": None if stats.block_skew is None else list(stats.block_skew),
        "push_imbalance": push,
        "pull_imbalance": pull,
    }


def stats_from_record(record: Mapping[str, Any], nodes: int | None = None) -> SparsityStats:
    """The :class:`SparsityStats` of a record, optionally for its first ``nodes`` ranks."""
    gammas = {int(k): float(v) for k, v in record["gammas"].items()}
    n = record["world_size"] if nodes is None else nodes
    return SparsityStats(
        num_rows=record["num_rows"],
        world_size=n,
        density=record["density"],
        gammas={k: v for k, v in gammas.items() if k <= n},
        block_density=record["block_density"],
        block_union_density=record["block_union_density"],
        skewness=record["skewness"],
        overlap=record["overlap"],
        block_skew=None if record.get("block_skew") is None else tuple(record["block_skew"]),
    )


def _sizes(num_rows: int, row_numel: int) -> dict[str, int]:
    return {
        "index_bytes": wire_index_dtype(num_rows).itemsize,
        "value_bytes": 4,
        "values_per_index": row_numel,
    }


def _predict(
    scheme: str,
    record: Mapping[str, Any],
    row_numel: int,
    network: NicNetwork,
    compute: ComputeModel | None,
) -> float:
    stats = stats_from_record(record)
    return simulate(
        scheme,
        stats,
        network,
        compute,
        **_sizes(stats.num_rows, row_numel),
        push_imbalance=record.get("push_imbalance", 1.0),
        pull_imbalance=record.get("pull_imbalance", 1.0),
    ).seconds


# --------------------------------------------------------------------------- validation


def network_from_runs(runs: Sequence[Mapping[str, Any]]) -> NicNetwork:
    """One NIC model from the primitive timings of the given jobs (one job: its own network).

    On this machine a job's ranks share two cores and the kernel's TCP work,
    so the fixed cost and the rate reached depend on ``n``: the validation
    fits every job separately, from the timings it took before its cells.
    """
    timings = [PrimitiveTiming(**t) for run in runs for t in run.get("primitives", [])]
    return fit_network(timings)


def compute_from_runs(
    payload: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], cores: int
) -> ComputeModel:
    """Local work per scheme from runs on a fast link: measured minus the network's share."""
    samples = []
    for run in runs:
        network = network_from_runs([run])
        n = run["nodes"]
        for key, schemes in run["cells"].items():
            cell = payload["inputs"][key]
            record = cell["stats"][str(n)]
            stats = stats_from_record(record)
            for scheme, row in schemes.items():
                if scheme not in SCHEME_NAMES:
                    continue
                wire = _predict(scheme, record, cell["row_numel"], network, None)
                work = scheme_work(scheme, stats, values_per_index=cell["row_numel"])
                seconds = max(row["seconds"] - wire, 0.05 * row["seconds"])
                samples.append(ComputeSample(scheme, n, work, seconds))
    return fit_compute(samples, cores)


def _loopback_work(
    payload: Mapping[str, Any], loopback: Mapping[str, Any], key: str, scheme: str
) -> float | None:
    """Local work of one cell's scheme: its loopback time less the loopback network's share."""
    row = loopback["cells"].get(key, {}).get(scheme)
    if row is None:
        return None
    cell = payload["inputs"][key]
    record = cell["stats"][str(loopback["nodes"])]
    wire = _predict(scheme, record, cell["row_numel"], network_from_runs([loopback]), None)
    return max(row["seconds"] - wire, 0.0)


def _error_summary(rows: Sequence[Mapping[str, Any]], field: str) -> dict[str, Any]:
    errors = [abs(r[field]) for r in rows]
    by = {}
    for rate in dict.fromkeys(r["rate"] for r in rows):
        for n in sorted({r["nodes"] for r in rows if r["rate"] == rate}):
            mine = [abs(r[field]) for r in rows if (r["rate"], r["nodes"]) == (rate, n)]
            by[f"{rate}/{n}"] = {
                "median": statistics.median(mine),
                "within_15pct": sum(e <= VALIDATION_LIMIT for e in mine),
                "of": len(mine),
            }
    return {
        "median_abs_error": statistics.median(errors) if errors else None,
        "within_15pct": sum(e <= VALIDATION_LIMIT for e in errors),
        "predictions": len(errors),
        "holds": bool(errors) and max(errors) <= VALIDATION_LIMIT,
        "by_rate_and_nodes": by,
    }


def validate_simulator(payload: Mapping[str, Any], cores: int | None = None) -> dict[str, Any]:
    """Predicted vs measured seconds for every scheme, cell and ``n`` of every non-loopback rate.

    Needs ``loopback`` among the benchmark's rates. Each emulated job's
    network is fitted from its own primitive timings (never from its cells).
    Two predictions per row, which differ only in the local work:

    * ``predicted_s``: the work measured for the same cell and ``n`` on
      loopback (its time less the loopback network's share), which checks the
      network model alone: alpha-beta per collective and the busiest node;
    * ``predicted_model_s``: the work from :class:`ComputeModel`, fitted on
      every loopback cell (what :func:`run_simulation` can extrapolate with).
    """
    cores = cores or os.cpu_count() or 1
    runs = list(payload["runs"].values())
    loopback = {r["nodes"]: r for r in runs if r["rate"] == "loopback"}
    if not loopback:
        return {"skipped": "no loopback run: the local work cannot be measured"}
    compute = compute_from_runs(payload, list(loopback.values()), cores)
    out: dict[str, Any] = {"compute": compute.as_dict(), "networks": {}, "rows": []}
    for run in runs:
        rate, n = run["rate"], run["nodes"]
        if rate == "loopback" or n not in loopback:
            continue
        network = network_from_runs([run])
        out["networks"][f"{rate}/{n}"] = vars(network)
        for key, schemes in run["cells"].items():
            cell = payload["inputs"][key]
            record = cell["stats"][str(n)]
            for scheme, row in schemes.items():
                target = row.get("chosen", scheme) if scheme == "auto" else scheme
                if target not in SCHEME_NAMES:
                    continue
                work = _loopback_work(payload, loopback[n], key, target)
                if work is None:
                    continue
                wire = _predict(target, record, cell["row_numel"], network, None)
                modelled = _predict(target, record, cell["row_numel"], network, compute)
                out["rows"].append(
                    {
                        "rate": rate,
                        "nodes": n,
                        "source": cell["source"],
                        "density": cell["density"],
                        "scheme": scheme,
                        "measured_s": row["seconds"],
                        "network_s": wire,
                        "predicted_s": wire + work,
                        "error": (wire + work) / row["seconds"] - 1,
                        "predicted_model_s": modelled,
                        "model_error": modelled / row["seconds"] - 1,
                    }
                )
    rows = [r for r in out["rows"] if r["scheme"] != "auto"]
    out["worst"] = {
        f"{rate}/{scheme}": max(
            (abs(r["error"]) for r in rows if (r["rate"], r["scheme"]) == (rate, scheme)),
            default=None,
        )
        for rate in dict.fromkeys(r["rate"] for r in rows)
        for scheme in SCHEME_NAMES
    }
    out.update(_error_summary(rows, "error"))
    out["compute_model"] = _error_summary(rows, "model_error")
    return out


# --------------------------------------------------------------------------- the sweep


def measure_source(
    source: str, density: float, nodes: Sequence[int], seed: int = 0, **options: Any
) -> dict[str, Any]:
    """Real index sets of ``max(nodes)`` workers; the sparsity record of the first ``n``, per n."""
    from thrifty.zen.workloads import index_sets_at_density

    started = time.perf_counter()
    sets, num_rows, row_numel = index_sets_at_density(source, max(nodes), density, seed, **options)
    per_block = rows_per_block(OMNIREDUCE_BLOCK_SIZE, row_numel)
    records = {}
    for n in nodes:
        stats = measure_sparsity(sets[:n], num_rows, rows_per_block=per_block, overlap=n <= 16)
        push, pull = h0_imbalance(sets[:n], num_rows)
        records[str(n)] = stats_record(stats, push, pull)
    return {
        "source": source,
        "density": density,
        "num_rows": num_rows,
        "row_numel": row_numel,
        "nnz_per_rank": statistics.mean(s.numel() for s in sets),
        "stats": records,
        "measure_s": time.perf_counter() - started,
    }


def sweep_source(
    measured: Mapping[str, Any],
    network: NicNetwork,
    compute: ComputeModel | None = None,
    schemes: Sequence[str] = SCHEME_NAMES,
) -> dict[str, Any]:
    """Predicted seconds per scheme and ``n``, and Zen's 2x crossovers against each other scheme."""
    nodes = [int(n) for n in measured["stats"]]
    times = {
        scheme: [
            _predict(scheme, measured["stats"][str(n)], measured["row_numel"], network, compute)
            for n in nodes
        ]
        for scheme in schemes
    }
    out: dict[str, Any] = {"nodes": nodes, "seconds": times, "crossover_2x": {}}
    if "zen" in times:
        for other in (s for s in BEATS if s in times):
            out["crossover_2x"][other] = crossover(nodes, times["zen"], times[other])
        out["zen_speedup"] = {
            other: [t / z for z, t in zip(times["zen"], times[other], strict=True)]
            for other in times
            if other != "zen"
        }
    return out


def load_calibration(path: str | Path) -> tuple[dict[str, NicNetwork], ComputeModel | None]:
    """The networks and compute model a ``thrifty zen bench`` result file fitted."""
    import json

    data = json.loads(Path(path).read_text())
    fitted = data.get("simulator") or {}
    if "networks" not in fitted:
        raise ValueError(
            f"{path} has no fitted simulator: run `thrifty zen bench` with 'loopback' among "
            f"its rates (and at least one emulated rate)"
        )
    networks = {rate: NicNetwork(**net) for rate, net in fitted["networks"].items()}
    compute = None
    if "compute" in fitted:
        coefficients = {k: tuple(v) for k, v in fitted["compute"]["coefficients"].items()}
        compute = ComputeModel(coefficients, cores=None)  # one node, one core of its own
    return networks, compute


def describe_crossover(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (source, rate): Zen's crossovers and its speedups at 16 and the largest n."""
    rows = []
    for source, data in payload["sources"].items():
        for rate, sweep in data["sweeps"].items():
            nodes = sweep["nodes"]
            last = len(nodes) - 1
            at16 = nodes.index(16) if 16 in nodes else None
            speed = sweep.get("zen_speedup", {})
            rows.append(
                {
                    "source": source,
                    "rate": rate,
                    "crossover_2x": sweep["crossover_2x"],
                    "speedup_at_16": None
                    if at16 is None
                    else {k: v[at16] for k, v in speed.items()},
                    "speedup_at_max": {k: v[last] for k, v in speed.items()},
                    "max_nodes": nodes[last],
                    "gamma_at_max": data["stats"][str(nodes[last])]["gammas"].get(
                        str(nodes[last]), math.nan
                    ),
                }
            )
    return rows
