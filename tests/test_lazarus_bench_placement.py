"""Fig. 8 reproduction: thrifty's placement against MRO, spread and compact (exact P(k))."""

from __future__ import annotations

import json

import pytest

from thrifty.lazarus import allocate_replicas
from thrifty.lazarus.benchmark import (
    PLACEMENTS,
    placement_comparison,
    placement_scaling,
    plot_placement_comparison,
    zipf_loads,
)


@pytest.fixture(scope="module")
def default():
    return placement_comparison()


def assert_thrifty_dominates(result):
    probs = {name: result["placements"][name]["probability"] for name in PLACEMENTS}
    for other in ("mro", "spread", "compact"):
        for k, mine, theirs in zip(
            result["config"]["failures"], probs["thrifty"], probs[other], strict=True
        ):
            assert mine >= theirs, f"k={k}: thrifty {mine} < {other} {theirs}"


def test_default_instance_matches_fig8_ordering(default):
    assert default["config"]["failures"] == [1, 2, 3, 4, 5]
    assert sum(default["replicas"]) == 10 * 6
    assert min(default["replicas"]) >= 2
    assert_thrifty_dominates(default)
    placements = default["placements"]
    assert all(all(p["exact"]) for p in placements.values())
    k4 = default["config"]["failures"].index(4)
    # Fig. 8 at k=4: Lazarus > spread > compact = 0.
    assert placements["thrifty"]["probability"][k4] > placements["spread"]["probability"][k4]
    assert placements["spread"]["probability"][k4] > 0
    assert placements["compact"]["probability"][k4] == 0
    assert placements["thrifty"]["probability"][0] == 1.0  # f=2: any single failure survived
    assert placements["compact"]["probability"][0] < 1.0  # compact packs both replicas together
    assert default["search"]["seconds"] > 0
    assert "thrifty" in default["best"][k4]


def test_result_round_trips_through_json(default, tmp_path):
    assert json.loads(json.dumps(default)) == default
    path = plot_placement_comparison(default, tmp_path / "fig8.png")
    assert path.stat().st_size > 0


@pytest.mark.parametrize(("nodes", "slots", "experts"), [(3, 2, 3), (5, 3, 6), (8, 4, 12)])
def test_thrifty_dominates_on_small_instances(nodes, slots, experts):
    result = placement_comparison(nodes, slots, experts, failures=range(1, nodes))
    assert_thrifty_dominates(result)
    assert result["placements"]["thrifty"]["probability"][0] == 1.0
    assert result["search"]["proven_optimal"]


def test_truncated_mro_loses_a_single_failure():
    """N=3, c=2, r=[2,2,2]: published MRO keeps expert 3 on one node (P(1)=2/3)."""
    result = placement_comparison(3, 2, 3, failures=[1])
    assert result["replicas"] == [2, 2, 2]
    assert result["placements"]["mro"]["probability"] == [pytest.approx(2 / 3)]
    assert result["placements"]["thrifty"]["probability"] == [1.0]


def test_given_loads_are_used():
    loads = zipf_loads(16, seed=0)
    assert placement_comparison(loads=loads)["replicas"] == placement_comparison()["replicas"]
    measured = [5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 40]
    result = placement_comparison(loads=measured, failures=[1, 4])
    assert result["replicas"] == list(allocate_replicas(measured, 10, 6, 2).replicas)
    assert result["config"]["loads"] == "given"
    assert_thrifty_dominates(result)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="loads has 15 entries but experts=16"):
        placement_comparison(loads=[1] * 15)
    with pytest.raises(ValueError, match="failures contains"):
        placement_comparison(failures=[11])
    with pytest.raises(ValueError, match="failures is empty"):
        placement_comparison(failures=[])
    with pytest.raises(ValueError, match="repeats"):
        placement_scaling(repeats=0)


def test_zipf_loads_are_deterministic_and_skewed():
    a = zipf_loads(16, seed=3)
    assert a == zipf_loads(16, seed=3)
    assert a != zipf_loads(16, seed=4)
    assert sorted(a) == sorted(zipf_loads(16, seed=4))
    assert max(a) / min(a) == pytest.approx(16, rel=0.01)  # exponent 1: rank 1 / rank 16


def test_placement_scaling_reports_times():
    result = placement_scaling(nodes=200, slots=8, experts=64, repeats=2)
    assert len(result["seconds"]) == 2
    assert result["min_s"] <= result["median_s"] < 10
    assert sum(result["replicas"]) == 200 * 8
    assert result["probability"][0] == 1.0 and all(result["exact"])
    assert json.loads(json.dumps(result)) == result
