"""Zero-prefill hits: logits stored beside sequence-end checkpoints, charged at their bytes."""

from __future__ import annotations

import random

import pytest
from marconi_toy import LAYERS

from thrifty.marconi import simulate, synthetic_trace, with_resends
from thrifty.marconi.cache import build_cache
from thrifty.marconi.model import ModelSpec
from thrifty.marconi.tuner import replay

# The toy hybrid's 10 bytes of KV per token and 1000-byte checkpoints, with 300 bytes of logits.
TOY = ModelSpec("toy", LAYERS, logits_bytes=300)


def test_a_resend_of_input_plus_output_hits_all_of_it_only_with_logits():
    prompt, output = list(range(10)), [50, 51, 52]
    resend = prompt + output
    hits = {}
    for store in (False, True):
        cache = build_cache("marconi", 10**9, TOY, store_logits=store, need_logits=True)
        first = cache.begin(prompt, 3)
        assert first.logits_positions == ((13,) if store else ())
        assert first.finish(output).bytes_added == 130 + 1000 + (300 if store else 0)
        assert cache.tree.nbytes == 1130 + (300 if store else 0)
        hits[store] = cache.begin(resend, 2).hit_length
        # The paper's simulator (need_logits=False) counts the whole input either way.
        assert cache.begin(resend, 2, need_logits=False).hit_length == 13
    assert hits == {False: 0, True: 13}


def test_logits_go_where_the_input_or_the_sequence_ends_and_only_there():
    cache = build_cache("marconi", 10**9, TOY, store_logits=True, need_logits=True)
    cache.serve(list(range(20)), [1, 2])  # checkpoint at 22, with logits
    # A regenerate of the first 20 tokens: Marconi's branch point is the whole
    # input (20), captured in prefill, where the logits come for free.
    again = cache.begin(list(range(20)), 2)
    assert again.hit_length == 0 and again.positions == (20, 22)
    assert again.logits_positions == (20, 22)
    again.finish([1, 2])
    third = cache.begin(list(range(20)), 2)
    assert third.hit_length == 20 and third.hit_checkpoint.logits_nbytes == 300
    # A branch point inside the input stores the state only.
    other = cache.begin([*range(15), 99, 98], 1)
    assert other.positions == (15, 18) and other.logits_positions == (18,)
    other.finish([7])
    node = cache.tree.match_prefix(list(range(15))).hit_node
    assert node.depth == 15 and node.checkpoint.nbytes == 1000
    assert node.checkpoint.logits_nbytes == 0
    cache.tree.check_invariants()


def test_store_logits_needs_their_size():
    bare = ModelSpec("bare", TOY.layers)
    with pytest.raises(ValueError, match="logits_bytes"):
        build_cache("marconi", 10**6, bare, store_logits=True)


@pytest.mark.parametrize("policy", ["marconi", "sglang+", "vllm+", "sglang", "seglen", "vllm"])
def test_budget_holds_and_eviction_frees_the_logits(policy):
    """Random sessions with resends under a tight budget: the tree's byte count is
    the sum of its nodes' (logits included) and never above the budget."""
    rng = random.Random(7)
    cache = build_cache(
        policy,
        9000,
        TOY,
        alpha=0.5,
        block_size=4,
        vllm_block_size=4,
        mamba_cache_chunk_size=4,
        store_logits=True,
        need_logits=True,
    )
    history: list[int] = []
    full = 0
    for _ in range(150):
        if history and rng.random() < 0.3:
            inputs = history  # a resend of the last input + output
        elif history and rng.random() < 0.6:
            inputs = history + [rng.randrange(9) for _ in range(rng.randrange(1, 6))]
        else:
            inputs = [rng.randrange(9) for _ in range(rng.randrange(2, 12))]
        outputs = [rng.randrange(9) for _ in range(rng.randrange(1, 5))]
        outcome = cache.serve(inputs, outputs)
        full += outcome.hit_tokens == len(inputs)
        cache.tree.check_invariants()
        assert cache.tree.nbytes <= cache.capacity_bytes
        logits = sum(n.checkpoint.logits_nbytes for n in cache.tree.nodes() if n.checkpoint)
        assert logits % 300 == 0
        history = inputs + outputs
    assert cache.stats.evictions > 0
    assert cache.stats.full_hits == full
    if policy in ("marconi", "sglang+"):  # a checkpoint at every sequence end
        assert full > 10


def test_tuner_replays_serve_full_hits_as_the_live_cache():
    trace = with_resends(synthetic_trace(num_sessions=12, seed=3), 0.4, seed=1)
    spec = ModelSpec(TOY.name, TOY.layers, logits_bytes=300)
    live = build_cache("marconi", 40_000, spec, alpha=0.25, store_logits=True, need_logits=True)
    requests = [(r.input_tokens, r.output_tokens) for r in trace.requests]
    for inputs, outputs in requests[:40]:
        live.serve(inputs, outputs)
    snapshot = live.snapshot()
    before = live.stats.hit_tokens
    for inputs, outputs in requests[40:90]:
        live.serve(inputs, outputs)
    assert replay(snapshot, requests[40:90], 0.25) == live.stats.hit_tokens - before


def test_with_resends_and_the_simulator_modes():
    base = synthetic_trace(num_sessions=8, seed=2)
    trace = with_resends(base, 0.5, seed=0)
    extra = len(trace) - len(base)
    assert extra == trace.meta["resends"] > 0
    for i, r in enumerate(trace.requests[1:], 1):
        prev = trace.requests[i - 1]
        if r.input_tokens == prev.input_tokens + prev.output_tokens and r.ts == prev.ts:
            assert r.output_tokens == prev.output_tokens
    with pytest.raises(ValueError, match="rate"):
        with_resends(base, 1.5)
    spec = ModelSpec(TOY.name, TOY.layers, logits_bytes=300)
    results = {
        mode: simulate(trace, "marconi", 10**7, spec, alpha=0.0, full_hits=mode)
        for mode in ("free", "recompute", "logits")
    }
    free, recompute, logits = results["free"], results["recompute"], results["logits"]
    # A big cache: nothing is evicted, so the logits only add hits back.
    assert recompute.full_hit_requests == 0 < logits.full_hit_requests
    assert recompute.hit_tokens < logits.hit_tokens <= free.hit_tokens
    assert logits.final_logits_bytes > 0 == recompute.final_logits_bytes
    assert logits.final_bytes - logits.final_logits_bytes <= free.final_bytes
    with pytest.raises(ValueError, match="full_hits"):
        simulate(trace, "marconi", 10**7, spec, full_hits="always")


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("arch", ["nemotron_h", "bamba"])
def test_engine_zero_prefill_hits_are_token_identical_to_no_cache(arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from thrifty.marconi.engine import HybridEngine, TensorCheckpoint, build_model

    transformers.logging.set_verbosity_error()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(arch, vocab_size=64, seed=3)
        spec = ModelSpec.from_hf_config(model.config)
        assert spec.logits_bytes == 64 * 4
        cache = build_cache("marconi", 10**7, spec, store_logits=True)
        engine, plain = HybridEngine(model, cache), HybridEngine(model)
        off = HybridEngine(model, build_cache("marconi", 10**7, spec))
        rng = random.Random(5)
        prompt = [rng.randrange(64) for _ in range(18)]
        seen: set[int] = set()

        def both(ids: list[int], n: int = 4):
            got, ref, old = engine.serve(ids, n), plain.serve(ids, n), off.serve(ids, n)
            assert got.output_ids == ref.output_ids == old.output_ids
            seen.update(ref.output_ids)
            return got, old

        first, _ = both(prompt)
        resend = prompt + first.output_ids  # e.g. "continue": input + output exactly
        hit, old = both(resend)
        assert (hit.hit_tokens, hit.prefill_tokens, hit.prefill_pieces) == (len(resend), 0, 0)
        assert old.prefill_tokens > 0  # without logits: back to the checkpoint before
        again, _ = both(resend)  # the zero-prefill hit stored its own sequence end
        assert again.prefill_tokens == 0
        turn, _ = both(resend + hit.output_ids + [rng.randrange(64) for _ in range(5)])
        assert turn.hit_tokens == len(resend) + 4  # the ordinary multi-turn case
        # A forced (replayed) output stores its end's logits too.
        forced = engine.serve(prompt[:9], forced_output=[1, 2, 3])
        follow = engine.serve([*prompt[:9], 1, 2, 3], 2)
        assert follow.prefill_tokens == 0
        assert follow.output_ids == plain.serve([*prompt[:9], 1, 2, 3], 2).output_ids
        assert forced.prefill_tokens == 9
        assert len(seen) >= 3, "the model predicts (almost) one token: the check is vacuous"

        # Every charged byte is a tensor's, the logits included.
        total = logits = 0
        for node in cache.tree.nodes():
            total += node.kv.nbytes
            ckpt = node.checkpoint
            if ckpt is not None:
                assert isinstance(ckpt, TensorCheckpoint)
                states = sum(
                    t.nbytes for _, _, c, r in ckpt.states for t in (c, r) if t is not None
                )
                assert states == spec.checkpoint_bytes
                if ckpt.logits is not None:
                    assert ckpt.logits.nbytes == spec.logits_bytes == ckpt.logits_nbytes
                    assert ckpt.logits.untyped_storage().nbytes() == ckpt.logits.nbytes
                    logits += 1
                total += states + ckpt.logits_nbytes
        assert logits >= 3
        assert total == cache.tree.nbytes <= cache.capacity_bytes
    finally:
        torch.set_num_threads(saved)


def test_cli_simulate_takes_full_hits_and_resends(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from thrifty.cli import app
    from thrifty.marconi import write_jsonl

    monkeypatch.setenv("THRIFTY_RESULTS", str(tmp_path / "results"))
    path = write_jsonl(synthetic_trace(num_sessions=6, seed=1), tmp_path / "t.jsonl")
    args = ["marconi", "simulate", "--trace", str(path), "--sizes-gb", "2", "--workers", "1"]
    args += ["--policies", "marconi", "--ttft", "paper", "--resend-rate", "0.5"]
    result = CliRunner().invoke(app, [*args, "--full-hits", "logits"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "results" / "marconi_sweep.json").read_text())
    assert payload["full_hits"] == "logits" and payload["trace"]["resends"] > 0
    (row,) = payload["results"]
    assert row["full_hit_requests"] > 0 and row["final_logits_bytes"] > 0
    assert "whole-input hits (logits)" in result.output
    bad = CliRunner().invoke(app, [*args, "--full-hits", "always"])
    assert bad.exit_code != 0 and "'--full-hits'" in bad.output
