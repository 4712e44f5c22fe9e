"""Today's engines as baselines: SGLang's MambaRadixCache, SegLen and vLLM's align mode,
on small traces whose hits, kept states and evictions are worked out by hand."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marconi_toy import TOY, ckpt_depths

from thrifty.marconi.cache import PrefixCache, build_cache
from thrifty.marconi.model import LayerCost, ModelSpec, paper_hybrid_7b
from thrifty.marconi.policies import (
    SGLangAdmission,
    VLLMAlignAdmission,
    VLLMEviction,
    replay_length,
    vllm_align_geometry,
)
from thrifty.marconi.tree import MatchResult, RadixTree


def node_at(cache: PrefixCache, depth: int):
    return next(n for n in cache.tree.nodes() if n.depth == depth)


def assert_index_is_fresh(index) -> None:
    """Every live entry of a scored index carries its node's current efficiency
    (a tombstone above a node changes its replay length without touching it)."""
    for heap in (index._eff_min, index._eff_max):
        for entry in heap.entries:
            if index._live(entry):
                assert abs(entry[0]) == index.efficiency(entry[3]), entry[3]


def positions(admission, hit: int, matched: int, num_input: int, num_output: int) -> list[int]:
    match = MatchResult(hit, RadixTree().root, matched, ())
    return admission.checkpoint_positions(match, num_input, num_output)


# --------------------------------------------------------------------------- SGLang


def test_sglang_stores_states_only_on_the_chunk_grid():
    adm = SGLangAdmission(chunk_size=4, track_interval=8, chunked_prefill_size=None)
    assert positions(adm, 0, 0, 10, 3) == [8]  # the input rounded down; KV after it is freed
    assert positions(adm, 0, 0, 10, 7) == [16]  # decoding crossed the track grid lcm(4, 8)
    assert positions(adm, 0, 0, 3, 2) == []  # shorter than a grid step: nothing cached
    assert positions(adm, 4, 11, 14, 1) == [8, 12]  # branch 11 -> 8, then the input end
    chunked = SGLangAdmission(chunk_size=4, track_interval=8, chunked_prefill_size=8)
    assert positions(chunked, 0, 0, 20, 1) == [8, 16, 20]  # every chunked-prefill chunk end
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        SGLangAdmission(chunk_size=4, chunked_prefill_size=6)


def test_sglang_two_pools_tombstones_and_refreshes_only_the_used_state():
    # 12000 B: 2000 for states (two checkpoints), 10000 for KV.
    cache = build_cache(
        "sglang", 12_000, TOY, mamba_full_memory_ratio=0.2, mamba_cache_chunk_size=4
    )
    assert cache.state_capacity_bytes == 2_000
    a = list(range(12))
    cache.serve(a, [50])
    assert ckpt_depths(cache) == [12] and cache.tree.nbytes == 12 * 10 + 1000
    b = [*a, 50, 60, 61, 62]
    assert cache.serve(b, [70]).hit_tokens == 12
    assert ckpt_depths(cache) == [12, 16]  # the state pool is full
    top, tail = node_at(cache, 12), node_at(cache, 16)

    # A hit on the tail refreshes the KV along the whole hit path but only the
    # state it used (PR #31643).
    assert cache.lookup([*b, 70, 1, 2]).hit_length == 16
    clock = cache.tree.clock
    assert top.last_access == tail.last_access == tail.state_access == clock
    assert top.state_access < clock

    # A new session needs a state: the least recently used one is the inner
    # node's, which becomes a tombstone (KV kept, merged into its child).
    out = cache.serve(list(range(200, 208)), [1])
    assert (out.leaf_evictions, out.checkpoint_evictions) == (0, 1)
    assert ckpt_depths(cache) == [8, 16]
    assert cache.tree.nbytes == (16 + 8) * 10 + 2 * 1000
    # The tail's state still hits; the tombstone's prefix no longer does.
    assert cache.lookup([*b, 70, 1, 2]).hit_length == 16
    other = [*a, 300, 301, 302, 303, 304]
    request = cache.begin(other, 1)
    assert (request.hit_length, request.match.matched_length) == (0, 12)
    assert request.positions == (12, 16)  # the branch point, on the grid, and the input end
    cache.tree.check_invariants()


def test_sglang_kv_pool_evicts_the_least_recent_leaf_with_room_for_states():
    cache = build_cache(
        "sglang", 5_300, TOY, mamba_full_memory_ratio=50 / 3, mamba_cache_chunk_size=4
    )
    assert cache.state_capacity_bytes == 5_000  # KV pool: 300 B = 30 tokens
    for start in (0, 100):
        cache.serve(list(range(start, start + 12)), [1])
    out = cache.serve(list(range(200, 212)), [1])  # 120 B more KV than the pool has
    assert (out.leaf_evictions, out.checkpoint_evictions) == (1, 0)
    assert {n.edge[0] for n in cache.tree.nodes()} == {100, 200}
    assert cache.tree.state_nbytes == 2_000 and cache.tree.nbytes - cache.tree.state_nbytes == 240


@pytest.mark.parametrize(("cap", "kept"), [(2, [16, 20]), (1, [20])])
def test_sglang_caps_states_per_path_shallowest_first(cap, kept):
    cache = build_cache("sglang", 10**9, TOY, mamba_cache_chunk_size=4, max_states_per_path=cap)
    first = list(range(12))
    second = [*first, 99, 1, 2, 3]
    third = [*second, 99, 4, 5, 6]  # one session, three turns: states at 12, 16, 20
    outcomes = [cache.serve(turn, [99]) for turn in (first, second, third)]
    assert [o.hit_tokens for o in outcomes] == [0, 12, 16]
    assert ckpt_depths(cache) == kept
    assert sum(o.checkpoint_evictions for o in outcomes) == 3 - len(kept)
    cache.tree.check_invariants()


# --------------------------------------------------------------------------- SegLen


def test_seglen_keeps_the_long_segment_that_lru_would_evict():
    trace = [(list(range(40)), [1]), (list(range(100, 108)), [1]), (list(range(200, 212)), [1])]
    kept = {}
    for policy in ("sglang", "seglen"):
        cache = build_cache(
            policy, 12_000, TOY, mamba_full_memory_ratio=0.2, mamba_cache_chunk_size=4
        )
        for inputs, outputs in trace:
            cache.serve(inputs, outputs)
        kept[policy] = ckpt_depths(cache)
    # Two state slots, three requests: LRU drops the old 40-token segment; SegLen
    # (0.85 on segment length) drops the newer 8-token one, cheap to replay.
    assert kept == {"sglang": [8, 12], "seglen": [12, 40]}


def test_replay_length_reaches_back_over_tombstones_and_the_index_follows():
    cache = build_cache("seglen", 10**9, TOY, mamba_cache_chunk_size=4)
    stem = list(range(12))
    cache.serve(stem, [50])
    for branch in ([20, 21, 22, 23], [30, 31, 32, 33]):
        cache.serve([*stem, *branch], [1])
    cache.serve(list(range(300, 312)), [1])  # an unrelated 12-token segment
    fork = next(n for n in cache.tree.nodes() if n.edge[0] == 0)
    leaf = next(n for n in cache.tree.nodes() if n.edge[0] == 20)
    kv_index = cache.eviction.kv_index
    assert len(fork.children) == 2 and replay_length(leaf) == 4
    assert kv_index.select_victim().edge[0] in (20, 30)  # 4 tokens to replay: cheapest
    cache.tree.evict(fork)  # a tombstone with two children stays a node
    assert fork.alive and fork.checkpoint is None and replay_length(leaf) == 16
    # The branches now replay 16 tokens from the root, so the 12-token segment goes first.
    assert kv_index.select_victim().edge[0] == 300
    for index in (kv_index, cache.eviction.state_index):
        assert_index_is_fresh(index)
        score = index.scorer()
        assert score(index.select_victim()) == min(score(n) for n in index.candidates)


# --------------------------------------------------------------------------- vLLM


def test_vllm_block_size_is_computed_from_kv_and_state_bytes():
    # Qwen3.5-4B-like: 4 KV heads x 256 in bf16 (4096 B per token and layer), GDN
    # states of 2,146,304 B (fp32 recurrent, bf16 conv); 8 attention + 24 GDN layers.
    gdn = LayerCost("ssm", conv_state_bytes=49_152, recurrent_state_bytes=2_097_152)
    qwen = ModelSpec("qwen3.5-4b-like", (LayerCost("attention", 4096),) * 8 + (gdn,) * 24)
    assert vllm_align_geometry(qwen) == (528, 24 * 528 * 4096)  # issue #40696's 528
    block, padded = vllm_align_geometry(paper_hybrid_7b())
    assert (block, padded) == (80, 24 * 80 * 16_384)  # 16 * ceil(1,116,160 / (16 * 16,384))
    assert padded > paper_hybrid_7b().checkpoint_bytes  # the state page is padded
    assert vllm_align_geometry(TOY, block_size=4) == (4, 1000)  # a page below a state: state size


def test_vllm_states_at_block_ends_only():
    adm = VLLMAlignAdmission(4, max_num_batched_tokens=None, prefix_match_unit=None)
    assert positions(adm, 0, 0, 10, 7) == [8, 12, 16]  # last full input block, then decoding
    assert positions(adm, 0, 0, 3, 2) == [4]
    chunked = VLLMAlignAdmission(4, max_num_batched_tokens=4, prefix_match_unit=None)
    assert positions(chunked, 0, 0, 10, 3) == [4, 8, 12]  # one state per prefill chunk
    junction = VLLMAlignAdmission(4, max_num_batched_tokens=None, prefix_match_unit=2)
    assert positions(junction, 0, 7, 9, 1) == [6, 8]  # shared prefix 7 -> junction 6


@pytest.mark.parametrize(("unit", "hits"), [(None, [0, 0, 0]), (2, [0, 0, 2])])
def test_vllm_prefix_shorter_than_a_block_hits_only_through_the_junction(unit, hits):
    cache = build_cache("vllm", 10**9, TOY, vllm_block_size=4, prefix_match_unit=unit)
    got = [cache.serve([1, 2, 3, last], [9]).hit_tokens for last in (6, 7, 8)]
    assert got == hits


def test_vllm_evicts_states_a_request_moved_past_before_its_leaf():
    admission = VLLMAlignAdmission(4, max_num_batched_tokens=4, prefix_match_unit=None)
    cache = PrefixCache(4_160, TOY, admission, VLLMEviction(), name="vllm")
    cache.serve(list(range(10)), [10, 11, 12])  # states at 4, 8, 12: 3120 B
    cache.serve(list(range(100, 104)), [104])  # state at 4: 1040 B, the budget is full
    out = cache.serve(list(range(200, 204)), [1])
    # The oldest entries are the first request's inner states (released while it
    # ran), shallowest first; its leaf keeps the whole path's KV and still hits.
    assert (out.leaf_evictions, out.checkpoint_evictions) == (0, 2)
    assert ckpt_depths(cache) == [4, 4, 12]
    assert cache.lookup([*range(13), 5]).hit_length == 12
    cache.tree.check_invariants()


# --------------------------------------------------------------------------- all of them


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["sglang", "seglen", "vllm"]),
    st.integers(2_500, 9_000),
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 3), min_size=1, max_size=40),
            st.lists(st.integers(0, 3), min_size=0, max_size=10),
        ),
        min_size=1,
        max_size=25,
    ),
    st.sampled_from([None, 1, 2]),
)
def test_new_policies_keep_every_budget(policy, capacity, requests, cap):
    cache = build_cache(
        policy,
        capacity,
        TOY,
        mamba_full_memory_ratio=1.0,
        mamba_cache_chunk_size=4,
        max_states_per_path=cap,
        vllm_block_size=4,
        prefix_match_unit=2,
    )
    history: list[int] = []
    for inputs, outputs in requests:
        seq = [*history, *inputs] if history and inputs[0] == 0 else inputs
        cache.serve(seq, outputs)
        history = [*seq, *outputs]
        tree = cache.tree
        assert tree.nbytes <= capacity
        if cache.state_capacity_bytes is not None:
            assert tree.state_nbytes <= cache.state_capacity_bytes
            assert tree.nbytes - tree.state_nbytes <= capacity - cache.state_capacity_bytes
        tree.check_invariants()
        assert all(n.pins == 0 for n in tree.nodes())
        if policy == "seglen":
            for index in (cache.eviction.kv_index, cache.eviction.state_index):
                assert_index_is_fresh(index)
                victim, score = index.select_victim(), index.scorer()
                if victim is not None:
                    best = min(score(n) for n in index.candidates)
                    assert score(victim) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_new_policies_are_registered_and_validated():
    for policy in ("sglang", "seglen", "vllm"):
        assert build_cache(policy, 10**6, TOY).name == policy
    with pytest.raises(ValueError, match="eff_weight"):
        build_cache("seglen", 10**6, TOY, seglen_eff_weight=1.0)
    with pytest.raises(ValueError, match="mamba_full_memory_ratio"):
        build_cache("sglang", 10**6, TOY, mamba_full_memory_ratio=0)
    with pytest.raises(ValueError, match="max_states_per_path"):
        build_cache("sglang", 10**6, TOY, max_states_per_path=0)
    with pytest.raises(ValueError, match="select_state_victim"):
        PrefixCache(10**6, TOY, SGLangAdmission(), VLLMEviction(), state_capacity_bytes=10)


# --------------------------------------------------------------------------- in the engine


def test_engine_serves_the_new_baselines_token_identically(one_thread):
    transformers = pytest.importorskip("transformers")
    from thrifty.marconi.engine import HybridEngine, build_model

    transformers.logging.set_verbosity_error()
    model = build_model("nemotron_h", vocab_size=64, seed=2)
    spec = ModelSpec.from_hf_config(model.config)
    reference = HybridEngine(model)
    # Budgets (in checkpoints + 10 tokens each) under which every policy evicts and hits.
    for policy, states in (("sglang", 6), ("seglen", 6), ("vllm", 3)):
        budget = states * (spec.checkpoint_bytes + 10 * spec.kv_bytes_per_token)
        cache = build_cache(
            policy, budget, spec, mamba_cache_chunk_size=4, vllm_block_size=8, prefix_match_unit=4
        )
        engine = HybridEngine(model, cache)
        rng = random.Random(3)
        system = [rng.randrange(64) for _ in range(16)]
        sessions = [system + [rng.randrange(64) for _ in range(6)] for _ in range(3)]
        hits = 0
        for _ in range(2):
            for s, prompt in enumerate(sessions):
                result = engine.serve(prompt, 3)
                assert result.output_ids == reference.generate(prompt, 3), policy
                hits += result.hit_tokens
                sessions[s] = prompt + result.output_ids + [rng.randrange(64) for _ in range(3)]
        assert cache.tree.nbytes <= budget and cache.stats.evictions > 0 and hits > 0, policy
        cache.tree.check_invariants()
