"""Zen's benchmark: five sparse schemes on emulated nodes with their own rate-limited NIC.

For every rate and node count ``n`` one torchrun job runs inside an
:func:`~thrifty.bench.cluster.emulated_cluster` with one rank per node (a
shared loopback limit would hide imbalance, which is what Zen is about). The
driver prepares, once, every worker's non-zero rows for each source and
density (:func:`thrifty.zen.workloads.index_sets_at_density`: the LSTM's and
DeepFM's embedding gradients, the GPT's DGC selection, and uniformly random
rows as the adversarial case) and the analytic byte predictions. Each rank
then, per (source, density):

1. builds its sparse tensor (its real rows, random values) and the reference,
   a plain ``dist.all_reduce`` of the densified tensors;
2. per scheme (``dense``, ``agsparse``, ``sparcml``, ``omnireduce``, ``zen``
   and ``auto``, Zen's selection by measured time among BP, HC, AGsparse and
   dense, :class:`~thrifty.zen.AutoScheme`): one warm-up call whose result is
   compared with the reference (max abs error); then ``reps`` rounds in
   which every scheme makes one timed call (barrier, call, slowest rank's
   time) in turn, bytes counted by the ledger. Taking turns spreads the
   machine's load spikes (other jobs share the cores) over all schemes.

Then it trains the LSTM language model (full cl100k embedding, sparse) for a
few iterations with GradientSync and the embedding synchronised by a densified
all-reduce, AGsparse and Zen: iteration time, tokens per second, bytes.

The driver writes ``results/zen_bench.json`` and ``results/zen_bench.png``
with the ratios the issue's goals are about (:func:`goal_checks`).
Run with ``thrifty zen bench`` (root; ``--rates loopback`` runs without it,
with no rate limit) or ``python benchmarks/zen.py``.

:func:`run_analysis` is ``thrifty zen analyze``: the statistics of
:mod:`thrifty.zen.analysis` for each workload, written to
``results/zen_analysis.json`` and ``.png``.

The only module of Zen that imports the benchmark harness (``thrifty.bench``):
its result files, the emulated cluster, and the GPT model of the ``gpt_dgc``
workload, which it hands to :mod:`thrifty.zen.workloads`.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from thrifty.bench import cluster, netem
from thrifty.bench.models import build_model
from thrifty.bench.results import results_dir, write_json, write_partial
from thrifty.comm import collectives
from thrifty.sync import GradientSync
from thrifty.zen.analysis import SHARE_PARTS, SKEW_PARTS, analyze_workload
from thrifty.zen.analytic import (
    SCHEME_NAMES,
    eq1_bp_volume,
    measure_sparsity,
    predict_wire_bytes,
)
from thrifty.zen.hierarchical_hashing import h0_imbalance
from thrifty.zen.scaling import (
    DEFAULT_ALPHA,
    DEFAULT_ALPHA_PEER,
    KNOWN_SOURCES,
    SIM_NODES,
    SIM_RATES,
    SIM_SOURCES,
    compute_from_runs,
    load_calibration,
    measure_source,
    stats_record,
    sweep_source,
    validate_simulator,
)
from thrifty.zen.schemes.block_parallelism import OMNIREDUCE_BLOCK_SIZE, rows_per_block
from thrifty.zen.selection import AutoScheme
from thrifty.zen.simulator import ComputeModel, NicNetwork, PrimitiveTiming, fit_network
from thrifty.zen.sparse_rows import wire_index_dtype
from thrifty.zen.sync import make_scheme, sync_sparse
from thrifty.zen.workloads import (
    DENSITY_SOURCES,
    WORKLOADS,
    FrequencyVocabulary,
    LSTMLanguageModel,
    index_sets_at_density,
    make_workload,
    sharegpt_tokens,
)

__all__ = [
    "DENSITIES",
    "NODES",
    "RATES",
    "SCHEMES",
    "SOURCES",
    "GridError",
    "check_grid",
    "goal_checks",
    "plot_analysis",
    "prepare_inputs",
    "run_analysis",
    "run_simulation",
    "run_zen_benchmark",
    "summary_rows",
]

log = logging.getLogger(__name__)

MODULE = "thrifty.zen.benchmark"
NODES = (2, 4, 8)
RATES = ("1gbit", "10gbit")
DENSITIES = (0.001, 0.01, 0.05)
SOURCES = DENSITY_SOURCES
SCHEMES = ("dense", "agsparse", "sparcml", "omnireduce", "zen", "auto")
BASELINES = ("dense", "agsparse", "sparcml", "omnireduce")
TRAIN_CONFIGS = {"dense": None, "agsparse": "agsparse", "zen": "zen"}
TRAIN_BATCH, TRAIN_SEQ = 16, 32
GPT_MODEL = functools.partial(build_model, "gpt")
"""The ``gpt_dgc`` workload's model: the harness's GPT-style transformer."""


class GridError(ValueError):
    """A benchmark setting that cannot run; ``setting`` names it (``"nodes"``, ``"sources"``...)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def check_grid(
    nodes: Sequence[int],
    rates: Sequence[str],
    densities: Sequence[float],
    sources: Sequence[str],
    schemes: Sequence[str],
) -> None:
    """Refuse a grid the benchmark cannot run, before anything is prepared or launched.

    A rate is ``"loopback"`` (no limit: every rank on the plain loopback) or
    a NIC rate such as ``"1gbit"``.

    Raises:
        GridError: naming the setting that is wrong.
    """
    if not rates:
        raise GridError("rates", "give at least one rate ('loopback' for no limit)")
    for rate in rates:
        if rate != "loopback":
            try:
                netem.parse_rate(rate)
            except ValueError as exc:
                raise GridError("rates", f"{exc} (or 'loopback' for no limit)") from exc
    if not nodes or min(nodes) < 2:
        raise GridError("nodes", f"nodes must be >= 2 (one rank per node), got {list(nodes)}")
    if not densities or not all(0 < d <= 1 for d in densities):
        raise GridError("densities", f"densities must be in (0, 1], got {list(densities)}")
    for setting, names, known in (("sources", sources, SOURCES), ("schemes", schemes, SCHEMES)):
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            message = f"unknown {setting} {unknown or list(names)}; expected some of {known}"
            raise GridError(setting, message)


# --------------------------------------------------------------------------- driver side


def prepare_inputs(
    sources: Sequence[str],
    densities: Sequence[float],
    nodes: Sequence[int],
    train_iters: int,
    path: Path,
    seed: int = 0,
) -> dict[str, Any]:
    """Every worker's rows per (source, density), predictions per ``n``, and LSTM batches.

    Saved to ``path`` for the ranks; returns the predictions and sparsity
    statistics (JSON-able) for the report.
    """
    cells, report = [], {}
    workers = max(nodes)
    for source in sources:
        for density in densities:
            started = time.perf_counter()
            sets, num_rows, row_numel = index_sets_at_density(
                source, workers, density, seed, gpt_model=GPT_MODEL
            )
            per_block = rows_per_block(OMNIREDUCE_BLOCK_SIZE, row_numel)
            index_bytes = wire_index_dtype(num_rows).itemsize
            entry = index_bytes + 4 * row_numel
            predictions, records = {}, {}
            for n in nodes:
                stats = measure_sparsity(sets[:n], num_rows, rows_per_block=per_block)
                records[str(n)] = stats_record(stats, *h0_imbalance(sets[:n], num_rows))
                kw = {"index_bytes": index_bytes, "values_per_index": row_numel}
                predictions[str(n)] = {
                    "density": stats.density,
                    "gamma": stats.gamma,
                    "overlap": stats.overlap,
                    "skewness": stats.skewness,
                    "bytes": {s: vars(predict_wire_bytes(s, stats, **kw)) for s in SCHEME_NAMES},
                    "zen_balanced_max_rank_bytes": predict_wire_bytes(
                        "zen", stats, **kw
                    ).max_rank_bytes,
                    "eq1_bp_rank_bytes": eq1_bp_volume(
                        stats.gamma, n, stats.density, num_rows, entry
                    ),
                }
            key = f"{source}@{density:g}"
            shape = {
                "source": source,
                "density": density,
                "num_rows": num_rows,
                "row_numel": row_numel,
            }
            cells.append({"key": key, **shape, "sets": [s.to(torch.int32) for s in sets]})
            report[key] = {
                **shape,
                "nnz": [s.numel() for s in sets],
                "prepare_s": time.perf_counter() - started,
                "predicted": predictions,
                "stats": records,
            }
    train = None
    if train_iters > 0:
        tokens = sharegpt_tokens()
        vocab = FrequencyVocabulary.fit(tokens)
        ranked = vocab.encode(tokens)
        span = TRAIN_BATCH * (TRAIN_SEQ + 1)
        shard = ranked.numel() // workers
        train = {
            "vocab": vocab.size,
            "batches": [
                ranked[w * shard : w * shard + train_iters * span]
                .view(train_iters, TRAIN_BATCH, TRAIN_SEQ + 1)
                .to(torch.int32)
                for w in range(workers)
            ],
        }
    torch.save({"cells": cells, "train": train}, path)
    return report


def run_zen_benchmark(
    nodes: Sequence[int] = NODES,
    rates: Sequence[str] = RATES,
    densities: Sequence[float] = DENSITIES,
    sources: Sequence[str] = SOURCES,
    schemes: Sequence[str] = SCHEMES,
    reps: int = 5,
    train_iters: int = 6,
    train_warmup: int = 2,
    plot: bool = True,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Run the grid; write ``results/zen_bench.json`` (+ PNG).

    Each rate needs root (emulated NICs), except ``"loopback"``: all ranks on
    one node over the plain loopback (a smoke test; nothing is rate limited).

    Raises:
        GridError: a rate that is neither a NIC rate nor ``"loopback"``, an
            unknown source or scheme, a density outside (0, 1], or fewer than
            2 nodes (see :func:`check_grid`).
        NetemUnavailable: a rate other than ``"loopback"`` without root or ``tc``.
    """
    check_grid(nodes, rates, densities, sources, schemes)
    if any(rate != "loopback" for rate in rates):
        netem.check_available()
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "nodes": list(nodes),
        "rates": list(rates),
        "densities": list(densities),
        "sources": list(sources),
        "schemes": list(schemes),
        "reps": reps,
        "train_iters": train_iters,
        "train_warmup": train_warmup,
        "load_average_before": os.getloadavg(),
        "runs": {},
    }
    try:
        _run_grid(payload, nodes, rates, densities, sources, schemes, reps, timeout, started)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM: keep the (rate, n) runs that finished
        payload["seconds"] = time.perf_counter() - started
        payload["summary"] = summary_rows(payload) if payload["runs"] else []
        write_partial("zen_bench", payload, exc)
        raise
    payload["seconds"] = time.perf_counter() - started
    payload["summary"] = summary_rows(payload)
    if len({r["rate"] for r in payload["runs"].values()} - {"loopback"}) and any(
        r["rate"] == "loopback" for r in payload["runs"].values()
    ):
        payload["simulator"] = validate_simulator(payload)
    payload["goals"] = goal_checks(payload)
    path = write_json("zen_bench", payload)
    payload["json_path"] = str(path)
    if plot:
        payload["plot_path"] = str(plot_zen_bench(payload, results_dir() / "zen_bench.png"))
    return payload


def _run_grid(
    payload: dict[str, Any],
    nodes: Sequence[int],
    rates: Sequence[str],
    densities: Sequence[float],
    sources: Sequence[str],
    schemes: Sequence[str],
    reps: int,
    timeout: float,
    started: float,
) -> None:
    """Prepare the inputs, then one torchrun job per (rate, n); fills ``payload`` as they end."""
    train_iters, train_warmup = payload["train_iters"], payload["train_warmup"]
    with tempfile.TemporaryDirectory(prefix="thrifty-zen-") as tmp:
        inputs = Path(tmp) / "inputs.pt"
        iters = train_warmup + train_iters
        payload["inputs"] = prepare_inputs(sources, densities, nodes, iters, inputs)
        payload["prepare_s"] = time.perf_counter() - started
        job = {
            "inputs": str(inputs),
            "schemes": list(schemes),
            "reps": reps,
            "train_iters": train_iters,
            "train_warmup": train_warmup,
        }
        # loopback first: its runs fit the local work that `auto` adds to its model later
        for rate in sorted(rates, key=lambda r: r != "loopback"):
            if rate != "loopback" and "compute" not in job:
                done = [r for r in payload["runs"].values() if r["rate"] == "loopback"]
                if done:
                    cores = os.cpu_count() or 1
                    job["compute"] = compute_from_runs(payload, done, cores).as_dict()
            for n in nodes:
                job_start = time.perf_counter()
                if rate == "loopback":  # one node, plain loopback: no root, no rate limit
                    per_rank = cluster.run_torchrun(None, n, MODULE, job, timeout)
                else:
                    with cluster.emulated_cluster(n, rate) as emulated:
                        per_rank = cluster.run_torchrun(emulated, 1, MODULE, job, timeout)
                run = _merge_ranks(per_rank)
                run["seconds"] = time.perf_counter() - job_start
                run["load_average_after"] = os.getloadavg()
                payload["runs"][f"{rate}/{n}"] = {"rate": rate, "nodes": n, **run}
                log.info("zen bench %s, %d nodes: %.0f s", rate, n, run["seconds"])


def _merge_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Times agree on every rank (max over ranks per rep); bytes and errors are per rank."""
    first = per_rank[0]
    cells = {}
    for key, cell in first["cells"].items():
        schemes = {}
        for scheme, row in cell.items():
            sent = [r["cells"][key][scheme]["bytes"] for r in per_rank]
            schemes[scheme] = {
                "seconds": statistics.median(row["times"]),
                "times": row["times"],
                "max_rank_bytes": max(sent),
                "total_bytes": sum(sent),
                "bytes_per_rank": sent,
                "max_error": max(r["cells"][key][scheme]["error"] for r in per_rank),
                **({"chosen": row["chosen"]} if "chosen" in row else {}),
            }
        cells[key] = schemes
    return {"cells": cells, "train": first.get("train"), "primitives": first.get("primitives", [])}


def summary_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (rate, n, source, density): times, bytes vs the model, and the ratios."""
    rows = []
    for run in payload["runs"].values():
        n = run["nodes"]
        for key, schemes in run["cells"].items():
            inputs = payload["inputs"][key]
            predicted = inputs["predicted"][str(n)]
            times = {s: r["seconds"] for s, r in schemes.items()}
            others = {s: t for s, t in times.items() if s in BASELINES}
            best = min(others, key=others.__getitem__) if others else None
            model_ratio = {
                s: r["total_bytes"] / _predicted_total(predicted["bytes"][s])
                for s, r in schemes.items()
                if s in predicted["bytes"]
            }
            row = {
                "rate": run["rate"],
                "nodes": n,
                "source": inputs["source"],
                "density": inputs["density"],
                "gamma": predicted["gamma"],
                "skewness": predicted["skewness"],
                "seconds": times,
                "max_rank_bytes": {s: r["max_rank_bytes"] for s, r in schemes.items()},
                "max_error": max(r["max_error"] for r in schemes.values()),
                "bytes_vs_model": model_ratio,
                "best_baseline": best,
            }
            if "zen" in schemes:
                zen = schemes["zen"]
                row["zen_vs_balanced_model"] = (
                    zen["max_rank_bytes"] / predicted["zen_balanced_max_rank_bytes"]
                )
                row["zen_vs_eq1"] = zen["max_rank_bytes"] / predicted["eq1_bp_rank_bytes"]
            for s in ("zen", "auto"):
                if s in times and best is not None:
                    row[f"{s}_vs_best_baseline"] = times[s] / times[best]
            fixed = {s: t for s, t in times.items() if s != "auto"}
            if "auto" in times and fixed:
                row["best_scheme"] = min(fixed, key=fixed.__getitem__)
                row["auto_vs_best_scheme"] = times["auto"] / fixed[row["best_scheme"]]
                chosen = schemes["auto"].get("chosen")
                if chosen in fixed:  # the choice, timed as a fixed scheme in the same rounds
                    row["auto_choice_vs_best"] = fixed[chosen] / fixed[row["best_scheme"]]
            if "auto" in schemes:
                row["auto_chose"] = schemes["auto"].get("chosen")
            for base in BASELINES:
                if "zen" in times and base in times:
                    row[f"speedup_vs_{base}"] = times[base] / times["zen"]
            rows.append(row)
    return rows


def goal_checks(payload: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, each with the measured numbers that decide it."""
    rows = payload.get("summary") or summary_rows(payload)
    out: dict[str, Any] = {}
    ratios = [(r, s, v) for r in rows for s, v in r["bytes_vs_model"].items()]
    worst = max(ratios, key=lambda t: abs(t[2] - 1), default=None)
    outside = [{"scheme": s, "ratio": v, **_where(r)} for r, s, v in ratios if abs(v - 1) > 0.1]
    out["bytes_within_10pct_of_model"] = {
        "holds": not outside,
        "worst": None
        if worst is None
        else {"scheme": worst[1], "ratio": worst[2], **_where(worst[0])},
        "outside": outside,
    }
    zen = [r for r in rows if "zen_vs_eq1" in r]
    out["zen_bytes_within_1.1x_bp_optimum"] = {
        "holds": all(r["zen_vs_eq1"] <= 1.1 for r in zen),
        "max_vs_eq1_coo": max((r["zen_vs_eq1"] for r in zen), default=None),
        "max_vs_balanced_zen_model": max((r["zen_vs_balanced_model"] for r in zen), default=None),
    }
    auto = [r for r in rows if "auto_vs_best_scheme" in r]
    slowest = max(auto, key=lambda r: r["auto_vs_best_scheme"], default=None)
    out["auto_never_5pct_slower_than_best"] = {
        "holds": all(r["auto_vs_best_scheme"] <= 1.05 for r in auto),
        "worst": None if slowest is None else _brief(slowest),
        "violations": [_brief(r) for r in auto if r["auto_vs_best_scheme"] > 1.05],
    }
    # The same, for the scheme auto chose timed as a fixed scheme in the same rounds: the
    # quality of the choice, without the noise between two objects running one scheme.
    chose = [r for r in rows if "auto_choice_vs_best" in r]
    out["auto_choice_within_5pct_of_best"] = {
        "holds": bool(chose) and all(r["auto_choice_vs_best"] <= 1.05 for r in chose),
        "within": sum(r["auto_choice_vs_best"] <= 1.05 for r in chose),
        "of": len(chose),
        "worst": max((r["auto_choice_vs_best"] for r in chose), default=None),
        "violations": [_brief(r) for r in chose if r["auto_choice_vs_best"] > 1.05],
    }
    lstm = [r for r in rows if r["source"] == "lstm" and r["nodes"] == 8 and r["rate"] == "1gbit"]
    twice_agsparse = bool(lstm) and all(r.get("speedup_vs_agsparse", 0) >= 2 for r in lstm)
    out["lstm_n8_1gbit"] = {
        "holds": twice_agsparse,  # the headline; 5x dense is reported beside it
        "rows": [
            {
                "density": r["density"],
                "vs_agsparse": r.get("speedup_vs_agsparse"),
                "vs_dense": r.get("speedup_vs_dense"),
                "vs_omnireduce": r.get("speedup_vs_omnireduce"),
            }
            for r in lstm
        ],
        "holds_2x_agsparse": twice_agsparse,
        "holds_5x_dense": bool(lstm) and all(r.get("speedup_vs_dense", 0) >= 5 for r in lstm),
    }
    skewed = [r for r in rows if r["source"] in ("lstm", "deepfm") and "speedup_vs_omnireduce" in r]
    out["faster_than_omnireduce_under_skew"] = {
        "holds": all(r["speedup_vs_omnireduce"] > 1 for r in skewed),
        "min": min((r["speedup_vs_omnireduce"] for r in skewed), default=None),
        "slower": [_brief(r) for r in skewed if r["speedup_vs_omnireduce"] <= 1],
    }
    return out


def _predicted_total(volume: dict[str, float]) -> float:
    return volume["payload_bytes"] + volume["control_bytes"]


def _where(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("rate", "nodes", "source", "density")}


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "auto_vs_best_scheme",
        "auto_choice_vs_best",
        "best_scheme",
        "auto_chose",
        "speedup_vs_omnireduce",
    )
    return {**_where(row), **{k: row[k] for k in keys if k in row}}


def plot_zen_bench(payload: dict[str, Any], path: Path) -> Path:
    """Per rate and source: communication time of each scheme vs density, one panel per n."""
    import matplotlib  # optional: [bench]

    matplotlib.use("Agg")  # files only, no display; before pyplot is imported
    import matplotlib.pyplot as plt  # optional: [bench]

    rows = payload["summary"]
    rates, sources, nodes = payload["rates"], payload["sources"], payload["nodes"]
    panels = [(rate, source) for rate in rates for source in sources]
    size = (4.2 * len(nodes), 3.2 * len(panels))
    fig, axes = plt.subplots(len(panels), len(nodes), figsize=size, squeeze=False)
    for i, (rate, source) in enumerate(panels):
        for j, n in enumerate(nodes):
            ax = axes[i, j]
            cell = (rate, source, n)
            mine = sorted(
                (r for r in rows if (r["rate"], r["source"], r["nodes"]) == cell),
                key=lambda r: r["density"],
            )
            for k, scheme in enumerate(payload["schemes"]):
                pts = [(r["density"], r["seconds"][scheme]) for r in mine if scheme in r["seconds"]]
                if pts:
                    style = "-" if scheme in BASELINES else "--"
                    ax.plot(*zip(*pts, strict=True), "o" + style, color=f"C{k}", label=scheme)
            title = f"{source}, {n} nodes, {rate}"
            ax.set(xscale="log", yscale="log", title=title, xlabel="density", ylabel="seconds")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- analyze


def run_analysis(
    workloads: Sequence[str] = WORKLOADS,
    workers: int = 16,
    steps: int = 3,
    sizes: Sequence[int] = (2, 4, 8, 16),
    seed: int = 0,
    plot: bool = True,
    write: bool = True,
    **workload_options: Any,
) -> dict[str, Any]:
    """``thrifty zen analyze``: :func:`~thrifty.zen.analysis.analyze_workload` for each workload.

    Writes ``results/zen_analysis.json`` (+ PNG) when ``write``. The GPT
    workload runs the harness's GPT model (:data:`GPT_MODEL`).
    """
    unknown = [name for name in workloads if name not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload {unknown[0]!r}; expected some of {WORKLOADS}")
    out: dict[str, Any] = {
        "workers": workers,
        "steps": steps,
        "sizes": list(sizes),
        "workloads": {},
    }
    options = {"gpt_model": GPT_MODEL, **workload_options}
    for name in workloads:
        workload = make_workload(name, seed=seed, **options)
        out["workloads"][name] = analyze_workload(workload, workers, steps, sizes)
    if write:
        out["json_path"] = str(write_json("zen_analysis", out))
        if plot:
            out["plot_path"] = str(plot_analysis(out, results_dir() / "zen_analysis.png"))
    return out


def plot_analysis(payload: dict[str, Any], path: Path) -> Path:
    """Fig. 2 (overlap, gamma(n)) and Fig. 3 (shares of 8 parts, skewness vs parts)."""
    import matplotlib  # optional: [bench]
    import matplotlib.ticker  # optional: [bench]

    matplotlib.use("Agg")  # files only, no display; before pyplot is imported
    import matplotlib.pyplot as plt  # optional: [bench]

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    items = list(payload["workloads"].items())
    for i, (name, data) in enumerate(items):
        color = f"C{i}"
        if data["overlaps"]:
            axes[0].hist(
                data["overlaps"],
                bins=20,
                range=(0, 1),
                alpha=0.5,
                color=color,
                label=name,
                density=True,
            )
        ns = [int(n) for n in data["by_n"]]
        gammas = [data["by_n"][str(n)]["gamma"] for n in ns]
        axes[1].plot(ns, gammas, "o-", color=color, label=name)
        width = 0.8 / len(items)
        xs = [p + i * width for p in range(SHARE_PARTS)]
        axes[2].bar(xs, data["part_shares"], width=width, color=color, label=name)
        axes[3].plot(data["skewness_parts"], data["skewness"], "o-", color=color, label=name)
    ns = sorted({int(n) for _, d in items for n in d["by_n"]})
    if ns:
        axes[1].plot(ns, ns, "k--", label="no overlap (gamma = n)")
    axes[0].set(
        title="(a) overlap ratio of worker pairs", xlabel="overlap ratio", ylabel="density of pairs"
    )
    axes[1].set(
        title="(b) densification gamma(n)", xlabel="n workers", ylabel="gamma", xscale="log"
    )
    axes[2].set(
        title=f"(c) share of non-zeros in {SHARE_PARTS} equal parts", xlabel="part", ylabel="share"
    )
    axes[3].set(
        title="(d) skewness ratio",
        xlabel="equal parts",
        ylabel="max part density / d",
        xscale="log",
        yscale="log",
    )
    if ns:
        axes[1].set_xticks(ns, [str(n) for n in ns])
        axes[1].minorticks_off()
    axes[3].set_xticks(list(SKEW_PARTS), [str(k) for k in SKEW_PARTS])
    axes[3].yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axes[3].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[3].minorticks_off()
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- simulate


def run_simulation(
    sources: Sequence[str] = SIM_SOURCES,
    density: float = 0.01,
    nodes: Sequence[int] = SIM_NODES,
    rates: Sequence[str] = SIM_RATES,
    calibration: str | Path | None = None,
    with_compute: bool = False,
    plot: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Measure each source's sparsity up to ``max(nodes)`` ranks, sweep every rate, write results.

    ``calibration`` (a ``zen_bench.json`` with a fitted simulator) gives the
    per-call and per-peer latencies (their median over its rates) and, with
    ``with_compute``, this machine's local work per node.
    """
    if not nodes or min(nodes) < 2:
        raise ValueError(f"nodes must be >= 2, got {list(nodes)}")
    unknown = [s for s in sources if s not in KNOWN_SOURCES]
    if unknown or not sources:
        raise ValueError(
            f"unknown source {unknown or list(sources)}; expected some of {KNOWN_SOURCES}"
        )
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    bits = {rate: netem.parse_rate(rate) for rate in rates}
    alpha, alpha_peer, compute = DEFAULT_ALPHA, DEFAULT_ALPHA_PEER, None
    if calibration is not None:
        networks, fitted = load_calibration(calibration)
        alpha = statistics.median(n.alpha for n in networks.values())
        alpha_peer = statistics.median(n.alpha_peer for n in networks.values())
        compute = fitted if with_compute else None
    elif with_compute:
        raise ValueError("with_compute needs a calibration file (thrifty zen bench's JSON)")
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "density": density,
        "nodes": list(nodes),
        "rates": list(rates),
        "alpha_s": alpha,
        "alpha_peer_s": alpha_peer,
        "calibration": None if calibration is None else str(calibration),
        "compute": None if compute is None else compute.as_dict(),
        "load_average_before": os.getloadavg(),
        "sources": {},
    }
    if "gpt_dgc" in sources:
        options.setdefault("gpt_model", GPT_MODEL)
    # ShareGPT shards of 16k tokens per rank, so that a rank's batch reaches 1% of cl100k
    options.setdefault("max_tokens", max(2_000_000, 16_384 * max(nodes)))
    for source in sources:
        measured = measure_source(source, density, nodes, **options)
        log.info("%s: sparsity of %d ranks in %.1f s", source, max(nodes), measured["measure_s"])
        sweeps = {
            rate: sweep_source(measured, NicNetwork.from_bits(b, alpha, alpha_peer), compute)
            for rate, b in bits.items()
        }
        payload["sources"][source] = {**measured, "sweeps": sweeps}
    payload["seconds"] = time.perf_counter() - started
    payload["paper"] = {
        "nodes": 16,
        "claim": "Zen 5.09x OmniReduce / 2.82x SparCML communication, 16 nodes at 25 Gbit/s",
    }
    payload["json_path"] = str(write_json("zen_simulate", payload))
    if plot:
        payload["plot_path"] = str(plot_simulation(payload, results_dir() / "zen_simulate.png"))
    return payload


def plot_simulation(payload: Mapping[str, Any], path: Path) -> Path:
    """Predicted seconds per sync against n, one panel per (source, rate), log-log."""
    import matplotlib  # optional: [bench]

    matplotlib.use("Agg")  # files only, no display; before pyplot is imported
    import matplotlib.pyplot as plt  # optional: [bench]

    sources = list(payload["sources"])
    rates = list(payload["rates"])
    fig, axes = plt.subplots(
        len(sources), len(rates), figsize=(4.4 * len(rates), 3.3 * len(sources)), squeeze=False
    )
    colors = {scheme: f"C{i}" for i, scheme in enumerate(SCHEME_NAMES)}
    for i, source in enumerate(sources):
        for j, rate in enumerate(rates):
            ax = axes[i, j]
            sweep = payload["sources"][source]["sweeps"][rate]
            for scheme, seconds in sweep["seconds"].items():
                style = "o-" if scheme == "zen" else ".--"
                ax.plot(sweep["nodes"], seconds, style, color=colors[scheme], label=scheme)
            cross = sweep["crossover_2x"].get("agsparse")
            if cross is not None:
                ax.axvline(cross, color="grey", lw=0.8, ls=":")
            where = f"Zen 2x AGsparse from n={cross}" if cross else "Zen never 2x AGsparse"
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="nodes",
                ylabel="seconds per sync",
                title=f"{source}, {rate}\n{where}",
            )
            ax.set_xticks(sweep["nodes"], [str(n) for n in sweep["nodes"]])
            ax.minorticks_off()
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- rank side


def _sparse_tensor(rows: torch.Tensor, num_rows: int, row_numel: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_rows,) if row_numel == 1 else (num_rows, row_numel)
    values = torch.randn(rows.numel(), *shape[1:], generator=gen)
    return torch.sparse_coo_tensor(rows.reshape(1, -1), values, shape, is_coalesced=True)


def _timed_once(fn: Any) -> float:
    """One call on every rank at once; the slowest rank's seconds."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


A2A_SIZES = (256, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)
"""Bytes per peer of the timed all-to-alls that fit each job's network model."""
ALLREDUCE_SIZES = (64 << 10, 1 << 20, 16 << 20)
"""Bytes of the timed all-reduces that fit the ring's efficiency."""


def _time_primitives(reps: int = 3) -> list[dict[str, Any]]:
    """Dense all-to-alls and all-reduces of a few sizes: what the simulator's network is fitted to.

    The fastest of ``reps`` calls counts (each call's slowest rank), the one
    least disturbed by other work, as for the schemes.
    """
    n = dist.get_world_size()
    out = []
    for size in A2A_SIZES:
        chunks = list(torch.zeros(size * n, dtype=torch.uint8).split(size))
        best = min(
            _timed_once(lambda c=chunks, r=[size] * n: collectives.all_to_all_v(c, recv_sizes=r))
            for _ in range(reps)
        )
        out.append(vars(PrimitiveTiming("all_to_all", n, n - 1, float(size * (n - 1)), best)))
    for size in ALLREDUCE_SIZES:
        tensor = torch.zeros(size // 4)
        best = min(_timed_once(lambda t=tensor: dist.all_reduce(t)) for _ in range(reps))
        node_bytes = 2 * (n - 1) / n * size
        out.append(vars(PrimitiveTiming("all_reduce", n, 2 * (n - 1), node_bytes, best)))
    return out


def _bench_cell(
    cell: dict[str, Any], schemes: Sequence[str], reps: int, auto: AutoScheme | None = None
) -> dict[str, Any]:
    """Every scheme on this cell's tensors: error vs dense, then ``reps`` rounds of timed calls.

    The schemes take turns within each round, so a load spike on the machine
    (other jobs share its cores) hits them alike instead of one scheme's reps.
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    rows = cell["sets"][rank].to(torch.int64)
    tensor = _sparse_tensor(rows, cell["num_rows"], cell["row_numel"], 1000 + rank)
    reference = tensor.to_dense()
    dist.all_reduce(reference)
    reference /= n
    auto = auto or AutoScheme(profile_steps=2, criterion="time")
    objects = {name: auto if name == "auto" else make_scheme(name) for name in schemes}
    out: dict[str, Any] = {}
    for name, scheme in objects.items():
        result = sync_sparse(tensor, scheme, output="dense")  # warm-up
        out[name] = {"times": [], "error": (result - reference).abs().max().item()}
        del result
        while isinstance(scheme, AutoScheme) and scheme.chosen is None:  # its timed profile
            sync_sparse(tensor, scheme)
    ledgers = {name: collectives.CommLedger() for name in schemes}
    for _ in range(reps):
        for name, scheme in objects.items():
            with collectives.count_bytes(ledgers[name]):
                out[name]["times"].append(_timed_once(lambda s=scheme: sync_sparse(tensor, s)))
    for name, scheme in objects.items():
        out[name]["bytes"] = ledgers[name].wire_bytes / max(reps, 1)
        if isinstance(scheme, AutoScheme):
            out[name]["chosen"] = scheme.chosen
    return out


def _train_lstm(train: dict[str, Any], warmup: int, iters: int) -> dict[str, Any]:
    """The three configurations take turns, one iteration each (load spikes hit all alike)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    batches = train["batches"][rank].to(torch.int64)
    runs = {}
    for label, scheme in TRAIN_CONFIGS.items():
        torch.manual_seed(0)
        model = LSTMLanguageModel(train["vocab"])
        sync = GradientSync(model, sparse_scheme=scheme)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        runs[label] = (model, sync, opt, [], [])
    for i in range(warmup + iters):
        batch = batches[i]
        for model, _, opt, times, losses in runs.values():

            def step(m: Any = model, o: Any = opt, out: list = losses, b: Any = batch) -> None:
                o.zero_grad(set_to_none=True)
                loss = m(b[:, :-1], b[:, 1:])
                loss.backward()
                o.step()
                out.append(loss.item())

            elapsed = _timed_once(step)
            if i >= warmup:
                times.append(elapsed)
    out = {}
    for label, (_, sync, _, times, losses) in runs.items():
        seconds = statistics.median(times)
        out[label] = {
            "iteration_s": seconds,
            "times": times,
            "tokens_per_s": n * TRAIN_BATCH * TRAIN_SEQ / seconds,
            "wire_bytes_per_iter": sync.ledger.wire_bytes / (warmup + iters),
            "losses": losses,
        }
        sync.remove()
    return out


def _rank_run(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = torch.load(spec["inputs"])
    rank = dist.get_rank()
    primitives = _time_primitives()
    # `auto` chooses by the simulator: this job's network, the local work fitted on loopback
    network = fit_network([PrimitiveTiming(**t) for t in primitives])
    compute = None
    if spec.get("compute"):
        fitted = spec["compute"]
        coefficients = {k: (v[0], v[1]) for k, v in fitted["coefficients"].items()}
        compute = ComputeModel(coefficients, fitted["cores"])
    cells = {}
    for cell in data["cells"]:
        if rank == 0:
            print(f"[zen bench] {cell['key']}", file=sys.stderr, flush=True)
        auto = AutoScheme(profile_steps=2, criterion="model", network=network, compute=compute)
        cells[cell["key"]] = _bench_cell(cell, spec["schemes"], spec["reps"], auto)
    out: dict[str, Any] = {"cells": cells, "primitives": primitives}
    if data["train"] is not None and spec["train_iters"] > 0:
        out["train"] = _train_lstm(data["train"], spec["train_warmup"], spec["train_iters"])
    return out


if __name__ == "__main__":
    cluster.cluster_worker_main(_rank_run)
