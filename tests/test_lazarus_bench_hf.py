"""`thrifty lazarus bench-hf` end to end at its smallest: real processes, real kill -9s.

One recovery of each system (3 workers, a tiny Mixtral, the kill during step 5,
checkpoints every 2 steps) and a 4-second goodput run of each with one
failure; then the JSON and the plot are checked, not the numbers.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from typer.testing import CliRunner

from thrifty.cli import app

pytest.importorskip("transformers")

runner = CliRunner()

SMALLEST = ["--workers", "3", "--repeats", "1", "--kill-at-step", "5", "--checkpoint-every", "2"]
SMALLEST += ["--duration", "4", "--mtbf", "1", "--max-failures", "1", "--seed", "0"]
SMALLEST += ["--hidden", "32", "--experts", "4", "--seq", "32", "--batch", "2", "--vocab", "256"]


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_bench_hf_measures_both_systems(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("THRIFTY_RESULTS", str(tmp_path))
    result = runner.invoke(app, ["lazarus", "bench-hf", *SMALLEST])
    assert result.exit_code == 0, result.output
    bench = json.loads((tmp_path / "lazarus_bench_hf.json").read_text())
    assert (tmp_path / "lazarus_bench_hf.png").stat().st_size > 0

    recovery = bench["recovery"]
    for name in ("lazarus", "checkpoint_restart"):
        assert _positive(recovery["median"][name]["total_s"]), recovery["runs"][name]
    (lazarus,) = recovery["runs"]["lazarus"]
    assert lazarus["elements_lost"] in (0, None)  # None: the kill landed after the commit vote
    if lazarus["elements_lost"] == 0:
        assert lazarus["elements_checked"] > 0 and lazarus["steps_lost"] == 0
    assert not lazarus["checkpoint_reload"]
    (restart,) = recovery["runs"]["checkpoint_restart"]
    assert restart["steps_lost"] == 1  # resumed from the checkpoint of step 4
    assert _positive(recovery["speedup"]["median"])

    goodput = bench["goodput"]
    for name in ("lazarus", "checkpoint_restart"):
        g = goodput[name]
        assert g["failures"] == 1, g
        assert _positive(g["goodput_tokens_per_s"]) and g["curve"], g
    assert _positive(goodput["ratio"])


def test_bench_hf_rejects_bad_options(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("THRIFTY_RESULTS", str(tmp_path))
    result = runner.invoke(app, ["lazarus", "bench-hf", "--workers", "2"])
    assert result.exit_code == 2, result.output
    named = re.search(r"Invalid value for ([^:]*):", " ".join(result.output.split()))
    assert named and "'--workers'" in named.group(1), result.output
    assert not any(tmp_path.iterdir())
