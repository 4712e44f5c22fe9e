"""Eq. 1 replica allocation: the paper's example and its properties on random loads."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.lazarus import allocate_replicas


def test_paper_worked_example():
    allocation = allocate_replicas([10, 20, 30, 40], nodes=5, slots_per_node=4, min_replicas=2)
    assert allocation.replicas == (2, 4, 6, 8)
    assert not allocation.relaxed


def test_caller_order_is_kept():
    assert allocate_replicas([40, 10, 30, 20], 5, 4).replicas == (8, 2, 6, 4)


def test_minimum_lifts_cold_experts():
    allocation = allocate_replicas([1, 1, 1000], nodes=4, slots_per_node=2, min_replicas=2)
    assert allocation.replicas == (2, 2, 4)


@settings(max_examples=200, deadline=None)
@given(
    loads=st.lists(st.integers(0, 10_000), min_size=1, max_size=24),
    nodes=st.integers(1, 40),
    slots=st.integers(1, 8),
    f=st.integers(1, 4),
)
def test_properties(loads, nodes, slots, f):
    if len(loads) > nodes * slots:
        with pytest.raises(ValueError, match="do not fit"):
            allocate_replicas(loads, nodes, slots, f)
        return
    allocation = allocate_replicas(loads, nodes, slots, f)
    r = allocation.replicas
    assert len(r) == len(loads)
    assert sum(r) == nodes * slots
    assert allocation.min_replicas == min(f, nodes * slots // len(loads), nodes)
    assert all(x >= allocation.min_replicas for x in r)
    for a in range(len(loads)):  # monotone in load
        for b in range(len(loads)):
            if loads[a] < loads[b]:
                assert r[a] <= r[b]


@settings(max_examples=100, deadline=None)
@given(shares=st.lists(st.integers(2, 12), min_size=1, max_size=12), scale=st.integers(1, 50))
def test_exact_proportions_are_reproduced(shares, scale):
    """Loads exactly proportional to a valid allocation give that allocation back."""
    total = sum(shares)
    for slots in (1, 2, 4):
        if total % slots == 0:
            nodes = total // slots
            loads = [scale * s for s in shares]
            assert allocate_replicas(loads, nodes, slots, 2).replicas == tuple(shares)


@settings(max_examples=100, deadline=None)
@given(loads=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=2, max_size=16))
def test_float_loads_are_exact_and_deterministic(loads):
    a = allocate_replicas(loads, 16, 4, 2)
    b = allocate_replicas(list(loads), 16, 4, 2)
    assert a == b
    assert sum(a.replicas) == 64


def test_relaxation_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="thrifty.lazarus.allocation"):
        allocation = allocate_replicas([1, 2, 3, 4, 5], nodes=2, slots_per_node=4, min_replicas=2)
    assert allocation.relaxed and allocation.min_replicas == 1
    assert sum(allocation.replicas) == 8
    assert "relaxing the replica minimum from f=2 to f=1" in caplog.text


def test_more_min_replicas_than_nodes_is_relaxed(caplog):
    with caplog.at_level(logging.WARNING, logger="thrifty.lazarus.allocation"):
        allocation = allocate_replicas([1, 1], nodes=2, slots_per_node=8, min_replicas=3)
    assert allocation.min_replicas == 2 and allocation.relaxed
    assert "relaxing" in caplog.text


def test_no_warning_when_feasible(caplog):
    with caplog.at_level(logging.WARNING, logger="thrifty.lazarus.allocation"):
        allocate_replicas([1, 2, 3], nodes=3, slots_per_node=2, min_replicas=2)
    assert caplog.text == ""


def test_zero_loads_mean_equal_loads():
    assert allocate_replicas([0, 0, 0, 0], 2, 4, 1).replicas == (2, 2, 2, 2)
    assert sum(allocate_replicas([0, 5, 0], 3, 3, 2).replicas) == 9


def test_numpy_scalars_accepted():
    loads = np.array([10, 20, 30, 40], dtype=np.int64)
    assert allocate_replicas(loads, 5, 4).replicas == (2, 4, 6, 8)


@pytest.mark.parametrize(
    ("loads", "nodes", "slots", "f", "message"),
    [
        ([1, -1], 2, 2, 1, "negative"),
        ([1, float("nan")], 2, 2, 1, "not finite"),
        ([1, "x"], 2, 2, 1, "not a number"),
        ([], 2, 2, 1, "empty"),
        ([1, 2, 3], 1, 2, 1, "3 experts do not fit in 1 nodes x 2 slots"),
        ([1], 0, 2, 1, "nodes=0"),
        ([1], 1, 0, 1, "slots_per_node=0"),
        ([1], 1, 1, 0, "min_replicas=0"),
    ],
)
def test_bad_input(loads, nodes, slots, f, message):
    with pytest.raises((ValueError, TypeError), match=message):
        allocate_replicas(loads, nodes, slots, f)
