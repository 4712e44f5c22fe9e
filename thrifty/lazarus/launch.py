"""Launch a Lazarus job the way users do: a coordinator, then one ``torchrun`` per node.

The same path serves one machine and many::

    coordinator   python -m thrifty.lazarus.coordinator --host H --port 0
    node i        THRIFTY_LAZARUS_STORE=H:P torchrun --standalone --nproc-per-node K
                      --max-restarts R -m thrifty.lazarus.train --first-member i*K
                      --world-size N*K --run-dir RUN ...

Each ``torchrun`` is a plain local agent (``--standalone``: its rendezvous
is its own node's, never the job's): it starts the node's workers and, when
one dies, starts them again, up to ``R`` times. The membership of the job
lives in the coordinator, outside every worker, so a worker that dies costs
the others a Lazarus recovery (no restart), and its restarted process joins
as a new member and receives replicas. A node whose agent ran out of
restarts is simply gone; the job succeeds when the members left finish.

:class:`LazarusJob` runs one on this machine (``nodes`` are by default
``workers`` local agents of one worker each; :class:`Node` lets a caller
start an agent elsewhere, e.g. in a network namespace of an emulated
cluster, through a command prefix) and :func:`summarize` turns the
workers' reports into one account of the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thrifty.lazarus.coordinator import STORE_ENV
from thrifty.lazarus.train import TrainJob

__all__ = ["LaunchError", "LazarusJob", "Node", "summarize", "worker_pids"]

_STOP_GRACE_S = 3.0
_COORDINATOR_START_S = 60.0
_TAIL = 3000


class LaunchError(RuntimeError):
    """The job could not start or no member finished training."""


def _same(argv: list[str]) -> list[str]:
    return argv


@dataclass(frozen=True)
class Node:
    """Where one ``torchrun`` agent runs.

    Args:
        wrap: turns a command into the one that runs it on the node (e.g.
            ``["ip", "netns", "exec", name, *argv]`` or an ``ssh`` prefix);
            the identity runs it here.
        env: extra environment for the agent and its workers (e.g.
            ``GLOO_SOCKET_IFNAME``: the interface gloo binds to on that node).
    """

    wrap: Callable[[list[str]], list[str]] = _same
    env: dict[str, str] = field(default_factory=dict)


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-_TAIL:]
    return ""


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = _STOP_GRACE_S) -> None:
    """SIGTERM each process group (an agent stops its workers), then SIGKILL what is left."""
    running = [p for p in procs if p.poll() is None]
    below = [pid for p in running for pid in _descendants(p.pid)]
    for p in running:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(deadline - time.monotonic(), 0.01))
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for pid in below:  # workers an agent left behind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class LazarusJob:
    """A coordinator and one ``torchrun`` agent per node, on a run directory.

    ``with LazarusJob(job, workers=4, run_dir=d) as running: result = running.wait()``;
    between start and wait the caller may watch ``run_dir`` (:func:`worker_pids`,
    :meth:`committed_step`) and kill workers: that is what the job is for.

    Args:
        job: what every worker trains.
        workers: workers at the start, in all.
        run_dir: where the workers write pids, progress and reports; agent
            logs go to ``node<i>.log``, the coordinator's to ``coordinator.log``.
        nodes: one :class:`Node` per agent; default ``workers`` local agents.
            ``workers`` must be a multiple of their number.
        max_restarts: per agent: how many times it restarts its workers.
        coordinator_host: address the coordinator listens on, reachable by every node.
        coordinator_wrap: where the coordinator runs (as :attr:`Node.wrap`).
        timeout_s: the whole job's limit; everything is stopped after it.
    """

    def __init__(
        self,
        job: TrainJob,
        workers: int,
        run_dir: str | Path,
        *,
        nodes: Sequence[Node] | None = None,
        max_restarts: int = 3,
        coordinator_host: str = "127.0.0.1",
        coordinator_wrap: Callable[[list[str]], list[str]] = _same,
        timeout_s: float = 600.0,
    ) -> None:
        nodes = list(nodes) if nodes is not None else [Node() for _ in range(workers)]
        if workers < 1 or not nodes or workers % len(nodes):
            raise ValueError(
                f"workers={workers}: expected >= 1 and a multiple of the {len(nodes)} nodes"
            )
        if max_restarts < 0:
            raise ValueError(f"max_restarts={max_restarts}: expected >= 0")
        if workers * job.slots < job.experts:
            raise ValueError(
                f"workers={workers} x slots={job.slots} < experts={job.experts}: every expert "
                "needs a slot"
            )
        self.job = job
        self.workers = workers
        self.run_dir = Path(run_dir)
        self.nodes = nodes
        self.max_restarts = max_restarts
        self.coordinator_host = coordinator_host
        self.coordinator_wrap = coordinator_wrap
        self.timeout_s = timeout_s
        self.store: str | None = None
        self.agents: list[subprocess.Popen] = []
        self._coordinator: subprocess.Popen | None = None
        self._started = 0.0

    # ------------------------------------------------------------------ start / stop

    def __enter__(self) -> LazarusJob:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the coordinator, wait for its address, then every node's agent."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._started = time.monotonic()
        argv = [sys.executable, "-u", "-m", "thrifty.lazarus.coordinator"]
        argv += ["--host", self.coordinator_host, "--port", "0"]
        log = (self.run_dir / "coordinator.log").open("wb")
        self._coordinator = subprocess.Popen(
            self.coordinator_wrap(argv),
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.store = self._coordinator_address(log)
        per_node = self.workers // len(self.nodes)
        for i, node in enumerate(self.nodes):
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            argv += ["--nproc-per-node", str(per_node), "--max-restarts", str(self.max_restarts)]
            argv += ["--monitor-interval", "0.1", "-m", "thrifty.lazarus.train"]
            argv += ["--run-dir", str(self.run_dir), "--first-member", str(i * per_node)]
            argv += ["--world-size", str(self.workers), *self.job.argv()]
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "GLOO_SOCKET_IFNAME": "lo",
                "TORCH_CPP_LOG_LEVEL": "ERROR",
                **node.env,
                STORE_ENV: self.store,
            }
            with (self.run_dir / f"node{i}.log").open("wb") as sink:
                self.agents.append(
                    subprocess.Popen(
                        node.wrap(argv),
                        env=env,
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )

    def _coordinator_address(self, log: Any) -> str:
        """The ``host:port`` the coordinator prints once it listens."""
        assert self._coordinator is not None and self._coordinator.stdout is not None
        line = self._coordinator.stdout.readline().decode()
        log.close()
        if "store " not in line:
            self.stop()
            raise LaunchError(
                f"the coordinator did not start (said {line!r}):\n"
                f"{_tail(self.run_dir / 'coordinator.log')}"
            )
        return line.split("store ", 1)[1].split(",", 1)[0].strip()

    def stop(self) -> None:
        """Stop every agent (and its workers) and the coordinator."""
        _stop(self.agents)
        if self._coordinator is not None:
            _stop([self._coordinator])
            if self._coordinator.stdout is not None:
                self._coordinator.stdout.close()

    # ------------------------------------------------------------------ progress

    def committed_step(self) -> int:
        """The newest committed step the first member wrote (0 before the first)."""
        with contextlib.suppress(OSError, ValueError):
            return int((self.run_dir / "step").read_text())
        return 0

    def wait(self) -> dict[str, Any]:
        """Wait for every agent to exit; the :func:`summarize` of the workers' reports.

        Raises:
            LaunchError: no member finished training (the agents' log tails
                say why), or ``timeout_s`` passed.
        """
        deadline = self._started + self.timeout_s
        try:
            self._wait_agents(deadline)
        except BaseException:  # Ctrl-C included: nothing of the job outlives the command
            self.stop()
            raise
        result = summarize(self.run_dir, self.job.steps)
        result["wall_s"] = time.monotonic() - self._started
        result["agents_exit"] = [p.returncode for p in self.agents]
        if not result["finished_members"]:
            raise LaunchError(f"no member finished training:\n{self._logs()}")
        return result

    def _wait_agents(self, deadline: float) -> None:
        while any(p.poll() is None for p in self.agents):
            failed = self.run_dir / "failed"
            if failed.exists():  # a member gave up (LazarusError): the job cannot go on
                self.stop()
                raise LaunchError(f"the job failed: {_tail(failed)}\n{self._logs()}")
            if time.monotonic() > deadline:
                self.stop()
                raise LaunchError(
                    f"the job did not finish within {self.timeout_s:g}s; stopped it\n"
                    + self._logs()
                )
            time.sleep(0.1)

    def _logs(self) -> str:
        return "\n".join(
            f"--- node {i} (exit {p.returncode}) ---\n{_tail(self.run_dir / f'node{i}.log')}"
            for i, p in enumerate(self.agents)
        )


def worker_pids(run_dir: str | Path) -> dict[int, int]:
    """Member id -> pid of every worker that entered the job and is still alive."""
    out = {}
    for path in Path(run_dir, "pids").glob("member*.json"):
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text())
            pid = int(info["pid"])
            if Path(f"/proc/{pid}").exists() and not Path(run_dir, "reports", path.name).exists():
                out[int(info["member"])] = pid
    return out


def summarize(run_dir: str | Path, steps: int) -> dict[str, Any]:
    """One account of the run from the reports of the members that finished.

    Reconfigurations are merged by generation across members (each member
    records what it saw): times are the slowest member's, ``replicas_moved``
    and ``bytes_moved`` the sum of what members received.
    """
    reports = []
    for path in sorted(Path(run_dir, "reports").glob("member*.json")):
        with contextlib.suppress(OSError, ValueError):
            reports.append(json.loads(path.read_text()))
    reports.sort(key=lambda r: r["member"])
    finished = [r for r in reports if r["committed"] >= steps]
    merged: dict[int, dict[str, Any]] = {}
    for r in reports:
        for rec in r["report"]["reconfigurations"]:
            row = merged.get(rec["generation"])
            if row is None:
                merged[rec["generation"]] = row = {**rec, "replicas_moved": 0, "bytes_moved": 0}
            if rec["kind"] == "failure":  # a joiner admitted in a recovery saw a "join"
                row.update(kind="failure", members_before=rec["members_before"])
            for key in ("detection_s", "agree_s", "regroup_s", "transfer_s", "total_s"):
                if rec[key] is not None:
                    row[key] = max(row[key] or 0.0, rec[key])
            row["replicas_moved"] += rec["replicas_moved"]
            row["bytes_moved"] += rec["bytes_moved"]
            row["attempts"] = max(row["attempts"], rec["attempts"])
            if rec["checkpoint_reload"] is not None:
                row["checkpoint_reload"] = rec["checkpoint_reload"]
    losses: dict[int, float] = {}
    for r in reports:
        for step, value in r["losses"].items():
            losses.setdefault(int(step), value)
    layers = len(finished[0]["replica_experts"]) if finished else 0
    experts = [
        sorted({e for r in finished for e in r["replica_experts"][li]}) for li in range(layers)
    ]
    reconfigurations = [merged[g] for g in sorted(merged)]
    return {
        "steps": steps,
        "finished_members": [r["member"] for r in finished],
        "joined_members": [r["member"] for r in reports if r["restarts"] > 0],
        "reconfigurations": reconfigurations,
        "failures": sum(1 for rec in reconfigurations if rec["kind"] == "failure"),
        "checkpoint_reloads": sum(
            1 for rec in reconfigurations if rec["checkpoint_reload"] is not None
        ),
        "experts_present": experts,
        "loss": [losses[s] for s in sorted(losses)],
    }
