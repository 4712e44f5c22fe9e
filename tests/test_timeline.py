"""Timeline against hand-computed schedules; Profile on a real model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thrifty.comm import NetworkModel
from thrifty.comm.network import AlphaBeta
from thrifty.sync import Plan, Strategy
from thrifty.sync.profile import CompressionCost, Profile, TensorProfile, profile_model
from thrifty.sync.timeline import comm_time, simulate

# 2 ranks, no latency, 1 byte per microsecond per rank: all-reduce of B bytes takes B us.
NET = NetworkModel(
    "toy", {p: {2: AlphaBeta(0.0, 1e-6)} for p in ("all_reduce", "all_gather", "all_to_all")}
)
US = 1e-6


def _profile(costs: dict[str, CompressionCost] | None = None) -> Profile:
    tensors = [
        TensorProfile("c", 100, "float32", 10 * US),
        TensorProfile("b", 100, "float32", 20 * US),
        TensorProfile("a", 100, "float32", 30 * US),
    ]
    return Profile(
        tensors, forward=50 * US, backward=40 * US, step=5 * US, world_size=2, costs=costs or {}
    )


def test_uncompressed_layer_wise_fifo_channel() -> None:
    # Each all-reduce: 400 bytes -> 2*(1/2)*400 = 400 wire bytes = 400 us.
    t = simulate(_profile(), Plan.layer_wise(["c", "b", "a"]), NET)
    assert [g.comm_start / US for g in t.groups] == pytest.approx([10, 410, 810])
    assert t.groups[-1].comm_end / US == pytest.approx(1210)
    assert t.iteration / US == pytest.approx(50 + 1210 + 5)
    assert t.backward_end / US == pytest.approx(40)


def test_whole_model_waits_for_the_last_tensor() -> None:
    t = simulate(_profile(), Plan.whole_model(["c", "b", "a"]), NET)
    assert t.groups[0].comm_start / US == pytest.approx(30)
    assert t.iteration / US == pytest.approx(50 + 30 + 1200 + 5)


def test_compression_delays_backward_and_decoding_is_paid_per_rank() -> None:
    strategy = Strategy.make("topk", ratio=0.1)
    cost = CompressionCost([1, 10**6], [7 * US, 7 * US], [2 * US, 2 * US])
    prof = _profile({strategy.label(): cost})
    plan = Plan.layer_wise(["c", "b", "a"], strategy)
    t = simulate(prof, plan, NET)
    # k = 10 of 100: 10 fp32 values + 10 int32 indices = 80 bytes; gather of 160 -> 80 us.
    first, second = comm_time(strategy, 100, 2, NET)
    assert first / US == pytest.approx(80) and second == 0
    assert [g.ready / US for g in t.groups] == pytest.approx([10, 27, 44])
    assert [g.encode_end / US for g in t.groups] == pytest.approx([17, 34, 51])
    assert t.backward_end / US == pytest.approx(40 + 21)
    # finish: max(61, comm_end) + 2 ranks x 2 us decode per group
    ends = [g.comm_end / US for g in t.groups]
    assert ends == pytest.approx([97, 177, 257])
    assert t.groups[-1].finish / US == pytest.approx(257 + 4)


def test_plan_naming_unknown_tensors_is_refused() -> None:
    with pytest.raises(ValueError, match="lacks"):
        simulate(_profile(), Plan.whole_model(["a", "zzz"]), NET)


def test_profile_model_orders_tensors_as_backward_does() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategies = [Strategy.make("fp16"), Strategy.make("topk", ratio=0.1)]
    prof = profile_model(
        model, lambda: F.cross_entropy(model(x), y), opt, iters=3, compressors=strategies
    )
    assert prof.names[:2] == ["2.bias", "2.weight"] or prof.names[:2] == ["2.weight", "2.bias"]
    assert set(prof.names[2:]) == {"0.weight", "0.bias"}
    readies = [t.ready for t in prof.tensors]
    assert readies == sorted(readies) and readies[-1] <= prof.backward
    assert prof.forward > 0 and prof.backward > 0
    cost = prof.cost(strategies[1])
    assert cost.sizes[-1] == sum(t.numel for t in prof.tensors)
    assert all(v > 0 for v in cost.encode)
    again = Profile.from_dict(prof.to_dict())
    assert again == prof
    with pytest.raises(KeyError, match="no compression cost"):
        prof.cost(Strategy.make("qsgd"))
