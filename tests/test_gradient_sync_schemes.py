"""GradientSync runs every Strategy the plan allows: all-to-all, offload, hierarchical.

Real gloo ranks (4 ranks as 2 nodes x 2 where the scheme needs nodes). The
reference is the mean of the ranks' local gradients, all-gathered raw.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from thrifty.bench import RankFailure, run_ranks
from thrifty.sync import GradientSync, Plan, Strategy

# Odd sizes (73 elements in all), so shards need padding for 2 and 4 ranks.
_SIZES = [(5, 7), (7, 3)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(*_SIZES[0]), nn.Tanh(), nn.Linear(*_SIZES[1]))


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in reversed(list(model.named_parameters()))]


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(100 * step + rank))


def _backward(model: nn.Module, step: int) -> None:
    model.zero_grad()
    model(_batch(step, dist.get_rank())).square().sum().backward()


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    everyone = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, t)
    return everyone


def _plan(model: nn.Module, how: str, strategies: list[Strategy]) -> Plan:
    """``whole``: one group; ``layerwise``: one group per tensor, strategies in turn."""
    names = _names(model)
    if how == "whole":
        return Plan.whole_model(names, strategies[0])
    per_group = [strategies[i % len(strategies)] for i in range(len(names))]
    return Plan.contiguous(names, [1] * len(names), per_group)


def _run(
    how: str, strategies: list[Strategy], steps: int = 1, **sync_options: Any
) -> dict[str, Any]:
    """``steps`` synchronised backwards; the last one's grads, the reference mean, the ledger."""
    model = _model()
    reference = copy.deepcopy(model)
    sync = GradientSync(model, plan=_plan(model, how, strategies), **sync_options)
    for step in range(steps):
        _backward(model, step)
        _backward(reference, step)
    got = _grads(model)
    want = torch.stack(_gather(_grads(reference))).mean(0)
    sync.remove()
    return {
        "grads": got,
        "want": want,
        "same_on_every_rank": all(torch.equal(g, got) for g in _gather(got)),
        "ledger": sync.ledger.as_dict(),
    }


def _offloaded(strategy: Strategy) -> Strategy:
    return Strategy.make(
        strategy.compressor,
        strategy.collective,
        strategy.memory,
        offload=True,
        hierarchical=strategy.hierarchical,
        **dict(strategy.options),
    )


# ------------------------------------------------------------------ exact schemes

UNCOMPRESSED = [
    Strategy(),
    Strategy(collective="all_to_all"),
    Strategy(hierarchical=True),
    Strategy(collective="all_to_all", hierarchical=True),
]
LOSSLESS = [  # top-k keeping every entry: the residual stays zero
    Strategy.make("topk", "all_gather", ratio=1.0),
    Strategy.make("topk", "all_to_all", ratio=1.0),
    Strategy.make("topk", "all_gather", hierarchical=True, ratio=1.0),
    Strategy.make("topk", "all_to_all", offload=True, hierarchical=True, ratio=1.0),
    Strategy.make("none", "all_reduce", hierarchical=True),
]
FP16 = [
    Strategy.make("fp16", "all_reduce"),
    Strategy.make("fp16", "all_gather"),
    Strategy.make("fp16", "all_to_all"),
    Strategy.make("fp16", "all_reduce", hierarchical=True),
    Strategy.make("fp16", "all_to_all", offload=True, hierarchical=True),
]


def check_means(cases: list[tuple[str, Strategy, float]], ranks_per_node: int) -> list[str]:
    """Every case's averaged grads match the reference mean within its tolerance."""
    checked = []
    for how in ("whole", "layerwise"):
        for label, strategy, tolerance in cases:
            out = _run(how, [strategy], steps=2, ranks_per_node=ranks_per_node)
            error = float((out["grads"] - out["want"]).abs().max())
            scale = float(out["want"].abs().max())
            assert error <= tolerance * scale, (label, how, error, scale)
            assert out["same_on_every_rank"], (label, how)
            checked.append(f"{how}:{label}")
    return checked


def _cases(strategies: list[Strategy], tolerance: float) -> list[tuple[str, Strategy, float]]:
    return [(s.label(), s, tolerance) for s in strategies]


def test_uncompressed_schemes_equal_the_mean_on_two_nodes() -> None:
    cases = _cases(UNCOMPRESSED, 1e-6) + _cases(LOSSLESS, 1e-6)
    checked = run_ranks(check_means, 4, cases, 2, timeout=120)[0]
    assert len(checked) == 2 * len(cases)


def test_fp16_schemes_are_within_fp16_rounding_on_two_nodes() -> None:
    checked = run_ranks(check_means, 4, _cases(FP16, 2e-3), 2, timeout=120)[0]
    assert len(checked) == 2 * len(FP16)


@pytest.mark.parametrize("ranks_per_node", [1, 2])
def test_hierarchical_on_one_node_or_one_rank_per_node_is_exact(ranks_per_node: int) -> None:
    cases = _cases([UNCOMPRESSED[2], UNCOMPRESSED[3], LOSSLESS[2]], 1e-6)
    checked = run_ranks(check_means, 2, cases, ranks_per_node, timeout=60)[0]
    assert len(checked) == 2 * len(cases)


def check_plain_all_to_all_is_allreduce(world_size: int) -> float:
    """Reduce-scatter + all-gather against plain all-reduce of the same grads."""
    a = _run("whole", [Strategy(collective="all_to_all")])
    b = _run("whole", [Strategy()])
    assert dist.get_world_size() == world_size
    assert torch.allclose(a["grads"], b["grads"], rtol=1e-6, atol=1e-7)
    return float((a["grads"] - b["grads"]).abs().max())


def test_uncompressed_all_to_all_equals_all_reduce_on_three_ranks() -> None:
    # 73 elements over 3 ranks: the last shard is padded
    assert max(run_ranks(check_plain_all_to_all_is_allreduce, 3, 3)) < 1e-6


# ------------------------------------------------------------------ lossy: offload is exact

LOSSY = [
    Strategy.make("randomk", ratio=0.1),
    Strategy.make("efsignsgd", "all_gather"),
    Strategy.make("efsignsgd", "all_to_all"),
    Strategy.make("dgc", "all_gather", ratio=0.1),
    Strategy.make("dgc", "all_to_all", hierarchical=True, ratio=0.1),
    Strategy.make("randomk", hierarchical=True, ratio=0.1),
]


def check_offload_is_bit_identical(strategies: list[Strategy]) -> list[int]:
    """3 steps (so error feedback matters) with and without offload: equal bits and bytes."""
    sent = []
    for strategy in strategies:
        for how in ("whole", "layerwise"):
            plain = _run(how, [strategy], steps=3, ranks_per_node=2)
            moved = _run(how, [_offloaded(strategy)], steps=3, ranks_per_node=2)
            label = f"{how}:{strategy.label()}"
            assert torch.isfinite(plain["grads"]).all(), label
            assert plain["same_on_every_rank"] and moved["same_on_every_rank"], label
            assert torch.equal(plain["grads"], moved["grads"]), label
            # lossy: not the mean, but not nothing either
            assert not torch.equal(plain["grads"], plain["want"]), label
            assert plain["grads"].abs().sum() > 0, label
            # every byte of the offloaded groups is counted, once
            assert moved["ledger"] == plain["ledger"], (label, moved["ledger"], plain["ledger"])
            sent.append(sum(op["payload_bytes"] for op in moved["ledger"].values()))
    return sent


def test_lossy_schemes_agree_across_ranks_and_offload_changes_no_bit() -> None:
    sent = run_ranks(check_offload_is_bit_identical, 4, LOSSY, timeout=180)[0]
    assert len(sent) == 2 * len(LOSSY) and min(sent) > 0


def check_mixed_plan() -> dict[str, Any]:
    """Offloaded, hierarchical and plain groups in one plan; where compression runs."""
    mixed = [
        Strategy.make("topk", "all_gather", ratio=0.3),
        Strategy.make("topk", "all_gather", offload=True, ratio=0.3),
        Strategy.make("efsignsgd", "all_to_all", offload=True, hierarchical=True),
        Strategy(collective="all_to_all", hierarchical=True),
    ]
    main = _run("layerwise", mixed, steps=3, ranks_per_node=2)
    unmoved = [
        Strategy.make(s.compressor, s.collective, hierarchical=s.hierarchical, **dict(s.options))
        for s in mixed
    ]
    reference = _run("layerwise", unmoved, steps=3, ranks_per_node=2)
    assert torch.equal(main["grads"], reference["grads"])
    assert main["ledger"] == reference["ledger"]

    model = _model()
    sync = GradientSync(model, plan=_plan(model, "layerwise", mixed), ranks_per_node=2)
    threads: dict[int, set[str]] = {}
    for state in sync._groups:
        if state.compressor is None:
            continue
        original = state.compressor.compress

        def compress(*args: Any, _index: int = state.index, _original: Any = original) -> Any:
            threads.setdefault(_index, set()).add(threading.current_thread().name)
            return _original(*args)

        state.compressor.compress = compress  # type: ignore[method-assign]
    _backward(model, 0)
    launcher = sync._launcher
    assert launcher is not None
    sync.remove()
    assert sync._launcher is None
    assert not any(t.name.startswith("thrifty-launcher") for t in threading.enumerate())
    return {k: sorted(v) for k, v in threads.items()}


def test_mixed_plan_offloads_compression_to_the_launcher_thread() -> None:
    threads = run_ranks(check_mixed_plan, 4, timeout=120)[0]
    assert threads[0] == ["MainThread"]  # not offloaded: compressed during backward
    assert threads[1] == ["thrifty-launcher_0"]  # offloaded
    # offloaded divisible scheme: shards compressed on the launcher; the reduced
    # shard is re-compressed at the end of backward, on the main thread
    assert threads[2] == ["MainThread", "thrifty-launcher_0"]
    assert set(threads) == {0, 1, 2}


def check_no_launcher_without_offload() -> bool:
    model = _model()
    sync = GradientSync(model, compressor="topk", plan="whole", ratio=0.5)
    _backward(model, 0)
    started = any(t.name.startswith("thrifty-launcher") for t in threading.enumerate())
    offloaded = Plan.whole_model(_names(model), _offloaded(sync.strategy))
    sync.set_plan(offloaded)
    assert sync._launcher is not None
    _backward(model, 1)
    sync.set_plan(Plan.whole_model(_names(model), sync.strategy))
    assert sync._launcher is None  # switched back: the thread is gone
    return started


def test_launcher_exists_only_while_the_plan_offloads() -> None:
    assert run_ranks(check_no_launcher_without_offload, 2) == [False, False]


# ------------------------------------------------------------------ errors


def check_error_on_launcher_surfaces(strategies: list[Strategy]) -> str:
    model = _model()
    sync = GradientSync(model, plan=_plan(model, "layerwise", strategies), ranks_per_node=2)
    x = _batch(0, dist.get_rank())
    x[0, 0] = float("nan")  # every rank: NaN gradients everywhere
    model.zero_grad()
    with pytest.raises(ValueError, match="NaN") as caught:
        model(x).square().sum().backward()
    # the engine starts afresh: the next backward synchronises normally (DGC's
    # memory would not: it takes the NaN into its momentum before compressing)
    _backward(model, 1)
    got = _grads(model)
    assert torch.isfinite(got).all()
    assert all(torch.equal(g, got) for g in _gather(got))
    sync.remove()
    return str(caught.value)


@pytest.mark.parametrize(
    "strategies",
    [
        [Strategy.make("topk", "all_gather", "residual", offload=True, ratio=0.5)],
        # the second group fails on the backward thread while the launcher holds the first
        [
            Strategy.make(
                "topk", "all_to_all", "residual", offload=True, hierarchical=True, ratio=0.5
            ),
            Strategy.make("efsignsgd", "all_gather", "residual"),
        ],
    ],
    ids=["offloaded", "mixed"],
)
def test_compression_error_on_the_launcher_is_raised_by_backward(
    strategies: list[Strategy],
) -> None:
    messages = run_ranks(check_error_on_launcher_surfaces, 4, strategies, timeout=90)
    assert all("NaN" in m for m in messages)


def build_hierarchical(ranks_per_node: int | None, eager: bool) -> None:
    model = _model()
    plan = Plan.whole_model(_names(model), Strategy(hierarchical=True))
    if eager:
        GradientSync(model, ranks_per_node=ranks_per_node)
    else:
        GradientSync(model, plan=plan)


def test_hierarchical_needs_ranks_per_node_to_divide_the_world() -> None:
    with pytest.raises(RankFailure, match=r"ValueError: ranks_per_node=3 does not divide"):
        run_ranks(build_hierarchical, 4, 3, True, timeout=60)
    with pytest.raises(RankFailure, match=r"ValueError: ranks_per_node=3 does not divide"):
        run_ranks(build_hierarchical, 4, None, False, env={"LOCAL_WORLD_SIZE": "3"}, timeout=60)


def check_custom_group_refused() -> str:
    model = _model()
    group = dist.new_group([0, 1])
    plan = Plan.whole_model(_names(model), Strategy(hierarchical=True))
    with pytest.raises(ValueError, match="custom process_group") as caught:
        GradientSync(model, plan=plan, process_group=group)
    return str(caught.value)


def test_hierarchical_refuses_a_custom_process_group() -> None:
    assert all("hierarchical" in m for m in run_ranks(check_custom_group_refused, 2))


# ------------------------------------------------------------------ set_plan


def check_set_plan_to_hierarchical() -> float:
    model = _model()
    reference = copy.deepcopy(model)
    sync = GradientSync(model, compressor="dgc", plan="whole", ratio=0.2, ranks_per_node=2)
    names = _names(model)
    _backward(model, 0)
    hier = Strategy.make("dgc", "all_gather", hierarchical=True, ratio=0.2)
    sync.set_plan(Plan.contiguous(names, [2, len(names) - 2], [hier, sync.strategy]))
    _backward(model, 1)
    sync.set_plan(Plan.whole_model(names, Strategy(hierarchical=True)))
    _backward(model, 2)
    _backward(reference, 2)
    got, want = _grads(model), torch.stack(_gather(_grads(reference))).mean(0)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    return float((got - want).abs().max())


def test_set_plan_to_and_from_hierarchical_groups() -> None:
    assert max(run_ranks(check_set_plan_to_hierarchical, 4, timeout=90)) < 1e-5
