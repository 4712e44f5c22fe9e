"""Recovery benchmark baselines on real processes: torchrun restarts and resumes; costs parse."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from thrifty.cli import app
from thrifty.lazarus.benchmark import _torchrun_restart, _warm_relaunch
from thrifty.lazarus.moe import CompactVocab
from thrifty.lazarus.runtime import LazarusConfig


def _corpus():
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5000, (20_000,), generator=g).tolist()
    return CompactVocab(ids, 512).encode(ids)


CFG = LazarusConfig(
    workers=3,
    slots=2,
    experts=3,
    vocab=512,
    steps=9,
    kill_ranks=(1,),
    kill_at_step=6,
    checkpoint_every=4,
)


def test_torchrun_restarts_every_worker_and_resumes_from_the_checkpoint() -> None:
    # torchrun --max-restarts 1 on the real worker module: attempt 0 loses rank 1,
    # the agent restarts all three, they reload step 4 and redo steps 4-5.
    out = _torchrun_restart(CFG, _corpus())
    assert out["steps_lost"] == 6 - 4
    assert out["relaunch_s"] > 0 and out["init_load_s"] > 0 and out["redo_s"] > 0
    parts = out["relaunch_s"] + out["init_load_s"] + out["redo_s"]
    assert out["total_s"] == pytest.approx(parts)


def test_warm_relaunch_runs_the_survivors_from_the_checkpoint() -> None:
    out = _warm_relaunch(CFG, _corpus())
    assert out["steps_lost"] == 2
    assert 0 <= out["detection_s"] < out["total_s"]


def test_simulate_takes_the_measured_costs(tmp_path) -> None:
    bench = {
        "recovery": {
            "median": {
                "lazarus": {"step_s": 0.1, "total_s": 0.5, "checkpoint_s": 0.02},
                "torchrun": {"total_s": 5.0, "redo_s": 0.5},
            }
        }
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    env = {"THRIFTY_RESULTS": str(tmp_path)}
    result = CliRunner().invoke(
        app, ["lazarus", "simulate", "--from-bench", str(path), "--hours", "0.5"], env=env
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "lazarus_simulate.json").read_text())["config"]
    assert (config["step_s"], config["reconfig_s"]) == (0.1, 0.5)
    assert (config["restart_s"], config["checkpoint_s"]) == (4.5, 0.02)
    path.write_text("{}")
    result = CliRunner().invoke(app, ["lazarus", "simulate", "--from-bench", str(path)], env=env)
    # Rich wraps the error box at the terminal width (80 columns in CI), so a
    # long tmp path pushes the message across lines: compare it unwrapped.
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code != 0 and "not a `thrifty lazarus bench` result" in text


@pytest.mark.parametrize(
    "changes",
    [
        {"joiners": 1},  # no join_at_step
        {"kill_ranks": (5,)},
        {"on_failure": "retry"},
        {"resume": True},  # no checkpoint_dir
        {"workers": 0},
    ],
)
def test_bad_lazarus_configs_are_rejected(changes) -> None:
    with pytest.raises(ValueError):
        LazarusConfig(**changes)
