"""ByteComp's decision tree and decision algorithm, against the timeline and a brute force."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thrifty.bytecomp import Constraints, decide, zero_cost_profile
from thrifty.bytecomp.decide import brute_force, make_units
from thrifty.bytecomp.tree import compressions, gpu_options, options
from thrifty.comm import NetworkModel, Topology
from thrifty.sync import Group, Plan, Strategy
from thrifty.sync.profile import CompressionCost, Profile, TensorProfile
from thrifty.sync.timeline import simulate

RANDOMK = Strategy.make("randomk", ratio=0.01)
FP16 = Strategy.make("fp16")
SIZES = [256 * 4**i for i in range(10)]


def _cost(per_elem: float, fixed: float = 2e-5) -> CompressionCost:
    return CompressionCost(
        SIZES, [fixed + per_elem * s for s in SIZES], [fixed / 2 + per_elem / 2 * s for s in SIZES]
    )


def _profile(
    numels: list[int], gaps: list[float], world: int, per_elem: float = 2e-9, tail: float = 1e-3
) -> Profile:
    ready, tensors = 0.0, []
    for i, (numel, gap) in enumerate(zip(numels, gaps, strict=True)):
        ready += gap
        tensors.append(TensorProfile(f"t{i}", numel, "float32", ready))
    costs = {RANDOMK.cost_key(): _cost(per_elem), FP16.cost_key(): _cost(per_elem / 10)}
    return Profile(tensors, 0.02, ready + tail, 0.005, world, costs)


def _topology(rate: float = 1e9) -> Topology:
    return Topology(
        2,
        2,
        NetworkModel.analytic("flat", rate, 1e-3),
        NetworkModel.analytic("intra", 20 * rate, 2e-4),
        NetworkModel.analytic("inter", rate, 1e-3),
    )


# ---------------------------------------------------------------------- the tree


def test_tree_prunes_allreduce_for_non_summable_payloads() -> None:
    one_node = Topology.single_node(NetworkModel.analytic("lo", 1e9), 2)
    opts = gpu_options([RANDOMK], one_node)
    labels = [o.label() for o in opts]
    assert "fp32/all_reduce" in labels and "fp32/all_to_all" in labels
    assert not any(o.compressor == "randomk" and o.collective == "all_reduce" for o in opts)
    assert not any(o.hierarchical or o.offload for o in opts)  # one node; GPU options only
    # FP16 payloads sum elementwise, so all-reduce is a valid path for it.
    assert Strategy.make("fp16", "all_reduce") in gpu_options([FP16], one_node)


def test_tree_adds_hierarchical_offload_and_respects_constraints() -> None:
    topo = _topology()
    every = options([RANDOMK], topo)
    assert len(every) == len(set(every))
    assert any(o.hierarchical and o.compressor is None for o in every)
    assert any(o.hierarchical and o.offload for o in every)
    for o in every:
        o.validate()
        assert not (o.offload and o.compressor is None)
    once = options([RANDOMK], topo, Constraints(max_compressions=1))
    assert all(compressions(o) <= 1 for o in once)
    assert not any(o.collective == "all_to_all" and o.compressor for o in once)
    flat = options([RANDOMK], topo, Constraints(hierarchical=False, offload=False))
    assert not any(o.hierarchical or o.offload for o in flat)


# ---------------------------------------------------------------------- scoring


def test_decision_prediction_equals_the_timeline() -> None:
    rng = np.random.default_rng(1)
    numels = [int(x) for x in rng.choice([100, 5_000, 300_000, 2_000_000], size=40)]
    prof = _profile(numels, list(rng.uniform(0, 0.01, 40)), 4)
    topo = _topology()
    for bucket in (0, 1 << 20):
        d = decide(
            prof, RANDOMK, topo, bucket_bytes=bucket, constraints=Constraints(extra=("fp16",))
        )
        assert d.predicted == pytest.approx(simulate(prof, d.plan, topo).iteration, rel=1e-9)
        fp32 = Plan(tuple(Group(g.names, Strategy()) for g in d.plan.groups))
        assert d.baseline == pytest.approx(simulate(prof, fp32, topo).iteration, rel=1e-9)
        assert d.predicted <= d.baseline + 1e-12
        d.plan.check_covers(prof.names)


def test_make_units_merges_in_backward_order() -> None:
    prof = _profile([10, 10, 1_000_000, 10], [0.001] * 4, 2)
    assert [u.names for u in make_units(prof, 0)] == [("t0",), ("t1",), ("t2",), ("t3",)]
    units = make_units(prof, 1000)
    assert [u.names for u in units] == [("t0", "t1", "t2"), ("t3",)]
    assert units[0].numel == 1_000_020 and units[0].ready == prof.tensors[2].ready


# ---------------------------------------------------------------------- optimality


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    numels=st.lists(
        st.sampled_from([64, 4_096, 100_000, 1_000_000, 8_000_000]), min_size=1, max_size=6
    ),
    gap=st.floats(0.0, 0.02),
    per_elem=st.sampled_from([1e-10, 2e-9, 2e-8]),
    rate=st.sampled_from([1e8, 1e9, 1e10]),
    data=st.data(),
)
def test_within_three_percent_of_brute_force_on_one_node(
    numels: list[int], gap: float, per_elem: float, rate: float, data: st.DataObject
) -> None:
    gaps = [data.draw(st.floats(0.0, gap)) for _ in numels]
    prof = _profile(numels, gaps, 2, per_elem)
    net = NetworkModel.analytic("link", rate, 1e-3)
    _, best = brute_force(prof, RANDOMK, net)
    d = decide(prof, RANDOMK, net, bucket_bytes=0)
    assert best <= d.predicted + 1e-12  # the brute force really is a lower bound
    assert d.predicted <= 1.03 * best


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    numels=st.lists(st.sampled_from([4_096, 1_000_000, 8_000_000]), min_size=1, max_size=4),
    gap=st.floats(0.0, 0.02),
    per_elem=st.sampled_from([2e-10, 2e-9, 2e-8]),
)
def test_within_three_percent_of_brute_force_on_two_nodes(
    numels: list[int], gap: float, per_elem: float
) -> None:
    prof = _profile(numels, [gap] * len(numels), 4, per_elem)
    topo = _topology()
    _, best = brute_force(prof, RANDOMK, topo)
    d = decide(prof, RANDOMK, topo, bucket_bytes=0)
    assert best <= d.predicted + 1e-12
    assert d.predicted <= 1.03 * best


def test_brute_force_refuses_huge_spaces() -> None:
    prof = _profile([1000] * 12, [0.001] * 12, 4)
    with pytest.raises(ValueError, match="exceed"):
        brute_force(prof, RANDOMK, _topology())


# ---------------------------------------------------------------------- the rules


def test_remove_keeps_tensors_before_a_bubble_uncompressed() -> None:
    # Two early tensors, then a long stretch of backward: whatever they cost,
    # their all-reduce is hidden, so compressing them cannot help.
    prof = _profile([1_000_000, 1_000_000, 8_000_000], [0.0, 0.001, 0.5], 2, per_elem=1e-9)
    net = NetworkModel.analytic("link", 1e9, 1e-3)
    d = decide(prof, RANDOMK, net, bucket_bytes=0, refine=False)
    strategies = [g.strategy for g in d.plan.groups]
    assert strategies[0].compressor is None and strategies[1].compressor is None
    assert strategies[2].compressor == "randomk"  # exposed at the end: compressed


def test_offload_end_switch_picks_opposite_ends() -> None:
    # Many equal compressed tensors that all arrive at the end: some go to the
    # CPU lane. The switch decides whether the earliest or the latest go.
    numels = [2_000_000] * 6
    prof = _profile(numels, [0.0] * 6, 2, per_elem=1e-8, tail=0.0)
    net = NetworkModel.analytic("link", 2e8, 1e-3)
    first = decide(prof, RANDOMK, net, bucket_bytes=0, refine=False, offload_end="output")
    last = decide(prof, RANDOMK, net, bucket_bytes=0, refine=False, offload_end="input")
    for decision, offloaded_end in ((first, 0), (last, -1)):
        # Within one (size, option) group a prefix from the chosen end is offloaded.
        groups: dict[Strategy, list[bool]] = {}
        for g in decision.plan.groups:
            base = replace(g.strategy, offload=False)
            groups.setdefault(base, []).append(g.strategy.offload)
        flags = max(groups.values(), key=len)
        assert any(flags) and not all(flags), flags
        assert flags[offloaded_end] and not flags[-1 - offloaded_end], flags


def test_zero_cost_bound_is_a_lower_bound() -> None:
    rng = np.random.default_rng(3)
    prof = _profile([int(x) for x in rng.integers(1_000, 4_000_000, 20)], [0.002] * 20, 4, 1e-8)
    topo = _topology()
    d = decide(prof, RANDOMK, topo)
    bound = decide(zero_cost_profile(prof), RANDOMK, topo)
    assert bound.predicted <= d.predicted + 1e-12
    assert all(v == 0.0 for c in zero_cost_profile(prof).costs.values() for v in c.encode)


def test_clear_errors() -> None:
    prof = _profile([1000, 2000], [0.001, 0.001], 2)
    net = NetworkModel.analytic("link", 1e9)
    with pytest.raises(KeyError, match="no compression cost for dgc"):
        decide(prof, "dgc", net)
    with pytest.raises(ValueError, match="offload_end"):
        decide(prof, RANDOMK, net, offload_end="middle")
    with pytest.raises(ValueError, match="bucket_bytes"):
        decide(prof, RANDOMK, net, bucket_bytes=-1)
    with pytest.raises(ValueError, match="4"):
        decide(prof, RANDOMK, _topology())  # a 2-rank profile on a 4-rank topology


def test_incremental_scoring_equals_full_scoring() -> None:
    """Candidates scored from a unit on (the search's fast path) equal full timelines."""
    from thrifty.bytecomp.decide import _Scorer

    rng = np.random.default_rng(7)
    numels = [int(x) for x in rng.choice([64, 50_000, 1_000_000, 6_000_000], size=30)]
    prof = _profile(numels, list(rng.uniform(0, 0.005, 30)), 4, per_elem=1e-8)
    topo = _topology()
    every = options([RANDOMK], topo)
    scorer = _Scorer(prof, make_units(prof, 0), every, topo)
    for _ in range(5):
        current = rng.integers(0, len(every), 30)
        assert scorer.set_choice(current) == pytest.approx(scorer.time(current), rel=1e-12)
        for lo in (0, 1, 17, 29):
            rows = np.repeat(current[None, :], 6, axis=0)
            rows[:, lo:] = rng.integers(0, len(every), (6, 30 - lo))
            fast = scorer.times_from(rows[:, lo:], lo)
            assert fast == pytest.approx(scorer.times(rows), rel=1e-12)
