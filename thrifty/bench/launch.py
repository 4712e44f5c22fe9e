"""Run a function on N ranks of a real gloo process group, on this machine.

Tests and benchmarks need real ``torch.distributed`` groups, not mocks. This is
the one place that starts them:

* every rank is a separate process (``torch.multiprocessing``, forkserver with
  torch preloaded, so a rank starts in a fraction of a second);
* the rendezvous ``TCPStore`` lives in the *calling* process, on a socket bound
  to ``127.0.0.1`` port 0 before the store is built, so no other process can
  take the port between choosing and listening, nothing listens beyond
  loopback, and the store survives a rank that dies;
* each rank's return value comes back in rank order; an exception on any rank
  is re-raised here as :class:`RankFailure` carrying the remote traceback;
* a collective that hangs ends in :class:`RanksTimedOut`, with the Python
  stack of every rank that was still running, instead of hanging the caller;
* each rank leads a process group of its own, which is killed whole when the
  run ends, whatever ends it (Ctrl-C, SIGTERM, a failure, a timeout): a rank
  blocked in a gloo collective never gets to run a Python signal handler, so
  the caller does not wait for it. A rank also dies with the fork server,
  so killing the caller outright does not leave ranks behind either.

Example::

    import torch, torch.distributed as dist
    from thrifty.bench import run_ranks

    def allreduce_rank() -> float:
        t = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(t)
        return t.item()

    assert run_ranks(allreduce_rank, world_size=3) == [3.0, 3.0, 3.0]
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import faulthandler
import os
import pickle
import queue
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankFailure", "RanksTimedOut", "loopback_store", "run_ranks"]

_LOOPBACK = "127.0.0.1"
# After the first rank fails, the others usually fail within milliseconds
# ("Connection closed by peer"); wait this long to collect their reports too.
_FAILURE_GRACE_S = 2.0
# Gloo's full-mesh connect inside init_process_group now and then loses a
# socket on a loaded 2-core machine ("Connection closed by peer" before any
# user code ran). Such a start is retried from scratch, with a fresh store.
_SETUP_ATTEMPTS = 3
_CONNECTION_ERRORS = ("Connection closed by peer", "Connection reset", "connectFullMesh")
_forkserver_preloaded = False
_PR_SET_PDEATHSIG = 1  # prctl(2)


class RankFailure(RuntimeError):
    """A rank raised. ``rank`` is the first rank that failed, ``remote_traceback`` its traceback."""

    def __init__(
        self,
        rank: int,
        remote_traceback: str,
        others: Mapping[int, str],
        during_setup: bool = False,
    ) -> None:
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.others = dict(others)
        # True when the rank failed inside init_process_group, before ``fn`` ran.
        self.during_setup = during_setup
        lines = [f"rank {rank} failed:", remote_traceback.rstrip()]
        for other, summary in sorted(self.others.items()):
            lines.append(f"(rank {other} also failed: {summary})")
        super().__init__("\n".join(lines))


class RanksTimedOut(TimeoutError):
    """Some ranks did not finish in time, typically a collective that never completes."""

    def __init__(self, timeout: float, pending: list[int], stacks: Mapping[int, str]) -> None:
        self.pending = pending
        self.stacks = dict(stacks)
        lines = [
            f"ranks {pending} did not finish within {timeout:g}s; a collective is probably "
            "waiting for a rank that never joins it (mismatched calls or shapes across ranks?)."
        ]
        for rank in pending:
            stack = self.stacks.get(rank, "").strip()
            if stack:
                lines.append(f"--- rank {rank} was at:\n{stack}")
        super().__init__("\n".join(lines))


def loopback_store(world_size: int, timeout: float = 300.0) -> dist.TCPStore:
    """Start a ``TCPStore`` server that listens on 127.0.0.1 only, on a free port.

    The socket is bound (port 0) and listening before the store exists, so the
    port is ours without a race. The store owns the socket from then on.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((_LOOPBACK, 0))
    sock.listen(max(128, world_size))
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        _LOOPBACK,
        port,
        None,
        True,
        datetime.timedelta(seconds=timeout),
        wait_for_workers=False,
        master_listen_fd=sock.fileno(),
    )
    sock.detach()  # the store closes the descriptor itself
    return store


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    threads: int,
    env: Mapping[str, str],
    stack_file: str,
    results: Any,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> None:
    # A group of its own: the caller kills it whole (with anything the rank
    # started), and a terminal's Ctrl-C goes to the caller, which decides.
    os.setpgid(0, 0)
    _die_with_parent()
    os.environ.update(env)
    torch.set_num_threads(threads)
    with open(stack_file, "w") as stack_out:
        # On timeout the parent sends SIGUSR1; every thread's stack goes to this file.
        faulthandler.register(signal.SIGUSR1, file=stack_out, all_threads=True)
        status = "setup_error"
        try:
            store = dist.TCPStore(
                _LOOPBACK, port, world_size, False, datetime.timedelta(seconds=timeout)
            )
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout),
            )
            status = "error"
            value = fn(*args, **kwargs)
            message = (rank, "ok", pickle.dumps(value))
        except BaseException as exc:
            summary = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            message = (rank, status, pickle.dumps((traceback.format_exc(), summary)))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put(message)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that forked it exits.

    A rank's parent is the fork server, which exits when the caller does; so
    ranks never outlive a caller that was killed without running its clean-up.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent was already gone before prctl
            os._exit(1)


def _kill(proc: Any) -> None:
    """SIGKILL a rank's process group (the rank and what it started), then the rank."""
    if proc.pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.is_alive():
        proc.kill()


def _context(start_method: str) -> Any:
    global _forkserver_preloaded
    ctx = mp.get_context(start_method)
    if start_method == "forkserver" and not _forkserver_preloaded:
        # Import torch once in the fork server; each rank then forks from it.
        ctx.set_forkserver_preload(["torch", "torch.distributed", "thrifty.bench.launch"])
        _forkserver_preloaded = True
    return ctx


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    threads_per_rank: int = 1,
    env: Mapping[str, str] | None = None,
    start_method: str = "forkserver",
    may_die: Collection[int] = (),
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` ranks and return their results by rank.

    The process group is initialised before ``fn`` runs (use ``dist.get_rank()``
    inside) and destroyed after. ``fn`` must be importable (a module-level
    function), and its arguments and result picklable. A start whose gloo
    connect loses a socket inside ``init_process_group`` (before ``fn`` ran, so
    nothing of the user's happened twice) is retried on a fresh store, up to
    ``_SETUP_ATTEMPTS`` times, with a line on stderr each time.

    Args:
        timeout: seconds for the whole run; also the process group's collective timeout.
        threads_per_rank: ``torch.set_num_threads`` in each rank, 1 by default so
            that N ranks on a few cores do not oversubscribe them.
        env: extra environment for the ranks. ``GLOO_SOCKET_IFNAME`` defaults to
            ``lo`` so that gloo only ever talks over loopback.
        may_die: ranks expected to die by a signal (fault-tolerance tests kill
            them on purpose); such a death is not a failure and the rank's
            result is ``None``. The others keep running.

    Raises:
        RankFailure: a rank raised; the message holds its traceback.
        RanksTimedOut: not every rank finished within ``timeout``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    rank_env = {"GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    ctx = _context(start_method)
    for attempt in range(1, _SETUP_ATTEMPTS + 1):
        try:
            return _run_once(
                ctx,
                fn,
                world_size,
                args,
                kwargs,
                timeout,
                backend,
                threads_per_rank,
                rank_env,
                frozenset(may_die),
            )
        except RankFailure as exc:
            lost_socket = any(m in exc.remote_traceback for m in _CONNECTION_ERRORS)
            if not (exc.during_setup and lost_socket) or attempt == _SETUP_ATTEMPTS:
                raise
            print(
                f"thrifty.bench.run_ranks: gloo lost a socket while {world_size} ranks "
                f"connected (attempt {attempt}/{_SETUP_ATTEMPTS}); starting them again",
                file=sys.stderr,
            )
    raise AssertionError("unreachable")


def _run_once(
    ctx: Any,
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    timeout: float,
    backend: str,
    threads_per_rank: int,
    rank_env: Mapping[str, str],
    may_die: frozenset[int],
) -> list[Any]:
    """One start of every rank on a fresh store; see :func:`run_ranks`."""
    store = loopback_store(world_size, timeout)
    results = ctx.Queue()
    stack_dir = tempfile.TemporaryDirectory(prefix="thrifty-ranks-")
    stack_files = [str(Path(stack_dir.name) / f"rank{r}.txt") for r in range(world_size)]
    procs = []
    try:
        for rank in range(world_size):
            proc = ctx.Process(
                target=_rank_main,
                args=(
                    rank,
                    world_size,
                    store.port,
                    backend,
                    timeout,
                    threads_per_rank,
                    rank_env,
                    stack_files[rank],
                    results,
                    fn,
                    args,
                    kwargs,
                ),
                name=f"thrifty-rank{rank}",
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        return _collect(procs, results, timeout, stack_files, may_die)
    finally:
        for proc in procs:
            _kill(proc)
        for proc in procs:
            proc.join(timeout=5)
        results.close()
        del store
        stack_dir.cleanup()


def _collect(
    procs: list[Any],
    results: Any,
    timeout: float,
    stack_files: list[str],
    may_die: frozenset[int] = frozenset(),
) -> list[Any]:
    world_size = len(procs)
    values: dict[int, Any] = {}
    errors: dict[int, tuple[str, str]] = {}
    in_setup: set[int] = set()  # ranks that failed inside init_process_group
    deadline = time.monotonic() + timeout
    first_error_at: float | None = None
    while len(values) + len(errors) < world_size:
        now = time.monotonic()
        if first_error_at is not None and now - first_error_at > _FAILURE_GRACE_S:
            break
        if now > deadline:
            pending = [r for r in range(world_size) if r not in values and r not in errors]
            raise RanksTimedOut(timeout, pending, _dump_stacks(procs, pending, stack_files))
        try:
            rank, status, blob = results.get(timeout=0.05)
        except queue.Empty:
            _note_silent_deaths(procs, values, errors, may_die)
        else:
            if status == "ok":
                values[rank] = pickle.loads(blob)
            else:
                errors[rank] = pickle.loads(blob)
                if status == "setup_error":
                    in_setup.add(rank)
        if errors and first_error_at is None:
            first_error_at = time.monotonic()
    if errors:
        # Report the rank whose failure came first in rank order among the
        # non-connection errors: the others are usually its consequence.
        def is_consequence(rank: int) -> bool:
            text = errors[rank][0]
            return "Connection closed by peer" in text or "Connection reset" in text

        primary = min(errors, key=lambda r: (is_consequence(r), r))
        others = {r: errors[r][1] for r in errors if r != primary}
        raise RankFailure(primary, errors[primary][0], others, during_setup=primary in in_setup)
    return [values[r] for r in range(world_size)]


def _note_silent_deaths(
    procs: list[Any],
    values: dict[int, Any],
    errors: dict[int, tuple[str, str]],
    may_die: frozenset[int] = frozenset(),
) -> None:
    """A rank killed by a signal (or os._exit) never reports; record it as a failure."""
    for rank, proc in enumerate(procs):
        if rank in values or rank in errors or proc.is_alive():
            continue
        proc.join(timeout=0.5)  # its message may still be in flight
        if rank in may_die and proc.exitcode is not None and proc.exitcode < 0:
            values[rank] = None  # killed on purpose
            continue
        if proc.exitcode not in (0, None):
            reason = f"process exited with code {proc.exitcode}"
            if proc.exitcode < 0:
                reason = f"process killed by signal {signal.Signals(-proc.exitcode).name}"
            errors[rank] = (reason + " before reporting a result\n", reason)


def _dump_stacks(procs: list[Any], pending: list[int], stack_files: list[str]) -> dict[int, str]:
    for rank in pending:
        if procs[rank].is_alive() and procs[rank].pid is not None:
            os.kill(procs[rank].pid, signal.SIGUSR1)
    time.sleep(0.5)
    stacks = {}
    for rank in pending:
        try:
            stacks[rank] = Path(stack_files[rank]).read_text()
        except OSError:
            stacks[rank] = ""
    return stacks
