"""`thrifty marconi trace | simulate | serve-trace` on tiny synthetic traces."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from thrifty.cli import app
from thrifty.marconi import read_jsonl, synthetic_trace, write_jsonl

runner = CliRunner()


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("THRIFTY_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def test_trace_writes_the_artifact_jsonl(tmp_path, results):
    out = tmp_path / "synthetic.jsonl"
    result = runner.invoke(
        app, ["marconi", "trace", "--source", "synthetic", "--sessions", "3", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    trace = read_jsonl(out)
    assert len(trace.session_ids()) == 3
    assert "requests" in result.output and str(out) in result.output.replace("\n", "")


def test_simulate_sweeps_policies_and_sizes(tmp_path, results):
    path = write_jsonl(synthetic_trace(num_sessions=6, seed=1), tmp_path / "t.jsonl")
    result = runner.invoke(
        app,
        [
            "marconi",
            "simulate",
            "--trace",
            str(path),
            "--sizes-gb",
            "0.2,2",
            "--workers",
            "1",
            "--ttft",
            "paper",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((results / "marconi_sweep.json").read_text())
    assert len(payload["results"]) == 6  # 3 policies x 2 sizes
    assert {r["policy"] for r in payload["results"]} == {"vllm+", "sglang+", "marconi"}
    assert "marconi_7x_vllm" in payload["goals"]
    assert (results / "marconi_sweep.png").stat().st_size > 0
    assert "goal marconi_never_below_sglang" in result.output
    bad = runner.invoke(app, ["marconi", "simulate", "--trace", str(path), "--policies", "lfu"])
    assert bad.exit_code != 0 and "lfu" in bad.output
    assert "Invalid value for '--policies'" in bad.output


def test_simulate_runs_every_baseline_and_prints_ratios_to_the_best(tmp_path, results):
    path = write_jsonl(synthetic_trace(num_sessions=6, seed=1), tmp_path / "t.jsonl")
    policies = "vllm+,sglang+,sglang,seglen,vllm,marconi"
    args = ["--trace", str(path), "--sizes-gb", "0.5", "--workers", "1", "--ttft", "paper"]
    result = runner.invoke(app, ["marconi", "simulate", *args, "--policies", policies])
    assert result.exit_code == 0, result.output
    payload = json.loads((results / "marconi_sweep.json").read_text())
    (row,) = payload["hit_rate_table"]["rows"]
    baselines = {p: row[p] for p in policies.split(",") if p != "marconi"}
    assert row["best_baseline"] == max(baselines, key=baselines.get)
    assert row["vs_best"]["marconi"] == pytest.approx(row["marconi"] / max(baselines.values()))
    assert "best baseline" in result.output
    assert f"{row['vs_best']['marconi']:.2f}x" in result.output


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--trace", "missing.jsonl"], "--trace"),
        (["--source", "reddit"], "--source"),
        (["--source", "synthetic", "--tuner", "greedy"], "--tuner"),
        (["--source", "synthetic", "--ttft", "missing.json"], "--ttft"),
        (["--source", "synthetic", "--sizes-gb", "0"], "--sizes-gb"),
    ],
)
def test_simulate_names_the_bad_flag(tmp_path, results, args, flag):
    bad = runner.invoke(app, ["marconi", "simulate", *args])
    assert bad.exit_code == 2, bad.output
    assert f"Invalid value for '{flag}'" in bad.output


def test_trace_names_the_bad_flag(results):
    bad = runner.invoke(app, ["marconi", "trace", "--message-format", "xml"])
    assert bad.exit_code == 2 and "Invalid value for '--message-format'" in bad.output


def test_serve_trace_measures_ttft_on_a_tiny_trace(tmp_path, results):
    trace = synthetic_trace(
        num_sessions=2,
        num_system_prompts=1,
        system_prompt_tokens=48,
        chat_turns=(2, 2),
        agent_fraction=0.0,
        user_tokens=(8, 12),
        output_tokens=(4, 6),
        seed=2,
    )
    path = write_jsonl(trace, tmp_path / "tiny.jsonl")
    result = runner.invoke(
        app,
        [
            "marconi",
            "serve-trace",
            "--trace",
            str(path),
            "--budgets-mb",
            "4",
            "--repeats",
            "1",
            "--name",
            "serve_smoke",
            "--vocab-size",
            "32000",
            "--hidden-size",
            "64",
            "--layers",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((results / "serve_smoke.json").read_text())
    engines = {row["engine"] for row in payload["rows"]}
    assert engines == {"none", "vllm+@4MB", "sglang+@4MB", "marconi@4MB"}
    assert all(row["first_token_mismatches"] == 0 for row in payload["rows"])
    marconi = next(row for row in payload["rows"] if row["engine"] == "marconi@4MB")
    assert marconi["token_hit_rate"] > 0
    assert payload["ttft_fit"]["points"] >= 2
