"""Lazarus benchmarks: measured recovery vs checkpoint-restart, and placement (the paper's Fig. 8).

:func:`recovery_vs_restart` kills a rank of a real MoE training job and times
how long it takes until every survivor is training the failed step again:
with Lazarus (no reload), with ``torchrun --max-restarts`` (the agent
restarts every worker, which reloads the last checkpoint and redoes the
steps since), and with a warm relaunch from our harness (a restart whose
processes need no interpreter start-up or imports: a lower bound for any
restart). All three run the same job, interleaved, in one call.

Placement. The paper's case for MRO placement is Fig. 8: GPT-L on 10
nodes x 6 slots with 16 experts, 4 nodes failed at once, Lazarus recovers
41% of the time, the spread plan 12% and the compact plan never. Our brute
force (see :mod:`thrifty.lazarus.placement_search`) found that published MRO
is not always optimal, so thrifty places experts with a corrected search.
:func:`placement_comparison` puts the four plans side by side on one
allocation, with exact probabilities:

* ``"thrifty"`` - :func:`~thrifty.lazarus.search_placement` with the
  arguments the runtime uses (``min_distinct`` = the enforced ``f``);
* ``"mro"`` - :func:`~thrifty.lazarus.placement.mro_placement`, as published;
* ``"spread"`` - :func:`~thrifty.lazarus.placement.rotation_placement`;
* ``"compact"`` - :func:`~thrifty.lazarus.placement.compact_placement`.

Replica counts come from Eq. 1 (:func:`~thrifty.lazarus.allocate_replicas`)
on per-expert token loads. The paper's loads (SmartMoE's routing trace at
step 200) are not public, so by default we use a skewed, deterministic load:
Zipf with exponent 1 (expert of popularity rank ``i`` gets ``~1/i`` of the
tokens, a common model of MoE routing skew), scaled to a million tokens,
rounded to integers and shuffled over expert ids with ``random.Random(seed)``
(so expert id says nothing about load; Eq. 1 only sees the sorted loads).
Pass ``loads=`` with measured token counts (e.g. from the runtime's load
monitor) to score a real allocation. Absolute numbers depend on the loads,
so they need not match the paper's; the ordering is what Fig. 8 is about.

Thrifty's search maximises ``(P(1), P(2), ...)`` lexicographically, not each
``P(k)`` separately; the result says, per ``k``, which plan was best, so a
``k`` where another plan wins is visible rather than hidden.

:func:`placement_scaling` times :func:`~thrifty.lazarus.place_experts` at
1,000 nodes (paper §6.7: under 1 s on one core).

``thrifty lazarus bench`` runs all three through :func:`run_bench`, which writes
``results/lazarus_bench.json`` with two plots; :func:`measured_costs` reads the
recovery medians back for the simulator (``thrifty lazarus simulate --from-bench``).

This is the benchmark side of Lazarus, the only module of the package that uses
the harness (:mod:`thrifty.bench`), so the modules a training step runs never
load it. It also holds the launchers: :func:`train` / :func:`run_job` start a
run on local gloo ranks with the harness's ``run_ranks`` (used by ``thrifty
lazarus train``, the demo and the recovery benchmark), and run as
``python -m thrifty.lazarus.benchmark SPEC_JSON`` the module is the ``torchrun``
entry point of the checkpoint-restart baseline.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from thrifty.bench.cluster import ClusterJobFailed, cluster_worker_main, run_torchrun
from thrifty.bench.launch import RankFailure, run_ranks
from thrifty.bench.results import results_dir, write_json, write_partial
from thrifty.lazarus.allocation import allocate_replicas
from thrifty.lazarus.coordinator import Coordinator, connect_store
from thrifty.lazarus.manager import Lazarus, LazarusOptions
from thrifty.lazarus.moe import sharegpt_corpus
from thrifty.lazarus.placement import (
    Placement,
    compact_placement,
    mro_placement,
    rotation_placement,
)
from thrifty.lazarus.placement_search import place_experts, search_placement
from thrifty.lazarus.recovery import recovery_estimate
from thrifty.lazarus.runtime import LazarusConfig, summarize, train_rank

__all__ = [
    "PAPER_FIG8",
    "PLACEMENTS",
    "HFBenchConfig",
    "HFBenchResult",
    "LazarusBenchConfig",
    "LazarusBenchResult",
    "hf_goodput",
    "hf_recovery",
    "measured_costs",
    "placement_comparison",
    "placement_scaling",
    "plot_bench_hf",
    "plot_placement_comparison",
    "plot_recovery",
    "recovery_vs_restart",
    "run_bench",
    "run_bench_hf",
    "run_job",
    "train",
    "zipf_loads",
]

log = logging.getLogger(__name__)

PLACEMENTS = ("thrifty", "mro", "spread", "compact")
# Fig. 8, GPT-L at step 200 (10 nodes x 6 slots, 16 experts), 4 nodes failed.
PAPER_FIG8 = {"failed": 4, "lazarus": 0.41, "spread": 0.12, "compact": 0.0}
SCALING_GOAL_S = 1.0
SCALING_SLOTS = 8
SCALING_EXPERTS = 64
# The torchrun baseline runs this module (its ``__main__`` below) on every rank.
MODULE = "thrifty.lazarus.benchmark"


# --------------------------------------------------------------------------- local launcher


def run_job(cfg: LazarusConfig, corpus: torch.Tensor | None = None) -> list[Any]:
    """Run ``cfg.workers + cfg.joiners`` local gloo ranks; their raw results (None if killed).

    ``corpus`` defaults to ``cfg.corpus_tokens`` ShareGPT tokens; without a
    ``checkpoint_dir`` the run checkpoints into a temporary directory.
    """
    if corpus is None:
        corpus = sharegpt_corpus(cfg.corpus_tokens, cfg.vocab)
    with contextlib.ExitStack() as stack:
        if not cfg.checkpoint_dir:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lazarus-ckpt-"))
            cfg = replace(cfg, checkpoint_dir=tmp)
        return run_ranks(
            train_rank,
            cfg.workers + cfg.joiners,
            corpus,
            cfg,
            may_die=cfg.kill_ranks,
            timeout=max(120.0, cfg.steps * 3.0),
        )


def train(cfg: LazarusConfig, corpus: torch.Tensor | None = None) -> dict[str, Any]:
    """Run Lazarus on local gloo ranks and return the JSON report (see :func:`summarize`)."""
    started = time.perf_counter()
    results = run_job(cfg, corpus)
    return summarize(cfg, results, time.perf_counter() - started)


def zipf_loads(
    experts: int, *, exponent: float = 1.0, seed: int = 0, total: int = 1_000_000
) -> list[int]:
    """Deterministic skewed token counts: rank ``i`` gets ``~total / i**exponent / H``, shuffled.

    Integers (so Eq. 1 runs in exact arithmetic), each at least 1, assigned to
    expert ids in an order shuffled by ``random.Random(seed)``.

    Example::

        >>> sorted(zipf_loads(4, total=100), reverse=True)
        [48, 24, 16, 12]
    """
    if experts < 1:
        raise ValueError(f"experts={experts}: need at least one expert")
    if exponent < 0:
        raise ValueError(f"exponent={exponent}: expected >= 0 (0 is uniform)")
    weights = [1.0 / (rank**exponent) for rank in range(1, experts + 1)]
    norm = sum(weights)
    loads = [max(1, round(total * w / norm)) for w in weights]
    random.Random(seed).shuffle(loads)
    return loads


def _resolve_loads(loads: Sequence[float] | None, experts: int, seed: int) -> list[float]:
    if loads is None:
        return list(zipf_loads(experts, seed=seed))
    values = list(loads)
    if len(values) != experts:
        raise ValueError(
            f"loads has {len(values)} entries but experts={experts}: need one token count "
            "per expert"
        )
    return values


def _json_number(value: float) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() else number


def _check_failures(failures: Iterable[int], nodes: int) -> list[int]:
    ks = [int(k) for k in failures]
    if not ks:
        raise ValueError("failures is empty: give at least one number of failed nodes")
    bad = [k for k in ks if not 0 <= k <= nodes]
    if bad:
        raise ValueError(f"failures contains {bad}: expected 0 <= k <= {nodes} nodes")
    return ks


def placement_comparison(
    nodes: int = 10,
    slots: int = 6,
    experts: int = 16,
    min_replicas: int = 2,
    failures: Iterable[int] = range(1, 6),
    loads: Sequence[float] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Exact recovery probability of each placement for ``k`` failed nodes (Fig. 8).

    Args:
        nodes, slots, experts: the cluster (``N``, ``c``) and experts per layer (``E``).
        min_replicas: ``f`` of Eq. 1 (relaxed, with a logged warning, when it cannot fit).
        failures: the numbers of simultaneously failed nodes ``k`` to score.
        loads: tokens per expert (length ``experts``); ``None`` uses :func:`zipf_loads`.
        seed: shuffles the default loads over expert ids; also seeds Monte Carlo if an
            exact count were unaffordable (never at the default size).

    Returns a JSON-able dict: ``config``, ``loads``, ``replicas`` (Eq. 1),
    ``search`` (how long thrifty's search took and what it proved), per
    placement its ``nodes`` (experts per node), ``probability`` (one per
    ``k``, aligned with ``config["failures"]``), ``method``, ``exact`` and
    ``half_width``; ``best`` names the best plan per ``k``; ``paper`` holds
    Fig. 8's numbers for reference.

    Example::

        >>> result = placement_comparison(nodes=4, slots=2, experts=4, failures=[1])
        >>> result["placements"]["thrifty"]["probability"]
        [1.0]
    """
    ks = _check_failures(failures, nodes)
    token_loads = _resolve_loads(loads, experts, seed)
    allocation = allocate_replicas(token_loads, nodes, slots, min_replicas)
    replicas = allocation.replicas

    start = time.perf_counter()
    searched = search_placement(replicas, nodes, slots, min_distinct=allocation.min_replicas)
    search_s = time.perf_counter() - start

    plans: dict[str, Placement] = {
        "thrifty": searched.placement,
        "mro": mro_placement(replicas, nodes, slots),
        "spread": rotation_placement(replicas, nodes, slots),
        "compact": compact_placement(replicas, nodes, slots),
    }
    placements: dict[str, Any] = {}
    for name, plan in plans.items():
        estimates = [recovery_estimate(plan, k, seed=seed) for k in ks]
        placements[name] = {
            "nodes": [list(node) for node in plan.nodes],
            "min_distinct_nodes": min(plan.distinct_nodes(e) for e in range(experts)),
            "probability": [est.probability for est in estimates],
            "method": [est.method for est in estimates],
            "exact": [est.exact for est in estimates],
            "half_width": [est.half_width for est in estimates],
        }
    best = []
    for i in range(len(ks)):
        top = max(placements[name]["probability"][i] for name in PLACEMENTS)
        best.append([name for name in PLACEMENTS if placements[name]["probability"][i] == top])

    return {
        "config": {
            "nodes": nodes,
            "slots": slots,
            "experts": experts,
            "min_replicas": min_replicas,
            "failures": ks,
            "seed": seed,
            "loads": "given" if loads is not None else "zipf(exponent=1, shuffled by seed)",
        },
        "loads": [_json_number(t) for t in token_loads],
        "replicas": list(replicas),
        "min_replicas_enforced": allocation.min_replicas,
        "search": {
            "seconds": search_s,
            "source": searched.source,
            "proven_optimal": searched.proven_optimal,
            "exact_score": searched.exact_score,
            "evaluations": searched.evaluations,
            "ranked_failures": list(searched.failures),
        },
        "placements": placements,
        "best": best,
        "paper": dict(PAPER_FIG8),
    }


def placement_scaling(
    nodes: int = 1000,
    slots: int = SCALING_SLOTS,
    experts: int = SCALING_EXPERTS,
    repeats: int = 3,
    *,
    min_replicas: int = 2,
    loads: Sequence[float] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Wall time of :func:`~thrifty.lazarus.place_experts` at cluster scale (goal: < 1 s).

    Calls it ``repeats`` times with the runtime's arguments (library defaults,
    ``min_distinct`` = the enforced ``f``) on Eq. 1's allocation of ``loads``
    (default :func:`zipf_loads`), and reports every time, the min and the
    median, and the resulting plan's exact ``P(k)`` for ``k = 1..4``.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least one timed run")
    token_loads = _resolve_loads(loads, experts, seed)
    allocation = allocate_replicas(token_loads, nodes, slots, min_replicas)
    seconds = []
    placement = None
    for _ in range(repeats):
        start = time.perf_counter()
        placement = place_experts(
            allocation.replicas, nodes, slots, min_distinct=allocation.min_replicas
        )
        seconds.append(time.perf_counter() - start)
    assert placement is not None
    ks = [k for k in range(1, 5) if k <= nodes]
    estimates = [recovery_estimate(placement, k, seed=seed) for k in ks]
    return {
        "config": {
            "nodes": nodes,
            "slots": slots,
            "experts": experts,
            "min_replicas": min_replicas,
            "repeats": repeats,
            "seed": seed,
            "loads": "given" if loads is not None else "zipf(exponent=1, shuffled by seed)",
        },
        "replicas": list(allocation.replicas),
        "seconds": seconds,
        "min_s": min(seconds),
        "median_s": statistics.median(seconds),
        "goal_s": SCALING_GOAL_S,
        "meets_goal": statistics.median(seconds) < SCALING_GOAL_S,
        "failures": ks,
        "probability": [est.probability for est in estimates],
        "method": [est.method for est in estimates],
        "exact": [est.exact for est in estimates],
    }


def plot_placement_comparison(result: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars like Fig. 8: per number of failed nodes, one bar per placement."""
    import matplotlib  # optional: [bench] matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: [bench] matplotlib

    ks = result["config"]["failures"]
    names = list(result["placements"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(ks), 3.6))
    for i, name in enumerate(names):
        xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(ks))]
        ax.bar(xs, result["placements"][name]["probability"], width, label=name)
    ax.set_xticks(list(range(len(ks))), [str(k) for k in ks])
    ax.set_xlabel("failed nodes")
    ax.set_ylabel("recovery probability")
    ax.set_ylim(0, 1.05)
    cfg = result["config"]
    ax.set_title(
        f"{cfg['nodes']} nodes x {cfg['slots']} slots, {cfg['experts']} experts, "
        f"f={result['min_replicas_enforced']}"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- recovery


RECOVERY_SYSTEMS = ("lazarus", "torchrun", "warm_relaunch")
# The recovery job's model and victim (``recovery_vs_restart``'s defaults).
RECOVERY_SLOTS = 3
RECOVERY_EXPERTS = 6
RECOVERY_KILL_RANK = 2
RECOVERY_STEPS_AFTER_KILL = 9


def _recovery_config(
    workers: int,
    slots: int,
    experts: int,
    steps: int,
    kill_rank: int,
    kill_at_step: int,
    checkpoint_every: int,
) -> LazarusConfig:
    """The recovery job; the restarts need a checkpoint before the kill and steps after it."""
    if not 0 < checkpoint_every < kill_at_step < steps:
        raise ValueError(
            f"checkpoint_every={checkpoint_every}, kill_at_step={kill_at_step}, steps={steps}: "
            "expected 0 < checkpoint_every < kill_at_step < steps (the restarts resume from a "
            "checkpoint before the kill, and recovery is timed up to the failed step)"
        )
    return LazarusConfig(
        workers=workers,
        slots=slots,
        experts=experts,
        steps=steps,
        kill_ranks=(kill_rank,),
        kill_at_step=kill_at_step,
        checkpoint_every=checkpoint_every,
        return_states=True,
    )


def recovery_vs_restart(
    workers: int = 4,
    slots: int = RECOVERY_SLOTS,
    experts: int = RECOVERY_EXPERTS,
    steps: int = 15 + RECOVERY_STEPS_AFTER_KILL,
    kill_rank: int = RECOVERY_KILL_RANK,
    kill_at_step: int = 15,
    checkpoint_every: int = 10,
    repeats: int = 3,
    corpus: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Measured recovery from one ``kill -9``: Lazarus against checkpoint-restarts of the same job.

    Every clock runs from the kill (the dying rank stamps it) until training
    is back at the failed step, so the work lost since the checkpoint counts
    against the restarts: with a checkpoint every ``checkpoint_every`` steps
    a failure loses half an interval on average, and the default kill falls
    there. ``elements_lost`` counts parameter and Adam-moment elements of the
    surviving replicas that differ from their step-start state after
    Lazarus's recovery (or vanished with no replica left); it should be 0.
    Runs are interleaved ``repeats`` times and medians reported, since this
    machine is shared and noisy.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least one measurement")
    cfg = _recovery_config(
        workers, slots, experts, steps, kill_rank, kill_at_step, checkpoint_every
    )
    if corpus is None:
        corpus = sharegpt_corpus(cfg.corpus_tokens, cfg.vocab)
    measure = {
        "lazarus": _lazarus_recovery,
        "torchrun": _torchrun_restart,
        "warm_relaunch": _warm_relaunch,
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in RECOVERY_SYSTEMS}
    failed_launches: list[str] = []
    for _ in tqdm(range(repeats), desc="lazarus bench: recoveries", file=sys.stderr):
        for name in RECOVERY_SYSTEMS:
            runs[name].append(
                _measure_once_more_on_failure(measure[name], cfg, corpus, failed_launches)
            )
    median = {
        name: {k: _median([r[k] for r in rs]) for k, v in rs[0].items() if isinstance(v, float)}
        for name, rs in runs.items()
    }
    lazarus = [r["total_s"] for r in runs["lazarus"]]
    speedup = {
        name: _median([r["total_s"] / t for r, t in zip(runs[name], lazarus, strict=True)])
        for name in RECOVERY_SYSTEMS[1:]
    }
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "return_states"},
        "runs": runs,
        "median": median,
        "speedup": speedup,
        "elements_lost": max(r["elements_lost"] for r in runs["lazarus"]),
        "checkpoint_reloads": sum(r["checkpoint_reload"] for r in runs["lazarus"]),
        "failed_launches": failed_launches,
    }


def _measure_once_more_on_failure(
    measure: Callable[[Any, Any], dict[str, Any]],
    cfg: Any,
    corpus: Any,
    failures: list[str],
) -> dict[str, Any]:
    """One measurement; a job that fails to start is tried once more and recorded.

    Rarely (about 2 launches in 30 here) gloo's start-up mesh fails with
    "Connection closed by peer" while many processes start on 2 cores; that
    says nothing about recovery, so the measurement is retried, visibly.
    """
    try:
        return measure(cfg, corpus)
    except (RankFailure, ClusterJobFailed) as exc:
        failures.append(f"{measure.__name__}: {str(exc).strip().splitlines()[-1][:200]}")
        log.warning("a %s job failed to run; measuring once more", measure.__name__)
        return measure(cfg, corpus)


def _lazarus_recovery(cfg: LazarusConfig, corpus: torch.Tensor) -> dict[str, Any]:
    results = run_job(cfg, corpus)
    (rec,) = summarize(cfg, results, 0.0)["reconfigurations"]
    survivors = [r for r in results if r is not None and "members" in r]
    before: dict[str, dict[str, torch.Tensor]] = {"p": {}, "m": {}, "v": {}}
    for r in survivors:
        for kind in before:
            before[kind].update(r["pre_failure"][kind])
    held = {name for r in survivors for name in r["post_recovery"]["p"]}
    lost = sum(t.numel() for name, t in before["p"].items() if name not in held)
    for r in survivors:
        for kind in before:
            for name, tensor in r["post_recovery"][kind].items():
                lost += int((tensor != before[kind][name]).sum())
    return {
        "total_s": rec["total_s"],
        "detection_s": rec["detection_s"],
        "regroup_s": rec["regroup_s"],
        "transfer_s": rec["transfer_s"],
        "replicas_moved": rec["replicas_moved"],
        "bytes_moved": rec["bytes_moved"],
        "checkpoint_reload": rec["checkpoint_reload"],
        "steps_lost": rec["step"] - rec["resumed_at_step"],
        "elements_lost": lost,
        "step_s": _step_seconds(survivors[0]["step_walls"], cfg.kill_at_step),
        "checkpoint_s": _median([t for r in survivors for t in r["checkpoint_s"]]),
    }


def _torchrun_restart(cfg: LazarusConfig, corpus: torch.Tensor) -> dict[str, Any]:
    """torchrun --max-restarts 1: the agent restarts all workers, which resume from a checkpoint."""
    with tempfile.TemporaryDirectory(prefix="lazarus-torchrun-") as tmp:
        corpus_path = str(Path(tmp) / "corpus.pt")
        torch.save(corpus, corpus_path)
        job = replace(cfg, on_failure="abort", checkpoint_dir=f"{tmp}/ckpt", return_states=False)
        config = {**asdict(job), "kill_ranks": list(job.kill_ranks)}
        spec = {"config": config, "corpus": corpus_path}
        timeout = max(120.0, cfg.steps * 3.0)
        results = run_torchrun(None, cfg.workers, MODULE, spec, timeout, max_restarts=1)
        killed = max(float(p.read_text()) for p in Path(tmp, "ckpt").glob("killed*.txt"))
    if any(r["attempt"] != 1 for r in results):
        raise RuntimeError("torchrun did not restart the job after the kill")
    walls = {int(k): v for k, v in results[0]["step_walls"].items()}
    resumed_at = min(walls)
    started = max(r["process_started"] for r in results)
    return {
        "total_s": walls[cfg.kill_at_step] - killed,
        "relaunch_s": started - killed,  # agent notices, stops, spawns; start-up, imports
        "init_load_s": walls[resumed_at] - started,
        "redo_s": walls[cfg.kill_at_step] - walls[resumed_at],
        "steps_lost": cfg.kill_at_step - resumed_at,
    }


def _warm_relaunch(cfg: LazarusConfig, corpus: torch.Tensor) -> dict[str, Any]:
    """Survivors abort; our harness relaunches them (forkserver: torch already imported)."""
    with tempfile.TemporaryDirectory(prefix="lazarus-restart-") as tmp:
        first = replace(cfg, on_failure="abort", checkpoint_dir=tmp, return_states=False)
        aborted = [r for r in run_job(first, corpus) if r is not None]
        relaunched = time.time()
        survivors = cfg.workers - len(cfg.kill_ranks)
        results = run_job(replace(first, workers=survivors, kill_ranks=(), resume=True), corpus)
    walls = results[0]["step_walls"]
    resumed_at = min(walls)
    killed = aborted[0]["killed"]
    return {
        "total_s": walls[cfg.kill_at_step] - killed,
        "detection_s": max(r["caught"] for r in aborted) - killed,
        "relaunch_init_load_s": walls[resumed_at] - relaunched,
        "redo_s": walls[cfg.kill_at_step] - walls[resumed_at],
        "steps_lost": cfg.kill_at_step - resumed_at,
    }


def _step_seconds(walls: dict[int, float], before: int) -> float:
    """Median time of one step before step ``before`` (from one rank's step start times)."""
    times = [walls[s + 1] - walls[s] for s in range(1, before - 1) if s + 1 in walls]
    return _median(times)


def _median(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else float("nan")


def plot_recovery(result: dict[str, Any], path: str | Path) -> Path:
    """Stacked bars: where each system's recovery time goes (medians)."""
    import matplotlib  # optional: [bench] matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: [bench] matplotlib

    fig, ax = plt.subplots(figsize=(9.5, 3.5))
    for i, name in enumerate(RECOVERY_SYSTEMS):
        skip = ("total_s", "step_s", "checkpoint_s")
        parts = {k: v for k, v in result["median"][name].items() if k not in skip}
        left = 0.0
        for part, value in parts.items():
            ax.barh(i, value, left=left, label=f"{name}: {part[:-2]}")
            left += value
        ax.text(result["median"][name]["total_s"], i, f" {result['median'][name]['total_s']:.2f} s")
    ax.set_yticks(range(len(RECOVERY_SYSTEMS)), RECOVERY_SYSTEMS)
    ax.set_xlabel("seconds from kill -9 to training the failed step again (median)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- torchrun entry


def _torchrun_rank(spec: dict[str, Any], started: float) -> dict[str, Any]:
    """One rank under torchrun: train, or on a restarted attempt resume; with its timestamps.

    The spec holds the :class:`LazarusConfig` fields and the path of a saved
    token corpus. A restarted attempt (``TORCHELASTIC_RESTART_COUNT`` > 0)
    resumes from the newest checkpoint and kills no one.
    """
    fields = dict(spec["config"])
    fields["kill_ranks"] = tuple(fields["kill_ranks"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt:
        fields.update(kill_ranks=(), resume=True)
    cfg = LazarusConfig(**fields)
    corpus = torch.load(spec["corpus"])
    result = train_rank(corpus, cfg, namespace=f"lazarus-attempt{attempt}")
    result.pop("held", None)
    return {**result, "attempt": attempt, "process_started": started}


# --------------------------------------------------------------------------- thrifty lazarus bench


@dataclass(frozen=True)
class LazarusBenchConfig:
    """What ``thrifty lazarus bench`` runs.

    Args:
        repeats: interleaved repetitions of each recovery (medians reported).
        workers: ranks of the recovery job, which kills rank 2 (so at least 3).
        kill_at_step: the step whose forward ends in the kill; the job runs
            ``kill_at_step + 9`` steps.
        checkpoint_every: checkpoint interval, below ``kill_at_step`` so that
            the restarts have a checkpoint to resume from.
        nodes, slots, experts: the placement instance (Fig. 8: 10 x 6, 16 experts),
            scored for 1 to ``min(5, nodes)`` failed nodes.
        scaling_nodes: nodes of the :func:`placement_scaling` timing (8 slots,
            64 experts; paper §6.7: 1,000 nodes).
    """

    repeats: int = 3
    workers: int = 4
    kill_at_step: int = 15
    checkpoint_every: int = 10
    nodes: int = 10
    slots: int = 6
    experts: int = 16
    scaling_nodes: int = 1000

    def __post_init__(self) -> None:
        for name in ("repeats", "nodes", "slots", "experts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.workers <= RECOVERY_KILL_RANK:
            raise ValueError(
                f"workers={self.workers}: expected >= {RECOVERY_KILL_RANK + 1} "
                f"(the recovery job kills rank {RECOVERY_KILL_RANK})"
            )
        if self.experts > self.nodes * self.slots:
            raise ValueError(
                f"experts={self.experts}: more than nodes={self.nodes} x slots={self.slots} "
                "slots can hold"
            )
        if self.scaling_nodes * SCALING_SLOTS < SCALING_EXPERTS:
            raise ValueError(
                f"scaling_nodes={self.scaling_nodes}: expected >= "
                f"{SCALING_EXPERTS // SCALING_SLOTS} ({SCALING_EXPERTS} experts in "
                f"{SCALING_SLOTS} slots per node)"
            )
        _ = self.recovery  # checks kill_at_step and checkpoint_every

    @property
    def recovery(self) -> LazarusConfig:
        """The recovery job (:func:`recovery_vs_restart`'s model and kill)."""
        return _recovery_config(
            self.workers,
            RECOVERY_SLOTS,
            RECOVERY_EXPERTS,
            self.kill_at_step + RECOVERY_STEPS_AFTER_KILL,
            RECOVERY_KILL_RANK,
            self.kill_at_step,
            self.checkpoint_every,
        )


@dataclass(frozen=True)
class LazarusBenchResult:
    """:func:`run_bench`'s three results (as written to ``json_path``) and its plots."""

    config: LazarusBenchConfig
    recovery: dict[str, Any]
    placement: dict[str, Any]
    scaling: dict[str, Any]
    json_path: Path
    plots: tuple[Path, ...]


def run_bench(cfg: LazarusBenchConfig) -> LazarusBenchResult:
    """Recovery vs restarts, Fig. 8 placement and placement scaling; JSON and plots in results/."""
    recovery = recovery_vs_restart(
        workers=cfg.workers,
        steps=cfg.kill_at_step + RECOVERY_STEPS_AFTER_KILL,
        kill_at_step=cfg.kill_at_step,
        checkpoint_every=cfg.checkpoint_every,
        repeats=cfg.repeats,
    )
    placement = placement_comparison(
        nodes=cfg.nodes,
        slots=cfg.slots,
        experts=cfg.experts,
        failures=range(1, min(5, cfg.nodes) + 1),
    )
    scaling = placement_scaling(
        nodes=cfg.scaling_nodes, slots=SCALING_SLOTS, experts=SCALING_EXPERTS
    )
    out = results_dir()
    plots = (
        plot_recovery(recovery, out / "lazarus_recovery.png"),
        plot_placement_comparison(placement, out / "lazarus_placement.png"),
    )
    path = write_json(
        "lazarus_bench", {"recovery": recovery, "placement": placement, "scaling": scaling}
    )
    return LazarusBenchResult(cfg, recovery, placement, scaling, path, plots)


def measured_costs(path: str | Path) -> dict[str, float]:
    """The simulator's costs from a ``thrifty lazarus bench`` result (medians, seconds).

    Keys are :class:`~thrifty.lazarus.simulate.SimConfig` fields. Raises
    ValueError naming the file when it is not such a result.
    """
    try:
        median = json.loads(Path(path).read_text())["recovery"]["median"]
        lazarus, torchrun = median["lazarus"], median["torchrun"]
        return {
            "step_s": lazarus["step_s"],
            "reconfig_s": lazarus["total_s"],
            # The simulator rolls back to the checkpoint itself: the redo is not a fixed cost.
            "restart_s": torchrun["total_s"] - torchrun["redo_s"],
            "checkpoint_s": lazarus["checkpoint_s"],
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a `thrifty lazarus bench` result ({exc})") from exc


# --------------------------------------------------------------------------- HF MoE
#
# The same training job, a small Hugging Face Mixtral on ShareGPT, run two ways: with the
# Lazarus manager (one process per worker, membership in a Coordinator), and as a plain
# torchrun job (DDP, every rank holds every expert) that checkpoints every C steps and is
# restarted by torchrun from the last checkpoint. Every worker appends one line per event to
# a log of its own (line-buffered, so a SIGKILL cannot take back what was written), and the
# benchmark reads the logs afterwards: nothing is timed from inside the process that dies.

HF_SYSTEMS = ("lazarus", "checkpoint_restart")
HF_TASK_LAZARUS = "hf_lazarus"
HF_TASK_DDP = "hf_ddp"
HF_LR = 1e-3
HF_SPEEDUP_GOAL = 10.0
_POLL_S = 0.01
_STOP_MARGIN_STEPS = 3  # stop_at is this far past the newest step seen: no rank is there yet
_CURVE_POINTS = 400


@dataclass(frozen=True)
class HFBenchConfig:
    """What ``thrifty lazarus bench-hf`` runs: recovery and goodput on a small HF Mixtral.

    Args:
        workers: worker processes (Lazarus members / torchrun ranks), at least 3.
        repeats: interleaved repetitions of each recovery (medians reported).
        kill_at_step: the recovery kill lands while the job runs this step (0-based:
            after ``kill_at_step`` committed steps); the job then runs
            ``steps_after_kill`` more.
        checkpoint_every: both systems checkpoint every this many steps (torch.save);
            below ``kill_at_step`` so that the restart has a checkpoint to resume from.
        kill_rank: the recovery's victim (a Lazarus member id / torchrun rank).
        duration_s: goodput: seconds of training per system (from its first step).
        mtbf_s: goodput: mean time between failures (exponential, seeded).
        max_failures: goodput: at most this many kills per system (0: no cap).
        seed: the failure schedule and the goodput victims.
        hidden, experts, layers, seq, batch, vocab: the Mixtral (intermediate size
            ``2 * hidden``, 4 heads, top-2) and each worker's batch of ``batch x seq`` tokens.
        slots: Lazarus expert slots per worker per layer; 0 picks ``ceil(2 E / workers)``
            (two replicas of every expert).
        recovery / goodput: which parts to run.
        corpus_tokens: ShareGPT tokens the batches are cut from.
    """

    workers: int = 4
    repeats: int = 3
    kill_at_step: int = 15
    steps_after_kill: int = 5
    checkpoint_every: int = 10
    kill_rank: int = 1
    duration_s: float = 120.0
    mtbf_s: float = 30.0
    max_failures: int = 0
    seed: int = 0
    hidden: int = 64
    experts: int = 8
    layers: int = 2
    seq: int = 64
    batch: int = 4
    vocab: int = 2048
    slots: int = 0
    recovery: bool = True
    goodput: bool = True
    corpus_tokens: int = 100_000

    def __post_init__(self) -> None:
        for name in ("repeats", "steps_after_kill", "experts", "layers", "seq", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.workers < 3:
            raise ValueError(f"workers={self.workers}: expected >= 3 (one is killed)")
        if not 0 <= self.kill_rank < self.workers:
            raise ValueError(f"kill_rank={self.kill_rank}: expected 0..{self.workers - 1}")
        if not 0 < self.checkpoint_every < self.kill_at_step:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every}, kill_at_step={self.kill_at_step}: "
                "expected 0 < checkpoint_every < kill_at_step (the restart resumes from a "
                "checkpoint before the kill)"
            )
        if not (self.duration_s > 0 and self.mtbf_s > 0):
            raise ValueError(
                f"duration_s={self.duration_s}, mtbf_s={self.mtbf_s}: expected > 0 seconds"
            )
        if self.max_failures < 0 or self.slots < 0:
            raise ValueError(f"max_failures={self.max_failures}, slots={self.slots}: expected >= 0")
        if self.hidden < 8 or self.hidden % 4:
            raise ValueError(f"hidden={self.hidden}: expected a multiple of 4 heads, >= 8")
        if self.vocab < 16:
            raise ValueError(f"vocab={self.vocab}: expected >= 16")
        if (self.workers - 1) * self.slots_per_worker < self.experts:
            raise ValueError(
                f"slots={self.slots_per_worker}, workers={self.workers}, experts="
                f"{self.experts}: the survivors of one failure must hold every expert "
                "((workers - 1) x slots >= experts)"
            )
        if not (self.recovery or self.goodput):
            raise ValueError("recovery=False and goodput=False: nothing to run")

    @property
    def slots_per_worker(self) -> int:
        return self.slots or math.ceil(2 * self.experts / self.workers)

    @property
    def tokens_per_worker_step(self) -> int:
        return self.batch * self.seq

    def model_spec(self) -> dict[str, int]:
        return {
            "hidden": self.hidden,
            "experts": self.experts,
            "layers": self.layers,
            "seq": self.seq,
            "batch": self.batch,
            "vocab": self.vocab,
        }


# ----------------------------------------------------------- inside the workers


def _hf_model(m: dict[str, int]) -> torch.nn.Module:
    """The benchmark's Mixtral, the same weights in every process (seed 0)."""
    import transformers  # optional: [lazarus] transformers

    config = transformers.MixtralConfig(
        vocab_size=m["vocab"],
        hidden_size=m["hidden"],
        intermediate_size=2 * m["hidden"],
        num_hidden_layers=m["layers"],
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=m["experts"],
        num_experts_per_tok=2,
        max_position_embeddings=m["seq"],
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def _hf_batch(tokens: torch.Tensor, step: int, rank: int, m: dict[str, int]) -> torch.Tensor:
    """Worker ``rank``'s batch of step ``step``: a function of the two only (both systems)."""
    g = torch.Generator().manual_seed(step * 1000 + rank)
    seq = m["seq"]
    starts = torch.randint(0, len(tokens) - seq, (m["batch"],), generator=g).tolist()
    return torch.stack([tokens[s : s + seq] for s in starts])


class _EventLog:
    """One line per event, line-buffered: each line is a write() before the next event."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1)

    def write(self, *fields: Any) -> None:
        self._file.write(" ".join(repr(f) if isinstance(f, float) else str(f) for f in fields))
        self._file.write("\n")


class _StopSignal:
    """Whether to stop before the next step: a fixed step count, or ``bench/stop_at``.

    The benchmark sets ``bench/stop_at`` a few steps past the newest step it
    saw, so every worker reads it before reaching it and all stop at the same step.
    """

    def __init__(self, store: dist.TCPStore, steps: int) -> None:
        self._store = store
        self._stop_at = steps or None

    def __call__(self, committed: int) -> bool:
        if self._stop_at is None and self._store.check(["bench/stop_at"]):
            self._stop_at = int(self._store.get("bench/stop_at"))
        return self._stop_at is not None and committed >= self._stop_at


def _hf_state(mgr: Lazarus) -> dict[str, Any]:
    """Every slot's weights and optimizer state, and the dense parameters' (clones)."""
    experts = {}
    for li, layer in enumerate(mgr.layers):
        for slot, expert in enumerate(layer.replica_experts):
            experts.setdefault(f"{li}/{expert}", mgr.slot_state(li, slot))
    dense = {
        name: {
            "weights": {"w": p.detach().clone()},
            "optimizer": {"w": {k: v.clone() for k, v in mgr.optimizer.state[p].items()}},
        }
        for name, p in mgr.dense_parameters()
        if p in mgr.optimizer.state
    }
    return {"committed": mgr.committed_steps, "experts": experts, "dense": dense}


def _save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` under a temporary name, then rename: a kill leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.rename(path)


def _hf_lazarus_worker(spec: dict[str, Any], started: float) -> None:
    """One Lazarus worker (``python -m thrifty.lazarus.benchmark SPEC``), or a joiner.

    A process started after the job began joins it (the manager sees the
    running job in the store). With ``snapshot_step`` set it saves its state at
    the start of that step and at the first step it runs after a recovery, for
    the benchmark to count elements lost.
    """
    torch.set_num_threads(1)
    m = spec["model"]
    log_dir = Path(spec["log_dir"])
    events = _EventLog(log_dir / f"lazarus-{os.getpid()}.log")
    store = connect_store(spec["store"])
    tokens = torch.load(spec["corpus"])
    model = _hf_model(m)
    built = time.time()
    options = LazarusOptions(
        slots_per_rank=spec["slots"],
        fault_tolerance=2,
        checkpoint_dir=spec["checkpoint_dir"],
        checkpoint_every=spec["checkpoint_every"],
    )
    try:
        mgr = Lazarus(
            model,
            lambda module: torch.optim.AdamW(module.parameters(), lr=HF_LR),
            options,
            store=spec["store"],
        )
    except TimeoutError as exc:  # a joiner the job finished without: nothing to report
        events.write("X", repr(str(exc)))
        return
    me = mgr.member_id
    store.set(f"bench/pid/{me}", str(os.getpid()))
    events.write("T", me, started, built, time.time())
    snapshot = spec.get("snapshot_step")
    taken: dict[str, int] = {}
    stop = _StopSignal(store, spec["steps"])
    while not stop(mgr.committed_steps):
        x = _hf_batch(tokens, mgr.committed_steps, mgr.rank, m)

        def closure(x: torch.Tensor = x) -> torch.Tensor:
            seen = len(mgr.report.reconfigurations)
            events.write("S", mgr.committed_steps, time.time(), seen)
            if snapshot is not None:
                if "pre" not in taken and mgr.committed_steps == snapshot:
                    _save_atomic(_hf_state(mgr), log_dir / f"pre-{me}.pt")
                    taken["pre"] = seen
                elif "pre" in taken and "post" not in taken and seen > taken["pre"]:
                    _save_atomic(_hf_state(mgr), log_dir / f"post-{me}.pt")
                    taken["post"] = seen
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            return loss

        mgr.step(closure)
        events.write("C", mgr.committed_steps, time.time(), mgr.world_size)
        if mgr.rank == 0:
            store.set("bench/step", str(mgr.committed_steps))
            store.add("bench/commits", 1)
    records = [asdict(r) for r in mgr.report.reconfigurations]
    mgr.close()
    summary = {"member": me, "committed": mgr.committed_steps, "reconfigurations": records}
    (log_dir / f"lazarus-{me}.json").write_text(json.dumps(summary))


def _hf_ddp_rank(spec: dict[str, Any], started: float) -> dict[str, Any]:
    """One rank of the checkpoint-restart job under torchrun (DDP: every rank has every expert).

    A restarted attempt (``TORCHELASTIC_RESTART_COUNT`` > 0) loads the newest
    checkpoint; rank 0 saves one every ``checkpoint_every`` steps.
    """
    entered = time.time()
    torch.set_num_threads(1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank, world = dist.get_rank(), dist.get_world_size()
    m = spec["model"]
    log_dir = Path(spec["log_dir"])
    events = _EventLog(log_dir / f"ddp-{os.getpid()}.log")
    store = connect_store(spec["store"])
    store.set(f"bench/pid/{attempt}/{rank}", str(os.getpid()))
    tokens = torch.load(spec["corpus"])
    model = _hf_model(m)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=HF_LR)
    built = time.time()
    ckpt_dir = Path(spec["checkpoint_dir"])
    committed = 0
    newest = sorted(ckpt_dir.glob("step*.pt"))
    if newest:
        state = torch.load(newest[-1])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        committed = int(state["step"])
    loaded = time.time()
    events.write("T", attempt, rank, started, entered, built, loaded)
    if rank == 0:
        store.set("bench/attempt", str(attempt))
    every = spec["checkpoint_every"]
    stop = _StopSignal(store, spec["steps"])
    while not stop(committed):
        x = _hf_batch(tokens, committed, rank, m)
        events.write("S", committed, time.time(), attempt)
        optimizer.zero_grad(set_to_none=True)
        ddp(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        committed += 1
        events.write("C", committed, time.time(), world)
        if rank == 0:
            store.set("bench/step", str(committed))
            store.add("bench/commits", 1)
            if committed % every == 0:
                begin = time.time()
                state = {
                    "step": committed,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                }
                _save_atomic(state, ckpt_dir / f"step{committed:08d}.pt")
                events.write("K", committed, time.time() - begin)
    return {"attempt": attempt, "rank": rank, "committed": committed}


# ----------------------------------------------------------- the benchmark process


@dataclass
class _Event:
    kind: str
    fields: list[str]
    path: str


def _read_events(log_dir: Path, prefix: str) -> list[_Event]:
    out = []
    for path in sorted(log_dir.glob(f"{prefix}-*.log")):
        for line in path.read_text().splitlines():
            kind, *fields = line.split(" ")
            if fields:
                out.append(_Event(kind, fields, path.name))
    return out


def _chain(commits: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """The commits the final state is built on, in step order: ``(step, wall, world)``.

    Walking back from the last commit, step ``s - 1``'s commit is the latest one
    before step ``s``'s: a step committed and then lost (a restart went back to
    an older checkpoint) is replaced by its redo, and one never redone is dropped.
    """
    if not commits:
        return []
    by_step: dict[int, list[tuple[float, int]]] = {}
    for step, wall, world in commits:
        by_step.setdefault(step, []).append((wall, world))
    last = max(commits, key=lambda c: c[1])
    chain = [last]
    step, wall = last[0], last[1]
    while step > 1:
        step -= 1
        earlier = [c for c in by_step.get(step, []) if c[0] <= wall]
        if not earlier:
            break
        wall, world = max(earlier)
        chain.append((step, wall, world))
    return chain[::-1]


def _hf_spec(cfg: HFBenchConfig, tmp: Path, store: str, corpus: str) -> dict[str, Any]:
    (tmp / "ckpt").mkdir(parents=True, exist_ok=True)
    return {
        "model": cfg.model_spec(),
        "store": store,
        "corpus": corpus,
        "log_dir": str(tmp),
        "checkpoint_dir": str(tmp / "ckpt"),
        "checkpoint_every": cfg.checkpoint_every,
        "slots": cfg.slots_per_worker,
        "steps": 0,
    }


def _worker_env(rank: int, world: int) -> dict[str, str]:
    return {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }


class _Chaos:
    """The killer, outside every worker: kills by pid, at a step or on a schedule.

    ``plan`` is either ``{"at_step": k, "victim": id}`` (one kill once the job
    committed ``k`` steps) or ``{"times": [...], "seed": s}`` (seconds after the
    job's first commit; a kill waits until the job trained a step since the
    previous one, so it never lands in a restart, and the next time counts on
    from there). ``duration_s`` ends a timed run: ``bench/stop_at`` is set then.
    """

    def __init__(
        self,
        store: dist.TCPStore,
        plan: dict[str, Any],
        victims: Callable[[], dict[int, int]],
        duration_s: float | None = None,
        on_kill: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.plan = plan
        self.victims = victims
        self.duration_s = duration_s
        self.on_kill = on_kill
        self.kills: list[dict[str, Any]] = []
        self.begin: float | None = None
        self.stopped_at: float | None = None
        self._rng = random.Random(plan.get("seed", 0))
        self._times = list(plan.get("times", ()))
        self._shift = 0.0
        self._max_step = 0
        self._commits_at_kill = -1

    def poll(self) -> None:
        now = time.time()
        store = self.store
        if not store.check(["bench/step"]):
            return
        step = int(store.get("bench/step"))
        self._max_step = max(self._max_step, step)
        commits = store.add("bench/commits", 0)
        if self.begin is None:
            self.begin = now
        timed = self.duration_s is not None and self.stopped_at is None
        if timed and now - self.begin >= self.duration_s:
            store.set("bench/stop_at", str(self._max_step + _STOP_MARGIN_STEPS))
            self.stopped_at = now
            return
        if self.stopped_at is not None or commits <= self._commits_at_kill + 1:
            return  # stopping, or not trained a step since the last kill
        if "at_step" in self.plan:
            if not self.kills and step >= self.plan["at_step"]:
                self._kill(self.plan["victim"], now, commits)
            return
        if self._times and now - self.begin >= self._times[0] + self._shift:
            live = self.victims()
            if live:
                self._shift = now - self.begin - self._times.pop(0)
                self._kill(self._rng.choice(sorted(live)), now, commits)

    def _kill(self, victim: int, now: float, commits: int) -> None:
        pid = self.victims().get(victim)
        if pid is None:
            return
        killed = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._commits_at_kill = commits
        self.kills.append({"victim": victim, "pid": pid, "wall": killed})
        if self.on_kill is not None:
            self.on_kill(victim)


def _failure_times(cfg: HFBenchConfig) -> list[float]:
    """Exponential inter-arrival times with mean ``mtbf_s`` (seeded), inside the budget."""
    rng = random.Random(cfg.seed)
    times, t = [], 0.0
    while True:
        t += rng.expovariate(1.0 / cfg.mtbf_s)
        if t >= cfg.duration_s or (cfg.max_failures and len(times) >= cfg.max_failures):
            return times
        times.append(t)


def _run_lazarus_job(
    cfg: HFBenchConfig,
    tmp: Path,
    corpus: str,
    plan: dict[str, Any],
    *,
    steps: int = 0,
    snapshot_step: int | None = None,
    duration_s: float | None = None,
    joiners: bool = False,
) -> _Chaos:
    """The Lazarus job on ``cfg.workers`` processes with a killer; optionally replace the dead."""
    timeout = 300.0 + (duration_s or 0.0) + 3.0 * steps
    with Coordinator() as coordinator:
        spec = _hf_spec(cfg, tmp, coordinator.address, corpus)
        spec.update(task=HF_TASK_LAZARUS, steps=steps, snapshot_step=snapshot_step)
        argv = [sys.executable, "-m", MODULE, json.dumps(spec)]
        procs: list[subprocess.Popen] = []
        killed: set[int] = set()

        def spawn(rank: int) -> None:
            with (tmp / f"proc{len(procs)}.out").open("wb") as sink:
                procs.append(
                    subprocess.Popen(
                        argv,
                        env=_worker_env(rank, cfg.workers),
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )

        store = connect_store(coordinator.address)

        def victims() -> dict[int, int]:
            alive = {p.pid for p in procs if p.poll() is None}
            out = {}
            for key in range(cfg.workers + len(procs)):
                if store.check([f"bench/pid/{key}"]):
                    pid = int(store.get(f"bench/pid/{key}"))
                    if pid in alive and pid not in killed:
                        out[key] = pid
            return out

        def replace_victim(member: int) -> None:
            killed.add(chaos.kills[-1]["pid"])
            if joiners:
                spawn(0)  # RANK is ignored: the job runs, so the new process joins it

        chaos = _Chaos(store, plan, victims, duration_s, replace_victim)
        try:
            for rank in range(cfg.workers):
                spawn(rank)
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs):
                chaos.poll()
                _check_workers(procs, killed, tmp)
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the Lazarus job did not finish within {timeout:g}s\n{_tails(tmp)}"
                    )
                time.sleep(_POLL_S)
            _check_workers(procs, killed, tmp)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return chaos


def _check_workers(procs: list[subprocess.Popen], killed: set[int], tmp: Path) -> None:
    failed = [p for p in procs if p.poll() not in (None, 0) and p.pid not in killed]
    if failed:
        codes = ", ".join(f"pid {p.pid}: {p.returncode}" for p in failed)
        raise RankFailure(f"Lazarus workers failed ({codes})\n{_tails(tmp)}")


def _tails(tmp: Path, chars: int = 1500) -> str:
    return "\n".join(
        f"--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}"
        for path in sorted(tmp.glob("proc*.out"))
    )


def _run_ddp_job(
    cfg: HFBenchConfig,
    tmp: Path,
    corpus: str,
    plan: dict[str, Any],
    *,
    steps: int = 0,
    duration_s: float | None = None,
    max_restarts: int = 1,
) -> tuple[_Chaos, list[Any]]:
    """The checkpoint-restart job under ``torchrun --max-restarts``, with the killer in a thread."""
    timeout = 300.0 + 60.0 * max_restarts + (duration_s or 0.0) + 3.0 * steps
    with Coordinator() as coordinator:
        spec = _hf_spec(cfg, tmp, coordinator.address, corpus)
        spec.update(task=HF_TASK_DDP, steps=steps)
        store = connect_store(coordinator.address)

        def victims() -> dict[int, int]:
            if not store.check(["bench/attempt"]):
                return {}
            attempt = int(store.get("bench/attempt"))
            keys = [f"bench/pid/{attempt}/{r}" for r in range(cfg.workers)]
            if not store.check(keys):
                return {}
            return {r: int(store.get(k)) for r, k in enumerate(keys)}

        chaos = _Chaos(store, plan, victims, duration_s)
        done = threading.Event()
        errors: list[BaseException] = []

        def killer() -> None:  # the only user of `store` while torchrun runs
            try:
                while not done.is_set():
                    chaos.poll()
                    time.sleep(_POLL_S)
            except BaseException as exc:  # re-raised by the main thread
                errors.append(exc)

        thread = threading.Thread(target=killer, name="lazarus-bench-killer", daemon=True)
        thread.start()
        try:
            results = run_torchrun(None, cfg.workers, MODULE, spec, timeout, max_restarts)
        finally:
            done.set()
            thread.join(timeout=5)
        if errors:
            raise errors[0]
    return chaos, results


# ----------------------------------------------------------- recovery


def _commits(events: list[_Event]) -> list[tuple[int, float, int]]:
    return [
        (int(e.fields[0]), float(e.fields[1]), int(e.fields[2])) for e in events if e.kind == "C"
    ]


def _step_time(chain: list[tuple[int, float, int]], before: float) -> float:
    """Median seconds between consecutive commits before ``before``."""
    walls = [w for _, w, _ in chain if w < before]
    return _median([b - a for a, b in itertools.pairwise(walls)])


def _hf_lazarus_recovery(cfg: HFBenchConfig, corpus: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lazarus-hf-") as name:
        tmp = Path(name)
        steps = cfg.kill_at_step + cfg.steps_after_kill
        plan = {"at_step": cfg.kill_at_step, "victim": cfg.kill_rank}
        chaos = _run_lazarus_job(
            cfg, tmp, corpus, plan, steps=steps, snapshot_step=cfg.kill_at_step
        )
        (kill,) = chaos.kills
        events = _read_events(tmp, "lazarus")
        commits = _commits(events)
        at_kill = max(s for s, w, _ in commits if w < kill["wall"])
        summaries = [json.loads(p.read_text()) for p in sorted(tmp.glob("lazarus-*.json"))]
        survivor = min(summaries, key=lambda s: s["member"])
        (rec,) = [r for r in survivor["reconfigurations"] if r["kind"] == "failure"]
        # Training again: each survivor's first step start after its recovery, the last of those.
        again = {}
        for e in events:
            if e.kind == "S" and int(e.fields[2]) >= 1 and e.path not in again:
                again[e.path] = (float(e.fields[1]), int(e.fields[0]))
        back_wall = max(w for w, _ in again.values())
        resumed = min(s for _, s in again.values())
        lost, checked = _elements_lost(tmp, cfg)
        total = back_wall - kill["wall"]
        parts = {
            "detection_s": rec["detection_s"] or 0.0,
            "agree_s": rec["agree_s"],
            "regroup_s": rec["regroup_s"],
            "transfer_s": rec["transfer_s"],
        }
        return {
            "total_s": total,
            **parts,
            "other_s": max(0.0, total - sum(parts.values())),
            "steps_lost": at_kill - resumed,
            "elements_lost": lost,
            "elements_checked": checked,
            "replicas_moved": rec["replicas_moved"],
            "bytes_moved": rec["bytes_moved"],
            "checkpoint_reload": rec["checkpoint_reload"] is not None,
            "rolled_forward": rec["rolled_forward"],
            "step_s": _step_time(_chain(commits), kill["wall"]),
        }


def _elements_lost(tmp: Path, cfg: HFBenchConfig) -> tuple[int | None, int]:
    """Parameter and optimizer elements of the survivors' state after recovery that differ
    from the state before the failed step (or vanished): ``(lost, compared)``.

    Each expert's reference is any replica saved before the failure (the victim's
    too, if it got that far); each survivor's dense state is compared with its own.
    ``None`` lost when a survivor rolled the step forward (then the states differ
    by the step itself and there is nothing to compare).
    """
    pre = {p.name[4:-3]: torch.load(p, weights_only=False) for p in tmp.glob("pre-*.pt")}
    post = {p.name[5:-3]: torch.load(p, weights_only=False) for p in tmp.glob("post-*.pt")}
    if not post or any(post[m]["committed"] != pre[m]["committed"] for m in post if m in pre):
        return None, 0
    reference: dict[str, Any] = {}
    for state in pre.values():
        for key, replica in state["experts"].items():
            reference.setdefault(key, replica)
    lost = checked = 0
    expected = {f"{li}/{e}" for li in range(cfg.layers) for e in range(cfg.experts)}
    held = {key for state in post.values() for key in state["experts"]}
    for key in expected - held:
        lost += _numel(reference[key]) if key in reference else 0
    for member, state in post.items():
        pairs = [(state["experts"][k], reference[k]) for k in state["experts"] if k in reference]
        if member in pre:
            pairs += [(state["dense"][n], pre[member]["dense"][n]) for n in state["dense"]]
        for after, before in pairs:
            d, n = _diff(after, before)
            lost, checked = lost + d, checked + n
    return lost, checked


def _tensors(replica: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    out = [(f"w:{k}", v) for k, v in replica["weights"].items()]
    for name, state in replica["optimizer"].items():
        out += [(f"o:{name}:{k}", v) for k, v in state.items() if torch.is_tensor(v)]
    return out


def _numel(replica: dict[str, Any]) -> int:
    return sum(t.numel() for _, t in _tensors(replica))


def _diff(after: dict[str, Any], before: dict[str, Any]) -> tuple[int, int]:
    ref = dict(_tensors(before))
    differ = compared = 0
    for key, tensor in _tensors(after):
        compared += tensor.numel()
        if key not in ref or ref[key].shape != tensor.shape:
            differ += tensor.numel()
        else:
            differ += int((tensor != ref[key]).sum())
    missing = sum(t.numel() for k, t in ref.items() if k not in dict(_tensors(after)))
    return differ + missing, compared


def _hf_restart_recovery(cfg: HFBenchConfig, corpus: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lazarus-hf-torchrun-") as name:
        tmp = Path(name)
        steps = cfg.kill_at_step + cfg.steps_after_kill
        plan = {"at_step": cfg.kill_at_step, "victim": cfg.kill_rank}
        chaos, results = _run_ddp_job(cfg, tmp, corpus, plan, steps=steps, max_restarts=1)
        events = _read_events(tmp, "ddp")
    (kill,) = chaos.kills
    if any(r["attempt"] != 1 for r in results):
        raise RuntimeError("torchrun did not restart the job after the kill")
    commits = _commits(events)
    at_kill = max(s for s, w, _ in commits if w < kill["wall"])
    starts = [e for e in events if e.kind == "S" and e.fields[2] == "1"]
    back_wall = max(float(e.fields[1]) for e in starts if int(e.fields[0]) == at_kill)
    first_wall = max(
        min(float(e.fields[1]) for e in starts if e.path == path)
        for path in {e.path for e in starts}
    )
    resumed = min(int(e.fields[0]) for e in starts)
    stamps = [
        [float(f) for f in e.fields[2:]] for e in events if e.kind == "T" and e.fields[0] == "1"
    ]
    started, entered, built, loaded = (max(s[i] for s in stamps) for i in range(4))
    saves = [float(e.fields[1]) for e in events if e.kind == "K"]
    return {
        "total_s": back_wall - kill["wall"],
        "relaunch_s": started - kill["wall"],  # the agent notices, stops, spawns; imports
        "rendezvous_s": entered - started,  # the new process group
        "build_s": built - entered,  # transformers, the model, DDP
        "load_s": loaded - built,  # the checkpoint
        "first_step_s": first_wall - loaded,
        "redo_s": back_wall - first_wall,  # the steps since the checkpoint, again
        "steps_lost": at_kill - resumed,
        "step_s": _step_time(_chain(commits), kill["wall"]),
        "checkpoint_s": _median(saves),
    }


def _spread(values: Sequence[float | None]) -> dict[str, float]:
    present = [v for v in values if v is not None]
    if not present:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(present), "min": min(present), "max": max(present)}


def hf_recovery(cfg: HFBenchConfig, corpus: str) -> dict[str, Any]:
    """Kill -9 one worker at ``cfg.kill_at_step``: Lazarus vs torchrun checkpoint-restart.

    Both clocks run from the kill (stamped by the killer, outside the workers)
    to the moment the job is training the failed step again, the last worker
    to get there deciding: for Lazarus the survivors re-running that step after
    the reconfiguration, for the restart the restarted job starting it again
    after relaunch, imports, model build, checkpoint load and the redone steps.
    Repetitions are interleaved; each metric's median, min and max is reported,
    and the speedup is the median of the per-repetition ratios.
    """
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in HF_SYSTEMS}
    measure = {"lazarus": _hf_lazarus_recovery, "checkpoint_restart": _hf_restart_recovery}
    failed_launches: list[str] = []
    for _ in tqdm(range(cfg.repeats), desc="lazarus bench-hf: recoveries", file=sys.stderr):
        for name in HF_SYSTEMS:
            runs[name].append(
                _measure_once_more_on_failure(measure[name], cfg, corpus, failed_launches)
            )
    summary = {
        name: {
            k: _spread([r[k] for r in rs])
            for k, v in rs[0].items()
            if isinstance(v, float) and not isinstance(v, bool)
        }
        for name, rs in runs.items()
    }
    ratios = [
        r["total_s"] / lz["total_s"]
        for r, lz in zip(runs["checkpoint_restart"], runs["lazarus"], strict=True)
    ]
    lost = [r["elements_lost"] for r in runs["lazarus"]]
    speedup = _spread(ratios)
    return {
        "runs": runs,
        "summary": summary,
        "median": {name: {k: s["median"] for k, s in m.items()} for name, m in summary.items()},
        "speedup": speedup,
        "elements_lost": None if None in lost else max(lost),
        "steps_lost": {name: max(r["steps_lost"] for r in runs[name]) for name in HF_SYSTEMS},
        "goal": {
            "speedup": HF_SPEEDUP_GOAL,
            "met": speedup["median"] >= HF_SPEEDUP_GOAL and lost == [0] * len(lost),
        },
        "failed_launches": failed_launches,
    }


# ----------------------------------------------------------- goodput


def _goodput(
    chaos: _Chaos, events: list[_Event], cfg: HFBenchConfig, duration_s: float
) -> dict[str, Any]:
    """Tokens of the final state's history committed within the window, per wall second."""
    assert chaos.begin is not None
    begin, end = chaos.begin, chaos.begin + duration_s
    chain = [c for c in _chain(_commits(events)) if begin <= c[1] <= end]
    per_worker = cfg.tokens_per_worker_step
    tokens = sum(world * per_worker for _, _, world in chain)
    full = [b[1] - a[1] for a, b in itertools.pairwise(chain) if a[2] == b[2] == cfg.workers]
    step_s = _median(full)
    steady = cfg.workers * per_worker / step_s if step_s == step_s and step_s > 0 else math.nan
    curve, total = [], 0
    stride = max(1, len(chain) // _CURVE_POINTS)
    for i, (_, wall, world) in enumerate(chain):
        total += world * per_worker
        if i % stride == 0 or i == len(chain) - 1:
            curve.append([round(wall - begin, 3), total])
    return {
        "tokens": tokens,
        "steps": len(chain),
        "goodput_tokens_per_s": tokens / duration_s,
        "steady_tokens_per_s": steady,
        "time_lost_s": duration_s - tokens / steady if steady == steady else math.nan,
        "step_s": step_s,
        "failures": len(chaos.kills),
        "kills_s": [round(k["wall"] - begin, 3) for k in chaos.kills],
        "victims": [k["victim"] for k in chaos.kills],
        "curve": curve,
    }


def hf_goodput(cfg: HFBenchConfig, corpus: str) -> dict[str, Any]:
    """Each system trains for ``cfg.duration_s`` with kills at exponential times (mean ``mtbf_s``).

    The schedule (seeded) is the same for both, counted from each job's first
    commit; a kill is held back until the job trained a step since the last
    one. Lazarus: every killed worker is replaced at once by a new process that
    joins the running job (a cluster manager replacing a node); the survivors
    train on meanwhile. Checkpoint-restart: ``torchrun --max-restarts`` restarts
    every worker from the last checkpoint. Goodput counts only the tokens of
    steps the final state is built on (redone steps once, lost ones not).
    ``time_lost_s`` is the budget minus the time the tokens would take at the
    failure-free rate of all workers.
    """
    times = _failure_times(cfg)
    plan = {"times": times, "seed": cfg.seed}
    out: dict[str, Any] = {"schedule_s": times}
    with tempfile.TemporaryDirectory(prefix="lazarus-hf-goodput-") as name:
        tmp = Path(name) / "lazarus"
        tmp.mkdir()
        chaos = _run_lazarus_job(cfg, tmp, corpus, plan, duration_s=cfg.duration_s, joiners=True)
        out["lazarus"] = _goodput(chaos, _read_events(tmp, "lazarus"), cfg, cfg.duration_s)
        out["lazarus"]["checkpoint_reloads"] = sum(
            1
            for p in tmp.glob("lazarus-*.json")
            for r in json.loads(p.read_text())["reconfigurations"]
            if r["checkpoint_reload"] is not None
        )
        tmp = Path(name) / "restart"
        tmp.mkdir()
        chaos, _ = _run_ddp_job(
            cfg, tmp, corpus, plan, duration_s=cfg.duration_s, max_restarts=len(times) + 1
        )
        out["checkpoint_restart"] = _goodput(chaos, _read_events(tmp, "ddp"), cfg, cfg.duration_s)
    laz, ckpt = out["lazarus"], out["checkpoint_restart"]
    out["ratio"] = (
        laz["goodput_tokens_per_s"] / ckpt["goodput_tokens_per_s"]
        if ckpt["goodput_tokens_per_s"] > 0
        else math.inf
    )
    return out


# ----------------------------------------------------------- plot, entry point


def plot_bench_hf(result: dict[str, Any], path: str | Path) -> Path:
    """Left: recovery parts stacked per system (medians). Right: goodput over time per system."""
    import matplotlib  # optional: [bench] matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: [bench] matplotlib

    recovery, goodput = result.get("recovery"), result.get("goodput")
    panels = [p for p in (recovery, goodput) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), squeeze=False)
    col = 0
    if recovery:
        ax = axes[0][col]
        col += 1
        skip = ("total_s", "step_s", "checkpoint_s")
        for i, name in enumerate(HF_SYSTEMS):
            med = recovery["median"][name]
            left = 0.0
            for part, value in med.items():
                if part in skip or math.isnan(value):
                    continue
                ax.barh(i, value, left=left, label=f"{name}: {part[:-2]}")
                left += value
            ax.text(med["total_s"], i, f" {med['total_s']:.2f} s", va="center")
        ax.set_yticks(range(len(HF_SYSTEMS)), HF_SYSTEMS)
        ax.set_xlabel("kill -9 -> training the failed step again (s, median)")
        ax.set_title(f"recovery: Lazarus {recovery['speedup']['median']:.1f}x faster")
        ax.legend(fontsize=6, loc="lower right")
    if goodput:
        ax = axes[0][col]
        for name in HF_SYSTEMS:
            g = goodput[name]
            xs = [p[0] for p in g["curve"]]
            ys = [p[1] for p in g["curve"]]
            (line,) = ax.plot(xs, ys, label=f"{name}: {g['goodput_tokens_per_s']:.0f} tok/s")
            for t in g["kills_s"]:
                ax.axvline(t, color=line.get_color(), linestyle=":", linewidth=0.8)
        ax.set_xlabel("seconds since the first step (dotted: kill -9)")
        ax.set_ylabel("tokens trained (kept)")
        ax.set_title(f"goodput: Lazarus / restart = {goodput['ratio']:.2f}x")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@dataclass(frozen=True)
class HFBenchResult:
    """:func:`run_bench_hf`'s result (as written to ``json_path``) and its plot."""

    config: HFBenchConfig
    recovery: dict[str, Any] | None
    goodput: dict[str, Any] | None
    json_path: Path
    plot: Path


def run_bench_hf(cfg: HFBenchConfig, corpus: torch.Tensor | None = None) -> HFBenchResult:
    """Recovery and goodput on the HF Mixtral; ``results/lazarus_bench_hf.json`` and ``.png``.

    Ctrl-C or SIGTERM writes what finished (:func:`write_partial`) and re-raises.
    """
    payload: dict[str, Any] = {"config": {**asdict(cfg), "slots": cfg.slots_per_worker}}
    if corpus is None:
        corpus = sharegpt_corpus(cfg.corpus_tokens, cfg.vocab)
    with tempfile.TemporaryDirectory(prefix="lazarus-hf-corpus-") as tmp:
        corpus_path = str(Path(tmp) / "corpus.pt")
        torch.save(corpus, corpus_path)
        try:
            if cfg.recovery:
                payload["recovery"] = hf_recovery(cfg, corpus_path)
            if cfg.goodput:
                payload["goodput"] = hf_goodput(cfg, corpus_path)
        except KeyboardInterrupt as exc:
            write_partial("lazarus_bench_hf", payload, exc)
            raise
    plot = plot_bench_hf(payload, results_dir() / "lazarus_bench_hf.png")
    path = write_json("lazarus_bench_hf", payload)
    return HFBenchResult(cfg, payload.get("recovery"), payload.get("goodput"), path, plot)


def _torchrun_entry(spec: dict[str, Any], started: float) -> dict[str, Any]:
    if spec.get("task") == HF_TASK_DDP:
        return _hf_ddp_rank(spec, started)
    return _torchrun_rank(spec, started)


if __name__ == "__main__":
    # Interpreter start-up and every import are behind us: a restarted attempt counts the
    # time up to here as relaunch, what follows (new group, checkpoint load) as init + load.
    _started = time.time()
    _spec = json.loads(sys.argv[1]) if len(sys.argv) == 2 else {}
    if _spec.get("task") == HF_TASK_LAZARUS:
        _hf_lazarus_worker(_spec, _started)
    else:
        cluster_worker_main(functools.partial(_torchrun_entry, started=_started))
