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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NetNamespace", "NetemUnavailable", "parse_rate", "rate_limited_loopback"]

log = logging.getLogger(__name__)

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_live: set[str] = set()
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
    """Turn SIGTERM into an exception so that ``finally`` blocks still run."""
    if threading.current_thread() is not threading.main_thread():
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
            subprocess.run(argv, check=True, env=env)
        else:
            with rate_limited_loopback(rate) as ns:
                ns.run(argv, check=True, env=env)
        return json.loads(out.read_text())


def worker_main(fn: Any) -> None:
    """``__main__`` of a worker module: ``fn(spec)``'s JSON-able result goes to ``spec["out"]``."""
    if len(sys.argv) != 2:
        sys.exit("internal entry point of a thrifty benchmark; run it through the thrifty CLI")
    spec = json.loads(sys.argv[1])
    Path(spec["out"]).write_text(json.dumps(fn(spec)))
