"""MergeComp's online and hybrid searches on real ranks; convergence with DGC."""

from __future__ import annotations

import torch
import torch.distributed as dist

from thrifty.bench import run_ranks
from thrifty.bench.models import DigitsCNN, train_digits_shard
from thrifty.mergecomp import MergeComp
from thrifty.mergecomp.online import _binary_search
from thrifty.sync import GradientSync


def test_binary_search_finds_the_best_split_within_its_budget() -> None:
    n, best_split = 20, 7

    def cost(lengths: tuple[int, ...]) -> float:
        if len(lengths) == 1:
            return 10.0
        return 1.0 + abs(lengths[0] - best_split) * 0.1 + 0.5 * (len(lengths) - 2)

    search = _binary_search(n, budget=12)
    lengths = next(search)
    measured = {}
    try:
        while True:
            measured[lengths] = cost(lengths)
            lengths = search.send(measured[lengths])
    except StopIteration:
        pass
    assert len(measured) <= 12
    assert min(measured, key=measured.get) == (best_split, n - best_split)


def _train(mode: str, steps: int) -> dict:
    n = dist.get_world_size()
    torch.manual_seed(0)
    model = DigitsCNN()
    planner = MergeComp(mode=mode, warmup=2, trial_iters=2, max_trials=4)
    sync = GradientSync(model, compressor="dgc", plan=planner, ratio=0.05)
    # DGC's memory carries the momentum (momentum correction): plain SGD on top.
    accuracy = train_digits_shard(model, torch.optim.SGD(model.parameters(), lr=0.1), steps)
    tuner = planner.tuners[0]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(n)]
    dist.all_gather(everyone, flat)
    return {
        "accuracy": accuracy,
        "chosen": tuner.chosen.lengths if tuner.chosen else None,
        "trials": [(t.lengths, t.measured) for t in tuner.trials],
        "fingerprint": sync.plan.fingerprint(),
        "replicas_equal": all(torch.equal(e, flat) for e in everyone),
        "attached": tuner in sync.iteration_callbacks,
    }


def test_hybrid_mergecomp_with_dgc_converges_and_agrees_across_ranks() -> None:
    results = run_ranks(_train, 2, "hybrid", 400, timeout=300)
    first = results[0]
    assert first["chosen"] is not None and not first["attached"]
    assert 1 <= len(first["trials"]) <= 4 + 2  # max_trials, then the best two again
    assert all(r["fingerprint"] == first["fingerprint"] for r in results)
    assert all(r["chosen"] == first["chosen"] and r["trials"] == first["trials"] for r in results)
    assert all(r["replicas_equal"] for r in results)
    assert first["accuracy"] >= 0.90, first


def test_online_mergecomp_measures_a_bounded_number_of_plans() -> None:
    results = run_ranks(_train, 2, "online", 40, timeout=300)
    first = results[0]
    assert first["chosen"] is not None
    assert 2 <= len(first["trials"]) <= 4 + 2
    runs: dict = {}
    for lengths, measured in first["trials"]:
        runs.setdefault(lengths, []).append(measured)
    assert max(len(v) for v in runs.values()) == 2  # the best two were measured again
    assert first["chosen"] == min(runs, key=lambda k: sum(runs[k]) / len(runs[k]))
    assert all(r["chosen"] == first["chosen"] for r in results)
