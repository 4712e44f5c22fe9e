"""`thrifty lazarus bench | simulate` end to end at their smallest settings; bad flags.

`thrifty lazarus train` runs end to end in tests/test_lazarus_launch.py, with
workers killed from outside at moments the test does not choose.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from thrifty.cli import app

runner = CliRunner()


def _unwrapped(output: str) -> str:
    """Rich wraps its error box at the terminal width: compare the words, not the lines."""
    return " ".join(output.replace("│", " ").split())


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("THRIFTY_RESULTS", str(tmp_path))
    return tmp_path


def test_bench_then_simulate_from_its_measured_costs(results) -> None:
    # Every piece of the benchmark at its smallest: one repetition of each recovery
    # (Lazarus, torchrun restart, warm relaunch) on 3 ranks, a 4-node placement, and
    # placement scaling at 8 nodes. Then the simulator reads the measured costs back.
    args = ["lazarus", "bench", "--repeats", "1", "--workers", "3", "--kill-at-step", "3"]
    args += ["--checkpoint-every", "2", "--nodes", "4", "--slots", "2", "--experts", "4"]
    result = runner.invoke(app, [*args, "--scaling-nodes", "8"])
    assert result.exit_code == 0, result.output
    bench = json.loads((results / "lazarus_bench.json").read_text())
    assert set(bench["recovery"]["median"]) == {"lazarus", "torchrun", "warm_relaunch"}
    assert bench["placement"]["config"]["failures"] == [1, 2, 3, 4]
    assert bench["scaling"]["config"]["nodes"] == 8
    assert (results / "lazarus_recovery.png").stat().st_size > 0
    assert (results / "lazarus_placement.png").stat().st_size > 0

    path = results / "lazarus_bench.json"
    result = runner.invoke(app, ["lazarus", "simulate", "--from-bench", str(path), "--hours", "1"])
    assert result.exit_code == 0, result.output
    config = json.loads((results / "lazarus_simulate.json").read_text())["config"]
    assert config["reconfig_s"] == bench["recovery"]["median"]["lazarus"]["total_s"]


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["train", "--top-k", "5"], "--top-k"),
        (["train", "--model", "gpt2"], "--model"),
        (["train", "--max-restarts", "-1"], "--max-restarts"),
        (["train", "--workers", "2", "--experts", "20"], "--experts"),
        (["bench", "--workers", "2"], "--workers"),
        (["bench", "--checkpoint-every", "20"], "--checkpoint-every"),
        (["bench", "--repeats", "0"], "--repeats"),
        (["simulate", "--nodes", "2", "--slots", "1"], "--experts"),
        (["simulate", "--mtbf", "0"], "--mtbf"),
    ],
)
def test_bad_options_are_reported_against_their_flag(results, args, flag) -> None:
    result = runner.invoke(app, ["lazarus", *args])
    assert result.exit_code == 2, result.output
    named = re.search(r"Invalid value for ([^:]*):", _unwrapped(result.output))
    assert named and repr(flag) in named.group(1), result.output
    assert not any(results.iterdir())  # rejected before anything ran
