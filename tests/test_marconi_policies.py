"""Admission placement, eviction order and the byte budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marconi_toy import TOY, ckpt_depths

from thrifty.marconi.cache import PrefixCache, build_cache
from thrifty.marconi.policies import (
    BlockAdmission,
    LRUEviction,
    MarconiAdmission,
    UtilityEviction,
)
from thrifty.marconi.tree import RadixTree

# --------------------------------------------------------------------------- admission


def test_marconi_admission_checkpoints_last_token_then_branch_point():
    cache = build_cache("marconi", 10**9, TOY)
    system = list(range(100, 120))  # a shared 20-token system prompt
    a_in, a_out = [*system, 1, 2, 3], [4, 5]
    cache.serve(a_in, a_out)
    assert ckpt_depths(cache) == [25]  # after the last decoded token only
    # Another user with the same system prompt: diverges inside the edge at 20.
    b_in = [*system, 7, 8]
    match = cache.lookup(b_in)
    assert match.hit_length == 0 and match.matched_length == 20
    assert cache.checkpoint_positions(match, len(b_in), 3) == [20, 25]
    cache.admit([*b_in, 9, 9, 9], [20, 25])
    assert ckpt_depths(cache) == [20, 25, 25]
    # The third user hits the system prompt (purely-input reuse: 3rd occurrence).
    c_in = [*system, 5]
    assert cache.lookup(c_in).hit_length == 20


def test_marconi_admission_next_turn_hits_previous_input_and_output():
    cache = build_cache("marconi", 10**9, TOY)
    turn1_in, turn1_out = [1, 2, 3, 4], [5, 6]
    cache.serve(turn1_in, turn1_out)
    turn2_in = [*turn1_in, *turn1_out, 7, 8]
    outcome = cache.serve(turn2_in, [9])
    assert outcome.hit_tokens == 6
    assert ckpt_depths(cache) == [6, 9]  # no branch checkpoint needed


def test_marconi_admission_no_branch_checkpoint_when_match_is_a_hit():
    match = RadixTree().match_prefix([1, 2, 3])
    assert MarconiAdmission().checkpoint_positions(match, 3, 2) == [5]


def test_block_admission_checkpoints_every_block_and_only_whole_blocks():
    cache = build_cache("vllm+", 10**9, TOY, block_size=4)
    cache.serve(list(range(10)), [10, 11, 12])  # 13 tokens: blocks end at 4, 8, 12
    assert ckpt_depths(cache) == [4, 8, 12]
    assert cache.tree.nbytes == 12 * 10 + 3 * 1000
    # A hit lands on a block boundary only.
    assert cache.lookup([0, 1, 2, 3, 4, 5, 6, 99]).hit_length == 4
    assert BlockAdmission(32).checkpoint_positions(RadixTree().match_prefix([]), 40, 30) == [
        32,
        64,
    ]


def test_sglang_plus_is_marconi_admission_with_lru():
    cache = build_cache("sglang+", 10**9, TOY)
    assert isinstance(cache.admission, MarconiAdmission)
    assert isinstance(cache.eviction, LRUEviction) and cache.eviction.touch_path


# --------------------------------------------------------------------------- eviction order


def test_lru_evicts_least_recent_leaf_and_touches_whole_path():
    # Budget fits a shared prefix plus two branches; the third evicts one.
    cache = build_cache("sglang+", 5_000, TOY)  # holds 4100 B before the 4th request
    prefix = [1, 2, 3, 4]
    cache.serve([*prefix, 10], [11])  # A
    cache.serve([*prefix, 20], [21])  # B: branch checkpoint at 4
    cache.serve([*prefix, 10, 11, 12], [13])  # A again: touches A's path
    leaves = {n.edge[0]: n for n in cache.tree.nodes() if not n.children}
    assert set(leaves) == {20, 12}
    cache.serve([*prefix, 30], [31])  # needs room: B's leaf is the LRU leaf
    tokens = {n.edge[0] for n in cache.tree.nodes()}
    assert 20 not in tokens and 12 in tokens and 30 in tokens
    cache.tree.check_invariants()


def test_utility_alpha_zero_is_recency_over_single_child_nodes():
    cache = build_cache("marconi", 10**9, TOY, alpha=0.0)
    cache.serve([1, 2, 3, 4], [5])  # leaf at 5
    cache.serve([1, 2, 3, 4, 5, 6], [7])  # chain: checkpoint 5 -> 7
    chain_top = cache.lookup([1, 2, 3, 4, 5, 9]).hit_node
    assert chain_top.depth == 5 and len(chain_top.children) == 1
    # Marconi touched only the hit node (depth 5), so the depth-7 leaf is older.
    assert cache.eviction.select_victim().depth == 7


def test_utility_prefers_evicting_low_flop_efficiency_when_alpha_is_large():
    spec = TOY
    cache = build_cache("marconi", 10**9, spec, alpha=100.0)
    short = [1, 2]  # short sequence: few FLOPs per byte
    long = list(range(10, 60))  # long sequence: attention's L^2 makes it efficient
    cache.serve(long, [0])
    cache.serve(short, [0])  # newer, but less efficient
    victim = cache.eviction.select_victim()
    assert victim.depth == 3
    assert spec.flop_efficiency(0, 3) < spec.flop_efficiency(0, 51)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 4), min_size=1, max_size=20),
            st.lists(st.integers(0, 4), min_size=0, max_size=6),
        ),
        min_size=1,
        max_size=30,
    ),
    st.floats(0.0, 5.0),
)
def test_threshold_search_finds_the_brute_force_argmin(requests, alpha):
    cache = build_cache("marconi", 10**9, TOY, alpha=alpha)
    for inputs, outputs in requests:
        cache.serve(inputs, outputs)
        index = cache.eviction
        assert isinstance(index, UtilityEviction)
        victim = index.select_victim()
        score = index.scorer()
        if victim is None:
            assert not index.candidates
            continue
        best = min(score(n) for n in index.candidates)
        assert score(victim) == pytest.approx(best, rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------- budget


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["marconi", "sglang+", "vllm+"]),
    st.integers(1_100, 8_000),
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 3), min_size=1, max_size=40),
            st.lists(st.integers(0, 3), min_size=0, max_size=10),
        ),
        min_size=1,
        max_size=25,
    ),
    st.booleans(),
)
def test_budget_is_never_exceeded(policy, capacity, requests, truncate):
    cache = build_cache(policy, capacity, TOY, block_size=4, alpha=0.7, truncate_oversized=truncate)
    history: list[int] = []
    for inputs, outputs in requests:
        # Mix fresh requests with multi-turn continuations.
        seq = [*history, *inputs] if history and inputs[0] == 0 else inputs
        cache.serve(seq, outputs)
        history = [*seq, *outputs]
        assert cache.tree.nbytes <= capacity
        cache.tree.check_invariants()
        assert all(n.pins == 0 for n in cache.tree.nodes())


def test_request_larger_than_budget_is_rejected_or_truncated():
    capacity = 2_500  # two checkpoints + a little KV
    cache = build_cache("vllm+", capacity, TOY, block_size=4)
    out = cache.serve(list(range(40)), [])
    assert not out.admitted and cache.stats.rejected == 1 and cache.tree.nbytes == 0
    cache = build_cache("vllm+", capacity, TOY, block_size=4, truncate_oversized=True)
    out = cache.serve(list(range(40)), [])
    assert out.admitted and cache.stats.truncated == 1
    assert ckpt_depths(cache) == [4, 8]
    assert cache.tree.nbytes <= capacity


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity_bytes"):
        PrefixCache(0, TOY, MarconiAdmission(), LRUEviction())
    with pytest.raises(ValueError, match="unknown policy"):
        build_cache("lfu", 10, TOY)
