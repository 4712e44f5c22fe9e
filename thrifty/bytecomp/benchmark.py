"""ByteComp benchmark: per-tensor strategies vs uniform ones, MergeComp and PyTorch DDP.

One torchrun job per topology (an emulated cluster of nodes with their own
rate-limited NIC, :mod:`thrifty.bench.cluster`; or one node whose ranks share
a rate-limited loopback). Inside the job every rank:

1. calibrates the topology's network models (flat, intra-node, inter-node);
2. profiles the model locally (all ranks at once, so the cores are as busy as
   in training) with every compressor's measured cost;
3. rank 0 decides, from its profile and the calibrated topology, for each
   compressor: the best *uniform* strategy (every unit the same option, scored
   by the timeline over layer-wise and ByteComp's units), ByteComp's plan, and
   the "compression at zero cost" bound; the plans are broadcast;
4. every configuration trains side by side in the same run: DDP fp32, DDP with
   PyTorch's PowerSGD hook, and per compressor the uniform plan, MergeComp's
   hybrid search and ByteComp's plan; measured beside predicted.

Run with ``thrifty bytecomp bench`` (root: emulated NICs) or
``python benchmarks/bytecomp.py``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from thrifty.bench import cluster, netem
from thrifty.bench.models import build_model, count_parameters
from thrifty.bench.results import results_dir, write_json
from thrifty.bench.training import (
    BATCH,
    DEFAULT_OPTIONS,
    PLANNER_OPTIONS,
    _loss,
    time_iterations,
)
from thrifty.comm import Topology
from thrifty.sync import GradientSync, Group, Plan, Strategy
from thrifty.sync.engine import get_planner
from thrifty.sync.profile import Profile, profile_model
from thrifty.sync.timeline import simulate

__all__ = ["TOPOLOGIES", "run_bytecomp_benchmark", "run_selection_benchmark"]

log = logging.getLogger(__name__)

# (nodes, ranks per node): 2 nodes with 2 ranks each behind their own NIC, and
# one node whose 2 ranks share one rate-limited link.
TOPOLOGIES = ((2, 2), (1, 2))
COMPRESSORS = ("randomk", "dgc", "efsignsgd")
CALIBRATION_SIZES = (16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20)
MODULE = "thrifty.bytecomp.benchmark"  # also when this file runs as __main__


def _decide_all(
    profile: Profile, topology: Topology, compressors: Sequence[str]
) -> list[dict[str, Any]]:
    """Rank 0: the thrifty configurations with their plans and predictions."""
    from thrifty.bytecomp import Constraints, decide, make_units, options, zero_cost_profile
    from thrifty.bytecomp.online import spare_cores

    # Every emulated node's ranks run on this one machine.
    constraints = Constraints(offload=spare_cores(topology.world_size))
    configs = []
    for name in compressors:
        base = Strategy.make(name, **DEFAULT_OPTIONS.get(name, {}))
        started = time.perf_counter()
        decision = decide(profile, base, topology, constraints=constraints)
        seconds = time.perf_counter() - started
        bound = decide(zero_cost_profile(profile), base, topology, constraints=constraints)
        bound_s = bound.predicted
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
        common = {"kind": "thrifty", "compressor": name, "zero_cost_bound_s": bound_s,
                  "offload_allowed": constraints.offload}  # fmt: skip
        configs.append(
            {**common, "label": f"{name} uniform", "scheme": "uniform",
             "plan": uniform[1].to_dict(), "predicted_s": uniform[0],
             "strategy": uniform[1].groups[0].strategy.label()}
        )  # fmt: skip
        configs.append({**common, "label": f"{name} mergecomp", "scheme": "mergecomp"})
        configs.append(
            {**common, "label": f"{name} bytecomp", "scheme": "bytecomp",
             "plan": decision.plan.to_dict(), "predicted_s": decision.predicted,
             "decide_s": seconds, "bucket_bytes": decision.bucket_bytes,
             "strategies": _histogram(decision.plan)}
        )  # fmt: skip
    return configs


def _histogram(plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in plan.groups:
        counts[g.strategy.label()] = counts.get(g.strategy.label(), 0) + len(g.names)
    return counts


def _wrap(config: dict[str, Any], model: torch.nn.Module, k: int, topology: Topology) -> Any:
    if config["kind"] == "ddp":
        return DDP(model), None
    if config["kind"] == "ddp_powersgd":
        ddp = DDP(model, bucket_cap_mb=1024)  # one bucket: see thrifty.bench.training
        state = powerSGD.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powerSGD.powerSGD_hook)
        return ddp, None
    name = config["compressor"]
    if config["scheme"] == "mergecomp":
        options = {**PLANNER_OPTIONS["mergecomp"], "network": topology.flat}
        planner = get_planner("mergecomp", **options)
        sync = GradientSync(model, name, plan=planner, ranks_per_node=k,
                            **DEFAULT_OPTIONS.get(name, {}))  # fmt: skip
        return model, sync
    plan = Plan.from_dict(config["plan"])
    return model, GradientSync(model, plan=plan, ranks_per_node=k)


def _time_config(
    config: dict[str, Any], model_name: str, k: int, topology: Topology, warmup: int, iters: int
) -> tuple[list[float], GradientSync | None, int]:
    torch.manual_seed(0)
    model = build_model(model_name)
    batch = model.example_batch(
        **BATCH[model_name], generator=torch.Generator().manual_seed(dist.get_rank())
    )
    wrapped, sync = _wrap(config, model, k, topology)
    times, search = time_iterations(model_name, wrapped, sync, batch, warmup, iters)
    return times, sync, search


def _rank_run(spec: dict[str, Any]) -> dict[str, Any] | None:
    """Every rank of the torchrun job: calibrate, profile, decide (rank 0), time."""
    rank, n = dist.get_rank(), dist.get_world_size()
    k = int(os.environ.get("LOCAL_WORLD_SIZE", n))
    torch.set_num_threads(1)
    if n // k > 1 and k > 1:
        topology = cluster.measure_topology(CALIBRATION_SIZES, budget_s=0.3, progress=rank == 0,
                                       ranks_per_node=k)  # fmt: skip
    else:
        from thrifty.bench.collectives import time_collectives
        from thrifty.comm.network import Measurement, NetworkModel

        rows = time_collectives(("all_reduce", "all_gather", "all_to_all"), CALIBRATION_SIZES,
                                0.3, "calibrate", progress=rank == 0)  # fmt: skip
        flat = NetworkModel.fit(
            "flat", [Measurement(r["primitive"], n, r["nbytes"], r["seconds"]) for r in rows]
        )
        topology = Topology(n // k, k, flat)
    out: dict[str, Any] = {"topology": topology.to_dict(), "models": {}}
    for model_name in spec["models"]:
        torch.manual_seed(0)
        probe = build_model(model_name)
        batch = probe.example_batch(
            **BATCH[model_name], generator=torch.Generator().manual_seed(rank)
        )
        opt = torch.optim.SGD(probe.parameters(), lr=1e-3, momentum=0.9)
        bases = [Strategy.make(c, **DEFAULT_OPTIONS.get(c, {})) for c in spec["compressors"]]

        def loss(m: torch.nn.Module = probe, b: Any = batch, name: str = model_name) -> Any:
            return _loss(name, m, b)

        profile = profile_model(probe, loss, opt, iters=3, warmup=1, compressors=bases,
                                world_size=n)  # fmt: skip
        del probe, opt
        shared = [_decide_all(profile, topology, spec["compressors"]) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        configs: list[dict[str, Any]] = [{"label": "DDP fp32", "kind": "ddp"}]
        configs.append({"label": "DDP powerSGD_hook r4", "kind": "ddp_powersgd"})
        configs += shared[0]  # type: ignore[operator]
        rows = []
        bar = tqdm(configs, desc=model_name, disable=rank != 0, file=sys.stderr, leave=False)
        for config in bar:
            bar.set_postfix_str(config["label"])
            times, sync, search = _time_config(
                config, model_name, k, topology, spec["warmup"], spec["iters"]
            )
            slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            row = {**config, "iteration_s": slowest.item(), "times": times}
            row.pop("plan", None)
            if sync is not None:
                if config.get("scheme") == "mergecomp":
                    row["search_iterations"] = search
                    row["groups"] = len(sync.plan.groups)
                    row["predicted_s"] = simulate(profile, sync.plan, topology).iteration
                row["wire_bytes_per_iter"] = sync.ledger.wire_bytes / max(
                    sync.iterations, 1
                )  # fmt: skip
                row["groups"] = len(sync.plan.groups)
                sync.remove()
            rows.append(row)
        out["models"][model_name] = {
            "rows": rows,
            "parameters": count_parameters(build_model(model_name), trainable_only=True),
            "tensors": len(profile.tensors),
            "profile": profile.to_dict(),
        }
    return out if rank == 0 else None


def _single_node_job(spec: dict[str, Any]) -> Any:
    """Inside a rate-limited namespace: one node, its ranks sharing the limited loopback."""
    return cluster.run_torchrun(None, spec["ranks_per_node"], MODULE, spec["job"], spec["timeout"])[
        0
    ]


def run_bytecomp_benchmark(
    models: Sequence[str] = ("cnn", "gpt"),
    topologies: Sequence[tuple[int, int]] = TOPOLOGIES,
    rate: str = "1gbit",
    compressors: Sequence[str] = COMPRESSORS,
    warmup: int = 2,
    iters: int = 4,
    plot: bool = True,
    timeout: float = 5400.0,
) -> dict[str, Any]:
    """Run every topology; write results/bytecomp.json (+ PNG)."""
    job = {"models": list(models), "compressors": list(compressors), "warmup": warmup,
           "iters": iters, "timeout_s": timeout}  # fmt: skip
    payload: dict[str, Any] = {"rate": rate, "runs": {}}
    for nodes, k in topologies:
        label = f"{nodes}x{k}"
        if nodes > 1:
            with cluster.emulated_cluster(nodes, rate) as emulated:
                result = cluster.run_torchrun(emulated, k, MODULE, job, timeout)[0]
        else:
            spec = {"ranks_per_node": k, "job": job, "timeout": timeout}
            result = netem.run_worker(rate, MODULE, {"single_node": spec})
        for model_rows in result["models"].values():
            _add_ratios(model_rows["rows"])
        payload["runs"][label] = result
    path = write_json("bytecomp", payload)
    payload["json_path"] = str(path)
    if plot:
        payload["plot_path"] = str(plot_bytecomp(payload, results_dir() / "bytecomp.png"))
    return payload


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = next(r["iteration_s"] for r in rows if r["kind"] == "ddp")
    for row in rows:
        row["speedup_vs_ddp"] = base / row["iteration_s"]
        if row.get("predicted_s"):
            row["prediction_error"] = (row["predicted_s"] - row["iteration_s"]) / row["iteration_s"]


def summary_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (topology, model, compressor): measured uniform / MergeComp / ByteComp, and bounds."""
    out = []
    for label, run in payload["runs"].items():
        for model, data in run["models"].items():
            rows = data["rows"]
            ddp = next(r for r in rows if r["kind"] == "ddp")
            hook = next(r for r in rows if r["kind"] == "ddp_powersgd")
            by = {(r.get("compressor"), r.get("scheme")): r for r in rows}
            for comp in dict.fromkeys(r["compressor"] for r in rows if "compressor" in r):
                uni, mc, bc = (by[(comp, s)] for s in ("uniform", "mergecomp", "bytecomp"))
                out.append(
                    {"topology": label, "model": model, "compressor": comp,
                     "ddp_s": ddp["iteration_s"], "powersgd_s": hook["iteration_s"],
                     "uniform_s": uni["iteration_s"], "uniform_strategy": uni.get("strategy"),
                     "mergecomp_s": mc["iteration_s"], "bytecomp_s": bc["iteration_s"],
                     "bytecomp_predicted_s": bc["predicted_s"],
                     "zero_cost_bound_s": bc["zero_cost_bound_s"],
                     "decide_ms": 1000 * bc["decide_s"]}
                )  # fmt: skip
    return out


def plot_bytecomp(payload: dict[str, Any], path: Path) -> Path:
    """Bars: measured iteration time per configuration; dots: predicted; line: zero-cost bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(label, model, data) for label, run in payload["runs"].items()
              for model, data in run["models"].items()]  # fmt: skip
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 4 * len(panels)), squeeze=False)
    colors = {"uniform": "C0", "mergecomp": "C2", "bytecomp": "C1"}
    for ax, (label, model, data) in zip(axes[:, 0], panels, strict=True):
        rows = data["rows"]
        xs = range(len(rows))
        ax.bar(xs, [r["iteration_s"] for r in rows],
               color=[colors.get(r.get("scheme"), "C3") for r in rows])  # fmt: skip
        pred = [(i, r["predicted_s"]) for i, r in enumerate(rows) if r.get("predicted_s")]
        if pred:
            ax.plot(*zip(*pred, strict=True), "k.", label="timeline prediction")
        bounds = [(i, r["zero_cost_bound_s"]) for i, r in enumerate(rows)
                  if r.get("scheme") == "bytecomp"]  # fmt: skip
        if bounds:
            ax.plot(*zip(*bounds, strict=True), "kx", label="zero-cost compression bound")
        ax.legend()
        ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("iteration (s)")
        ax.set_title(f"{model}, {label} (nodes x ranks), {payload['rate']} per node: "
                     "red DDP, blue uniform, green MergeComp, orange ByteComp")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    import torch.nn.functional as F  # noqa: F401  (the GPT computes its own loss)

    from thrifty.bench.models import GPT
    from thrifty.bench.netem import parse_rate
    from thrifty.bytecomp import decide
    from thrifty.comm import NetworkModel

    torch.manual_seed(0)
    model = GPT(n_layer=layers, n_embd=256, n_head=4, block_size=64)
    x, y = model.example_batch(2, 64)
    bases = [Strategy.make(c, **DEFAULT_OPTIONS.get(c, {})) for c in compressors]
    profile = profile_model(model, lambda: model(x, y)[1], iters=2, warmup=1,
                            compressors=bases, world_size=4)  # fmt: skip
    bits = parse_rate(rate)
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
                    {"compressor": base.compressor, "refine": refine, "buckets": str(bucket),
                     "tensors": len(profile.tensors), "units": len(d.plan.groups),
                     "decide_ms": 1000 * statistics.median(seconds),
                     "predicted_s": d.predicted, "fp32_s": d.baseline,
                     "evaluations": d.evaluations}
                )  # fmt: skip
    payload = {"rate": rate, "layers": layers, "tensors": len(profile.tensors), "rows": rows}
    payload["json_path"] = str(write_json("bytecomp_selection", payload))
    return payload


def _main(spec: dict[str, Any]) -> Any:
    return _rank_run(spec)


if __name__ == "__main__":
    if len(sys.argv) == 2 and "single_node" in json.loads(sys.argv[1]):
        netem.worker_main(lambda spec: _single_node_job(spec["single_node"]))
    else:
        cluster.cluster_worker_main(_main)
