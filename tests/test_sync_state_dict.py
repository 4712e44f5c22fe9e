"""Checkpoint and resume of GradientSync and the DDP hook state, on real gloo ranks.

A run of ``STEPS`` steps saves model, optimizer and sync state at step
``CUT`` and goes on; a second launch (new processes, new process group)
builds everything afresh, loads the checkpoint and finishes the run. Both
must end with the same parameters, bit for bit: error feedback, PowerSGD's
Q, DGC's momentum and an online planner's decision all carried over.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.bench import RankFailure, run_ranks
from thrifty.mergecomp import MergeComp
from thrifty.sync import GradientSync
from thrifty.sync.ddp_hook import CompressionHookState, compression_hook

STEPS, CUT = 6, 3


class Net(nn.Module):
    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, hidden)
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def _step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(100 * step + dist.get_rank())
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


SETUPS: dict[str, dict[str, Any]] = {
    "topk_ef": {"compressor": "topk", "plan": "whole", "ratio": 0.1},
    "powersgd": {"compressor": "powersgd", "plan": "layerwise", "rank": 2},
    "dgc": {"compressor": "dgc", "plan": "layerwise", "ratio": 0.1},
    "topk_divisible": {
        "compressor": "topk",
        "plan": "whole",
        "collective": "all_to_all",
        "ratio": 0.1,
    },
}


def _run(setup: str, directory: str, mode: str, steps: int = STEPS, cut: int = CUT) -> Any:
    """``first``: train, save at ``cut``, go on; ``resume``: load at ``cut``, finish."""
    torch.manual_seed(0)
    model = Net()
    kwargs = dict(SETUPS[setup]) if setup in SETUPS else {**SETUPS["topk_ef"], "plan": _mergecomp()}
    sync = GradientSync(model, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path = Path(directory) / f"rank{dist.get_rank()}.pt"
    start, switches = 0, []
    if mode != "first":
        checkpoint = torch.load(path, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optim"])
        if mode == "resume":
            sync.load_state_dict(checkpoint["sync"])
        torch.set_rng_state(checkpoint["rng"])
        start = cut
        original = sync.set_plan
        sync.set_plan = lambda plan, **kw: (switches.append(plan), original(plan, **kw))[1]  # type: ignore[method-assign]
    for step in range(start, steps):
        if mode == "first" and step == cut:
            state = {
                "model": model.state_dict(),
                "optim": opt.state_dict(),
                "sync": sync.state_dict(),
                "rng": torch.get_rng_state(),
            }
            torch.save(state, path)
        _step(model, opt, step)
    tuner = kwargs["plan"].tuners[0] if setup == "mergecomp" else None
    return {
        "params": _params(model),
        "plan": sync.plan.to_dict(),
        "chosen": None if tuner is None or tuner.chosen is None else tuner.chosen.lengths,
        "searching": tuner is not None and tuner in sync.iteration_callbacks,
        "switches": len(switches),
    }


def _mergecomp() -> MergeComp:
    """A quick online search: it chooses within the first ``CUT`` steps of the mergecomp run."""
    return MergeComp(mode="online", warmup=1, trial_iters=1, max_trials=3, confirm=1)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_resume_is_bit_for_bit(setup: str, tmp_path: Path) -> None:
    first = run_ranks(_run, 2, setup, str(tmp_path), "first", timeout=90)
    resumed = run_ranks(_run, 2, setup, str(tmp_path), "resume", timeout=90)
    for rank in range(2):
        assert _same(first[rank]["params"], resumed[rank]["params"]), f"rank {rank} differs"
    if setup == "topk_ef":  # the control: without the sync state the run ends elsewhere
        lost = run_ranks(_run, 2, setup, str(tmp_path), "resume_without_sync", timeout=90)
        assert not _same(first[0]["params"], lost[0]["params"])


def test_mergecomp_resume_does_not_search_again(tmp_path: Path) -> None:
    steps, cut = 12, 9
    first = run_ranks(_run, 2, "mergecomp", str(tmp_path), "first", steps, cut, timeout=90)
    assert first[0]["chosen"] is not None, "the search should have finished before the cut"
    resumed = run_ranks(_run, 2, "mergecomp", str(tmp_path), "resume", steps, cut, timeout=90)
    for rank in range(2):
        assert resumed[rank]["chosen"] == first[rank]["chosen"]
        assert not resumed[rank]["searching"]
        assert resumed[rank]["plan"] == first[rank]["plan"]
        assert resumed[rank]["switches"] == 0  # no plan switch after the state was loaded
        assert _same(first[rank]["params"], resumed[rank]["params"])


def _dcp_run(directory: str, mode: str) -> dict[str, torch.Tensor]:
    """The same cut with torch.distributed.checkpoint: one sharded checkpoint for all ranks."""
    torch.manual_seed(0)
    model = Net()
    sync = GradientSync(model, compressor="topk", plan="layerwise", ratio=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = 0
    if mode == "resume":
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd, "sync": sync}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = CUT
    for step in range(start, STEPS):
        if mode == "first" and step == CUT:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd, "sync": sync}, checkpoint_id=directory)
        _step(model, opt, step)
    return _params(model)


def test_torch_distributed_checkpoint_round_trip(tmp_path: Path) -> None:
    first = run_ranks(_dcp_run, 2, str(tmp_path), "first", timeout=90)
    resumed = run_ranks(_dcp_run, 2, str(tmp_path), "resume", timeout=90)
    for rank in range(2):
        assert _same(first[rank], resumed[rank]), f"rank {rank} differs"


def _hook_run(directory: str, mode: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model)
    hook = CompressionHookState("topk", ratio=0.1)
    ddp.register_comm_hook(hook, compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    path = Path(directory) / f"hook{dist.get_rank()}.pt"
    start = 0
    if mode == "resume":
        checkpoint = torch.load(path, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optim"])
        hook.load_state_dict(checkpoint["hook"])
        start = CUT
    for step in range(start, STEPS):
        if mode == "first" and step == CUT:
            state = {"model": model.state_dict(), "optim": opt.state_dict()}
            torch.save({**state, "hook": hook.state_dict()}, path)
        _step(ddp, opt, step)
    return _params(model)


def test_ddp_hook_state_round_trip(tmp_path: Path) -> None:
    first = run_ranks(_hook_run, 2, str(tmp_path), "first", timeout=90)
    resumed = run_ranks(_hook_run, 2, str(tmp_path), "resume", timeout=90)
    for rank in range(2):
        assert _same(first[rank], resumed[rank]), f"rank {rank} differs"


def _load_elsewhere(directory: str, what: str) -> None:
    torch.manual_seed(0)
    model = Net(hidden=32 if what == "model" else 24)
    sync = GradientSync(model, **SETUPS["topk_ef"])
    checkpoint = torch.load(os.path.join(directory, "rank0.pt"), weights_only=True)
    sync.load_state_dict(checkpoint["sync"])


def test_loading_on_another_world_size_or_model_is_refused(tmp_path: Path) -> None:
    run_ranks(_run, 2, "topk_ef", str(tmp_path), "first", timeout=90)
    with pytest.raises(RankFailure, match="saved by 2 ranks, this job has 1"):
        run_ranks(_load_elsewhere, 1, str(tmp_path), "world", timeout=60)
    with pytest.raises(RankFailure, match=r"parameter 'fc1.weight' is torch.float32 \(24, 16\)"):
        run_ranks(_load_elsewhere, 2, str(tmp_path), "model", timeout=60)


def test_state_dict_is_plain_and_complete_before_the_first_step() -> None:
    """A fresh engine's state dict is the template dcp.load fills: every slot, flags off."""
    run_ranks(_fresh_template, 2, timeout=60)


def _fresh_template() -> None:
    model = Net()
    sync = GradientSync(model, compressor="powersgd", plan="layerwise", rank=2)
    state = sync.state_dict()
    groups = state["ranks"][str(dist.get_rank())]
    assert len(groups) == 4
    assert not bool(groups["0"]["memory"]["set_residual"])
    assert "shared_q" not in groups["1"]["compressor"]  # fc2.weight (4, 24): sent uncompressed
    assert not bool(groups["3"]["compressor"]["set_shared_q"])  # fc1.weight (24, 16), rank 2
    _step(model, torch.optim.SGD(model.parameters(), lr=0.0), 0)
    after = sync.state_dict()["ranks"][str(dist.get_rank())]
    assert bool(after["0"]["memory"]["set_residual"])
    assert after["3"]["compressor"]["shared_q"].shape == (16, 2)
    assert bool(after["3"]["compressor"]["set_shared_q"])
