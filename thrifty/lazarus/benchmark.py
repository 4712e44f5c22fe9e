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
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from thrifty.bench.cluster import ClusterJobFailed, cluster_worker_main, run_torchrun
from thrifty.bench.launch import RankFailure, run_ranks
from thrifty.bench.results import results_dir, write_json
from thrifty.lazarus.allocation import allocate_replicas
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
    "LazarusBenchConfig",
    "LazarusBenchResult",
    "measured_costs",
    "placement_comparison",
    "placement_scaling",
    "plot_placement_comparison",
    "plot_recovery",
    "recovery_vs_restart",
    "run_bench",
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
    measure: Callable[[LazarusConfig, torch.Tensor], dict[str, Any]],
    cfg: LazarusConfig,
    corpus: torch.Tensor,
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


if __name__ == "__main__":
    # Interpreter start-up and every import are behind us: a restarted attempt counts the
    # time up to here as relaunch, what follows (new group, checkpoint load) as init + load.
    cluster_worker_main(functools.partial(_torchrun_rank, started=time.time()))
