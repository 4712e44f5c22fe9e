"""The membership store of a Lazarus job: a process of its own, outside every worker.

Run it before the workers and leave it running::

    python -m thrifty.lazarus.coordinator --host 127.0.0.1 --port 29600

Workers find it through ``THRIFTY_LAZARUS_STORE=127.0.0.1:29600`` (or the
``store`` argument of :class:`~thrifty.lazarus.manager.Lazarus`).

It serves two things:

* a ``TCPStore`` (server side, ``wait_for_workers=False``): heartbeat
  counters, the agreed member list of every generation, and the prefix under
  which each generation builds its process group. It must outlive any
  worker: a store hosted by a worker (torchrun's rank 0 store) dies with it
  and takes the survivors' rendezvous along;
* a liveness port (published in the store as ``coordinator/liveness``):
  each worker keeps one TCP connection open to it. When a worker dies the
  kernel closes that connection, so the coordinator sees EOF within
  milliseconds of a SIGKILL or a crash and writes ``<namespace>/dead/<id>``.
  Heartbeats stay necessary for what closes no socket: a SIGSTOPped or
  hung process, or a machine that vanished from the network.

Why not TorchFT's Lighthouse (``torchft`` 0.2.0, not installed here; read
from its wheel): the Lighthouse forms a quorum of interchangeable *replica
groups* (DDP/HSDP replicas), each healed by copying a whole replica from a
peer at the highest step; it knows nothing of members that hold *different*
experts, so the part Lazarus needs (who holds which replica, what moves
where, when a checkpoint is unavoidable) would still be ours. It would add
a compiled Rust extension, OpenTelemetry dependencies and a second server
(the Lighthouse plus a per-group ManagerServer) while we would still need a
store for per-generation gloo rendezvous. A TCPStore already gives atomic
``add`` and ``compare_set``, which is all the agreement protocol needs, and
the liveness port adds the one thing a store cannot do: notice a closed
connection. TorchFT's idea we do reuse: a per-step commit decision before
the optimizer step, and recovery by re-running the step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import selectors
import signal
import socket
import threading
import time

import torch.distributed as dist

__all__ = ["LIVENESS_KEY", "STORE_ENV", "Coordinator", "connect_store", "parse_address"]

log = logging.getLogger(__name__)

STORE_ENV = "THRIFTY_LAZARUS_STORE"
LIVENESS_KEY = "coordinator/liveness"
_HELLO_MAX = 512


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``, with an error that names the bad value."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"store address {address!r}: expected 'host:port', e.g. '127.0.0.1:29600'")
    return host, int(port)


def connect_store(address: str | None = None, timeout_s: float = 60.0) -> dist.TCPStore:
    """A client of the coordinator's store at ``address`` (default ``$THRIFTY_LAZARUS_STORE``)."""
    address = address or os.environ.get(STORE_ENV)
    if not address:
        raise ValueError(
            f"no coordinator address: pass store='host:port' or set {STORE_ENV}; start one with "
            "`python -m thrifty.lazarus.coordinator --host 127.0.0.1 --port 29600`"
        )
    host, port = parse_address(address)
    return dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s))


class Coordinator:
    """A TCPStore server plus the liveness listener, in this process.

    ``python -m thrifty.lazarus.coordinator`` runs one until killed; tests
    start one in their own process (which is outside every worker too).

    Args:
        host: the address to listen on (store and liveness port).
        port: the store's port; 0 picks a free one (see :attr:`port`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._server = dist.TCPStore(
            host, port, None, True, datetime.timedelta(seconds=60), wait_for_workers=False
        )
        self.port = self._server.port
        self._store = dist.TCPStore(host, self.port, None, False, datetime.timedelta(seconds=60))
        self._listener = socket.create_server((host, 0))
        self._listener.setblocking(False)
        self.liveness_port = self._listener.getsockname()[1]
        self._store.set(LIVENESS_KEY, f"{host}:{self.liveness_port}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lazarus-liveness", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``host:port`` of the store, what workers are given."""
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._listener.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _watch(self) -> None:
        """Accept liveness connections; on EOF write ``<namespace>/dead/<id>`` = wall time."""
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        names: dict[socket.socket, str] = {}
        buffers: dict[socket.socket, bytes] = {}
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.1):
                sock = key.fileobj
                if sock is self._listener:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = self._listener.accept()
                        conn.setblocking(False)
                        buffers[conn] = b""
                        sel.register(conn, selectors.EVENT_READ, None)
                    continue
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(_HELLO_MAX)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    if sock not in names:
                        buffers[sock] += data
                        if b"\n" in buffers[sock]:
                            names[sock] = buffers[sock].split(b"\n", 1)[0].decode()
                    continue
                sel.unregister(sock)
                sock.close()
                buffers.pop(sock, None)
                name = names.pop(sock, None)
                if name:  # "<namespace>\t<id>"
                    namespace, _, member = name.partition("\t")
                    self._store.set(f"{namespace}/dead/{member}", repr(time.time()))
                    self._store.add(f"{namespace}/events", 1)
                    log.info("liveness: %s member %s closed its connection", namespace, member)
        for sock in list(buffers):
            sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=29600, help="store port (0: pick one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    coordinator = Coordinator(args.host, args.port)
    print(
        f"lazarus coordinator: store {coordinator.address}, liveness port "
        f"{coordinator.liveness_port}; workers: {STORE_ENV}={coordinator.address}",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    coordinator.close()


if __name__ == "__main__":
    main()
