"""``thrifty zen analyze``: the sparsity of real gradients (the paper's §2.1, Figs. 2-3).

For each workload of :mod:`thrifty.zen.workloads`, train a few data-parallel
steps with ``workers`` simulated workers (one process, each worker its own
data shard) and measure, per step, on the first ``n`` workers' non-zero rows
for ``n = 2, 4, 8, 16``:

* density ``d`` (non-zero rows / rows, mean over workers);
* overlap ratio ``|I_a & I_b| / min(|I_a|, |I_b|)`` of every pair of workers;
* densification ratio ``gamma(n) = d(sum of n) / d``;
* skewness ratio ``max part density / density`` when one worker's tensor is
  cut into ``k`` equal contiguous parts (and the share of non-zeros in each
  of 8 parts, the paper's Fig. 3);
* Zen's ``h0`` Push/Pull imbalance (Theorem 2) and the bytes each scheme
  would send per rank (:func:`thrifty.zen.predict_wire_bytes`), with the
  BP-or-HC choice of Eq. 1 vs Eq. 2.

Results go to ``results/zen_analysis.json`` and ``results/zen_analysis.png``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from thrifty.zen.analytic import SCHEME_NAMES, measure_sparsity, predict_wire_bytes
from thrifty.zen.hierarchical_hashing import h0_imbalance
from thrifty.zen.schemes.block_parallelism import OMNIREDUCE_BLOCK_SIZE, rows_per_block
from thrifty.zen.selection import choose_bp_or_hc
from thrifty.zen.sparse_rows import wire_index_dtype
from thrifty.zen.workloads import WORKLOADS, make_workload, simulate_index_sets

__all__ = ["SKEW_PARTS", "analyze_index_sets", "plot_analysis", "run_analysis", "skewness_curve"]

log = logging.getLogger(__name__)

SKEW_PARTS = (2, 4, 8, 16, 32, 64, 128)
SHARE_PARTS = 8


def skewness_curve(rows: Tensor, num_rows: int, parts: Sequence[int] = SKEW_PARTS) -> list[float]:
    """``max part density / density`` of one tensor cut into ``k`` equal parts, for each ``k``."""
    out = []
    for k in parts:
        if rows.numel() == 0:
            out.append(1.0)
            continue
        part = torch.div(rows * k, num_rows, rounding_mode="floor")
        out.append(float(torch.bincount(part, minlength=k).max()) * k / rows.numel())
    return out


def _part_shares(rows: Tensor, num_rows: int, parts: int = SHARE_PARTS) -> list[float]:
    part = torch.div(rows * parts, num_rows, rounding_mode="floor")
    counts = torch.bincount(part, minlength=parts).double()
    return (counts / max(1, rows.numel())).tolist()


def _pairwise_overlaps(sets: Sequence[Tensor]) -> list[float]:
    out = []
    for a in range(len(sets)):
        for b in range(a + 1, len(sets)):
            small = min(sets[a].numel(), sets[b].numel())
            if small:
                out.append(torch.isin(sets[a], sets[b]).sum().item() / small)
    return out


def analyze_index_sets(
    steps: Sequence[Sequence[Tensor]],
    num_rows: int,
    row_numel: int,
    sizes: Sequence[int] = (2, 4, 8, 16),
) -> dict[str, Any]:
    """Statistics of per-step, per-worker non-zero rows (see the module docstring)."""
    workers = len(steps[0])
    per_block = rows_per_block(OMNIREDUCE_BLOCK_SIZE, row_numel)
    index_bytes = wire_index_dtype(num_rows).itemsize
    by_n: dict[int, dict[str, Any]] = {}
    for n in (s for s in sizes if s <= workers):
        rows: dict[str, list[float]] = {}
        predicted: dict[str, list[float]] = {s: [] for s in SCHEME_NAMES}
        choices = []
        for sets in steps:
            stats = measure_sparsity(list(sets[:n]), num_rows, rows_per_block=per_block)
            push, pull = h0_imbalance(list(sets[:n]), num_rows)
            values = {"density": stats.density, "gamma": stats.gamma,
                      "overlap": stats.overlap or 0.0, "union_skewness": stats.skewness,
                      "push_imbalance": push, "pull_imbalance": pull}  # fmt: skip
            for key, value in values.items():
                rows.setdefault(key, []).append(value)
            for scheme in SCHEME_NAMES:
                volume = predict_wire_bytes(
                    scheme, stats, index_bytes=index_bytes, values_per_index=row_numel,
                    checked=False, push_imbalance=push, pull_imbalance=pull,
                )  # fmt: skip
                predicted[scheme].append(volume.max_rank_bytes)
            choices.append(choose_bp_or_hc(stats.gammas, n))
        entry: dict[str, Any] = {k: statistics.mean(v) for k, v in rows.items()}
        entry["predicted_max_rank_bytes"] = {k: statistics.mean(v) for k, v in predicted.items()}
        entry["eq1_eq2_choice"] = max(set(choices), key=choices.count)
        by_n[n] = entry
    all_sets = [s for sets in steps for s in sets]
    skew = [skewness_curve(s, num_rows) for s in all_sets]
    shares = [_part_shares(s, num_rows) for s in all_sets]
    overlaps = [o for sets in steps for o in _pairwise_overlaps(list(sets))]
    return {
        "num_rows": num_rows,
        "row_numel": row_numel,
        "workers": workers,
        "steps": len(steps),
        "density": statistics.mean(s.numel() / num_rows for s in all_sets),
        "by_n": {str(n): v for n, v in by_n.items()},
        "skewness_parts": list(SKEW_PARTS),
        "skewness": [statistics.mean(col) for col in zip(*skew, strict=True)],
        "part_shares": [statistics.mean(col) for col in zip(*shares, strict=True)],
        "overlaps": overlaps,
        "overlap_mean": statistics.mean(overlaps) if overlaps else None,
    }


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
    """Analyse each workload; write ``results/zen_analysis.json`` (+ PNG) when ``write``."""
    from thrifty.bench.results import results_dir, write_json

    out: dict[str, Any] = {"workers": workers, "steps": steps, "sizes": list(sizes),
                           "workloads": {}}  # fmt: skip
    for name in workloads:
        started = time.perf_counter()
        workload = make_workload(name, seed=seed, **workload_options)
        index_sets = simulate_index_sets(workload, workers, steps)
        result = analyze_index_sets(index_sets, workload.num_rows, workload.row_numel, sizes)
        result["description"] = workload.description
        result["seconds"] = time.perf_counter() - started
        out["workloads"][name] = result
        log.info("%s analysed in %.1f s", name, result["seconds"])
    if write:
        out["json_path"] = str(write_json("zen_analysis", out))
        if plot:
            out["plot_path"] = str(plot_analysis(out, results_dir() / "zen_analysis.png"))
    return out


def plot_analysis(payload: dict[str, Any], path: Path) -> Path:
    """Fig. 2 (overlap, gamma(n)) and Fig. 3 (shares of 8 parts, skewness vs parts)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    items = list(payload["workloads"].items())
    for i, (name, data) in enumerate(items):
        color = f"C{i}"
        if data["overlaps"]:
            axes[0].hist(data["overlaps"], bins=20, range=(0, 1), alpha=0.5, color=color,
                         label=name, density=True)  # fmt: skip
        ns = [int(n) for n in data["by_n"]]
        axes[1].plot(ns, [data["by_n"][str(n)]["gamma"] for n in ns], "o-", color=color,
                     label=name)  # fmt: skip
        width = 0.8 / len(items)
        xs = [p + i * width for p in range(SHARE_PARTS)]
        axes[2].bar(xs, data["part_shares"], width=width, color=color, label=name)
        axes[3].plot(data["skewness_parts"], data["skewness"], "o-", color=color, label=name)
    ns = sorted({int(n) for _, d in items for n in d["by_n"]})
    if ns:
        axes[1].plot(ns, ns, "k--", label="no overlap (gamma = n)")
    axes[0].set(title="(a) overlap ratio of worker pairs", xlabel="overlap ratio",
                ylabel="density of pairs")  # fmt: skip
    axes[1].set(title="(b) densification gamma(n)", xlabel="n workers", ylabel="gamma",
                xscale="log")  # fmt: skip
    axes[2].set(title=f"(c) share of non-zeros in {SHARE_PARTS} equal parts", xlabel="part",
                ylabel="share")  # fmt: skip
    axes[3].set(title="(d) skewness ratio", xlabel="equal parts", ylabel="max part density / d",
                xscale="log", yscale="log")  # fmt: skip
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
