"""Ctrl-C and SIGTERM stop a run within seconds, leave nothing behind, and keep what finished.

Real processes: a ``thrifty`` command (or a script calling ``run_ranks``) is
started in a session of its own, the signal goes to its process group (what
a terminal's Ctrl-C does) once it has started its ranks, and then nothing it
started may survive: no process recorded before the signal, no network
namespace of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist
import typer
from typer.testing import CliRunner

from thrifty.bench import netem
from thrifty.bench.results import write_partial
from thrifty.cli.interrupts import InterruptibleGroup

STOP_BUDGET_S = 5.0
CLI = "from thrifty.cli import app; app()"


def _descendants(pid: int) -> set[int]:
    return set(netem.descendants(pid))


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie has finished: it only waits to be reaped)."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def _namespaces(pid: int) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if f"thrifty-{pid}-" in line]


class Command:
    """A process in its own session whose combined output is read as it comes."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.output = b""
        self._selector = selectors.DefaultSelector()
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)

    def read(self, timeout: float) -> None:
        for _ in self._selector.select(timeout):
            chunk = self.proc.stdout.read()
            if chunk:
                self.output += chunk

    def wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                self.read(0.1)
                pytest.fail(f"ended (code {self.proc.returncode}) before {what}:\n{self.text}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} within {timeout:g}s:\n{self.text}")
            self.read(0.1)

    def interrupt(self, signum: int) -> tuple[float, set[int]]:
        """Signal the process group; (seconds until exit, processes it had just before)."""
        started = _descendants(self.proc.pid)
        sent = time.monotonic()
        os.killpg(self.proc.pid, signum)
        deadline = sent + 30
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read(0.05)
        elapsed = time.monotonic() - sent
        print(f"stopped {elapsed:.2f}s after {signal.Signals(signum).name}")  # pytest -s shows it
        if self.proc.poll() is None:
            self.kill()
        self.read(0.2)
        return elapsed, started

    def kill(self) -> None:
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "THRIFTY_RESULTS": str(tmp_path), "PYTHONUNBUFFERED": "1"}


def _assert_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 1.0  # SIGKILLed processes need a moment to vanish
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pids), f"processes left behind: {sorted(_alive(pids))}"


@pytest.fixture
def can_emulate() -> None:
    try:
        netem.check_available()
    except netem.NetemUnavailable as exc:
        pytest.skip(str(exc))


def _zen_workers(pid: int) -> int:
    """The zen benchmark's torchrun workers below ``pid`` (not the agents)."""
    count = 0
    for child in _descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"thrifty.zen.benchmark" in cmdline and b"torch.distributed.run" not in cmdline:
            count += 1
    return count


@pytest.mark.netem
def test_ctrl_c_stops_zen_bench_on_an_emulated_cluster(tmp_path: Path, can_emulate: None) -> None:
    # A slow NIC and many reps: the job cannot finish before the signal.
    argv = [sys.executable, "-c", CLI, "zen", "bench", "--nodes", "2", "--rates", "20mbit"]
    argv += ["--densities", "5%", "--sources", "uniform", "--schemes", "dense,zen"]
    argv += ["--reps", "10000", "--train-iters", "0"]
    cmd = Command(argv, _env(tmp_path))
    cmd.wait_for(lambda: _zen_workers(cmd.proc.pid) >= 2, 60, "torchrun workers")
    time.sleep(1.0)  # the ranks are inside their collectives now
    namespaces = _namespaces(cmd.proc.pid)
    assert len(namespaces) == 3, namespaces  # hub + 2 nodes
    elapsed, children = cmd.interrupt(signal.SIGINT)

    assert cmd.proc.returncode == 130, cmd.text
    assert elapsed < STOP_BUDGET_S, f"took {elapsed:.1f}s to stop:\n{cmd.text}"
    assert _namespaces(cmd.proc.pid) == []
    _assert_gone(children)
    doc = json.loads((tmp_path / "zen_bench.json").read_text())
    assert doc["partial"] is True and doc["interrupted_by"] == "SIGINT"
    assert doc["runs"] == {}  # the one (rate, n) run was cut short
    assert "uniform@0.05" in doc["inputs"]  # what finished: the prepared inputs
    assert "interrupted by SIGINT: wrote partial results to" in cmd.text
    assert "zen_bench.json" in cmd.text


def test_sigterm_stops_compress_bench_and_keeps_finished_rows(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", CLI, "compress", "bench", "--model", "digits"]
    argv += ["--workers", "2", "--rate", "loopback", "--compressors", "topk"]
    argv += ["--warmup", "0", "--iters", "300", "--points", "heavy", "--repeats", "1"]
    cmd = Command(argv, _env(tmp_path))
    # rank 0's progress bar counts the configurations done: wait for the first.
    cmd.wait_for(lambda: "1/6" in cmd.text, 60, "the first configuration's row")
    elapsed, children = cmd.interrupt(signal.SIGTERM)

    assert cmd.proc.returncode == 143, cmd.text
    assert elapsed < STOP_BUDGET_S, f"took {elapsed:.1f}s to stop:\n{cmd.text}"
    assert len(children) >= 3, children  # worker, fork server, ranks
    _assert_gone(children)
    doc = json.loads((tmp_path / "compress_digits.json").read_text())
    assert doc["partial"] is True and doc["interrupted_by"] == "SIGTERM"
    rows = doc["runs"]["loopback"]["rows"]
    assert 1 <= len(rows) < 6
    assert rows[0]["kind"] == "local"  # the compute bound comes first
    assert "interrupted by SIGTERM: wrote partial results to" in cmd.text


RUN_RANKS_STUCK = textwrap.dedent(
    """
    import sys
    from thrifty.bench.launch import run_ranks
    from tests.test_interrupts import stuck_rank

    if __name__ == "__main__":
        run_ranks(stuck_rank, 3, sys.argv[1], timeout=600)
    """
)


def stuck_rank(pid_dir: str) -> None:
    """Rank 0 never joins the barrier the others wait in: every rank blocks."""
    Path(pid_dir, f"rank{dist.get_rank()}").write_text(str(os.getpid()))
    if dist.get_rank() == 0:
        time.sleep(600)
    dist.barrier()


def test_ctrl_c_kills_ranks_stuck_in_a_collective(tmp_path: Path) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(RUN_RANKS_STUCK)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = Command([sys.executable, str(script), str(tmp_path)], env)
    ranks = [tmp_path / f"rank{r}" for r in range(3)]
    cmd.wait_for(lambda: all(p.exists() and p.read_text() for p in ranks), 60, "3 ranks")
    time.sleep(0.5)  # ranks 1 and 2 are inside the barrier now
    pids = {int(p.read_text()) for p in ranks}
    assert _alive(pids) == pids
    elapsed, children = cmd.interrupt(signal.SIGINT)

    assert elapsed < STOP_BUDGET_S, f"took {elapsed:.1f}s to stop:\n{cmd.text}"
    assert pids <= children | pids
    _assert_gone(pids | children)
    assert "KeyboardInterrupt" in cmd.text


def test_the_command_group_turns_signals_into_exit_codes_and_restores_handlers(
    tmp_path: Path,
) -> None:
    """In-process: SIGTERM to itself -> partial file, message, 143; handlers as before."""
    app = typer.Typer(cls=InterruptibleGroup)

    @app.command()
    def work(signame: str) -> None:
        try:
            os.kill(os.getpid(), signal.Signals[signame])
            time.sleep(5)  # the handler raises before this ends
        except KeyboardInterrupt as exc:
            write_partial("work", {"done": 1}, exc, tmp_path / "work.json")
            raise

    @app.command()
    def other() -> None:  # a second command: keeps `work` a subcommand
        pass

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signame, code in (("SIGTERM", 143), ("SIGINT", 130)):
        result = CliRunner().invoke(app, ["work", signame])
        assert result.exit_code == code, result.output
        assert f"interrupted by {signame}: wrote partial results to" in result.output
        doc = json.loads((tmp_path / "work.json").read_text())
        assert doc["partial"] is True and doc["interrupted_by"] == signame
        assert doc["done"] == 1
    assert {s: signal.getsignal(s) for s in before} == before
