"""The emulated cluster gives every node its own rate-limited NIC, and torchrun runs across it.

The namespace tests are skipped, with the reason, where this machine cannot
make namespaces (not root, no iproute2); the loopback test runs anywhere.
"""

from __future__ import annotations

import subprocess

import pytest

from thrifty.bench import netem
from thrifty.bench.cluster import (
    ClusterJobFailed,
    emulated_cluster,
    run_torchrun,
)
from thrifty.comm.topology import Topology

WORKER = "thrifty.bench.cluster"
RATE = "200mbit"
NBYTES = 4 << 20


@pytest.fixture(scope="module")
def can_emulate() -> None:
    try:
        netem.check_available()
    except netem.NetemUnavailable as exc:
        pytest.skip(str(exc))


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def two_by_two(can_emulate: None) -> dict:
    """One 2-node x 2-rank job at 200 Mbit/s: selftest plus a small topology fit."""
    with emulated_cluster(2, RATE) as cluster:
        names = {ns.name for ns in (*cluster.namespaces, cluster.hub)}
        assert names <= _namespaces()
        spec = {"task": "selftest", "nbytes": NBYTES, "topology_sizes": [1 << 16, 1 << 18, 1 << 20]}
        results = run_torchrun(cluster, 2, WORKER, spec, timeout=120)
    return {"cluster": cluster, "names": names, "results": results}


def test_ranks_use_only_their_nodes_address(two_by_two: dict) -> None:
    cluster, results = two_by_two["cluster"], two_by_two["results"]
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert [r["local_rank"] for r in results] == [0, 1, 0, 1]
    for r in results:
        # Gloo binds the node's veth address, also for peers on the same node.
        assert r["local_addresses"] == [cluster.addresses[r["rank"] // 2]], r
        assert set(r["peer_addresses"]) <= set(cluster.addresses), r


def test_cross_node_is_rate_limited_and_intra_node_is_not(two_by_two: dict) -> None:
    r = two_by_two["results"][0]
    # Both cross groups run at once: each node's 2 ranks send their half of the
    # gathered 4 MiB to the other node, 4 MiB through each NIC.
    nic_seconds = 2 * (NBYTES / 2) * 8 / two_by_two["cluster"].rate_bits
    assert r["cross_s"] > 0.5 * nic_seconds, f"cross {r['cross_s']:.3f}s, NIC {nic_seconds:.3f}s"
    assert r["intra_s"] < r["cross_s"] / 4, r
    assert r["flat_s"] > 0.5 * nic_seconds * 3 / 4, r  # each node sends >= 3 MiB on the ring


def test_topology_is_fitted_alike_on_every_rank(two_by_two: dict) -> None:
    dicts = [r["topology"] for r in two_by_two["results"]]
    assert all(d == dicts[0] for d in dicts)
    topo = Topology.from_dict(dicts[0])
    assert (topo.nodes, topo.ranks_per_node, topo.hierarchical) == (2, 2, True)
    assert topo.inter is not None and topo.intra is not None
    inter = topo.inter.time("all_gather", 1 << 20, 2)
    intra = topo.intra.time("all_gather", 1 << 20, 2)
    assert inter > 3 * intra, (inter, intra)


def test_namespaces_deleted_after_the_job(two_by_two: dict) -> None:
    assert not two_by_two["names"] & _namespaces()


def test_namespaces_deleted_on_exception(can_emulate: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), emulated_cluster(3, "1gbit") as cluster:
        names = {ns.name for ns in (*cluster.namespaces, cluster.hub)}
        sleeper = cluster.namespaces[1].popen(["sleep", "60"])
        raise RuntimeError("boom")
    assert not names & _namespaces()
    assert sleeper.wait(timeout=10) != 0  # killed with its namespace


def test_failing_worker_raises_with_its_traceback(can_emulate: None) -> None:
    with emulated_cluster(2, "1gbit") as cluster:
        spec = {"task": "selftest", "nbytes": 1 << 16, "fail_rank": 1}
        with pytest.raises(ClusterJobFailed, match="selftest failure requested on rank 1") as err:
            run_torchrun(cluster, 1, WORKER, spec, timeout=60)
    assert err.value.node == 1
    assert "RuntimeError" in str(err.value)


def test_loopback_job_without_namespaces() -> None:
    results = run_torchrun(None, 2, WORKER, {"task": "selftest", "nbytes": 1 << 16}, timeout=60)
    placed = [(r["rank"], r["local_rank"], r["world_size"]) for r in results]
    assert placed == [(0, 0, 2), (1, 1, 2)]
    assert all(r["local_addresses"] == ["127.0.0.1"] for r in results)
    assert "cross_s" not in results[0]  # one node: nothing crosses a NIC
