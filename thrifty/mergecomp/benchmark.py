"""MergeComp's benchmark: DDP fp32 vs layer-wise, whole-model and MergeComp's search.

Per compressor, GradientSync runs three plans side by side in the same job
(through the one training harness, :mod:`thrifty.bench.training`): one group
per tensor, one group for the whole model, and the partition that MergeComp's
hybrid search picks (model-based candidates, then a few measured iterations).
The search runs to the end before timing; its iterations, seconds and trials
are recorded beside the measured iteration time of the plan it chose.

Run with ``thrifty mergecomp bench`` or ``python benchmarks/mergecomp.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from thrifty.bench.training import (
    LOOPBACK,
    Configuration,
    TrainingResult,
    compute_bound,
    ddp,
    ddp_hook,
    gradient_sync,
    run_training_benchmark,
)
from thrifty.comm import NetworkModel
from thrifty.mergecomp.online import MergeComp

__all__ = [
    "FAMILY",
    "SEARCH_OPTIONS",
    "configurations",
    "run_mergecomp_benchmark",
    "search_planner",
    "search_summary",
]

FAMILY = "MergeComp"
"""The plots' legend entry for MergeComp's rows (also in ByteComp's benchmark)."""

SEARCH_OPTIONS: dict[str, Any] = {"warmup": 2, "trial_iters": 3, "max_trials": 4, "confirm": 2}
"""The benchmark's search: 4 candidates, then the best two again, 3 timed iterations
each (plus one to settle): about 26 iterations of search."""


def search_planner(network: NetworkModel | None = None, mode: str = "hybrid") -> MergeComp:
    """A fresh MergeComp planner with the benchmark's search settings.

    ``network``: a fitted model to price candidates with; None fits one in place.
    Module-level, so that other benchmarks can ship it to their ranks (pickled).
    """
    return MergeComp(mode=mode, network=network, **SEARCH_OPTIONS)


def search_summary(planner: MergeComp) -> dict[str, Any]:
    """What MergeComp's search did on this rank: its model time, trials and choice."""
    tuner = planner.tuners[-1] if planner.tuners else None
    if tuner is None or tuner.chosen is None:
        return {}
    return {
        "search_seconds": tuner.search_seconds,
        "trials": [[list(t.lengths), t.measured, t.predicted] for t in tuner.trials],
        "chosen_lengths": list(tuner.chosen.lengths),
    }


def configurations(compressors: Sequence[str], mode: str = "hybrid") -> list[Configuration]:
    """The compute bound, DDP fp32 and PyTorch's hooks, then per compressor: layer-wise,
    whole-model and MergeComp."""
    configs = [compute_bound(), ddp(), ddp_hook("fp16"), ddp_hook("powersgd")]
    for name in compressors:
        configs += [
            gradient_sync(name, "layerwise"),
            gradient_sync(name, "whole"),
            gradient_sync(
                name,
                search_planner(mode=mode),
                label=f"{name} mergecomp",
                family=FAMILY,
                summarize=search_summary,
            ),
        ]
    return configs


def run_mergecomp_benchmark(
    model: str = "cnn",
    workers: int = 2,
    rates: Sequence[str] = (LOOPBACK,),
    compressors: Sequence[str] = ("dgc", "topk", "efsignsgd"),
    warmup: int = 3,
    iters: int = 4,
    *,
    mode: str = "hybrid",
    points: Sequence[str] = ("heavy",),
    repeats: int = 1,
    plot: bool = True,
) -> TrainingResult:
    """Time the compute bound, DDP, its hooks, layer-wise, whole-model and MergeComp.

    Writes ``results/mergecomp_<model>.json`` (+ PNG); rates, operating points
    and repeats as in :func:`thrifty.bench.training.run_training_benchmark`.
    """
    return run_training_benchmark(
        f"mergecomp_{model}",
        model,
        configurations(compressors, mode),
        rates,
        workers,
        warmup,
        iters,
        title=f"MergeComp, {model}, {workers} workers",
        points=points,
        repeats=repeats,
        plot=plot,
    )
