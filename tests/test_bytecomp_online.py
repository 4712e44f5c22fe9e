"""``plan="bytecomp"`` on real ranks: profile, decide on rank 0, switch, train on."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from thrifty.bench import run_ranks
from thrifty.bench.launch import RankFailure
from thrifty.bench.models import DigitsCNN, train_digits_shard
from thrifty.bytecomp import ByteComp, decide
from thrifty.comm import NetworkModel, Topology
from thrifty.sync import GradientSync
from thrifty.sync.profile import profile_model


def _train(steps: int, ranks_per_node: int | None, slow_link: bool) -> dict:
    n = dist.get_world_size()
    torch.manual_seed(0)
    model = DigitsCNN()
    # A slow link makes compression pay; without one the topology is fitted here.
    link = NetworkModel.analytic("slow", 1e6, 1e-3)
    planner = ByteComp(warmup=2, topology=Topology.single_node(link, n) if slow_link else None)
    sync = GradientSync(
        model, compressor="randomk", plan=planner, ranks_per_node=ranks_per_node, ratio=0.25
    )
    before = sync.plan
    accuracy = train_digits_shard(model, torch.optim.SGD(model.parameters(), lr=0.1), steps)
    tuner = planner.tuners[0]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(n)]
    dist.all_gather(everyone, flat)
    decision = tuner.decision
    return {
        "accuracy": accuracy,
        "profiling_plan": [(len(g.names), g.strategy.label()) for g in before.groups],
        "switched": sync.plan != before,
        "fingerprint": sync.plan.fingerprint(),
        "replicas_equal": all(torch.equal(e, flat) for e in everyone),
        "attached": tuner in sync.iteration_callbacks,
        "predicted": None if decision is None else decision.predicted,
        "baseline": None if decision is None else decision.baseline,
        "hierarchical": any(g.strategy.hierarchical for g in sync.plan.groups),
        "labels": sorted({g.strategy.label() for g in sync.plan.groups}),
    }


def test_bytecomp_planner_switches_every_rank_to_rank0s_plan_and_trains() -> None:
    results = run_ranks(_train, 2, 200, None, True, timeout=300)
    first = results[0]
    # Profiling runs with one uncompressed group; then every rank runs the same new plan.
    assert first["profiling_plan"] == [(8, "fp32/all_reduce")]  # DigitsCNN: 8 tensors
    assert all(r["switched"] and not r["attached"] for r in results)
    assert len({r["fingerprint"] for r in results}) == 1
    assert all(r["replicas_equal"] for r in results)
    assert first["predicted"] <= first["baseline"]
    assert any(label.startswith("randomk") for label in first["labels"])  # it compresses
    assert first["accuracy"] > 0.7  # and the model still learns (chance: 0.1; fp32: 0.93)


def test_bytecomp_planner_on_two_nodes_fits_the_topology_in_place() -> None:
    results = run_ranks(_train, 4, 12, 2, False, timeout=300)
    assert len({r["fingerprint"] for r in results}) == 1
    assert all(r["replicas_equal"] and r["switched"] for r in results)
    assert results[0]["predicted"] <= results[0]["baseline"]


def _decide_everywhere() -> dict:
    torch.manual_seed(0)
    model = DigitsCNN()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    from thrifty.sync import Strategy

    strategy = Strategy.make("randomk", ratio=0.25)
    profile = profile_model(
        model,
        lambda: torch.nn.functional.cross_entropy(model(x), y),
        compressors=[strategy],
        world_size=dist.get_world_size(),
    )
    # Each rank's profile differs (timings): only decisions from one profile agree.
    shared = [profile.to_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    from thrifty.sync.profile import Profile

    profile = Profile.from_dict(shared[0])
    topology = Topology.single_node(NetworkModel.analytic("link", 1e8, 1e-3), 2)
    planner = ByteComp(topology=topology, profile=profile)
    sync = GradientSync(model, compressor="randomk", plan=planner, ratio=0.25)
    # The planner allows CPU offload only with a spare core per rank on this machine.
    from thrifty.bytecomp import Constraints
    from thrifty.bytecomp.online import spare_cores

    allowed = Constraints(offload=spare_cores(sync.ranks_per_node))
    expected = decide(profile, strategy, topology, constraints=allowed).plan
    return {"same": sync.plan == expected, "callbacks": len(sync.iteration_callbacks)}


def test_bytecomp_with_profile_and_topology_decides_at_once_on_every_rank() -> None:
    results = run_ranks(_decide_everywhere, 2, timeout=120)
    assert all(r["same"] and r["callbacks"] == 0 for r in results)


def _no_compressor() -> None:
    GradientSync(DigitsCNN(), plan=ByteComp())


def test_bytecomp_without_a_compressor_is_refused() -> None:
    with pytest.raises(RankFailure, match="give it a compressor"):
        run_ranks(_no_compressor, 2, timeout=60)
