"""Algorithm 1 dispatcher: conservation, balance, local-first and determinism.

The all-to-all is simulated in process: rank ``i``'s send buffer is cut by
its send splits, chunk ``j`` goes to rank ``j``, and receive buffers are the
chunks in source-rank order (what ``all_to_all_single`` does).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.lazarus import plan_dispatch
from thrifty.lazarus.dispatcher import dispatch_local, split_evenly, token_counts
from thrifty.lazarus.placement import mro_placement


def _all_to_all(buffers: list[torch.Tensor], splits: list[list[int]]) -> list[torch.Tensor]:
    chunks = [
        list(torch.split(buffer, split)) for buffer, split in zip(buffers, splits, strict=True)
    ]
    ranks = len(buffers)
    return [torch.cat([chunks[src][dst] for src in range(ranks)]) for dst in range(ranks)]


@st.composite
def scenarios(draw):
    ranks = draw(st.integers(1, 6))
    experts = draw(st.integers(1, 6))
    top_k = draw(st.integers(1, min(2, experts)))
    replicas = torch.tensor(
        draw(
            st.lists(
                st.lists(st.integers(0, 2), min_size=experts, max_size=experts),
                min_size=ranks,
                max_size=ranks,
            )
        )
    )
    for e in range(experts):  # every expert somewhere
        if replicas[:, e].sum() == 0:
            replicas[draw(st.integers(0, ranks - 1)), e] = 1
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    skew = torch.rand(experts, generator=generator) ** 3 + 0.01
    expert_ids = []
    for _ in range(ranks):
        tokens = draw(st.integers(0, 40))
        ids = torch.multinomial(skew.expand(tokens, experts), top_k, generator=generator)
        expert_ids.append(ids if top_k > 1 else ids.reshape(-1))
    return replicas, expert_ids, experts


def _run(replicas, expert_ids, experts):
    counts = torch.stack([token_counts(ids, experts) for ids in expert_ids])
    plan = plan_dispatch(counts, replicas)
    local = [dispatch_local(plan, rank, ids) for rank, ids in enumerate(expert_ids)]
    return counts, plan, local


@settings(max_examples=50, deadline=None)
@given(scenarios())
def test_every_pair_reaches_one_replica_and_returns_in_order(scenario):
    replicas, expert_ids, experts = scenario
    counts, plan, local = _run(replicas, expert_ids, experts)
    ranks = len(expert_ids)
    # Payload: (source rank, pair index, expert) so receivers can be checked.
    payloads = []
    for rank, (ids, d) in enumerate(zip(expert_ids, local, strict=True)):
        flat = ids.reshape(-1)
        pairs = torch.stack([torch.full_like(flat, rank), torch.arange(flat.numel()), flat], dim=1)
        payloads.append(pairs[d.send_order])
    for i in range(ranks):
        for j in range(ranks):
            assert local[i].send_splits[j] == local[j].recv_splits[i]
    received = _all_to_all(payloads, [d.send_splits for d in local])
    seen = set()
    for rank, (rows, d) in enumerate(zip(received, local, strict=True)):
        assert torch.equal(rows[:, 2], d.recv_experts)  # receivers know each row's expert
        for src, index, expert in rows.tolist():
            assert replicas[rank, expert] > 0, "a pair reached a rank without its expert"
            assert (src, index) not in seen, "a pair was delivered twice"
            seen.add((src, index))
        # the rank serves exactly the load the plan gave it
        served = torch.bincount(rows[:, 2], minlength=experts)
        assert torch.equal(served, plan.load()[rank])
    assert len(seen) == int(counts.sum())
    # Experts compute f(x) = 1000 * expert + pair index; send back with splits swapped.
    outputs = [1000 * rows[:, 2] + rows[:, 1] for rows in received]
    returned = _all_to_all(outputs, [d.recv_splits for d in local])
    for ids, d, back in zip(expert_ids, local, returned, strict=True):
        restored = d.restore(back)
        assert restored.shape == ids.shape
        expected = 1000 * ids + torch.arange(ids.numel()).reshape(ids.shape)
        assert torch.equal(restored, expected)


@settings(max_examples=50, deadline=None)
@given(scenarios())
def test_load_per_replica_within_one_token_of_fair_share(scenario):
    replicas, expert_ids, experts = scenario
    counts, plan, _ = _run(replicas, expert_ids, experts)
    load = plan.load()
    for e in range(experts):
        total, r = int(counts[:, e].sum()), int(replicas[:, e].sum())
        fair = total / r
        assert int(load[:, e].sum()) == total
        for rank in range(len(expert_ids)):
            per_replica = plan.replica_loads(rank, e)
            assert len(per_replica) == int(replicas[rank, e])
            assert sum(per_replica) == int(load[rank, e])
            for x in per_replica:
                assert math.floor(fair) <= x <= math.ceil(fair)
                assert abs(x - fair) < 1


@settings(max_examples=50, deadline=None)
@given(scenarios())
def test_local_tokens_first(scenario):
    replicas, expert_ids, experts = scenario
    counts, plan, local = _run(replicas, expert_ids, experts)
    D, load = plan.counts, plan.load()
    ranks = len(expert_ids)
    for e in range(experts):
        for i in range(ranks):
            sent_away = int(D[i, :, e].sum() - D[i, i, e])
            received_from_others = int(D[:, i, e].sum() - D[i, i, e])
            # Local pairs stay unless this rank's capacity is already full with them.
            assert D[i, i, e] == min(int(counts[i, e]), int(load[i, e]))
            assert sent_away == 0 or received_from_others == 0
        # No more traffic than the capacities force.
        forced = int((counts[:, e] - load[:, e]).clamp(min=0).sum())
        assert int(D[:, :, e].sum() - D[:, :, e].diagonal().sum()) == forced
    for rank, d in enumerate(local):  # the local pairs are the first of each expert's pairs
        flat = expert_ids[rank].reshape(-1)
        for e in range(experts):
            dest = d.destination[flat == e]
            keep = int(D[rank, rank, e])
            assert torch.all(dest[:keep] == rank)
            assert torch.all(dest[keep:] != rank)


@settings(max_examples=30, deadline=None)
@given(scenarios())
def test_identical_plans_from_identical_inputs(scenario):
    replicas, expert_ids, experts = scenario
    counts, plan, local = _run(replicas, expert_ids, experts)
    again = plan_dispatch(counts.to(torch.int32).clone(), replicas.numpy().copy())
    assert torch.equal(plan.counts, again.counts)
    for rank, ids in enumerate(expert_ids):
        d = dispatch_local(again, rank, ids.clone())
        assert torch.equal(d.destination, local[rank].destination)
        assert torch.equal(d.send_order, local[rank].send_order)
        assert d.send_splits == local[rank].send_splits
        assert d.recv_splits == local[rank].recv_splits


def test_hand_example():
    # Expert 0 on ranks 0 and 1 (13 pairs: 6.5 each), expert 1 on ranks 1 and 2 (5 pairs).
    replicas = torch.tensor([[1, 0], [1, 1], [0, 1]])
    counts = torch.tensor([[5, 0], [1, 4], [7, 1]])
    plan = plan_dispatch(counts, replicas)
    # Hamilton tie (6.5 / 6.5) goes to the rank with more local pairs: rank 0.
    assert plan.load()[:, 0].tolist() == [7, 6, 0]
    # Expert 1: 2.5 / 2.5, rank 1 has 4 local pairs so it takes the extra one.
    assert plan.load()[:, 1].tolist() == [0, 3, 2]
    # Rank 2's 7 pairs of expert 0 fill rank 0's spare 2 and rank 1's spare 5.
    assert plan.counts[2, :, 0].tolist() == [2, 5, 0]
    assert plan.counts[1, :, 1].tolist() == [0, 3, 1]


def test_replica_matrix_from_placement_feeds_the_plan():
    placement = mro_placement([2, 2, 4], nodes=4, slots_per_node=2)
    replicas = torch.from_numpy(placement.replica_matrix())
    counts = torch.tensor([[3, 0, 9], [0, 5, 1], [2, 2, 2], [1, 1, 0]])
    plan = plan_dispatch(counts, replicas)
    assert torch.equal(plan.load().sum(dim=0), counts.sum(dim=0))
    assert torch.all(plan.load()[replicas == 0] == 0)


def test_split_evenly():
    assert split_evenly(7, 3) == [3, 2, 2]
    assert split_evenly(0, 2) == [0, 0]


def test_errors():
    with pytest.raises(ValueError, match=r"experts \[1\] have tokens but no replica"):
        plan_dispatch(torch.tensor([[1, 1]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="must be non-negative"):
        plan_dispatch(torch.tensor([[-1, 1]]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="both must be"):
        plan_dispatch(torch.tensor([[1, 1]]), torch.tensor([[1, 1, 1]]))
    plan = plan_dispatch(torch.tensor([[2, 0]]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="the plan was built from"):
        dispatch_local(plan, 0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="expert ids must lie"):
        token_counts(torch.tensor([0, 5]), 2)
