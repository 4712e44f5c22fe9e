"""ByteComp benchmark: per-tensor strategies vs uniform ones, other planners and PyTorch DDP.

One torchrun job per topology (an emulated cluster of nodes with their own
rate-limited NIC, :mod:`thrifty.bench.cluster`; or one node whose ranks share
a rate-limited loopback, or the plain loopback). Inside the job every rank:

1. calibrates the topology's network models (flat, intra-node, inter-node;
   :func:`thrifty.comm.calibration.measure_topology`);
2. profiles the model locally (all ranks at once, so the cores are as busy as
   in training) with every compressor's measured cost;
3. rank 0 decides, from its profile and the calibrated topology, for each
   compressor: the best *uniform* strategy (every unit the same option, scored
   by the timeline over layer-wise and ByteComp's units), ByteComp's plan, and
   the "compression at zero cost" bound; the plans are broadcast;
4. every configuration trains side by side in the same job, through the one
   training harness (:mod:`thrifty.bench.training`): the compute bound (no
   communication), DDP fp32, DDP with PyTorch's ``fp16_compress_hook`` and
   ``powerSGD_hook``, and per compressor layer-wise, whole-model, the uniform
   plan, each planner the caller compares with (``comparisons``: the CLI
   passes MergeComp's search) and ByteComp's plan; measured beside predicted.

Steps 2-4 run once per operating point (:mod:`thrifty.bench.operating_points`:
the default batch, and a GPU-like one chosen by measurement before the job).

Run with ``thrifty bytecomp bench`` (root for emulated NICs; ``--rate loopback
--topologies 1x2`` runs anywhere) or ``python benchmarks/bytecomp.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from thrifty.bench import cluster, netem
from thrifty.bench.models import GPT, MODEL_NAMES, build_model, count_parameters
from thrifty.bench.operating_points import operating_points
from thrifty.bench.results import interrupted_by, note_partial, write_json
from thrifty.bench.training import (
    DEFAULT_OPTIONS,
    HOOKS,
    LOOPBACK,
    Configuration,
    TrainingResult,
    TrainingRun,
    check_rates,
    compute_bound,
    ddp,
    ddp_hook,
    decode_objects,
    encode_objects,
    gradient_sync,
    profile_training_model,
    time_configurations,
)
from thrifty.bytecomp.decide import decide, make_units, zero_cost_profile
from thrifty.bytecomp.online import spare_cores
from thrifty.bytecomp.tree import Constraints, options
from thrifty.comm import NetworkModel, Topology
from thrifty.comm.calibration import measure_topology
from thrifty.compressors import available_compressors
from thrifty.sync import Group, Plan, Planner, Strategy
from thrifty.sync.profile import Profile, profile_model
from thrifty.sync.timeline import simulate

__all__ = [
    "BYTECOMP",
    "TOPOLOGIES",
    "UNIFORM",
    "run_bytecomp_benchmark",
    "run_selection_benchmark",
    "summary_rows",
]

# (nodes, ranks per node): 2 nodes with 2 ranks each behind their own NIC, and
# one node whose 2 ranks share one rate-limited link.
TOPOLOGIES = ((2, 2), (1, 2))
COMPRESSORS = ("randomk", "dgc", "efsignsgd")
CALIBRATION_SIZES = (16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20)
MODULE = "thrifty.bytecomp.benchmark"  # also when this file runs as __main__

# The plots' legend entries for this benchmark's own rows.
UNIFORM = "best uniform"
BYTECOMP = "ByteComp"

PlannerFactory = Callable[[NetworkModel], Planner]
"""Builds a planner to compare with, given the job's calibrated flat network model."""


def _decide_all(
    profile: Profile, topology: Topology, compressors: Sequence[str]
) -> list[dict[str, Any]]:
    """Rank 0: per compressor, the best uniform plan, ByteComp's plan and the bound."""
    # Every emulated node's ranks run on this one machine.
    constraints = Constraints(offload=spare_cores(topology.world_size))
    decided = []
    for name in compressors:
        base = Strategy.make(name, **DEFAULT_OPTIONS.get(name, {}))
        started = time.perf_counter()
        decision = decide(profile, base, topology, constraints=constraints)
        seconds = time.perf_counter() - started
        bound = decide(zero_cost_profile(profile), base, topology, constraints=constraints)
        # Best uniform: one option for every unit (layer-wise, or ByteComp's units).
        layouts = [make_units(profile, 0), make_units(profile, decision.bucket_bytes)]
        uniform: tuple[float, Plan] | None = None
        for units in layouts:
            for option in options([base], topology, constraints):
                if option.compressor is None:
                    continue
                plan = Plan(tuple(Group(u.names, option) for u in units))
                t = simulate(profile, plan, topology).iteration
                if uniform is None or t < uniform[0]:
                    uniform = (t, plan)
        assert uniform is not None
        decided.append(
            {
                "compressor": name,
                "offload_allowed": constraints.offload,
                "uniform_plan": uniform[1].to_dict(),
                "uniform_predicted_s": uniform[0],
                "bytecomp_plan": decision.plan.to_dict(),
                "bytecomp_predicted_s": decision.predicted,
                "bound_s": bound.predicted,
                "decide_s": seconds,
                "bucket_bytes": decision.bucket_bytes,
            }
        )
    return decided


def _histogram(plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in plan.groups:
        counts[g.strategy.label()] = counts.get(g.strategy.label(), 0) + len(g.names)
    return counts


def _configurations(
    decided: list[dict[str, Any]],
    comparisons: Mapping[str, PlannerFactory],
    topology: Topology,
    k: int,
) -> list[Configuration]:
    """The bound, DDP and its hooks, then per compressor: layer-wise, whole, uniform, the
    comparisons, ByteComp."""
    configs = [compute_bound(), ddp(), ddp_hook("fp16"), ddp_hook("powersgd")]
    for d in decided:
        name = d["compressor"]
        uniform = Plan.from_dict(d["uniform_plan"])
        configs += [gradient_sync(name, p, ranks_per_node=k) for p in ("layerwise", "whole")]
        configs.append(
            gradient_sync(
                name,
                uniform,
                label=f"{name} uniform",
                family=UNIFORM,
                ranks_per_node=k,
                predicted_s=d["uniform_predicted_s"],
                extra={"strategy": uniform.groups[0].strategy.label()},
            )
        )
        for family, factory in comparisons.items():
            configs.append(
                gradient_sync(
                    name,
                    factory(topology.flat),
                    label=f"{name} {family}",
                    family=family,
                    ranks_per_node=k,
                )
            )
        plan = Plan.from_dict(d["bytecomp_plan"])
        configs.append(
            gradient_sync(
                name,
                plan,
                label=f"{name} bytecomp",
                family=BYTECOMP,
                ranks_per_node=k,
                predicted_s=d["bytecomp_predicted_s"],
                bound_s=d["bound_s"],
                extra={
                    "decide_s": d["decide_s"],
                    "bucket_bytes": d["bucket_bytes"],
                    "strategies": _histogram(plan),
                },
            )
        )
    return configs


def _rank_run(spec: dict[str, Any]) -> dict[str, Any] | None:
    """Every rank of the torchrun job: calibrate, profile, decide (rank 0), time."""
    rank, n = dist.get_rank(), dist.get_world_size()
    k = int(os.environ.get("LOCAL_WORLD_SIZE", n))
    torch.set_num_threads(1)
    topology = measure_topology(
        CALIBRATION_SIZES,
        budget_s=spec["calibration_s"],
        ranks_per_node=k,
        progress=rank == 0,
        under_load=spec.get("under_load", False),
    )
    comparisons: dict[str, PlannerFactory] = decode_objects(spec["comparisons"])
    bases = [Strategy.make(c, **DEFAULT_OPTIONS.get(c, {})) for c in spec["compressors"]]
    out: dict[str, Any] = {"topology": topology.to_dict(), "models": {}}
    for key, model_name, point in spec["runs"]:
        batch = point["batch"]
        profile = profile_training_model(model_name, bases, n, batch)
        shared = [_decide_all(profile, topology, spec["compressors"]) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        decided: list[dict[str, Any]] = shared[0]  # type: ignore[assignment]
        configs = _configurations(decided, comparisons, topology, k)

        def predict(plan: Plan, profile: Profile = profile) -> float:
            return simulate(profile, plan, topology).iteration

        rows = time_configurations(
            model_name,
            configs,
            spec["warmup"],
            spec["iters"],
            batch_size=batch,
            repeats=spec["repeats"],
            predict=predict,
        )
        meta = {
            "parameters": count_parameters(build_model(model_name), trainable_only=True),
            "tensors": len(profile.tensors),
            "offload_allowed": decided[0]["offload_allowed"] if decided else None,
            "profile": profile.to_dict(),
            "model": model_name,
            "point": point["name"],
            "batch": batch,
        }
        out["models"][key] = TrainingRun(rows, meta).to_dict()
    return out if rank == 0 else None


def _single_node_job(spec: dict[str, Any]) -> Any:
    """Inside a rate-limited namespace (or on plain loopback): one node, its ranks sharing it."""
    job = cluster.run_torchrun(None, spec["ranks_per_node"], MODULE, spec["job"], spec["timeout"])
    return job[0]


def check_topologies(topologies: Sequence[tuple[int, int]], rate: str) -> None:
    """Raise ValueError naming a topology that cannot run at ``rate``."""
    if not topologies:
        raise ValueError("need at least one topology, e.g. (1, 2)")
    for nodes, k in topologies:
        if nodes < 1 or k < 1:
            raise ValueError(f"topology {nodes}x{k}: nodes and ranks per node must be >= 1")
        if nodes > 1 and rate == LOOPBACK:
            raise ValueError(
                f"topology {nodes}x{k} emulates {nodes} NICs and needs a rate such as '1gbit'; "
                f"'{LOOPBACK}' runs one node only (e.g. 1x{k})"
            )


def run_bytecomp_benchmark(
    models: Sequence[str] = ("cnn", "gpt"),
    topologies: Sequence[tuple[int, int]] = TOPOLOGIES,
    rate: str = "1gbit",
    compressors: Sequence[str] = COMPRESSORS,
    warmup: int = 2,
    iters: int = 4,
    *,
    comparisons: Mapping[str, PlannerFactory] | None = None,
    calibration_s: float = 0.3,
    under_load: bool = False,
    points: Sequence[str] = ("heavy",),
    repeats: int = 1,
    plot: bool = True,
    timeout: float = 5400.0,
) -> TrainingResult:
    """Run every topology; write results/bytecomp.json (+ PNG).

    Each model runs at each operating point (``points``, see
    :mod:`thrifty.bench.operating_points`; measured here before the jobs), the
    whole list of configurations ``repeats`` times in interleaved rounds.

    Args:
        rate: each node's NIC (``"1gbit"``; root), or ``"loopback"`` for one
            node on the plain loopback.
        comparisons: planners to time beside ByteComp, by legend name, each
            built in the job from the calibrated flat network model (module-level
            factories: they travel to the ranks pickled), e.g.
            ``{"MergeComp": thrifty.mergecomp.benchmark.search_planner}``.
        calibration_s: seconds of repetitions per calibration point.
        under_load: calibrate every collective while each rank also computes
            (:func:`thrifty.comm.calibration.compute_load`), as in training.
    """
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        raise ValueError(f"unknown models {unknown}; expected some of {list(MODEL_NAMES)}")
    unknown = [c for c in compressors if c not in available_compressors() or c == "none"]
    if unknown or not compressors:
        raise ValueError(
            f"bad compressors {list(compressors)}; expected some of "
            f"{[c for c in available_compressors() if c != 'none']}"
        )
    check_rates([rate])
    check_topologies(topologies, rate)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    resolved = {m: operating_points(m, points) for m in models}
    several = len(points) > 1
    runs = [
        (f"{m} {p.name}" if several else m, m, p.to_dict()) for m in models for p in resolved[m]
    ]
    job = {
        "runs": runs,
        "repeats": repeats,
        "compressors": list(compressors),
        "warmup": warmup,
        "iters": iters,
        "calibration_s": calibration_s,
        "under_load": under_load,
        "comparisons": encode_objects(dict(comparisons or {})),
        "timeout_s": timeout,
    }
    shapes: dict[str, Any] = {}
    settings = {
        "rate": rate,
        "calibrated_under_load": under_load,
        "models": list(models),
        "compressors": list(compressors),
        "comparisons": list(comparisons or {}),
        "warmup": warmup,
        "iters": iters,
        "repeats": repeats,
        "points": [p.to_dict() for pts in resolved.values() for p in pts],
        "topologies": shapes,
    }
    title = f"ByteComp, {rate} per node (nodes x ranks, model)"
    out = TrainingResult("bytecomp", title, {}, settings, "zero-cost compression bound")
    try:
        for nodes, k in topologies:
            label = f"{nodes}x{k}"
            if nodes > 1:
                with cluster.emulated_cluster(nodes, rate) as emulated:
                    result = cluster.run_torchrun(emulated, k, MODULE, job, timeout)[0]
            else:
                spec = {"ranks_per_node": k, "job": job, "timeout": timeout}
                result = netem.run_worker(rate, MODULE, {"single_node": spec})
            shapes[label] = result["topology"]
            for key, doc in result["models"].items():
                run = TrainingRun.from_dict(doc)
                run.meta.update(topology=label)
                run.compare()
                out.runs[f"{label} {key}"] = run
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM: keep the topologies that finished
        out.interrupted_by = interrupted_by(exc)
        note_partial(exc, out.write())
        raise
    out.write()
    if plot:
        out.plot()
    return out


def summary_rows(result: TrainingResult) -> list[dict[str, Any]]:
    """Per (topology, model, compressor): measured uniform / comparisons / ByteComp, and bounds.

    ``others`` maps each other plan's legend name (layer-wise, whole-model,
    ``"MergeComp"``, ...) to its measured seconds per iteration; ``spread`` is
    ByteComp's fastest and slowest repetition.
    """
    out = []
    for run in result.runs.values():
        ddp_row = run.baseline()
        hooks = {r.label: r for r in run.rows if r.kind == "ddp_hook"}
        fp16, hook = hooks.get(HOOKS["fp16"]), hooks.get(HOOKS["powersgd"])
        bound = next((r for r in run.rows if r.kind == "local"), None)
        by = {(r.compressor, r.family): r for r in run.rows if r.kind == "sync"}
        families = dict.fromkeys(r.family for r in run.rows if r.kind == "sync")
        others = [f for f in families if f not in (UNIFORM, BYTECOMP)]
        for comp in dict.fromkeys(r.compressor for r in run.rows if r.kind == "sync"):
            uni, bc = by[(comp, UNIFORM)], by[(comp, BYTECOMP)]
            out.append(
                {
                    "topology": run.meta["topology"],
                    "model": run.meta["model"],
                    "point": run.meta.get("point", "heavy"),
                    "batch": run.meta.get("batch"),
                    "compressor": comp,
                    "compute_bound_s": bound.iteration_s if bound else None,
                    "ddp_s": ddp_row.iteration_s if ddp_row else None,
                    "fp16_s": fp16.iteration_s if fp16 else None,
                    "powersgd_s": hook.iteration_s if hook else None,
                    "uniform_s": uni.iteration_s,
                    "uniform_strategy": uni.extra.get("strategy"),
                    "others": {f: by[(comp, f)].iteration_s for f in others},
                    "bytecomp_s": bc.iteration_s,
                    "bytecomp_spread_s": list(bc.spread()),
                    "bytecomp_predicted_s": bc.predicted_s,
                    "zero_cost_bound_s": bc.bound_s,
                    "decide_ms": 1000 * bc.extra["decide_s"],
                }
            )
    return out


def run_selection_benchmark(
    layers: int = 25,
    compressors: Sequence[str] = COMPRESSORS,
    rate: str = "100mbit",
    reps: int = 5,
) -> dict[str, Any]:
    """How long ByteComp takes to decide for a ~300-tensor model (the paper: 1-179 ms).

    A GPT-style model with ``layers`` blocks (25 blocks: 304 tensors) is profiled
    here; each compressor is decided on an analytic 2 x 2 topology (slow enough
    that communication matters, so the decision is not trivially fp32) with the
    paper's algorithms alone and with the refinement, per tensor and with
    buckets. Median of ``reps`` runs each; writes results/bytecomp_selection.json.
    """
    if layers < 1 or reps < 1:
        raise ValueError(f"need layers >= 1 and reps >= 1, got layers={layers}, reps={reps}")
    torch.manual_seed(0)
    model = GPT(n_layer=layers, n_embd=256, n_head=4, block_size=64)
    x, y = model.example_batch(2, 64)
    bases = [Strategy.make(c, **DEFAULT_OPTIONS.get(c, {})) for c in compressors]
    profile = profile_model(
        model, lambda: model(x, y)[1], iters=2, warmup=1, compressors=bases, world_size=4
    )
    bits = netem.parse_rate(rate)
    shared = NetworkModel.analytic(rate, bits / 2, latency=5e-4)
    topology = Topology(2, 2, shared, NetworkModel.analytic("intra", 20 * bits, 2e-4), shared)
    rows = []
    for base in bases:
        for refine in (False, True):
            for bucket in (0, "auto"):
                seconds = []
                for _ in range(reps):
                    started = time.perf_counter()
                    d = decide(profile, base, topology, refine=refine, bucket_bytes=bucket)
                    seconds.append(time.perf_counter() - started)
                rows.append(
                    {
                        "compressor": base.compressor,
                        "refine": refine,
                        "buckets": str(bucket),
                        "tensors": len(profile.tensors),
                        "units": len(d.plan.groups),
                        "decide_ms": 1000 * statistics.median(seconds),
                        "predicted_s": d.predicted,
                        "fp32_s": d.baseline,
                        "evaluations": d.evaluations,
                    }
                )
    payload = {"rate": rate, "layers": layers, "tensors": len(profile.tensors), "rows": rows}
    payload["json_path"] = str(write_json("bytecomp_selection", payload))
    return payload


if __name__ == "__main__":
    if len(sys.argv) == 2 and "single_node" in json.loads(sys.argv[1]):
        netem.worker_main(lambda spec: _single_node_job(spec["single_node"]))
    else:
        cluster.cluster_worker_main(_rank_run)
