"""NaN/Inf on one rank: the same error (or the same skipped step) on every rank, same step.

Before, a NaN on one rank with Top-k raised a ValueError there while its peer
failed in the collective with gloo's "Connection closed by peer". Now every
rank's count rides in the group's own collective, so every rank knows.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import thrifty.zen  # noqa: F401  registers sparse_scheme="zen" with GradientSync
from thrifty.bench import RankFailure, run_ranks
from thrifty.comm.agreement import NonFiniteGradientError
from thrifty.sync import GradientSync, Plan, Strategy
from thrifty.sync.ddp_hook import CompressionHookState, compression_hook

BAD_RANK = 1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def _loss(model: nn.Module, step: int, poison: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + dist.get_rank())
    x = torch.randn(8, 12, generator=g)
    if poison:
        x[0, 0] = float("nan")  # one NaN input: NaN in fc1's and fc2's gradients
    return F.cross_entropy(model(x), torch.randint(0, 4, (8,), generator=g))


def _memory_state(sync: GradientSync) -> list[torch.Tensor]:
    out = []
    for state in sync._groups:
        for memory in (state.memory, state.second_memory):
            if memory is not None:
                out += [
                    t.clone() for k in memory.state_keys() for t in memory.export_state(k).values()
                ]
    return out


CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("fp32 all-reduce", {}),
    ("fp32 all-to-all", {"collective": "all_to_all"}),
    ("topk all-gather", {"compressor": "topk", "ratio": 0.25}),
    ("topk all-to-all", {"compressor": "topk", "ratio": 0.25, "collective": "all_to_all"}),
    ("fp16 all-reduce", {"compressor": "fp16"}),
    ("powersgd rounds", {"compressor": "powersgd", "rank": 1}),
    ("signsgd vote", {"compressor": "signsgd"}),
    ("topk offload", {"plan": "offload-topk"}),
]


def _sync(options: dict[str, Any], nonfinite: str, model: nn.Module) -> GradientSync:
    options = dict(options)
    if options.pop("plan", None) == "offload-topk":
        strategy = Strategy.make("topk", ratio=0.25, offload=True)
        names = [n for n, _ in reversed(list(model.named_parameters()))]
        return GradientSync(model, plan=Plan.layer_wise(names, strategy), nonfinite=nonfinite)
    return GradientSync(model, plan="whole", nonfinite=nonfinite, **options)


def check_every_config(nonfinite: str) -> list[dict[str, Any]]:
    """For each config: good step, poisoned step (rank 1), good step."""
    results = []
    for label, options in CONFIGS:
        torch.manual_seed(0)
        model = Net()
        sync = _sync(options, nonfinite, model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            opt.zero_grad()
            before = _memory_state(sync)
            error = None
            try:
                _loss(model, step, poison=step == 1 and dist.get_rank() == BAD_RANK).backward()
            except NonFiniteGradientError as exc:
                error = exc
            if step == 1:
                after = _memory_state(sync)
                results.append(
                    {
                        "label": label,
                        "error": None if error is None else str(error),
                        "counts": None if error is None else error.counts,
                        "skipped": sync.skipped_last_step,
                        "grads_none": all(p.grad is None for p in model.parameters()),
                        "memory_kept": len(before) == len(after)
                        and all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
                    }
                )
            else:
                assert error is None and not sync.skipped_last_step, (label, step)
            opt.step()
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        results[-1]["finite"] = bool(torch.isfinite(params).all())
        results[-1]["params"] = params
    return results


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_nan_on_one_rank_is_agreed_by_every_rank(nonfinite: str) -> None:
    ranks = run_ranks(check_every_config, 2, nonfinite, timeout=90)
    for got0, got1 in zip(*ranks, strict=True):
        label = got0["label"]
        assert got0["error"] == got1["error"], label  # the same message on every rank
        assert got0["grads_none"] and got1["grads_none"], label
        assert got0["memory_kept"] and got1["memory_kept"], label  # error feedback untouched
        assert got0["finite"] and got1["finite"], label
        assert torch.equal(got0["params"], got1["params"]), label  # replicas stay equal
        if nonfinite == "raise":
            assert got0["error"] is not None, label
            assert f"rank {BAD_RANK}:" in got0["error"] and "rank 0:" not in got0["error"], label
            assert got0["counts"], label
            for per_rank in got0["counts"].values():  # by group: {rank: count}
                assert list(per_rank) == [BAD_RANK] and per_rank[BAD_RANK] > 0, label
        else:
            assert got0["error"] is None and got0["skipped"] and got1["skipped"], label


class SparseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6, sparse=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(x).mean(1))


def check_sparse(nonfinite: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = SparseNet()
    sync = GradientSync(model, sparse_scheme="zen", nonfinite=nonfinite)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out: dict[str, Any] = {}
    for step in range(3):
        opt.zero_grad()
        g = torch.Generator().manual_seed(step * 10 + dist.get_rank())
        x = torch.randint(0, 20, (4, 5), generator=g)
        loss = F.cross_entropy(model(x), torch.randint(0, 3, (4,), generator=g))
        if step == 1 and dist.get_rank() == BAD_RANK:
            loss = loss * float("nan")  # every gradient NaN on this rank
        try:
            loss.backward()
        except NonFiniteGradientError as exc:
            out["error"] = str(exc)
        if step == 1:
            out["skipped"] = sync.skipped_last_step
            out["grads_none"] = all(p.grad is None for p in model.parameters())
        opt.step()
    out["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_sparse_zen_path_agrees(nonfinite: str) -> None:
    got0, got1 = run_ranks(check_sparse, 2, nonfinite, timeout=60)
    assert got0.get("error") == got1.get("error")
    assert got0["grads_none"] and got1["grads_none"]
    assert torch.equal(got0["params"], got1["params"])
    assert torch.isfinite(got0["params"]).all()
    if nonfinite == "raise":
        assert got0["error"] and f"rank {BAD_RANK}:" in got0["error"]
    else:
        assert got0["skipped"] and got1["skipped"] and "error" not in got0


def check_ddp(compressor: str, nonfinite: str, options: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = DDP(Net())
    state = CompressionHookState(compressor, nonfinite=nonfinite, **options)
    model.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out: dict[str, Any] = {}
    for step in range(2):
        opt.zero_grad()
        try:
            _loss(model, step, poison=step == 1 and dist.get_rank() == BAD_RANK).backward()
        except NonFiniteGradientError as exc:  # raised in the hook itself (multi-round)
            out["error"] = str(exc)
            break
        except RuntimeError as exc:  # DDP re-raises a future's error as a RuntimeError
            out["error"] = str(exc).split("NonFiniteGradientError: ")[-1].split("\n")[0]
            break
        if state.skipped_last_step:
            out["skipped"] = True
            continue  # as GradScaler.step does
        opt.step()
    out["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out


@pytest.mark.parametrize(
    ("compressor", "options"),
    [("topk", {"ratio": 0.25}), ("fp16", {}), ("powersgd", {"rank": 1})],
)
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_ddp_hook_agrees(compressor: str, options: dict[str, Any], nonfinite: str) -> None:
    got0, got1 = run_ranks(check_ddp, 2, compressor, nonfinite, options, timeout=60)
    if nonfinite == "raise":
        assert got0["error"] == got1["error"]
        assert "compression_hook: NaN/Inf" in got0["error"] and f"rank {BAD_RANK}:" in got0["error"]
    else:
        assert got0.get("skipped") and got1.get("skipped")
        assert torch.equal(got0["params"], got1["params"])
        assert torch.isfinite(got0["params"]).all()


def check_off() -> None:
    model = Net()
    sync = GradientSync(model, compressor="topk", ratio=0.25, nonfinite="off")
    _loss(model, 0, poison=dist.get_rank() == BAD_RANK).backward()
    del sync


def test_off_keeps_the_compressors_own_check() -> None:
    with pytest.raises(RankFailure, match=r"contains \d+ NaN"):
        run_ranks(check_off, 2, timeout=30)


def _bad_mode() -> None:
    GradientSync(Net(), nonfinite="ignore")


def test_nonfinite_mode_is_validated() -> None:
    with pytest.raises(RankFailure, match="nonfinite must be one of"):
        run_ranks(_bad_mode, 1, timeout=30)


def test_nonfinite_error_is_both_floating_point_and_value_error() -> None:
    exc = NonFiniteGradientError("x", {})
    assert isinstance(exc, FloatingPointError) and isinstance(exc, ValueError)
