"""Replay a trace through each policy and cache size; token hits, FLOPs, modelled TTFT.

The simulator is sequential, as the paper's: requests are taken in arrival
order and each is matched, then admitted, before the next one; timestamps only
set how sessions interleave. States are byte counts (no tensors).

A request whose whole input is cached (``full_hits``) is counted as the paper's
simulator counts it, a hit of every input token (``"free"``), or as an engine
serves it, which needs the last input token's logits for the first output
token: without them it falls back to the checkpoint before (``"recompute"``),
with them stored beside sequence-end checkpoints, charged at the model's
``logits_bytes``, it prefills nothing (``"logits"``, zero-prefill hits).

TTFT is modelled as linear in the tokens that still need prefill,
``intercept_ms + per_token_ms * (input - hit)``. The defaults are the paper's
fit to Jamba-1.5-Mini on an A100 (about 17.8 ms + 0.053 ms per token); an
engine's own prefill measurements can be fitted with :meth:`TTFTModel.fit`.

:func:`sweep` runs policies x cache sizes, in worker processes when asked
(fork: the trace is shared, not copied per task).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from thrifty.marconi.cache import BASELINES, PAPER_POLICIES, POLICIES, build_cache
from thrifty.marconi.model import ModelSpec, paper_hybrid_7b
from thrifty.marconi.traces import Trace
from thrifty.marconi.tuner import make_tuner

__all__ = ["FULL_HITS", "GB", "SimResult", "TTFTModel", "hit_rate_table", "simulate", "sweep"]

log = logging.getLogger(__name__)

GB = 10**9
PAPER_SHAREGPT_SIZES_GB = (1, 2, 3, 4, 5, 10)
FULL_HITS = ("free", "recompute", "logits")
"""How a whole-input hit is served; see the module docstring."""
_FULL_HIT_CACHE = {
    "free": {"store_logits": False, "need_logits": False},
    "recompute": {"store_logits": False, "need_logits": True},
    "logits": {"store_logits": True, "need_logits": True},
}


@dataclass(frozen=True)
class TTFTModel:
    """TTFT = ``intercept_ms + per_token_ms * uncached_tokens``."""

    intercept_ms: float = 17.8
    per_token_ms: float = 0.053

    def __post_init__(self) -> None:
        # Either sign is a valid fit; NaN or Inf would turn every TTFT into NaN.
        for name in ("intercept_ms", "per_token_ms"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of milliseconds, got {value!r}")

    def __call__(self, uncached_tokens: int) -> float:
        return self.intercept_ms + self.per_token_ms * uncached_tokens

    @classmethod
    def fit(cls, tokens: Sequence[int], ttft_ms: Sequence[float]) -> TTFTModel:
        """Least-squares line through measured (prefilled tokens, TTFT) points."""
        if len(tokens) != len(ttft_ms) or len(tokens) < 2:
            raise ValueError("need at least two (tokens, ttft_ms) points of equal count")
        slope, intercept = np.polyfit(np.asarray(tokens, float), np.asarray(ttft_ms, float), 1)
        return cls(float(intercept), float(slope))


@dataclass
class SimResult:
    """One policy at one cache size over one trace (JSON-able via :meth:`to_dict`)."""

    policy: str
    capacity_bytes: int
    trace: str
    requests: int
    input_tokens: int
    hit_tokens: int
    token_hit_rate: float
    flops_saved: float
    flops_total: float
    flops_saved_fraction: float
    ttft_mean_ms: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    leaf_evictions: int
    checkpoint_evictions: int
    truncated: int
    rejected: int
    final_bytes: int
    final_nodes: int
    final_checkpoints: int
    wall_s: float
    tuner: dict[str, Any] = field(default_factory=dict)
    full_hits: str = "free"
    full_hit_requests: int = 0
    final_logits_bytes: int = 0

    @property
    def evictions(self) -> int:
        return self.leaf_evictions + self.checkpoint_evictions

    @property
    def capacity_gb(self) -> float:
        return self.capacity_bytes / GB

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["evictions"] = self.evictions
        out["capacity_gb"] = self.capacity_gb
        return out


def simulate(
    trace: Trace,
    policy: str,
    capacity_bytes: int,
    spec: ModelSpec | None = None,
    *,
    alpha: float | None = None,
    tuner: str | None = "window",
    tuner_options: dict[str, Any] | None = None,
    ttft: TTFTModel | None = None,
    block_size: int = 32,
    truncate_oversized: bool = False,
    progress: bool = False,
    policy_options: dict[str, Any] | None = None,
    full_hits: str = "free",
) -> SimResult:
    """Replay ``trace`` through one policy at one cache size.

    Args:
        trace: the requests.
        policy: one of :data:`~thrifty.marconi.cache.POLICIES`.
        capacity_bytes: the cache budget.
        spec: the model (default: the paper's 7B hybrid).
        alpha: a fixed alpha for Marconi (disables the tuner).
        tuner: Marconi's alpha tuner when ``alpha`` is None: ``"window"`` (this
            project's), ``"paper"`` or ``None`` (alpha 0).
        tuner_options: keyword arguments for the tuner.
        ttft: the TTFT model (default: the paper's fit).
        block_size: vLLM+'s block size.
        truncate_oversized: see :class:`~thrifty.marconi.cache.PrefixCache`.
        progress: show a progress bar over requests.
        policy_options: keyword arguments for :func:`~thrifty.marconi.cache.build_cache`
            (e.g. ``max_states_per_path`` for ``"sglang"``).
        full_hits: ``"free"``, ``"recompute"`` or ``"logits"`` (see the module
            docstring); ``full_hit_requests`` counts the requests that hit
            their whole input, ``final_logits_bytes`` the logits held at the end.
    """
    if full_hits not in FULL_HITS:
        raise ValueError(f"full_hits must be one of {FULL_HITS}, got {full_hits!r}")
    if not isinstance(trace, Trace):
        raise TypeError(
            f"trace must be a Trace (load_trace, read_jsonl, synthetic_trace), got "
            f"{type(trace).__name__} {trace!r}"
        )
    spec = spec or paper_hybrid_7b()
    ttft = ttft or TTFTModel()
    the_tuner = None
    if policy == "marconi" and alpha is None:
        the_tuner = make_tuner(tuner, **(tuner_options or {}))
    cache = build_cache(
        policy,
        capacity_bytes,
        spec,
        alpha=alpha or 0.0,
        tuner=the_tuner,
        block_size=block_size,
        truncate_oversized=truncate_oversized,
        **_FULL_HIT_CACHE[full_hits],
        **(policy_options or {}),
    )
    started = time.perf_counter()
    ttfts = np.empty(len(trace))
    requests = tqdm(
        trace.requests, desc=f"{policy} {capacity_bytes / GB:g} GB", disable=not progress
    )
    for i, request in enumerate(requests):
        outcome = cache.serve(request.input_tokens, request.output_tokens)
        ttfts[i] = ttft(outcome.input_tokens - outcome.hit_tokens)
    stats = cache.stats
    return SimResult(
        policy=policy,
        capacity_bytes=int(capacity_bytes),
        trace=trace.name,
        requests=stats.requests,
        input_tokens=stats.input_tokens,
        hit_tokens=stats.hit_tokens,
        token_hit_rate=stats.hit_tokens / stats.input_tokens if stats.input_tokens else 0.0,
        flops_saved=stats.flops_saved,
        flops_total=stats.flops_total,
        flops_saved_fraction=stats.flops_saved / stats.flops_total if stats.flops_total else 0.0,
        ttft_mean_ms=float(ttfts.mean()) if len(ttfts) else math.nan,
        ttft_p50_ms=float(np.percentile(ttfts, 50)) if len(ttfts) else math.nan,
        ttft_p95_ms=float(np.percentile(ttfts, 95)) if len(ttfts) else math.nan,
        leaf_evictions=stats.leaf_evictions,
        checkpoint_evictions=stats.checkpoint_evictions,
        truncated=stats.truncated,
        rejected=stats.rejected,
        final_bytes=cache.tree.nbytes,
        final_nodes=cache.tree.num_nodes,
        final_checkpoints=cache.tree.num_checkpoints,
        wall_s=time.perf_counter() - started,
        tuner=(the_tuner.report() if the_tuner is not None else {"alpha": alpha or 0.0}),
        full_hits=full_hits,
        full_hit_requests=stats.full_hits,
        final_logits_bytes=sum(
            node.checkpoint.logits_nbytes for node in cache.tree.nodes() if node.checkpoint
        ),
    )


_SHARED: dict[str, Any] = {}


def _run_one(job: tuple[str, int, dict[str, Any]]) -> SimResult:
    policy, capacity, kwargs = job
    return simulate(_SHARED["trace"], policy, capacity, _SHARED["spec"], **kwargs)


def sweep(
    trace: Trace,
    policies: Sequence[str] = PAPER_POLICIES,
    capacities_gb: Sequence[float] = PAPER_SHAREGPT_SIZES_GB,
    spec: ModelSpec | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
    **kwargs: Any,
) -> list[SimResult]:
    """:func:`simulate` for every policy x cache size (``kwargs`` pass through).

    Results come back in (policy, size) order. ``workers > 1`` forks that many
    processes (Linux; other platforms run serially).
    """
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    spec = spec or paper_hybrid_7b()
    jobs = [(p, round(gb * GB), kwargs) for p in policies for gb in capacities_gb]
    # Longest jobs first (Marconi replays its windows) so the workers finish together.
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i][0] != "marconi", -jobs[i][1]))
    results: list[SimResult | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="sweep", disable=not progress)
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    if workers > 1 and can_fork and len(jobs) > 1:
        _SHARED.update(trace=trace, spec=spec)
        try:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
                futures = {pool.submit(_run_one, jobs[i]): i for i in order}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
        finally:
            _SHARED.clear()
    else:
        for i in order:
            policy, capacity, kw = jobs[i]
            results[i] = simulate(trace, policy, capacity, spec, **kw)
            bar.update()
    bar.close()
    return [r for r in results if r is not None]


def hit_rate_table(results: Sequence[SimResult]) -> dict[str, Any]:
    """Hit rate per policy and size, and Marconi's ratios to the baselines.

    ``mean_ratio_vs_vllm`` is the mean over sizes of Marconi/vLLM+ (how the
    artifact averages), ``min_ratio_vs_sglang`` the worst size against SGLang+.
    Each row also names its best baseline (the highest hit rate among the
    non-Marconi policies run at that size) and every policy's ratio to it
    (``vs_best``); ``mean_ratio_vs_best`` and ``min_ratio_vs_best`` summarise
    Marconi's.
    """
    by = {(r.policy, r.capacity_bytes): r for r in results}
    sizes = sorted({r.capacity_bytes for r in results})
    rows = []
    for size in sizes:
        row: dict[str, Any] = {"capacity_gb": size / GB}
        for policy in POLICIES:
            if (policy, size) in by:
                row[policy] = by[(policy, size)].token_hit_rate
        baselines = [p for p in BASELINES if p in row]
        if baselines:
            best = max(baselines, key=lambda p: row[p])
            row["best_baseline"] = best
            if row[best] > 0:
                row["vs_best"] = {p: row[p] / row[best] for p in POLICIES if p in row}
        rows.append(row)
    summary: dict[str, Any] = {"rows": rows}
    for base, key in (("vllm+", "vs_vllm"), ("sglang+", "vs_sglang")):
        ratios = [
            row["marconi"] / row[base]
            for row in rows
            if "marconi" in row and base in row and row[base] > 0
        ]
        if ratios:
            summary[f"mean_ratio_{key}"] = float(np.mean(ratios))
            summary[f"min_ratio_{key}"] = float(min(ratios))
    best = [row["vs_best"]["marconi"] for row in rows if "marconi" in row.get("vs_best", {})]
    if best:
        summary["mean_ratio_vs_best"] = float(np.mean(best))
        summary["min_ratio_vs_best"] = float(min(best))
    return summary
