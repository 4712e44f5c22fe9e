"""The multi-process harness: results, remote exceptions, hangs, dead ranks, loopback only."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from thrifty.bench.launch import RankFailure, RanksTimedOut, loopback_store, run_ranks


def rank_sum(offset: float) -> tuple[int, int, float]:
    t = torch.tensor([float(dist.get_rank()) + offset])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_results_come_back_in_rank_order(world_size: int) -> None:
    results = run_ranks(rank_sum, world_size, 0.5)
    expected = sum(range(world_size)) + 0.5 * world_size
    assert results == [(r, world_size, expected) for r in range(world_size)]


def fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise KeyError("rank one has no such key")
    dist.barrier()


def test_remote_exception_is_reraised_with_its_traceback() -> None:
    with pytest.raises(RankFailure) as info:
        run_ranks(fail_on_rank_one, 3, timeout=30)
    assert info.value.rank == 1
    assert "KeyError" in info.value.remote_traceback
    assert "fail_on_rank_one" in info.value.remote_traceback


def hang_on_rank_zero() -> None:
    if dist.get_rank() == 0:
        dist.barrier()  # rank 1 never joins
    else:
        time.sleep(120)


def test_a_hanging_collective_times_out_with_stacks() -> None:
    started = time.monotonic()
    with pytest.raises(RanksTimedOut) as info:
        run_ranks(hang_on_rank_zero, 2, timeout=3)
    assert time.monotonic() - started < 20
    assert info.value.pending == [0, 1]
    assert "barrier" in info.value.stacks[0]
    assert "hang_on_rank_zero" in str(info.value)


def die_on_rank_one() -> None:
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def test_a_killed_rank_is_reported_not_waited_for() -> None:
    started = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(die_on_rank_one, 2, timeout=60)
    assert time.monotonic() - started < 20
    assert info.value.rank == 1
    assert "SIGKILL" in str(info.value)


def _listening_addresses(port: int) -> list[str]:
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hexport = local.split(":")
                if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                    found.append(addr)
    return found


def test_store_listens_on_loopback_only() -> None:
    store = loopback_store(world_size=2, timeout=10)
    store.set("k", "v")
    assert _listening_addresses(store.port) == ["0100007F"]  # 127.0.0.1, little-endian hex


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        run_ranks(rank_sum, 0, 0.0)
    with pytest.raises(ValueError, match="timeout"):
        run_ranks(rank_sum, 2, 0.0, timeout=0)


def test_a_failure_inside_init_process_group_is_marked_and_not_retried() -> None:
    # No such interface: gloo fails inside init_process_group, before ``fn`` runs.
    with pytest.raises(RankFailure) as info:
        run_ranks(rank_sum, 2, 0.0, env={"GLOO_SOCKET_IFNAME": "nosuchnic0"}, timeout=30)
    assert info.value.during_setup
    assert "init_process_group" in info.value.remote_traceback
    with pytest.raises(RankFailure) as info:
        run_ranks(fail_on_rank_one, 3, timeout=30)
    assert not info.value.during_setup


def test_a_start_that_loses_a_socket_is_retried(monkeypatch, capfd) -> None:
    from thrifty.bench import launch

    # Treat the bad-interface error as a lost socket: every start fails the same
    # way, so the harness tries _SETUP_ATTEMPTS times, says so, then raises.
    monkeypatch.setattr(launch, "_CONNECTION_ERRORS", ("nosuchnic0",))
    with pytest.raises(RankFailure) as info:
        run_ranks(rank_sum, 2, 0.0, env={"GLOO_SOCKET_IFNAME": "nosuchnic0"}, timeout=30)
    assert info.value.during_setup
    retries = capfd.readouterr().err.count("starting them again")
    assert retries == launch._SETUP_ATTEMPTS - 1
