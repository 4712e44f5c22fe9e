"""What the run-time guards cost: ``nonfinite="raise"`` against ``"off"``, side by side.

``GradientSync`` and the DDP compression hook check every gradient for NaN/Inf
by default and agree on the count across ranks inside the collective they
already run (a lossless path widens its all-reduce by one element; a
compressed path sends the count beside its payload). This benchmark measures
that price where it would show: one training iteration of the benchmark CNN
and GPT (:mod:`thrifty.bench.models`), on plain loopback (no emulated network,
so the guard is the largest possible share of the iteration).

For every model and every compressor (fp32 and Top-k 1% by default), each
rank builds two copies of the model, one synced with ``nonfinite="off"`` and
one with ``"raise"`` (same seed, same batch), and times them interleaved:
``rounds`` rounds of ``iters`` iterations each, the order alternating per round,
each iteration bracketed by barriers and its time the slowest rank's. The
median of each mode gives the overhead ``raise / off - 1``; the issue's target
is at most 2%.

Writes ``results/sync_guards.json`` (machine info and the load average before
the start included) and ``results/sync_guards.png``. Run with
``thrifty compress bench-guards``.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from thrifty.bench.launch import run_ranks
from thrifty.bench.models import build_model
from thrifty.bench.results import results_dir, write_json
from thrifty.bench.training import BATCH, DEFAULT_OPTIONS, training_loss
from thrifty.sync import GradientSync

__all__ = ["MODES", "plot_guards", "run_guard_benchmark"]

MODES = ("off", "raise")
"""The settings of ``GradientSync(nonfinite=...)`` compared ("skip" costs what "raise" does)."""


def _rank_guards(model_name: str, compressor: str, rounds: int, iters: int) -> dict[str, list]:
    """One rank: time both modes interleaved; returns each mode's slowest-rank times."""
    torch.manual_seed(0)
    base = build_model(model_name)
    name = None if compressor == "fp32" else compressor
    batch = base.example_batch(
        **BATCH[model_name], generator=torch.Generator().manual_seed(dist.get_rank())
    )
    steps = {}
    for mode in MODES:
        model = copy.deepcopy(base)
        GradientSync(model, name, nonfinite=mode, **DEFAULT_OPTIONS.get(compressor, {}))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            training_loss(model_name, model, batch).backward()
            opt.step()

        steps[mode] = step
        step()  # warm-up
    times: dict[str, list] = {mode: [] for mode in MODES}
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            for _ in range(iters):
                dist.barrier()
                start = time.perf_counter()
                steps[mode]()
                slowest = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                times[mode].append(slowest.item())
    return times


def run_guard_benchmark(
    models: Sequence[str] = ("cnn", "gpt"),
    compressors: Sequence[str] = ("fp32", "topk"),
    workers: int = 2,
    rounds: int = 6,
    iters: int = 3,
    *,
    plot: bool = True,
    name: str = "sync_guards",
) -> dict[str, Any]:
    """Time ``nonfinite="raise"`` against ``"off"`` for each model and compressor.

    Returns the payload written to ``results/<name>.json``: one row per
    (model, compressor) with each mode's median iteration and the overhead.
    """
    if rounds < 1 or iters < 1 or workers < 1:
        raise ValueError(
            f"need rounds, iters and workers >= 1, got {rounds=}, {iters=}, {workers=}"
        )
    load_before = os.getloadavg()
    rows = []
    for model_name in models:
        for compressor in compressors:
            times = run_ranks(
                _rank_guards, workers, model_name, compressor, rounds, iters, timeout=1800
            )[0]
            median = {mode: statistics.median(times[mode]) for mode in MODES}
            rows.append(
                {
                    "model": model_name,
                    "compressor": compressor,
                    "median_s": median,
                    "min_s": {mode: min(times[mode]) for mode in MODES},
                    "overhead": median["raise"] / median["off"] - 1,
                    "samples": len(times["off"]),
                    "times": times,
                }
            )
    payload: dict[str, Any] = {
        "workers": workers,
        "rounds": rounds,
        "iters": iters,
        "rate": "loopback",
        "target_overhead": 0.02,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }
    payload["json_path"] = str(write_json(name, payload))
    if plot:
        payload["plot_path"] = str(plot_guards(payload, results_dir() / f"{name}.png"))
    return payload


def plot_guards(payload: Mapping[str, Any], path: Path) -> Path:
    """One bar pair per (model, compressor): median iteration with the guard off and on."""
    import matplotlib  # optional: [bench]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: [bench]

    rows = payload["rows"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(rows) + 1), 4.0))
    width = 0.38
    for i, mode in enumerate(MODES):
        xs = [j + (i - 0.5) * width for j in range(len(rows))]
        ax.bar(xs, [1e3 * r["median_s"][mode] for r in rows], width, label=f"nonfinite={mode!r}")
    for j, row in enumerate(rows):
        top = 1e3 * max(row["median_s"].values())
        ax.annotate(f"{100 * row['overhead']:+.1f}%", (j, top), ha="center", va="bottom")
    ax.set_xticks(range(len(rows)), [f"{r['model']} {r['compressor']}" for r in rows])
    ax.set_ylabel("median iteration (ms)")
    ax.set_title(f"NaN/Inf guard cost, {payload['workers']} ranks, loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
