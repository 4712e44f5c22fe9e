"""Marconi's two benchmarks: the simulated sweep and the engine's measured TTFT.

* :func:`run_sweep` replays a trace through every policy x cache size with the
  paper's 7B hybrid (sizes only) and reports token hit rate, FLOPs saved,
  modelled TTFT and evictions, plus the goal checks (Marconi >= 7x vLLM+ on
  average, never below SGLang+). Writes ``results/<name>.json`` and a
  paper-style plot of hit rate vs cache size per policy.
* :func:`run_serve_trace` serves a ShareGPT slice through a tiny random hybrid
  model on CPU, once per policy and byte budget plus once without a cache,
  and measures each request's TTFT. The engines run in lockstep (request by
  request, every engine in turn), so load on a shared machine hits all of
  them alike; each request's restore + prefill is timed ``repeats`` times and
  the fastest kept. The simulator's :class:`TTFTModel` is fitted to the
  one-piece prefills. Writes ``results/<name>.json`` and a plot.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from thrifty.bench.results import results_dir, write_json
from thrifty.marconi.cache import PAPER_POLICIES, build_cache
from thrifty.marconi.engine import HybridEngine, build_model, hybrid_config
from thrifty.marconi.model import ModelSpec, paper_hybrid_7b
from thrifty.marconi.simulate import GB, TTFTModel, hit_rate_table, sweep
from thrifty.marconi.traces import Trace
from thrifty.marconi.tuner import make_tuner

__all__ = [
    "DEFAULT_ENGINE_MODEL",
    "check_fits_vocabulary",
    "engine_demo",
    "engine_spec",
    "load_ttft_model",
    "plot_serve",
    "plot_sweep",
    "run_serve_trace",
    "run_sweep",
    "sweep_goals",
]

log = logging.getLogger(__name__)

MB = 10**6
ZERO_PREFILL = ("off", "on", "both")
# The engine benchmark's model: NemotronH (the fastest reference kernels on
# CPU), 8 layers (2 attention, 3 Mamba2, 3 MLP), width 128, cl100k vocabulary.
# One checkpoint (215 KB) weighs as much as the KV of 210 tokens; the
# paper's 7B: 409 tokens.
DEFAULT_ENGINE_MODEL: dict[str, Any] = {
    "arch": "nemotron_h",
    "vocab_size": 100_277,
    "hidden_size": 128,
    "num_layers": 8,
    "d_state": 64,
    "chunk_size": 64,
}


# --------------------------------------------------------------------------- sweep


def sweep_goals(table: dict[str, Any]) -> dict[str, Any]:
    """The issue's hit-rate goals, from :func:`hit_rate_table`'s summary."""
    rows = table["rows"]
    goals: dict[str, Any] = {}
    if any("marconi" in row and "vllm+" in row for row in rows):
        goals["marconi_7x_vllm"] = (
            {
                "holds": table["mean_ratio_vs_vllm"] >= 7.0,
                "mean_ratio": table["mean_ratio_vs_vllm"],
                "paper": 7.3,
            }
            if "mean_ratio_vs_vllm" in table
            else {"holds": None, "note": "vLLM+ hit no tokens at any size: no ratio"}
        )
    if any("marconi" in row and "sglang+" in row for row in rows):
        goals["marconi_never_below_sglang"] = (
            {
                "holds": table["min_ratio_vs_sglang"] >= 1.0,
                "min_ratio": table["min_ratio_vs_sglang"],
                "mean_ratio": table["mean_ratio_vs_sglang"],
            }
            if "min_ratio_vs_sglang" in table
            else {"holds": None, "note": "SGLang+ hit no tokens at any size: no ratio"}
        )
    return goals


def load_ttft_model(spec: str) -> tuple[TTFTModel, str]:
    """``"paper"``, ``"engine"`` (``results/marconi_serve.json``), ``"auto"`` (engine if
    that file exists, else paper) or a path to a serve-trace JSON."""
    if spec == "paper":
        return TTFTModel(), "paper fit (Jamba-1.5-Mini, A100): 17.8 ms + 0.053 ms/token"
    path = results_dir() / "marconi_serve.json" if spec in ("engine", "auto") else Path(spec)
    if spec == "auto" and not path.exists():
        return load_ttft_model("paper")
    try:
        fit = json.loads(path.read_text())["ttft_fit"]
        model = TTFTModel(fit["intercept_ms"], fit["per_token_ms"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot read a TTFT fit from {path}: {exc}") from exc
    return model, (
        f"engine fit ({path}): {model.intercept_ms:.2f} ms + {model.per_token_ms:.4f} ms/token"
    )


def run_sweep(
    trace: Trace,
    *,
    policies: Sequence[str] = PAPER_POLICIES,
    capacities_gb: Sequence[float] = (1, 2, 3, 4, 5, 10),
    spec: ModelSpec | None = None,
    workers: int = 2,
    ttft: str = "auto",
    tuner: str | None = "window",
    alpha: float | None = None,
    name: str = "marconi_sweep",
    progress: bool = True,
    full_hits: str = "free",
) -> dict[str, Any]:
    """Sweep policies x sizes; write ``results/<name>.json`` and ``.png``.

    ``full_hits`` (``"free"``, ``"recompute"``, ``"logits"``): how a request
    whose whole input is cached is served (see :mod:`thrifty.marconi.simulate`).
    """
    spec = spec or paper_hybrid_7b()
    ttft_model, ttft_source = load_ttft_model(ttft)
    started = time.perf_counter()
    cpu_before = _cpu_seconds()
    results = sweep(
        trace,
        policies,
        capacities_gb,
        spec,
        workers=workers,
        progress=progress,
        ttft=ttft_model,
        tuner=tuner,
        alpha=alpha,
        full_hits=full_hits,
    )
    wall = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    table = hit_rate_table(results)
    payload: dict[str, Any] = {
        "trace": trace.summary(),
        "model": spec.to_dict(),
        "policies": list(policies),
        "capacities_gb": list(capacities_gb),
        "tuner": "fixed alpha" if alpha is not None else tuner,
        "alpha": alpha,
        "full_hits": full_hits,
        "ttft_model": {
            "intercept_ms": ttft_model.intercept_ms,
            "per_token_ms": ttft_model.per_token_ms,
            "source": ttft_source,
        },
        "workers": workers,
        "sweep_wall_s": wall,
        "sweep_cpu_s": cpu,
        "results": [r.to_dict() for r in results],
        "hit_rate_table": table,
        "goals": sweep_goals(table),
    }
    payload["p95_ttft_vs_sglang"] = _p95_gains(results)
    path = write_json(name, payload)
    payload["json_path"] = str(path)
    payload["plot_path"] = str(plot_sweep(payload, path.with_suffix(".png")))
    return payload


def _cpu_seconds() -> float:
    """CPU seconds used by this process and its finished children (the sweep's workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _p95_gains(results: Sequence[Any]) -> list[dict[str, float]]:
    """Marconi's P95 TTFT against SGLang+ per size (negative = lower)."""
    by = {(r.policy, r.capacity_bytes): r for r in results}
    out = []
    for (policy, size), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        base = by.get(("sglang+", size))
        if policy == "marconi" and base is not None and base.ttft_p95_ms > 0:
            out.append(
                {
                    "capacity_gb": size / GB,
                    "marconi_p95_ms": r.ttft_p95_ms,
                    "sglang_p95_ms": base.ttft_p95_ms,
                    "change": r.ttft_p95_ms / base.ttft_p95_ms - 1.0,
                }
            )
    return out


def plot_sweep(payload: dict[str, Any], path: Path) -> Path:
    """Hit rate (left) and FLOPs saved (right) vs cache size, one line per policy."""
    import matplotlib  # optional: [bench]

    matplotlib.use("Agg")  # files only, no display; before pyplot is imported
    import matplotlib.pyplot as plt  # optional: [bench]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {
        "vllm+": ("C0", "s"),
        "sglang+": ("C2", "^"),
        "marconi": ("C1", "o"),
        "sglang": ("C4", "v"),
        "seglen": ("C5", "D"),
        "vllm": ("C9", "P"),
    }
    for policy in payload["policies"]:
        rows = sorted(
            (r for r in payload["results"] if r["policy"] == policy),
            key=lambda r: r["capacity_gb"],
        )
        color, marker = styles.get(policy, ("C3", "x"))
        xs = [r["capacity_gb"] for r in rows]
        style = {"marker": marker, "color": color, "label": policy}
        left.plot(xs, [100 * r["token_hit_rate"] for r in rows], **style)
        right.plot(xs, [100 * r["flops_saved_fraction"] for r in rows], **style)
    trace = payload["trace"]
    title = f"{trace['name']}: {trace['sessions']} sessions, {trace['requests']} requests"
    left.set(xlabel="cache size (GB)", ylabel="token hit rate (%)", title=title)
    right.set(
        xlabel="cache size (GB)", ylabel="prefill FLOPs saved (%)", title=payload["model"]["name"]
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- engine TTFT


def engine_spec(model_options: dict[str, Any] | None = None) -> ModelSpec:
    """The byte/FLOP model of the engine benchmark's model (no weights built).

    Raises:
        ValueError: an unknown architecture or a size it cannot take.
    """
    options = dict(DEFAULT_ENGINE_MODEL, **(model_options or {}))
    arch = options.pop("arch")
    return ModelSpec.from_hf_config(hybrid_config(arch, **options), dtype="float32")


def check_fits_vocabulary(trace: Trace, vocab_size: int) -> None:
    """Raise ValueError when a token id of ``trace`` is not below ``vocab_size``."""
    top = max(max(r.input_tokens + r.output_tokens, default=0) for r in trace.requests)
    if top >= vocab_size:
        raise ValueError(f"token id {top} does not fit the vocabulary of {vocab_size}")


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def run_serve_trace(
    trace: Trace,
    *,
    capacities_mb: Sequence[float] = (8, 16),
    policies: Sequence[str] = PAPER_POLICIES,
    model_options: dict[str, Any] | None = None,
    repeats: int = 3,
    threads: int = 1,
    tuner: str | None = "window",
    name: str = "marconi_serve",
    progress: bool = True,
    on_request: Callable[[int, int], None] | None = None,
    zero_prefill: str = "off",
) -> dict[str, Any]:
    """Measure real TTFT per request for each policy x budget and without a cache.

    Args:
        trace: requests (token ids below the model's vocabulary); each output is
            fed as recorded, so the next turn's input continues what was stored.
        capacities_mb: byte budgets (10^6 bytes), the same for every policy.
        policies: cache systems to run.
        model_options: overrides of :data:`DEFAULT_ENGINE_MODEL`.
        repeats: restore + prefill timings per request (the fastest is kept).
        threads: torch intra-op threads while measuring.
        tuner: Marconi's alpha tuner (as the simulator's default).
        name: results file stem.
        on_request: called with (done, total) after each request (progress).
        zero_prefill: ``"off"`` (caches as the paper), ``"on"`` (every cache
            stores logits for zero-prefill hits, ``store_logits``) or
            ``"both"`` (each policy x budget twice, the second labelled
            ``<policy>/zp``, served in the same lockstep).
    """
    if zero_prefill not in ZERO_PREFILL:
        raise ValueError(f"zero_prefill must be one of {ZERO_PREFILL}, got {zero_prefill!r}")
    import transformers  # optional: [marconi]

    transformers.logging.set_verbosity_error()  # the reference-kernel fallback notices
    options = dict(DEFAULT_ENGINE_MODEL, **(model_options or {}))
    arch = options.pop("arch")
    check_fits_vocabulary(trace, options["vocab_size"])
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        built = time.perf_counter()
        model = build_model(arch, **options)
        spec = ModelSpec.from_hf_config(model.config, dtype="float32")
        build_s = time.perf_counter() - built
        engines: dict[str, HybridEngine] = {"none": HybridEngine(model)}
        variants = {"off": [False], "on": [True], "both": [False, True]}[zero_prefill]
        for mb in capacities_mb:
            for policy in policies:
                for store_logits in variants:
                    tuned = make_tuner(tuner) if policy == "marconi" else None
                    cache = build_cache(
                        policy, round(mb * MB), spec, tuner=tuned, store_logits=store_logits
                    )
                    label = f"{policy}{'/zp' if zero_prefill == 'both' and store_logits else ''}"
                    engines[f"{label}@{mb:g}MB"] = HybridEngine(model, cache)
        if engines["none"].checkpoint_nbytes != spec.checkpoint_bytes:
            raise RuntimeError(
                f"byte model says {spec.checkpoint_bytes} B per checkpoint, the model's "
                f"states take {engines['none'].checkpoint_nbytes}"
            )
        warm = HybridEngine(model)
        for length in (16, 64):  # first calls allocate and pick kernels
            warm.serve([i % 256 for i in range(length)], forced_output=[1], repeats=2)
        records: dict[str, list[dict[str, Any]]] = {label: [] for label in engines}
        mismatched: dict[str, int] = dict.fromkeys(engines, 0)
        started = time.perf_counter()
        bar = tqdm(total=len(trace), desc="serve-trace", disable=not progress)
        for i, request in enumerate(trace.requests):
            first = None
            for label, engine in engines.items():
                r = engine.serve(
                    request.input_tokens, forced_output=request.output_tokens, repeats=repeats
                )
                if first is None:
                    first = r.output_ids[0]
                elif r.output_ids[0] != first:
                    mismatched[label] += 1
                records[label].append(
                    {
                        "input_tokens": len(request.input_tokens),
                        "hit_tokens": r.hit_tokens,
                        "prefill_tokens": r.prefill_tokens,
                        "prefill_pieces": r.prefill_pieces,
                        "ttft_ms": 1e3 * r.ttft_s,
                        "admit_ms": 1e3 * r.admit_s,
                    }
                )
            bar.update()
            if on_request is not None:
                on_request(i + 1, len(trace))
        bar.close()
        serve_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(saved_threads)

    # The simulator's TTFT model, fitted to the prefills that ran in one piece.
    points = [
        (rec["prefill_tokens"], rec["ttft_ms"])
        for recs in records.values()
        for rec in recs
        if rec["prefill_pieces"] == 1
    ]
    fit = TTFTModel.fit([p for p, _ in points], [t for _, t in points])
    measured = np.asarray([t for _, t in points])
    predicted = np.asarray([fit(p) for p, _ in points])
    r2 = 1.0 - float(((measured - predicted) ** 2).sum()) / float(
        ((measured - measured.mean()) ** 2).sum()
    )
    rows = []
    for label, recs in records.items():
        engine = engines[label]
        ttfts = [rec["ttft_ms"] for rec in recs]
        modelled = [fit(rec["prefill_tokens"]) for rec in recs]
        inputs = sum(rec["input_tokens"] for rec in recs)
        hits = sum(rec["hit_tokens"] for rec in recs)
        row: dict[str, Any] = {
            "engine": label,
            "policy": label.split("@")[0],
            "capacity_mb": None,
            "token_hit_rate": hits / inputs if inputs else 0.0,
            "ttft_mean_ms": float(np.mean(ttfts)),
            "ttft_p50_ms": _percentile(ttfts, 50),
            "ttft_p95_ms": _percentile(ttfts, 95),
            "modelled_ttft_mean_ms": float(np.mean(modelled)),
            "modelled_ttft_p95_ms": _percentile(modelled, 95),
            "multi_piece_prefills": sum(rec["prefill_pieces"] > 1 for rec in recs),
            "zero_prefill_hits": sum(rec["prefill_tokens"] == 0 for rec in recs),
            "first_token_mismatches": mismatched[label],
        }
        if engine.cache is not None:
            cache = engine.cache
            row.update(
                capacity_mb=cache.capacity_bytes / MB,
                evictions=cache.stats.evictions,
                rejected=cache.stats.rejected,
                final_bytes=cache.tree.nbytes,
                final_checkpoints=cache.tree.num_checkpoints,
                admit_mean_ms=float(np.mean([rec["admit_ms"] for rec in recs])),
                tuner=cache.tuner.report() if cache.tuner is not None else None,
            )
        rows.append(row)
    payload: dict[str, Any] = {
        "trace": trace.summary(),
        "model": {"arch": arch, **options, "spec": spec.to_dict(), "build_s": build_s},
        "capacities_mb": list(capacities_mb),
        "policies": list(policies),
        "repeats": repeats,
        "threads": threads,
        "zero_prefill": zero_prefill,
        "serve_s": serve_s,
        "rows": rows,
        "ttft_fit": {
            "intercept_ms": fit.intercept_ms,
            "per_token_ms": fit.per_token_ms,
            "r2": r2,
            "points": len(points),
        },
        "goals": _serve_goals(rows, capacities_mb),
        "records": records,
    }
    path = write_json(name, payload)
    payload["json_path"] = str(path)
    payload["plot_path"] = str(plot_serve(payload, path.with_suffix(".png")))
    return payload


def _serve_goals(rows: list[dict[str, Any]], capacities_mb: Sequence[float]) -> dict[str, Any]:
    """Marconi's mean TTFT below vLLM+'s and SGLang+'s at each budget."""
    by = {row["engine"]: row for row in rows}
    per_budget = []
    for mb in capacities_mb:
        marconi = by.get(f"marconi@{mb:g}MB")
        if marconi is None:
            continue
        entry: dict[str, Any] = {"capacity_mb": mb, "marconi_ms": marconi["ttft_mean_ms"]}
        for base in ("vllm+", "sglang+"):
            other = by.get(f"{base}@{mb:g}MB")
            if other is not None:
                entry[f"{base}_ms"] = other["ttft_mean_ms"]
                entry[f"lower_than_{base}"] = marconi["ttft_mean_ms"] < other["ttft_mean_ms"]
        per_budget.append(entry)
    holds = all(v for e in per_budget for k, v in e.items() if k.startswith("lower_than_"))
    return {"marconi_mean_ttft_lowest": {"holds": holds, "per_budget": per_budget}}


def plot_serve(payload: dict[str, Any], path: Path) -> Path:
    """Mean and P95 TTFT per engine (left); TTFT vs tokens prefilled with the fit (right)."""
    import matplotlib  # optional: [bench]

    matplotlib.use("Agg")  # files only, no display; before pyplot is imported
    import matplotlib.pyplot as plt  # optional: [bench]

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = payload["rows"]
    colors = {
        "none": "0.5",
        "vllm+": "C0",
        "sglang+": "C2",
        "marconi": "C1",
        "sglang": "C4",
        "seglen": "C5",
        "vllm": "C9",
    }
    xs = np.arange(len(rows))
    bar_colors = [colors.get(r["policy"], "C3") for r in rows]
    left.bar(xs - 0.2, [r["ttft_mean_ms"] for r in rows], 0.4, label="mean", color=bar_colors)
    p95 = [r["ttft_p95_ms"] for r in rows]
    left.bar(xs + 0.2, p95, 0.4, label="P95", alpha=0.45, color=bar_colors)
    left.set_xticks(list(xs), [r["engine"] for r in rows], rotation=30, ha="right", fontsize=8)
    left.set(ylabel="TTFT (ms)", title="measured TTFT (solid: mean, light: P95)")
    for label, recs in payload["records"].items():
        policy = label.split("@")[0]
        right.scatter(
            [r["prefill_tokens"] for r in recs],
            [r["ttft_ms"] for r in recs],
            s=8,
            color=colors.get(policy, "C3"),
            alpha=0.5,
            label=label,
        )
    fit = payload["ttft_fit"]
    top = max(r["prefill_tokens"] for recs in payload["records"].values() for r in recs)
    label = f"fit {fit['intercept_ms']:.1f} ms + {fit['per_token_ms']:.3f} ms/tok"
    line = [fit["intercept_ms"], fit["intercept_ms"] + fit["per_token_ms"] * top]
    right.plot([0, top], line, "k--", label=label)
    title = f"{payload['model']['arch']}, {payload['threads']} CPU thread(s)"
    right.set(xlabel="tokens prefilled", ylabel="TTFT (ms)", title=title)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the tour


def engine_demo(
    arch: str = "nemotron_h",
    *,
    sessions: int = 3,
    system_tokens: int = 384,
    user_tokens: int = 24,
    new_tokens: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """A few cached requests on a tiny hybrid model, checked against no cache.

    Every session shares one system prompt and runs two turns (the second
    continues the first's input + output). Each request is served by a
    Marconi-cached engine and by an uncached one; the greedy outputs must
    match token for token.
    """
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    try:
        return _engine_demo(arch, sessions, system_tokens, user_tokens, new_tokens, seed)
    finally:
        torch.set_num_threads(saved_threads)


def _engine_demo(
    arch: str, sessions: int, system_tokens: int, user_tokens: int, new_tokens: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    vocab = 256
    model = build_model(arch, vocab_size=vocab, hidden_size=64, num_layers=4, seed=seed)
    spec = ModelSpec.from_hf_config(model.config, dtype="float32")
    cached = HybridEngine(model, build_cache("marconi", 8 * MB, spec))
    plain = HybridEngine(model)
    warm = HybridEngine(model)
    warm.serve([i % vocab for i in range(system_tokens)], 2)

    def words(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    system = words(system_tokens)
    pending = [system + words(user_tokens) for _ in range(sessions)]
    cached_ms, plain_ms, hits, inputs, identical = [], [], 0, 0, True
    for turn in range(2):
        for s in range(sessions):
            prompt = pending[s]
            a = cached.serve(prompt, new_tokens, repeats=3)
            b = plain.serve(prompt, new_tokens, repeats=3)
            identical &= a.output_ids == b.output_ids
            cached_ms.append(1e3 * a.ttft_s)
            plain_ms.append(1e3 * b.ttft_s)
            hits += a.hit_tokens
            inputs += len(prompt)
            if turn == 0:
                pending[s] = prompt + a.output_ids + words(user_tokens)
    cache = cached.cache
    assert cache is not None
    return {
        "arch": arch,
        "requests": 2 * sessions,
        "identical": identical,
        "hit_rate": hits / inputs,
        "ttft_cached_ms": float(np.mean(cached_ms)),
        "ttft_plain_ms": float(np.mean(plain_ms)),
        "cache_bytes": cache.tree.nbytes,
        "checkpoints": cache.tree.num_checkpoints,
    }
