"""An emulated cluster on one machine: N nodes, each with its own rate-limited NIC.

A rate limit on one namespace's loopback (:mod:`thrifty.bench.netem`) models a
single shared link, so time follows the total bytes of all ranks. Real nodes
each have a NIC: here every node is a network namespace joined by a veth pair
to a Linux bridge in a hub namespace, with a ``tbf`` limit on both ends of
every veth (the node's egress and the hub's egress toward the node)::

    node0 [lo, eth0 10.213.0.1] --veth-- |        |
    node1 [lo, eth0 10.213.0.2] --veth-- | hub:br0 |
    ...                                   |        |

A ``torchrun`` job runs one agent per node namespace (:func:`run_torchrun`);
workers bind gloo to ``eth0`` (``GLOO_SOCKET_IFNAME``), so ranks on the same
node talk over the namespace's unlimited local path and ranks on different
nodes cross two limited veths. Only the namespaces' own addresses are used.

:func:`calibrate_cluster` fits the flat, intra-node and inter-node network
models of a :class:`~thrifty.comm.topology.Topology` on such a cluster from the
calling process: every rank of the job runs
:func:`thrifty.comm.calibration.measure_topology`.

Needs root and iproute2, like :mod:`thrifty.bench.netem`; every namespace is
deleted and every process inside killed on exit, exceptions, Ctrl-C, SIGTERM
and at interpreter exit. ``run_torchrun(None, ...)`` runs the same job on the
plain loopback as one node, without root.

Example::

    with emulated_cluster(nodes=2, rate="1gbit") as cluster:
        per_rank = run_torchrun(cluster, 2, "thrifty.bench.cluster", {"task": "topology"})
    topology = Topology.from_dict(per_rank[0]["topology"])
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from thrifty.bench import netem
from thrifty.bench.netem import NetNamespace
from thrifty.comm import collectives
from thrifty.comm.calibration import TOPOLOGY_SIZES, calibrate_topology, measure_topology
from thrifty.comm.topology import Topology, split_groups

__all__ = [
    "Cluster",
    "ClusterJobFailed",
    "ClusterJobTimedOut",
    "calibrate_cluster",
    "cluster_worker_main",
    "emulated_cluster",
    "run_torchrun",
]

log = logging.getLogger(__name__)

INTERFACE = "eth0"  # each node's NIC, inside its namespace
SUBNET = "10.213.0"  # node i is SUBNET.(i+1)/24
_STDERR_TAIL = 4000  # characters of a failed node's output quoted in the error
_FAILURE_GRACE_S = 3.0  # after one node fails, let the others report too
_STOP_GRACE_S = 5.0  # SIGTERM lets torchrun stop its workers; then SIGKILL
_INTERRUPT_GRACE_S = 1.0  # the same after Ctrl-C / SIGTERM, when the user waits for the prompt
_counter = 0


@dataclass(frozen=True)
class Cluster:
    """The namespaces of an :func:`emulated_cluster`: node ``i`` is ``namespaces[i]``."""

    namespaces: tuple[NetNamespace, ...]
    addresses: tuple[str, ...]  # node i's address on ``interface``
    interface: str
    rate_bits: int  # per NIC and direction
    delay: str | None
    hub: NetNamespace = field(repr=False)

    @property
    def nodes(self) -> int:
        return len(self.namespaces)


def _limit(namespace: str, dev: str, bits: int, burst: int, delay: str | None) -> None:
    """Egress of ``dev``: a token bucket, behind a netem delay when one is asked for."""
    tc = ("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", dev)
    tbf = ("tbf", "rate", f"{bits}bit", "burst", str(burst), "latency", "100ms")
    if delay:
        netem._sh(*tc, "root", "handle", "1:", "netem", "delay", delay)
        netem._sh(*tc, "parent", "1:1", "handle", "10:", *tbf)
    else:
        netem._sh(*tc, "root", *tbf)


@contextlib.contextmanager
def emulated_cluster(
    nodes: int,
    rate: str | float,
    delay: str | None = None,
    burst_bytes: int | None = None,
) -> Iterator[Cluster]:
    """``nodes`` namespaces, each with a NIC limited to ``rate`` per direction.

    Args:
        nodes: number of emulated nodes (1 ... 254).
        rate: each NIC's rate, ``"1gbit"``-style or bits per second.
        delay: optional one-way ``netem`` delay on every veth end, such as
            ``"100us"``; a message between two nodes passes two ends, so it
            pays the delay twice (and a round trip four times).
        burst_bytes: token-bucket depth; by default as in
            :func:`~thrifty.bench.netem.rate_limited_loopback` (1 ms of traffic,
            at least two 64 KiB segments, which veth's segmentation offload sends).
    """
    global _counter
    if not 1 <= nodes <= 254:
        raise ValueError(f"nodes must be in 1..254 (one /24 subnet), got {nodes}")
    netem.check_available()
    bits = netem.parse_rate(rate)
    burst = burst_bytes or max(2 * 65536 + 2048, bits // 8 // 1000)
    _counter += 1
    prefix = f"thrifty-{os.getpid()}-c{_counter}"
    hub = NetNamespace(f"{prefix}-hub", bits, delay)
    members = tuple(NetNamespace(f"{prefix}-n{i}", bits, delay) for i in range(nodes))
    addresses = tuple(f"{SUBNET}.{i + 1}" for i in range(nodes))
    cluster = Cluster(members, addresses, INTERFACE, bits, delay, hub)
    with netem._sigterm_unwinds():
        try:
            for ns in (hub, *members):
                netem._sh("ip", "netns", "add", ns.name)
                netem._live.add(ns.name)
            netem._sh("ip", "-n", hub.name, "link", "add", "br0", "type", "bridge")
            netem._sh("ip", "-n", hub.name, "link", "set", "br0", "up")
            for i, (ns, address) in enumerate(zip(members, addresses, strict=True)):
                port = f"node{i}"
                veth = ("type", "veth", "peer", "name", INTERFACE, "netns", ns.name)
                netem._sh("ip", "-n", hub.name, "link", "add", port, *veth)
                netem._sh("ip", "-n", hub.name, "link", "set", port, "master", "br0")
                netem._sh("ip", "-n", hub.name, "link", "set", port, "up")
                netem._sh("ip", "-n", ns.name, "link", "set", "lo", "up")
                netem._sh("ip", "-n", ns.name, "addr", "add", f"{address}/24", "dev", INTERFACE)
                netem._sh("ip", "-n", ns.name, "link", "set", INTERFACE, "up")
                _limit(ns.name, INTERFACE, bits, burst, delay)
                _limit(hub.name, port, bits, burst, delay)
            shape = "cluster %s: %d nodes, NICs limited to %s bit/s, delay %s"
            log.info(shape, prefix, nodes, bits, delay)
            yield cluster
        finally:
            for ns in (*members, hub):
                for child in ns.children:
                    if child.poll() is None:
                        child.kill()
                netem._delete(ns.name)


# --------------------------------------------------------------------------- torchrun jobs


class ClusterJobFailed(RuntimeError):
    """A node's torchrun exited with an error; ``output_tail`` is the end of its output."""

    def __init__(self, message: str, node: int | None, output_tail: str) -> None:
        super().__init__(message)
        self.node = node
        self.output_tail = output_tail


class ClusterJobTimedOut(ClusterJobFailed, TimeoutError):
    """The job did not finish in time; every node was killed."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = _STOP_GRACE_S) -> None:
    """SIGTERM each torchrun (it stops its workers), then SIGKILL what is left."""
    netem.stop_processes(procs, grace_s)


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-_STDERR_TAIL:]


def run_torchrun(
    cluster: Cluster | None,
    ranks_per_node: int,
    module: str,
    spec: dict[str, Any],
    timeout: float = 300.0,
    max_restarts: int = 0,
) -> list[Any]:
    """Run ``torchrun ... -m <module> <spec JSON>`` on every node; per-rank results in rank order.

    One ``python -m torch.distributed.run`` agent per node namespace, static
    rendezvous at node 0's address, ``ranks_per_node`` workers each. The
    module's ``__main__`` calls :func:`cluster_worker_main`; each rank's
    JSON-able return value comes back through ``spec["out_dir"]`` (set here).
    ``cluster=None`` runs one node on the plain loopback, no root needed.
    ``max_restarts`` is torchrun's: when a worker dies, the agent stops the
    others and starts them all again, up to that many times; the results are
    the last attempt's.

    Raises:
        ClusterJobFailed: a node's torchrun failed; the message quotes the end
            of its output (its workers' tracebacks), first failure first.
        ClusterJobTimedOut: ``timeout`` seconds passed; every node was killed.
    """
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
    if max_restarts and cluster is not None:
        # c10d hosts its store only where the endpoint matches the host name, which a
        # namespace's address never does, and numbers nodes by address, not --node-rank.
        raise ValueError("max_restarts needs cluster=None: restarts run on one node here")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    nodes = 1 if cluster is None else cluster.nodes
    master = "127.0.0.1" if cluster is None else cluster.addresses[0]
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo" if cluster is None else cluster.interface,
        "OMP_NUM_THREADS": "1",
        "TORCH_CPP_LOG_LEVEL": "ERROR",  # c10d cannot resolve a namespace's host name: harmless
    }
    with tempfile.TemporaryDirectory(prefix="thrifty-cluster-") as tmp:
        out_dir = Path(tmp)
        job = json.dumps({**spec, "out_dir": str(out_dir), "timeout_s": timeout})
        port = str(_free_port())
        procs: list[subprocess.Popen] = []
        logs = [out_dir / f"node{i}.log" for i in range(nodes)]
        try:
            # The static rendezvous, and c10d's store shared with the agent, live across
            # restarts with no per-attempt prefix: a restarted gloo group reads the dead
            # attempt's addresses. c10d with an unshared store gets a new one per round.
            if max_restarts:
                env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
            if max_restarts:
                endpoint = f"{master}:{port}"
                rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
                rendezvous += ["--rdzv-id", out_dir.name]
            else:
                rendezvous = ["--master-addr", master, "--master-port", port]
            for node in range(nodes):
                # c10d publishes the address of the store worker 0 hosts: give it the
                # loopback gloo uses rather than whatever the host name resolves to.
                local = ["--local-addr", master] if max_restarts else []
                argv = [sys.executable, "-m", "torch.distributed.run"]
                argv += ["--nnodes", str(nodes), "--node-rank", str(node)]
                argv += ["--nproc-per-node", str(ranks_per_node), *rendezvous, *local]
                argv += ["--max-restarts", str(max_restarts), "-m", module, job]
                with logs[node].open("wb") as sink:
                    kwargs = {
                        "env": env,
                        "stdout": sink,
                        "stderr": subprocess.STDOUT,
                        "stdin": subprocess.DEVNULL,
                        "start_new_session": True,
                    }
                    if cluster is None:
                        procs.append(subprocess.Popen(argv, **kwargs))
                    else:
                        procs.append(cluster.namespaces[node].popen(argv, **kwargs))
            _wait(procs, logs, out_dir, ranks_per_node, timeout)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the whole command stops within seconds
            _stop(procs, _INTERRUPT_GRACE_S)
            raise
        finally:
            _stop(procs)
        world = nodes * ranks_per_node
        missing = [r for r in range(world) if not (out_dir / f"rank{r}.json").exists()]
        if missing:
            tail = _tail(logs[0])
            message = (
                f"torchrun succeeded but ranks {missing} wrote no result: does {module}'s "
                f"__main__ call thrifty.bench.cluster.cluster_worker_main?\n{tail}"
            )
            raise ClusterJobFailed(message, None, tail)
        return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def _first_error(out_dir: Path) -> dict[str, Any] | None:
    """The earliest exception any worker reported (the others usually follow from it)."""
    errors = []
    for path in out_dir.glob("error*.json"):
        with contextlib.suppress(OSError, ValueError):
            errors.append(json.loads(path.read_text()))
    return min(errors, key=lambda e: e["time"]) if errors else None


def _wait(
    procs: Sequence[subprocess.Popen],
    logs: Sequence[Path],
    out_dir: Path,
    ranks_per_node: int,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    failed: list[int] = []  # nodes in the order their failure was seen
    grace_until = None
    while True:
        codes = [p.poll() for p in procs]
        failed += [i for i, c in enumerate(codes) if c not in (None, 0) and i not in failed]
        if failed and grace_until is None:
            grace_until = time.monotonic() + _FAILURE_GRACE_S
        if all(c is not None for c in codes) or (grace_until and time.monotonic() > grace_until):
            break
        if time.monotonic() > deadline:
            tails = "\n".join(
                f"--- node {i} output ---\n{_tail(log)}" for i, log in enumerate(logs)
            )
            message = (
                f"torchrun job did not finish within {timeout:g}s; killed all "
                f"{len(procs)} nodes\n{tails}"
            )
            raise ClusterJobTimedOut(message, None, tails)
        time.sleep(0.05)
    if failed:
        first, lines = failed[0], []
        root = _first_error(out_dir)
        if root is not None:
            first = root["rank"] // ranks_per_node
            failed = [first, *(i for i in failed if i != first)]
            traceback_text = root["traceback"].rstrip()
            lines.append(f"rank {root['rank']} (node {first}) failed first:\n{traceback_text}")
        lines.append(f"node {first}'s torchrun exited with code {codes[first]}")
        lines += [f"(node {i} also failed, code {codes[i]})" for i in failed[1:]]
        for i in failed:
            lines.append(f"--- node {i} output (tail) ---\n{_tail(logs[i])}")
        raise ClusterJobFailed("\n".join(lines), first, _tail(logs[first]))


def cluster_worker_main(fn: Callable[[dict[str, Any]], Any]) -> None:
    """``__main__`` of a module run by :func:`run_torchrun`: one call per rank.

    Reads the spec from ``argv``, joins the gloo group that torchrun describes,
    writes ``fn(spec)``'s JSON-able result to ``spec["out_dir"]/rank<r>.json``
    and leaves the group. An exception ends the worker with its traceback in
    torchrun's error summary, and in ``error<r>.json`` with the time it was
    raised, so that :func:`run_torchrun` names the rank that failed first.
    """
    if len(sys.argv) != 2:
        sys.exit("internal entry point of a thrifty cluster job; run it through run_torchrun")
    spec = json.loads(sys.argv[1])

    @record
    def main() -> None:
        timeout = datetime.timedelta(seconds=float(spec.get("timeout_s", 300)))
        dist.init_process_group("gloo", timeout=timeout)
        out_dir, rank = Path(spec["out_dir"]), dist.get_rank()
        try:
            result = fn(spec)
        except BaseException:
            error = {"rank": rank, "time": time.time(), "traceback": traceback.format_exc()}
            (out_dir / f"error{rank}.json").write_text(json.dumps(error))
            raise
        else:
            partial = out_dir / f"rank{rank}.partial"
            partial.write_text(json.dumps(result))
            partial.rename(out_dir / f"rank{rank}.json")  # never a half-written result
        finally:
            if dist.is_initialized():  # fn may have left it for a group of its own
                dist.destroy_process_group()

    main()


# --------------------------------------------------------------------------- topology


def calibrate_cluster(
    nodes: int,
    ranks_per_node: int,
    rate: str | float | None,
    sizes: Sequence[int] = TOPOLOGY_SIZES,
    budget_s: float = 0.5,
    delay: str | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Measure an emulated ``nodes x ranks_per_node`` cluster at ``rate`` from this process.

    ``rate=None`` (one node only) measures the plain loopback. Returns
    ``{"topology": Topology, "fit_error": {model name: fit report}, "rows": ...}``
    where the fit report is :func:`thrifty.comm.calibration.fit_report`.
    """
    spec = {"task": "topology", "sizes": list(sizes), "budget_s": budget_s}
    if rate is None:
        if nodes != 1:
            raise ValueError(f"rate=None means plain loopback, one node; got nodes={nodes}")
        result = run_torchrun(None, ranks_per_node, __name__, spec, timeout)[0]
    else:
        with emulated_cluster(nodes, rate, delay) as cluster:
            result = run_torchrun(cluster, ranks_per_node, __name__, spec, timeout)[0]
    return {**result, "topology": Topology.from_dict(result["topology"])}


# --------------------------------------------------------------------------- worker tasks


def _tcp_connections() -> list[tuple[str, str]]:
    """(local, remote) address of each established TCP socket of this process."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "01" and cols[9] in inodes:  # 01: ESTABLISHED
                    out.append((_proc_address(cols[1]), _proc_address(cols[2])))
    return out


def _proc_address(entry: str) -> str:
    """``/proc/net/tcp*``'s ``HEX:PORT`` (host-order 32-bit words) -> IP address text."""
    raw = bytes.fromhex(entry.split(":")[0])
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(packed)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(address)


def _timed_all_gather(nbytes: int, group: Any, reps: int = 3) -> float:
    """Fastest of ``reps`` all-gathers with a ``nbytes`` result in ``group``, all groups at once."""
    n = dist.get_world_size(group)
    mine = torch.ones(nbytes // 4 // n)
    out = [torch.empty_like(mine) for _ in range(n)]
    collectives.all_gather(mine, group=group, out=out)  # connections
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        collectives.all_gather(mine, group=group, out=out)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return min(times)


def _selftest(spec: dict[str, Any]) -> dict[str, Any]:
    """Where this rank is, which addresses it uses, and how fast its links are.

    ``spec``: ``nbytes`` (all-gather result, default 4 MiB), ``fail_rank`` (that
    rank raises), ``topology_sizes`` (also run :func:`measure_topology` on them).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    if spec.get("fail_rank") == rank:
        raise RuntimeError(f"selftest failure requested on rank {rank}")
    k = int(os.environ["LOCAL_WORLD_SIZE"])
    nbytes = int(spec.get("nbytes", 4 << 20))
    report: dict[str, Any] = {
        "rank": rank,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "world_size": world,
        "ranks_per_node": k,
        "nbytes": nbytes,
    }
    report["flat_s"] = _timed_all_gather(nbytes, None)
    if world // k > 1 and k > 1:
        groups = split_groups(k)
        report["intra_s"] = _timed_all_gather(nbytes, groups.intra)
        report["cross_s"] = _timed_all_gather(nbytes, groups.cross)
    if "topology_sizes" in spec:
        topology = measure_topology(spec["topology_sizes"], budget_s=0.0)
        report["topology"] = topology.to_dict()
    connections = _tcp_connections()
    report["local_addresses"] = sorted({local for local, _ in connections})
    report["peer_addresses"] = sorted({peer for _, peer in connections})
    return report


def _topology_task(spec: dict[str, Any]) -> dict[str, Any] | None:
    sizes = spec.get("sizes", TOPOLOGY_SIZES)
    calibration = calibrate_topology(sizes, budget_s=spec.get("budget_s", 0.5), progress=True)
    if dist.get_rank() != 0:
        return None
    return {
        "topology": calibration.topology.to_dict(),
        "fit_error": calibration.fit_reports(),
        "rows": {name: [t.to_dict() for t in got] for name, got in calibration.timings.items()},
    }


_TASKS = {"selftest": _selftest, "topology": _topology_task}


def _task(spec: dict[str, Any]) -> Any:
    task = spec.get("task")
    if task not in _TASKS:
        raise ValueError(f"unknown cluster task {task!r}; expected one of {sorted(_TASKS)}")
    return _TASKS[task](spec)


if __name__ == "__main__":
    cluster_worker_main(_task)
