"""The rate-limited namespace really limits loopback and is always deleted.

Skipped, with the reason, where this machine cannot make namespaces (not root,
no iproute2): tests must not require network emulation.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from thrifty.bench import netem

# Sends 4 MB over a loopback TCP socket inside the namespace and prints the seconds.
TRANSFER = """
import socket, threading, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
payload = b"x" * (4 << 20)
def sink():
    conn, _ = srv.accept(); got = 0
    while got < len(payload):
        got += len(conn.recv(1 << 20))
    conn.close()
t = threading.Thread(target=sink); t.start()
start = time.perf_counter()
c = socket.create_connection(srv.getsockname()); c.sendall(payload); t.join()
print(time.perf_counter() - start)
"""


@pytest.fixture(scope="module")
def can_emulate() -> None:
    try:
        netem.check_available()
    except netem.NetemUnavailable as exc:
        pytest.skip(str(exc))


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_parse_rate() -> None:
    assert netem.parse_rate("1gbit") == 10**9
    assert netem.parse_rate("200mbit") == 200 * 10**6
    assert netem.parse_rate("2.5g") == 2_500_000_000
    assert netem.parse_rate(1e6) == 10**6
    for bad in ("fast", "-1gbit", 0):
        with pytest.raises(ValueError):
            netem.parse_rate(bad)


def test_loopback_is_rate_limited(can_emulate: None) -> None:
    with netem.rate_limited_loopback("40mbit") as ns:
        out = ns.run([sys.executable, "-c", TRANSFER], capture_output=True, text=True, check=True)
        name = ns.name
        assert name in _namespaces()
    seconds = float(out.stdout)
    # 4 MiB at 40 Mbit/s is 0.84 s; one burst (1 MiB) passes free. Noise only slows it.
    assert seconds > 0.5, f"4 MiB took {seconds:.3f}s: the limit is not applied"
    assert name not in _namespaces()


def test_namespace_deleted_on_exception(can_emulate: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), netem.rate_limited_loopback("1gbit") as ns:
        name = ns.name
        sleeper = ns.popen(["sleep", "60"])
        raise RuntimeError("boom")
    assert name not in _namespaces()
    assert sleeper.wait(timeout=10) != 0  # killed with the namespace
