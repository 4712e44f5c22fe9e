"""Simulator, sweeps and alpha tuners on small synthetic traces."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from thrifty.marconi.cache import build_cache
from thrifty.marconi.model import paper_hybrid_7b
from thrifty.marconi.simulate import GB, TTFTModel, hit_rate_table, simulate, sweep
from thrifty.marconi.traces import synthetic_trace
from thrifty.marconi.tuner import PaperAlphaTuner, WindowAlphaTuner, choose_alpha, replay

SPEC = paper_hybrid_7b()


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(num_sessions=30, system_prompt_tokens=256, seed=1)


def test_simulate_reports_consistent_metrics(trace):
    result = simulate(trace, "marconi", int(0.5 * GB), alpha=0.5)
    assert result.requests == len(trace)
    assert result.input_tokens == sum(len(r.input_tokens) for r in trace)
    assert 0 < result.token_hit_rate < 1
    assert result.hit_tokens == round(result.token_hit_rate * result.input_tokens)
    assert 0 < result.flops_saved_fraction < 1
    assert result.ttft_p50_ms <= result.ttft_p95_ms
    assert result.final_bytes <= result.capacity_bytes
    assert result.evictions > 0
    json.dumps(result.to_dict())  # JSON-able


def test_unlimited_cache_reuses_every_shared_prefix(trace):
    big = simulate(trace, "sglang+", 1000 * GB)
    assert big.evictions == 0
    # Every turn after the first reuses at least the previous input + output.
    expected = 0
    previous: dict = {}
    for r in trace:
        if r.session_id in previous:
            expected += previous[r.session_id]
        previous[r.session_id] = len(r.input_tokens) + len(r.output_tokens)
    assert big.hit_tokens >= expected


def test_sweep_runs_every_policy_and_size_and_tabulates(trace):
    results = sweep(trace, capacities_gb=(0.3, 1.0), workers=2, progress=False, tuner="window")
    assert [(r.policy, r.capacity_gb) for r in results] == [
        (p, s) for p in ("vllm+", "sglang+", "marconi") for s in (0.3, 1.0)
    ]
    serial = sweep(trace, policies=("sglang+",), capacities_gb=(0.3,), progress=False)
    assert serial[0].hit_tokens == results[2].hit_tokens  # workers give the same numbers
    table = hit_rate_table(results)
    assert len(table["rows"]) == 2 and "mean_ratio_vs_vllm" in table
    for row in table["rows"]:
        assert row["vllm+"] <= row["marconi"]


def test_ttft_model_and_fit():
    model = TTFTModel()
    assert model(0) == pytest.approx(17.8) and model(1000) == pytest.approx(17.8 + 53)
    fitted = TTFTModel.fit([100, 200, 400], [15.0, 25.0, 45.0])
    assert fitted.intercept_ms == pytest.approx(5.0) and fitted.per_token_ms == pytest.approx(0.1)


def test_replay_from_a_snapshot_reproduces_the_live_cache(trace):
    cache = build_cache("marconi", int(0.3 * GB), SPEC, alpha=0.25)
    requests = [(r.input_tokens, r.output_tokens) for r in trace]
    for inputs, outputs in requests[:60]:
        cache.serve(inputs, outputs)
    snapshot = cache.snapshot()
    before = cache.stats.hit_tokens
    for inputs, outputs in requests[60:140]:
        cache.serve(inputs, outputs)
    assert replay(snapshot, requests[60:140], 0.25) == cache.stats.hit_tokens - before
    assert snapshot.stats.requests == 0  # replays run on copies


def test_window_tuner_tunes_every_window_with_evictions(trace):
    tuner = WindowAlphaTuner(grid=(0.0, 0.5, 2.0), window=20)
    cache = build_cache("marconi", int(0.3 * GB), SPEC, tuner=tuner)
    for r in trace:
        cache.serve(r.input_tokens, r.output_tokens)
    assert tuner.history[0] == (0, 0.0)
    assert 1 <= tuner.rounds <= len(trace) // 20
    assert cache.eviction.alpha in tuner.grid
    assert tuner.report()["alpha_history"] == tuner.history
    with pytest.raises(ValueError, match="ascending"):
        WindowAlphaTuner(grid=(1.0, 0.0))


def test_alpha_choice_keeps_current_on_near_ties_else_smallest():
    grid = (0.0, 0.5, 1.0, 2.0)
    assert choose_alpha(grid, [90, 100, 99.5, 80], current=1.0, tolerance=0.01) == 1.0
    assert choose_alpha(grid, [90, 100, 99.5, 80], current=2.0, tolerance=0.01) == 0.5
    assert choose_alpha(grid, [100, 100, 100, 100], current=2.0, tolerance=0.0) == 2.0
    assert choose_alpha(grid, [0, 0, 0, 0], current=5.0, tolerance=0.01) == 0.0


def test_paper_tuner_tunes_once_after_five_times_the_first_eviction(trace):
    tuner = PaperAlphaTuner(grid=(0.0, 1.0), score_last=50)
    cache = build_cache("marconi", int(0.3 * GB), SPEC, tuner=tuner)
    first_eviction = None
    for i, r in enumerate(trace, 1):
        cache.serve(r.input_tokens, r.output_tokens)
        if first_eviction is None and cache.stats.evictions:
            first_eviction = i
    assert first_eviction is not None
    assert [at for at, _ in tuner.history] == [5 * first_eviction]


def test_simulate_rejects_bad_arguments(trace):
    with pytest.raises(ValueError, match="unknown policy"):
        sweep(trace, policies=("lru",))
    with pytest.raises(ValueError, match="unknown tuner"):
        simulate(trace, "marconi", GB, tuner="bayes")


def test_marconi_imports_no_training_substrate_and_no_benchmark_code() -> None:
    """In a fresh interpreter: the library modules load neither the harness nor comm/sync;
    the benchmark module loads the harness's result files but no training substrate."""
    code = """
import sys
training = ("thrifty.comm", "thrifty.sync", "thrifty.compressors")
others = ("thrifty.zen", "thrifty.mergecomp", "thrifty.bytecomp", "thrifty.lazarus")
import thrifty.marconi, thrifty.marconi.engine, thrifty.marconi.tuner
benchmark = ("thrifty.bench", "thrifty.marconi.benchmark")
library = sorted(m for m in sys.modules if m.startswith((*training, *others, *benchmark)))
import thrifty.marconi.benchmark
bench = sorted(m for m in sys.modules if m.startswith((*training, *others)))
print(library, bench)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] []"
