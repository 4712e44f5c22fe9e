"""`thrifty lazarus train` as users launch it: coordinator + torchrun agents, kills from outside.

Nothing in the job knows when a worker dies: the test SIGKILLs worker pids
(read from the run directory the workers write) at random moments while the
command runs; each agent restarts its dead worker, which rejoins as a new
member. The emulated-cluster test does the same across network namespaces,
killing every worker of one node.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from thrifty.bench.cluster import emulated_cluster
from thrifty.cli import app
from thrifty.lazarus.launch import LazarusJob, Node, worker_pids
from thrifty.lazarus.train import TrainJob

pytest.importorskip("transformers")

runner = CliRunner()


def _killer(run_dir: Path, workers: int, kills: int, seed: int, killed: list[int]) -> None:
    """Once every worker is in the job: ``kills`` SIGKILLs of random live workers, random gaps."""
    rng = random.Random(seed)
    deadline = time.monotonic() + 120
    while len(worker_pids(run_dir)) < workers:
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    for _ in range(kills):
        time.sleep(rng.uniform(0.5, 2.5))
        pids = worker_pids(run_dir)
        if not pids:
            return
        member = rng.choice(sorted(pids))
        with contextlib.suppress(ProcessLookupError):  # it may have finished meanwhile
            os.kill(pids[member], signal.SIGKILL)
            killed.append(member)


def _lost(report: dict[str, Any]) -> set[int]:
    return {
        m
        for rec in report["reconfigurations"]
        for m in rec["members_before"]
        if m not in rec["members_after"]
    }


def test_train_survives_sigkills_at_random_moments(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("THRIFTY_RESULTS", str(tmp_path))
    run_dir = tmp_path / "run"
    workers, steps = 4, 60
    killed: list[int] = []
    killer = threading.Thread(target=_killer, args=(run_dir, workers, 2, 3, killed), daemon=True)
    killer.start()
    args = ["lazarus", "train", "--workers", str(workers), "--steps", str(steps)]
    args += ["--experts", "4", "--slots", "3", "--run-dir", str(run_dir), "--timeout", "150"]
    result = runner.invoke(app, args)
    killer.join(timeout=5)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "lazarus_train.json").read_text())
    assert len(killed) == 2, killed
    assert set(killed) <= _lost(report), (killed, report["reconfigurations"])
    assert report["failures"] >= 1 and report["checkpoint_reloads"] == 0
    assert sum(rec["replicas_moved"] for rec in report["reconfigurations"]) > 0
    assert report["experts_present"] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert report["finished_members"] and not set(killed) & set(report["finished_members"])
    for joined in report["joined_members"]:  # a restarted worker rejoined under a new id
        assert joined >= workers
    loss = report["loss"]
    assert len(loss) == steps
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.5
    assert "failure" in result.output  # the table of reconfigurations


def _have_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2's `{tool}`"
    return None


@pytest.mark.netem
@pytest.mark.skipif(_have_netns() is not None, reason=str(_have_netns()))
def test_emulated_cluster_node_loses_every_worker_and_they_rejoin(tmp_path) -> None:
    """2 nodes x 2 workers, coordinator in the hub; kill -9 both workers of node 1."""
    job = TrainJob(steps=110, experts=4, slots=3)  # long enough for node 1 to come back
    run_dir = tmp_path / "run"
    with emulated_cluster(nodes=2, rate="1gbit") as cluster:
        hub = cluster.hub.name
        coordinator_host = f"{cluster.addresses[0].rsplit('.', 1)[0]}.254"
        # The hub gets an address on its bridge (and its loopback, which the
        # coordinator's own client uses to reach that address) for the coordinator.
        subprocess.run(["ip", "-n", hub, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            ["ip", "-n", hub, "addr", "add", f"{coordinator_host}/24", "dev", "br0"], check=True
        )
        nodes = [
            Node(ns.command, {"GLOO_SOCKET_IFNAME": cluster.interface}) for ns in cluster.namespaces
        ]
        with LazarusJob(
            job,
            4,
            run_dir,
            nodes=nodes,
            coordinator_host=coordinator_host,
            coordinator_wrap=cluster.hub.command,
            timeout_s=150,
        ) as running:
            deadline = time.monotonic() + 120
            while len(worker_pids(run_dir)) < 4 or running.committed_step() < 1:
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.05)
            node1 = {m: p for m, p in worker_pids(run_dir).items() if m in (2, 3)}
            for pid in node1.values():
                os.kill(pid, signal.SIGKILL)
            report = running.wait()
    assert {2, 3} <= _lost(report), report["reconfigurations"]
    assert report["checkpoint_reloads"] == 0
    assert report["experts_present"] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert report["agents_exit"] == [0, 0]
    assert sorted(report["joined_members"]) == [4, 5], report  # node 1's restarted workers
    joins = [rec for rec in report["reconfigurations"] if rec["kind"] == "join"]
    assert joins and sum(rec["replicas_moved"] for rec in joins) > 0
    assert set(report["finished_members"]) == {0, 1, 4, 5}
