"""A silent or dead peer gives every survivor a clear error within the timeout, never a hang.

The silent peer stops itself with SIGSTOP (alive, connections open, never
answering: what a rank stuck in a debugger or swapping looks like); a survivor
SIGKILLs it afterwards. Survivors must raise within ``timeout`` + slack.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.bench import run_ranks
from thrifty.comm import collectives
from thrifty.comm.collectives import CollectiveError, SyncTimeoutError
from thrifty.sync import GradientSync
from thrifty.sync.ddp_hook import CompressionHookState, compression_hook

TIMEOUT = 2.0
SLACK = 2.0  # a loaded 2-core machine; gloo itself ends the operation at TIMEOUT
VICTIM = 1


def _pids() -> list[int]:
    pids: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    return pids


def _vanish(how: str) -> None:
    """Rank VICTIM stops answering (SIGSTOP) or dies (SIGKILL), here."""
    if dist.get_rank() == VICTIM:
        os.kill(os.getpid(), signal.SIGSTOP if how == "stop" else signal.SIGKILL)


def _outcome(pids: list[int], how: str, start: float, error: BaseException | None) -> dict:
    elapsed = time.monotonic() - start
    if how == "stop":
        # The test ends the stopped rank; every survivor tries, the first one wins.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[VICTIM], signal.SIGKILL)
    return {
        "type": None if error is None else type(error).__name__,
        "message": "" if error is None else str(error),
        "elapsed": elapsed,
    }


def check_gradient_sync(how: str, compressor: str | None) -> dict | None:
    pids = _pids()
    model = nn.Linear(16, 4)
    options = {"compressor": compressor, "ratio": 0.25} if compressor else {}
    sync = GradientSync(model, timeout=TIMEOUT, **options)
    x = torch.randn(8, 16)
    F.mse_loss(model(x), torch.zeros(8, 4)).backward()  # one good step
    _vanish(how)
    start = time.monotonic()
    error = None
    try:
        F.mse_loss(model(x), torch.zeros(8, 4)).backward()
    except CollectiveError as exc:
        error = exc
    del sync
    return _outcome(pids, how, start, error)


@pytest.mark.parametrize("compressor", [None, "topk"])
def test_stopped_peer_times_out_on_every_survivor(compressor: str | None) -> None:
    results = run_ranks(check_gradient_sync, 3, "stop", compressor, timeout=20, may_die=[VICTIM])
    for rank, got in enumerate(results):
        if rank == VICTIM:
            continue
        assert got["type"] == "SyncTimeoutError", got
        assert "got no answer within 2 s" in got["message"]
        assert "default process group (3 ranks)" in got["message"]
        assert TIMEOUT * 0.9 <= got["elapsed"] <= TIMEOUT + SLACK, got["elapsed"]


def test_dead_peer_fails_fast_on_every_survivor() -> None:
    results = run_ranks(check_gradient_sync, 3, "kill", "topk", timeout=20, may_die=[VICTIM])
    for rank, got in enumerate(results):
        if rank == VICTIM:
            continue
        assert got["type"] in ("CollectiveError", "SyncTimeoutError"), got
        assert got["elapsed"] <= TIMEOUT + SLACK, got["elapsed"]


def check_ddp_hook(how: str) -> dict | None:
    pids = _pids()
    model = DDP(nn.Linear(16, 4))
    state = CompressionHookState("topk", ratio=0.25, timeout=TIMEOUT)
    model.register_comm_hook(state, compression_hook)
    x = torch.randn(8, 16)
    for _ in range(2):  # DDP rebuilds its buckets (its own collective) in the second forward
        F.mse_loss(model(x), torch.zeros(8, 4)).backward()
    loss = F.mse_loss(model(x), torch.zeros(8, 4))
    _vanish(how)
    start = time.monotonic()
    error = None
    try:
        loss.backward()
    except RuntimeError as exc:  # DDP re-raises the hook's error as a RuntimeError
        error = exc
    return _outcome(pids, how, start, error)


def test_ddp_hook_stopped_peer_times_out() -> None:
    results = run_ranks(check_ddp_hook, 2, "stop", timeout=20, may_die=[VICTIM])
    got = results[0]
    assert got["type"] is not None, got
    assert "got no answer within 2 s" in got["message"], got["message"]
    assert got["elapsed"] <= TIMEOUT + SLACK, got["elapsed"]


def check_collective(how: str) -> dict | None:
    pids = _pids()
    _vanish(how)
    start = time.monotonic()
    error = None
    try:
        with collectives.collective_timeout(TIMEOUT):
            collectives.all_gather(torch.ones(4))
    except SyncTimeoutError as exc:
        error = exc
        assert exc.op == "all_gather" and exc.timeout == TIMEOUT
    return _outcome(pids, how, start, error)


def test_collective_timeout_on_a_plain_collective() -> None:
    got = run_ranks(check_collective, 2, "stop", timeout=20, may_die=[VICTIM])[0]
    assert got["type"] == "SyncTimeoutError", got
    assert got["elapsed"] <= TIMEOUT + SLACK, got["elapsed"]


def test_timeout_is_validated() -> None:
    with pytest.raises(ValueError, match="timeout must be > 0"), collectives.collective_timeout(0):
        pass
