"""Network emulation: run workers in a network namespace whose loopback is rate-limited.

On one machine loopback is far faster than a datacenter NIC, which hides what
compression buys. Workers started inside the namespace made here talk over
127.0.0.1 as usual, but every byte passes a ``tc`` token bucket (and optionally
a ``netem`` delay). Both directions share the one qdisc, so the limit models a
single shared link: time follows the total bytes of all ranks.

Needs root and iproute2 (``ip``, ``tc``); :class:`NetemUnavailable` says which
is missing. The namespace is always deleted, also on exceptions, Ctrl-C and
SIGTERM, and any process still inside it is killed first.

Example::

    with rate_limited_loopback("1gbit") as ns:
        ns.run([sys.executable, "-m", "thrifty.bench.collectives", "--worker"], check=True)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "NetNamespace",
    "NetemUnavailable",
    "descendants",
    "parse_rate",
    "rate_limited_loopback",
    "stop_processes",
]

log = logging.getLogger(__name__)

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_live: set[str] = set()
WORKER_STOP_GRACE_S = 2.0  # a worker's time to stop its ranks after SIGTERM; then SIGKILL
_counter = 0


class NetemUnavailable(RuntimeError):
    """This machine cannot emulate a network here (not root, or iproute2 missing)."""


def parse_rate(rate: str | float) -> int:
    """``"1gbit"``, ``"200mbit"``, ``"10g"`` or a number of bits/s -> bits per second."""
    if isinstance(rate, int | float):
        bits = int(rate)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(bit|bps|b)?\s*", rate.lower())
        if not match:
            raise ValueError(f"cannot parse rate {rate!r}; expected e.g. '1gbit', '200mbit'")
        value, prefix, _ = match.groups()
        bits = int(float(value) * _UNITS[prefix])
    if bits <= 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    return bits


def check_available() -> None:
    """Raise :class:`NetemUnavailable` with the reason if namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise NetemUnavailable("network emulation needs root (ip netns, tc); run as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetemUnavailable(f"'{tool}' not found: install iproute2 (apt install iproute2)")


def _sh(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetemUnavailable(f"'{' '.join(argv)}' failed: {proc.stderr.strip()}")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now, found by parent pid in ``/proc``.

    Process groups do not reach them all: torchrun starts its workers in new
    sessions, and a rank may start processes of its own.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_processes(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM each running process, wait up to ``grace_s``, then SIGKILL it and its tree.

    The tree is taken before the first signal (an orphan is re-parented and
    could no longer be found) and again before the kill, so nothing started
    in between survives either. Never raises for a process that is already gone.
    """
    running = [p for p in procs if p.poll() is None]
    below = {p.pid: descendants(p.pid) for p in running}
    for p in running:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(deadline - time.monotonic(), 0.01))
    for p in running:
        alive = p.poll() is None  # once reaped, its pid may belong to someone else
        tree = [p.pid, *below[p.pid], *descendants(p.pid)] if alive else below[p.pid]
        for pid in dict.fromkeys(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait()


@dataclass(frozen=True)
class NetNamespace:
    """A network namespace; :meth:`run` and :meth:`popen` start commands inside it."""

    name: str
    rate_bits: int
    delay: str | None = None
    # Processes started here; killed on exit even if they had not yet entered the namespace.
    children: list[subprocess.Popen] = field(default_factory=list, repr=False, compare=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(self.command(argv), **kwargs)
        self.children.append(proc)
        return proc


def _delete(name: str) -> None:
    """Kill what still runs inside, then delete the namespace. Never raises."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    if proc.returncode != 0 and "No such file" not in proc.stderr:
        log.warning("could not delete network namespace %s: %s", name, proc.stderr.strip())
    _live.discard(name)


@atexit.register
def _delete_leftovers() -> None:
    for name in list(_live):
        _delete(name)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into an exception so that ``finally`` blocks still run.

    Only where nobody handles SIGTERM yet: the ``thrifty`` command's own
    handler (:mod:`thrifty.cli.interrupts`) already unwinds, and names the signal.
    """
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def rate_limited_loopback(
    rate: str | float,
    delay: str | None = None,
    burst_bytes: int | None = None,
    name: str | None = None,
) -> Iterator[NetNamespace]:
    """A fresh namespace whose ``lo`` is limited to ``rate`` (e.g. ``"1gbit"``).

    Args:
        rate: link rate, ``"1gbit"``-style or bits per second.
        delay: optional one-way ``netem`` delay such as ``"1ms"``. Loopback
            packets pass the qdisc once per direction, so a round trip pays it twice.
        burst_bytes: token-bucket depth; by default 1 ms of traffic and at least
            two loopback MTUs (64 KiB each; a smaller bucket drops every packet).
            A deep bucket lets small messages pass at loopback speed, which a
            real link would not do, so it is kept as shallow as works.
    """
    global _counter
    check_available()
    bits = parse_rate(rate)
    burst = burst_bytes or max(2 * 65536 + 2048, bits // 8 // 1000)
    _counter += 1
    name = name or f"thrifty-{os.getpid()}-{_counter}"
    ns = NetNamespace(name, bits, delay)
    with _sigterm_unwinds():
        _sh("ip", "netns", "add", name)
        _live.add(name)
        try:
            inside = ("ip", "netns", "exec", name)
            _sh(*inside, "ip", "link", "set", "lo", "up")
            qdisc = (*inside, "tc", "qdisc", "add", "dev", "lo")
            tbf = ("tbf", "rate", f"{bits}bit", "burst", str(burst), "latency", "100ms")
            if delay:
                _sh(*qdisc, "root", "handle", "1:", "netem", "delay", delay)
                _sh(*qdisc, "parent", "1:1", "handle", "10:", *tbf)
            else:
                _sh(*qdisc, "root", *tbf)
            log.info("namespace %s: loopback limited to %s bit/s, delay %s", name, bits, delay)
            yield ns
        finally:
            for child in ns.children:
                if child.poll() is None:
                    child.kill()
            _delete(name)


def run_worker(rate: str | None, module: str, spec: dict[str, Any]) -> Any:
    """Run ``python -m <module> <spec as JSON>`` and return what it wrote to ``spec["out"]``.

    With a rate (``"1gbit"``) the process and every rank it starts live in a
    fresh rate-limited namespace; with None (or ``"loopback"``) it runs on the
    plain loopback. The module's ``__main__`` calls :func:`worker_main`.
    """
    with tempfile.TemporaryDirectory(prefix="thrifty-worker-") as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", module, json.dumps({**spec, "out": str(out)})]
        # c10d warns that it cannot resolve a namespace's host name: harmless.
        env = {**os.environ, "TORCH_CPP_LOG_LEVEL": "ERROR"}
        if rate in (None, "loopback"):
            _run_stoppable(subprocess.Popen, argv, env)
        else:
            with rate_limited_loopback(rate) as ns:
                _run_stoppable(ns.popen, argv, env)
        return json.loads(out.read_text())


def _run_stoppable(popen: Any, argv: list[str], env: dict[str, str]) -> None:
    """Run the worker to the end; on any exception here (Ctrl-C, SIGTERM) stop its tree.

    The worker has a session of its own, so a terminal's Ctrl-C reaches only
    this process, which then stops the worker in order: SIGTERM (the worker
    unwinds and kills its ranks), and after :data:`WORKER_STOP_GRACE_S` SIGKILL
    to everything below it.
    """
    proc = popen(argv, env=env, start_new_session=True)
    try:
        code = proc.wait()
    finally:
        stop_processes([proc], WORKER_STOP_GRACE_S)
    if code != 0:
        raise subprocess.CalledProcessError(code, argv)


def worker_main(fn: Any) -> None:
    """``__main__`` of a worker module: ``fn(spec)``'s JSON-able result goes to ``spec["out"]``."""
    if len(sys.argv) != 2:
        sys.exit("internal entry point of a thrifty benchmark; run it through the thrifty CLI")
    spec = json.loads(sys.argv[1])
    try:
        with _sigterm_unwinds():  # the driver's SIGTERM: unwind, so run_ranks kills the ranks
            result = fn(spec)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGTERM)  # stopped by the driver, which reports it
    Path(spec["out"]).write_text(json.dumps(result))
