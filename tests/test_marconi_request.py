"""The one request handle: ``cache.begin`` -> ``CacheRequest.finish``, for the simulator and
the engine (which must reach the cache through nothing else)."""

from __future__ import annotations

import random

import pytest
from marconi_toy import TOY

from thrifty.marconi.cache import build_cache
from thrifty.marconi.model import ModelSpec

SYSTEM = list(range(100, 120))  # a 20-token shared system prompt


def test_handle_carries_the_hit_the_positions_and_finishes_once():
    cache = build_cache("marconi", 10**9, TOY)
    first = cache.begin([*SYSTEM, 1, 2, 3], 2)
    assert (first.hit_length, first.hit_kv, first.hit_checkpoint) == (0, (), None)
    assert first.positions == (25,) and first.prefill_positions == ()
    assert first.output_positions == (25,)
    assert first.finish([4, 5]).checkpoints_added == 1
    with pytest.raises(RuntimeError, match="already called"):
        first.finish([4, 5])

    # Another user: diverges inside the cached edge at 20, so the branch point
    # must be captured during prefill; the end state during decoding.
    branch = cache.begin([*SYSTEM, 7, 8], 3)
    assert branch.hit_length == 0 and branch.match.matched_length == 20
    assert branch.positions == (20, 25)
    assert branch.prefill_positions == (20,) and branch.output_positions == (25,)
    outcome = branch.finish([9, 9, 9])
    assert (outcome.hit_tokens, outcome.checkpoints_added, outcome.bytes_added) == (0, 2, 2050)

    third = cache.begin([*SYSTEM, 5], 1)
    assert third.hit_length == 20
    assert sum(seg.num_tokens for seg in third.hit_kv) == 20
    assert third.hit_checkpoint is third.match.hit_node.checkpoint
    assert third.hit_checkpoint.nbytes == 1000
    assert third.prefill_positions == () and third.output_positions == (22,)
    third.finish([6])
    assert cache.stats.requests == 3 and cache.stats.hit_tokens == 20
    assert third.prefill_positions == ()  # read before finish: the answer it gave then
    late = cache.begin([*SYSTEM, 7, 8, 9], 1)
    late.finish([1])
    with pytest.raises(RuntimeError, match="before finish"):
        late.prefill_positions  # noqa: B018  (first read after finish: the tree has moved on)


def test_prefill_positions_skip_states_the_tree_already_holds():
    cache = build_cache("vllm+", 10**9, TOY, block_size=4)
    cache.serve(list(range(10)), [10, 11, 12])  # checkpoints at 4, 8, 12
    # An engine that must run the last input token caps the hit: 4, not 12.
    request = cache.begin(list(range(13)), 3, max_hit=5)
    assert request.hit_length == 4
    assert request.positions == (8, 12, 16)
    assert request.prefill_positions == ()  # 8 and 12 are in the tree already
    assert request.output_positions == (16,)


def test_finish_with_another_output_length_plans_again():
    cache = build_cache("marconi", 10**9, TOY)
    request = cache.begin([1, 2, 3, 4], 5)
    assert request.positions == (9,)
    outcome = request.finish([5, 6])  # stopped early: the state after 6 tokens
    assert outcome.checkpoints_added == 1 and outcome.output_tokens == 2
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7]).hit_length == 6


def test_serve_is_begin_then_finish():
    rng = random.Random(4)
    requests, history = [], []
    for _ in range(30):
        tail = [rng.randrange(5) for _ in range(rng.randrange(1, 8))]
        inputs = [*history, *tail] if history and rng.random() < 0.6 else [*SYSTEM[:8], *tail]
        outputs = [rng.randrange(5) for _ in range(rng.randrange(0, 4))]
        requests.append((inputs, outputs))
        history = inputs + outputs
    for policy in ("marconi", "sglang", "vllm"):
        served = build_cache(policy, 6000, TOY, alpha=0.5, vllm_block_size=4)
        handled = build_cache(policy, 6000, TOY, alpha=0.5, vllm_block_size=4)
        for inputs, outputs in requests:
            a = served.serve(inputs, outputs)
            b = handled.begin(inputs, len(outputs)).finish(outputs)
            assert a == b
        assert served.stats == handled.stats and served.tree.nbytes == handled.tree.nbytes


# --------------------------------------------------------------------------- the engine


class _OnlyTheHandle:
    """Stands in for a cache: the engine may call ``begin`` and nothing else, and
    may read only the handle's documented fields before calling ``finish``."""

    FIELDS = frozenset(
        {
            "hit_length",
            "hit_kv",
            "hit_checkpoint",
            "prefill_positions",
            "output_positions",
            "logits_positions",
        }
    )

    def __init__(self, cache) -> None:
        self._cache = cache
        self.calls: list[str] = []

    def begin(self, *args, **kwargs):
        self.calls.append("begin")
        return _HandleView(self._cache.begin(*args, **kwargs), self.calls)

    def __getattr__(self, name: str):
        raise AssertionError(f"the engine reached into the cache: .{name}")


class _HandleView:
    def __init__(self, request, calls: list[str]) -> None:
        self._request, self._calls = request, calls

    def finish(self, *args, **kwargs):
        self._calls.append("finish")
        return self._request.finish(*args, **kwargs)

    def __getattr__(self, name: str):
        if name not in _OnlyTheHandle.FIELDS:
            raise AssertionError(f"the engine read .{name} of the request handle")
        return getattr(self._request, name)


def test_engine_calls_the_cache_twice_per_request_and_never_its_tree(one_thread):
    transformers = pytest.importorskip("transformers")
    from thrifty.marconi.engine import HybridEngine, build_model

    transformers.logging.set_verbosity_error()
    model = build_model("nemotron_h", vocab_size=64, seed=1)
    spec = ModelSpec.from_hf_config(model.config)
    cache = build_cache("marconi", 10**7, spec)
    guarded = _OnlyTheHandle(cache)
    engine, reference = HybridEngine(model, guarded), HybridEngine(model)
    rng = random.Random(5)
    system = [rng.randrange(64) for _ in range(20)]
    prompts = [system + [rng.randrange(64) for _ in range(n)] for n in (6, 9, 4)]
    hits = 0
    for prompt in (*prompts, prompts[0]):
        result = engine.serve(prompt, 3)
        assert result.output_ids == reference.generate(prompt, 3)
        hits += result.hit_tokens
    assert guarded.calls == ["begin", "finish"] * 4
    assert hits > 0 and cache.stats.requests == 4  # restores ran through the handle
