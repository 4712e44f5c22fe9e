"""End-to-end gradient-compression benchmark: iteration time on real ranks, side by side.

For one model on N gloo ranks (inside a rate-limited namespace), every
configuration is timed in the same run, so the ratios are fair on a shared,
noisy machine:

* PyTorch DDP fp32 (the baseline), and DDP with PyTorch's ``powerSGD_hook``;
* thrifty GradientSync, layer-wise and whole-model, for each compressor.

Before training, each rank profiles the model locally (ready times, compression
costs); the timeline then predicts each thrifty configuration from the profile
and the NetworkModel fitted by ``thrifty bench collectives``, and the result
records predicted beside measured.

Run with ``thrifty compress bench --model cnn --workers 2 --rate 1gbit``.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from thrifty.bench import netem
from thrifty.bench.launch import run_ranks
from thrifty.bench.models import build_model, count_parameters
from thrifty.bench.results import results_dir, write_json
from thrifty.comm import NetworkModel
from thrifty.compressors import available_compressors
from thrifty.sync import GradientSync, Group, Plan, Strategy
from thrifty.sync.engine import get_planner
from thrifty.sync.profile import profile_model
from thrifty.sync.timeline import simulate

__all__ = ["DEFAULT_OPTIONS", "configurations", "run_training_benchmark"]

log = logging.getLogger(__name__)

# Compressor options used by the benchmarks (the papers' usual settings).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "topk": {"ratio": 0.01},
    "randomk": {"ratio": 0.01},
    "dgc": {"ratio": 0.01},
    "powersgd": {"rank": 4},
}
# Planner settings for the benchmark: 4 candidates, then the best two again,
# 3 timed iterations each (plus one to settle): about 26 iterations of search.
PLANNER_OPTIONS: dict[str, dict[str, Any]] = {
    "mergecomp": {"warmup": 2, "trial_iters": 3, "max_trials": 4, "confirm": 2},
}
BATCH: dict[str, dict[str, int]] = {
    "cnn": {"batch_size": 16},
    "gpt": {"batch_size": 4, "seq_len": 128},
    "digits": {"batch_size": 64},
}


def configurations(
    compressors: Sequence[str],
    plans: Sequence[str] = ("layerwise", "whole"),
    powersgd_hook: bool = True,
) -> list[dict[str, Any]]:
    """DDP fp32, DDP + PowerSGD hook, then thrifty with each plan per compressor."""
    configs: list[dict[str, Any]] = [{"label": "DDP fp32", "kind": "ddp"}]
    if powersgd_hook:
        configs.append({"label": "DDP powerSGD_hook r4", "kind": "ddp_powersgd"})
    for name in compressors:
        for plan in plans:
            configs.append(
                {
                    "label": f"{name} {plan}",
                    "kind": "thrifty",
                    "compressor": name,
                    "plan": plan,
                    "options": DEFAULT_OPTIONS.get(name, {}),
                    "planner_options": PLANNER_OPTIONS.get(plan, {}),
                }
            )
    return configs


def _loss(model_name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    x, y = batch
    if model_name == "gpt":
        return model(x, y)[1]
    return F.cross_entropy(model(x), y)


def time_iterations(
    model_name: str,
    wrapped: nn.Module,
    sync: GradientSync | None,
    batch: tuple[torch.Tensor, torch.Tensor],
    warmup: int,
    iters: int,
) -> tuple[list[float], int]:
    """Seconds of each of ``iters`` SGD iterations after ``warmup``, and the tuner's iterations.

    A MergeComp tuner (the sync's first iteration callback) first searches to
    the end, at most 100 iterations, so that only the chosen plan is timed.
    """
    opt = torch.optim.SGD(wrapped.parameters(), lr=1e-3, momentum=0.9)
    tuner = sync.iteration_callbacks[0] if sync and sync.iteration_callbacks else None
    search = 0
    while tuner is not None and tuner.chosen is None and search < 100:
        opt.zero_grad(set_to_none=True)
        _loss(model_name, wrapped, batch).backward()
        opt.step()
        search += 1
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _loss(model_name, wrapped, batch).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, search


def _wrap(config: dict[str, Any], model: nn.Module) -> tuple[nn.Module, GradientSync | None]:
    if config["kind"] == "ddp":
        return DDP(model), None
    if config["kind"] == "ddp_powersgd":
        # One bucket: powerSGD_hook launches its second all-reduce from a future
        # callback, and with several buckets on gloo the ranks then interleave
        # collectives in different orders (seen here as a size-mismatch abort).
        ddp = DDP(model, bucket_cap_mb=1024)
        # PyTorch requires start_powerSGD_iter > 1; the warm-up covers the
        # plain all-reduce iterations before it.
        state = powerSGD.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powerSGD.powerSGD_hook)
        return ddp, None
    name = config["compressor"]
    if config["plan"] not in ("layerwise", "whole"):
        planner = get_planner(config["plan"], **config.get("planner_options", {}))
        sync = GradientSync(
            model, compressor=None if name == "none" else name, plan=planner, **config["options"]
        )
        return model, sync
    sync = GradientSync(
        model, compressor=None if name == "none" else name, plan=config["plan"], **config["options"]
    )
    return model, sync


def _rank_benchmark(
    model_name: str, configs: list[dict[str, Any]], warmup: int, iters: int, network: dict | None
) -> dict[str, Any]:
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    probe = build_model(model_name)
    batch = probe.example_batch(**BATCH[model_name], generator=torch.Generator().manual_seed(rank))
    numel = count_parameters(probe, trainable_only=True)

    # Local profile (no communication) for the timeline's predictions.
    strategies = {
        c["label"]: Strategy.make(
            c["compressor"] if c["compressor"] != "none" else None, **c["options"]
        )
        for c in configs
        if c["kind"] == "thrifty"
    }
    opt = torch.optim.SGD(probe.parameters(), lr=1e-3, momentum=0.9)
    profile = profile_model(
        probe,
        lambda: _loss(model_name, probe, batch),
        opt,
        iters=3,
        warmup=1,
        compressors=list(set(strategies.values())),
        world_size=n,
    )
    net = NetworkModel.from_dict(network) if network else None

    rows = []
    bar = tqdm(configs, desc=model_name, disable=rank != 0, file=sys.stderr, leave=False)
    for config in bar:
        bar.set_postfix_str(config["label"])
        torch.manual_seed(0)
        model = build_model(model_name)
        wrapped, sync = _wrap(config, model)
        tuner = sync.iteration_callbacks[0] if sync and sync.iteration_callbacks else None
        times, search_iters = time_iterations(model_name, wrapped, sync, batch, warmup, iters)
        slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        row: dict[str, Any] = {**config, "iteration_s": slowest.item(), "times": times}
        if tuner is not None and tuner.chosen is not None:
            row["search_iterations"] = search_iters
            row["search_seconds"] = tuner.search_seconds
            row["trials"] = [(t.lengths, t.measured, t.predicted) for t in tuner.trials]
            row["chosen_lengths"] = tuner.chosen.lengths
        if sync is not None:
            row["wire_bytes_per_iter"] = sync.ledger.wire_bytes / (search_iters + warmup + iters)
            row["plan"] = sync.plan.describe()[:200]
            row["groups"] = len(sync.plan.groups)
            if net is not None:
                # The engine's own plan, with the strategy the profile measured.
                strategy = strategies[config["label"]]
                plan = Plan(tuple(Group(g.names, strategy) for g in sync.plan.groups))
                row["predicted_s"] = simulate(profile, plan, net, n).iteration
            sync.remove()
        else:
            row["wire_bytes_per_iter"] = (
                2 * (n - 1) / n * 4 * numel if config["kind"] == "ddp" else None
            )
        rows.append(row)
        del wrapped, model, opt
    return {"rows": rows, "profile": profile.to_dict(), "parameters": numel} if rank == 0 else {}


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    return run_ranks(
        _rank_benchmark,
        spec["workers"],
        spec["model"],
        spec["configs"],
        spec["warmup"],
        spec["iters"],
        spec["network"],
        timeout=spec["timeout"],
    )[0]


def run_training_benchmark(
    model: str = "cnn",
    workers: int = 2,
    rates: Sequence[str] = ("1gbit",),
    compressors: Sequence[str] | None = None,
    warmup: int = 3,
    iters: int = 4,
    network_json: str | Path | None = None,
    plot: bool = True,
    plans: Sequence[str] = ("layerwise", "whole"),
    name: str = "compress",
) -> dict[str, Any]:
    """Time every configuration at every rate; write results/<name>_<model>.json (+ PNG)."""
    compressors = list(compressors or [c for c in available_compressors() if c != "none"])
    configs = configurations(compressors, plans, powersgd_hook=name == "compress")
    network_json = Path(network_json or results_dir() / "collectives.json")
    out: dict[str, Any] = {"model": model, "workers": workers, "rates": {}, "batch": BATCH[model]}
    for rate in rates:
        try:
            network = NetworkModel.load(network_json, rate).to_dict()
        except (OSError, KeyError) as exc:
            log.warning("no fitted network model for %s (%s): no timeline predictions", rate, exc)
            network = None
        spec = {
            "workers": workers,
            "model": model,
            "configs": configs,
            "warmup": warmup,
            "iters": iters,
            "network": network,
            "timeout": 3600,
        }
        result = netem.run_worker(rate, "thrifty.bench.training", spec)
        base = next(r["iteration_s"] for r in result["rows"] if r["kind"] == "ddp")
        for row in result["rows"]:
            row["speedup_vs_ddp"] = base / row["iteration_s"]
            if "predicted_s" in row:
                row["prediction_error"] = (row["predicted_s"] - row["iteration_s"]) / row[
                    "iteration_s"
                ]
        out["rates"][rate] = result
    path = write_json(f"{name}_{model}", out)
    out["json_path"] = str(path)
    if plot:
        out["plot_path"] = str(plot_training(out, results_dir() / f"{name}_{model}.png"))
    return out


def plot_training(payload: dict[str, Any], path: Path) -> Path:
    """Bars: measured iteration time per configuration; dots: the timeline's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(payload["rates"])
    fig, axes = plt.subplots(len(rates), 1, figsize=(14, 4 * len(rates)), squeeze=False)
    for ax, rate in zip(axes[:, 0], rates, strict=True):
        rows = payload["rates"][rate]["rows"]
        xs = range(len(rows))
        colors = [
            "C3" if r["kind"] != "thrifty" else ("C0" if r["plan"] == "layerwise" else "C2")
            for r in rows
        ]
        ax.bar(xs, [r["iteration_s"] for r in rows], color=colors)
        pred = [(i, r["predicted_s"]) for i, r in enumerate(rows) if "predicted_s" in r]
        if pred:
            ax.plot(*zip(*pred, strict=True), "k.", label="timeline prediction")
            ax.legend()
        ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("iteration (s)")
        ax.set_title(
            f"{payload['model']}, {payload['workers']} workers, {rate}: "
            "red = PyTorch DDP, blue = layer-wise, green = whole-model"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    netem.worker_main(_worker)
