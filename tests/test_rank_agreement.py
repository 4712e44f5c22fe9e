"""Ranks that disagree get one clear error on every rank: no abort, no hang, no silent result.

Every case runs on real gloo ranks and returns, from each rank, the error it
raised (type and message), so the test sees that *every* rank raised the
same one (``run_ranks`` would report only the first failure).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.bench import run_ranks
from thrifty.comm import count_bytes
from thrifty.sync import GradientSync, Plan, RankMismatchError, Strategy
from thrifty.sync.ddp_hook import CompressionHookState, compression_hook


def _outcome(build: Any) -> tuple[str, str] | None:
    """What ``build()`` did on this rank, then a backward: None, or (error type, message)."""
    try:
        model = build()
        model(torch.randn(2, 8)).sum().backward()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def _linear_width(compressor: str | None) -> tuple[str, str] | None:
    def build() -> nn.Module:
        model = nn.Linear(8, 4 + dist.get_rank())
        GradientSync(model, compressor=compressor, plan="whole")
        return model

    return _outcome(build)


def _same_error_everywhere(results: list[Any]) -> str:
    assert all(r is not None for r in results), f"some rank raised nothing: {results}"
    assert len(set(results)) == 1, f"ranks raised different errors: {results}"
    kind, message = results[0]
    assert kind == "RankMismatchError", results[0]
    return message


@pytest.mark.parametrize("compressor", [None, "fp16", "topk"])
def test_model_widths_that_differ_raise_on_every_rank(compressor: str | None) -> None:
    message = _same_error_everywhere(run_ranks(_linear_width, 2, compressor, timeout=60))
    assert "parameter 'weight': shape differs across ranks: rank 0 (4, 8), rank 1 (5, 8)" in message


def _dtype_mismatch() -> tuple[str, str] | None:
    def build() -> nn.Module:
        model = nn.Linear(8, 4)
        if dist.get_rank() == 1:
            model = model.double()
        GradientSync(model, compressor="topk", ratio=0.5)
        return model.float()

    return _outcome(build)


def _requires_grad_mismatch() -> tuple[str, str] | None:
    def build() -> nn.Module:
        model = nn.Linear(8, 4)
        model.bias.requires_grad_(dist.get_rank() == 0)
        GradientSync(model)
        return model

    return _outcome(build)


def _options_mismatch() -> tuple[str, str] | None:
    def build() -> nn.Module:
        model = nn.Linear(8, 4)
        GradientSync(model, compressor="topk", ratio=0.1 if dist.get_rank() == 0 else 0.2)
        return model

    return _outcome(build)


def _compressor_mismatch() -> tuple[str, str] | None:
    def build() -> nn.Module:
        model = nn.Linear(8, 4)
        GradientSync(model, compressor="fp16" if dist.get_rank() == 0 else "bf16")
        return model

    return _outcome(build)


def _plan_mismatch() -> tuple[str, str] | None:
    def build() -> nn.Module:
        model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
        GradientSync(model, compressor="fp16", plan="whole" if dist.get_rank() else "layerwise")
        return model

    return _outcome(build)


def _name_mismatch() -> tuple[str, str] | None:
    def build() -> nn.Module:
        model = nn.Sequential()
        model.add_module("fc" if dist.get_rank() == 0 else "head", nn.Linear(8, 4))
        GradientSync(model)
        return model

    return _outcome(build)


def _local_error_on_one_rank() -> tuple[str, str] | None:
    def build() -> nn.Module:
        model = nn.Linear(8, 4)
        GradientSync(model, compressor="topk" if dist.get_rank() == 0 else "no-such-compressor")
        return model

    return _outcome(build)


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 4, sparse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(torch.arange(8) % 16) * x.sum()


def _sparse_scheme_mismatch() -> tuple[str, str] | None:
    import thrifty.zen  # noqa: F401 - registers the sparse schemes

    def build() -> nn.Module:
        model = _Bag()
        GradientSync(model, sparse_scheme="zen" if dist.get_rank() == 0 else "agsparse")
        return model

    return _outcome(build)


def _zen_seed_mismatch() -> tuple[str, str] | None:
    from thrifty.zen.schemes import BalancedParallelism

    def build() -> nn.Module:
        model = _Bag()
        GradientSync(model, sparse_scheme=BalancedParallelism(seed=1 + dist.get_rank()))
        return model

    return _outcome(build)


def _set_plan_mismatch() -> tuple[str, str] | None:
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    sync = GradientSync(model, compressor="fp16")
    strategy = Strategy.make("fp16")
    plan = (
        Plan.whole_model(sync.backward_order, strategy)
        if dist.get_rank() == 0
        else Plan.layer_wise(sync.backward_order, strategy)
    )
    try:
        sync.set_plan(plan)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


CASES = {
    "dtype": (
        _dtype_mismatch,
        "parameter 'weight': dtype differs across ranks: rank 0 torch.float32, "
        "rank 1 torch.float64",
    ),
    "requires_grad": (
        _requires_grad_mismatch,
        "parameter 'bias': requires_grad differs across ranks: rank 0 True, rank 1 False",
    ),
    "options": (
        _options_mismatch,
        "compressor configuration differs across ranks: rank 0 ratio=0.1, rank 1 ratio=0.2",
    ),
    "compressor": (
        _compressor_mismatch,
        "compressor differs across ranks: rank 0 fp16, rank 1 bf16",
    ),
    "plan": (_plan_mismatch, "plan: number of groups differs across ranks: rank 0 4, rank 1 1"),
    "name": (
        _name_mismatch,
        "parameter #0: name differs across ranks: rank 0 'fc.weight', rank 1 'head.weight'",
    ),
    "local_error": (
        _local_error_on_one_rank,
        "an error on some ranks only: rank 0 none, rank 1 ValueError: unknown compressor "
        "'no-such-compressor'",
    ),
    "set_plan": (_set_plan_mismatch, "plans differ across ranks"),
    "zen_seed": (
        _zen_seed_mismatch,
        "sparse scheme of 'emb.weight' differs across ranks: rank 0 zen(5, 1, 0), "
        "rank 1 zen(5, 2, 0)",
    ),
    "sparse_scheme": (
        _sparse_scheme_mismatch,
        "sparse scheme differs across ranks: rank 0 'zen', rank 1 'agsparse'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mismatch_raises_the_same_clear_error_on_every_rank(case: str) -> None:
    fn, expected = CASES[case]
    message = _same_error_everywhere(run_ranks(fn, 2, timeout=60))
    assert expected in message, message


def _count_construction_collectives(check: bool) -> tuple[int, int]:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with count_bytes() as ledger:
        sync = GradientSync(model, compressor="topk", ratio=0.5, check_plan=check)
    construction = ledger.calls
    with count_bytes() as ledger:
        sync.set_plan(Plan.whole_model(sync.backward_order, sync.strategy), check_plan=check)
    model(torch.randn(2, 8)).sum().backward()  # and training works
    return construction, ledger.calls


def test_matching_ranks_pay_one_collective_per_check() -> None:
    assert run_ranks(_count_construction_collectives, 2, True, timeout=60) == [(1, 1)] * 2
    assert run_ranks(_count_construction_collectives, 2, False, timeout=60) == [(0, 0)] * 2


def _hook_options_mismatch() -> tuple[str, str] | None:
    torch.manual_seed(0)
    ddp = DDP(nn.Linear(8, 4))
    ratio = 0.25 if dist.get_rank() == 0 else 0.5
    ddp.register_comm_hook(CompressionHookState("topk", ratio=ratio), compression_hook)
    try:
        F.mse_loss(ddp(torch.randn(2, 8)), torch.zeros(2, 4)).backward()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def test_ddp_hook_checks_the_compressor_on_first_use() -> None:
    results = run_ranks(_hook_options_mismatch, 2, timeout=60)
    # DDP wraps an error raised inside a comm hook; the message is ours on every rank.
    assert all(r is not None for r in results), results
    expected = "compressor configuration differs across ranks: rank 0 ratio=0.25, rank 1 ratio=0.5"
    assert all(expected in message for _, message in results), results


def test_rank_mismatch_error_is_a_value_error() -> None:
    assert issubclass(RankMismatchError, ValueError)
