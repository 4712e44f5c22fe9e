"""The sparsity of real gradients (the paper's §2.1, Figs. 2-3), behind ``thrifty zen analyze``.

:func:`analyze_workload` trains a workload of :mod:`thrifty.zen.workloads` for a
few data-parallel steps with ``workers`` simulated workers (one process, each
worker its own data shard) and measures, per step, on the first ``n`` workers'
non-zero rows for ``n = 2, 4, 8, 16``:

* density ``d`` (non-zero rows / rows, mean over workers);
* overlap ratio ``|I_a & I_b| / min(|I_a|, |I_b|)`` of every pair of workers;
* densification ratio ``gamma(n) = d(sum of n) / d``;
* skewness ratio ``max part density / density`` when one worker's tensor is
  cut into ``k`` equal contiguous parts (and the share of non-zeros in each
  of 8 parts, the paper's Fig. 3);
* Zen's ``h0`` Push/Pull imbalance (Theorem 2) and the bytes each scheme
  would send per rank (:func:`thrifty.zen.predict_wire_bytes`), with the
  BP-or-HC choice of Eq. 1 vs Eq. 2.

:func:`thrifty.zen.benchmark.run_analysis` runs it for each workload and writes
``results/zen_analysis.json`` and ``results/zen_analysis.png``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from thrifty.zen.analytic import SCHEME_NAMES, measure_sparsity, predict_wire_bytes
from thrifty.zen.hierarchical_hashing import h0_imbalance
from thrifty.zen.schemes.block_parallelism import OMNIREDUCE_BLOCK_SIZE, rows_per_block
from thrifty.zen.selection import choose_bp_or_hc
from thrifty.zen.sparse_rows import wire_index_dtype
from thrifty.zen.workloads import Workload, simulate_index_sets

__all__ = [
    "SHARE_PARTS",
    "SKEW_PARTS",
    "analyze_index_sets",
    "analyze_workload",
    "skewness_curve",
]

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
            values = {
                "density": stats.density,
                "gamma": stats.gamma,
                "overlap": stats.overlap or 0.0,
                "union_skewness": stats.skewness,
                "push_imbalance": push,
                "pull_imbalance": pull,
            }
            for key, value in values.items():
                rows.setdefault(key, []).append(value)
            for scheme in SCHEME_NAMES:
                volume = predict_wire_bytes(
                    scheme,
                    stats,
                    index_bytes=index_bytes,
                    values_per_index=row_numel,
                    checked=False,
                    push_imbalance=push,
                    pull_imbalance=pull,
                )
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


def analyze_workload(
    workload: Workload, workers: int, steps: int, sizes: Sequence[int] = (2, 4, 8, 16)
) -> dict[str, Any]:
    """Train ``steps`` steps of ``workers`` simulated workers; the statistics of their rows."""
    started = time.perf_counter()
    index_sets = simulate_index_sets(workload, workers, steps)
    result = analyze_index_sets(index_sets, workload.num_rows, workload.row_numel, sizes)
    result["description"] = workload.description
    result["seconds"] = time.perf_counter() - started
    log.info("%s analysed in %.1f s", workload.name, result["seconds"])
    return result
