"""The Zen benchmark's rank side and its report, without root (no emulated NICs)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from thrifty.bench import run_ranks
from thrifty.cli import app
from thrifty.zen import AutoScheme, sync_sparse
from thrifty.zen.benchmark import (
    _bench_cell,
    _merge_ranks,
    goal_checks,
    prepare_inputs,
    summary_rows,
)

SCHEMES = ("dense", "agsparse", "sparcml", "omnireduce", "zen", "auto")


def _timed_choice() -> dict[str, Any]:
    """AutoScheme(criterion="time") tries each candidate, then keeps the fastest."""
    rank = dist.get_rank()
    idx = torch.randperm(50_000, generator=torch.Generator().manual_seed(rank))[:500]
    tensor = torch.sparse_coo_tensor(idx.view(1, -1), torch.randn(500), (50_000,))
    reference = tensor.to_dense()
    dist.all_reduce(reference)
    auto = AutoScheme(criterion="time", candidates=("agsparse", "zen"), profile_steps=2)
    errors = []
    for _ in range(5):
        out = sync_sparse(tensor, auto, average=False, output="dense")
        errors.append((out - reference).abs().max().item())
    return {
        "chosen": auto.chosen,
        "tried": [name for name, _ in auto.timings],
        "times": [t for _, t in auto.timings],
        "error": max(errors),
    }


def _model_choice() -> dict[str, Any]:
    """AutoScheme(criterion="model"): simulated choice, then a new profile when density drifts."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    auto = AutoScheme(criterion="model", profile_steps=1, recheck_every=2, drift=2.0, margin=1.0)
    # margin 100: every candidate is a close call, so the clock decides among all four
    timed = AutoScheme(criterion="model", profile_steps=1, margin=100.0, network=None)
    errors, chosen = [], []
    for count in (200, 200, 200, 200, 20_000, 20_000, 20_000, 20_000):  # density x100 at call 5
        idx = torch.randperm(50_000, generator=gen)[:count]
        tensor = torch.sparse_coo_tensor(idx.view(1, -1), torch.randn(count), (50_000,))
        reference = tensor.to_dense()
        dist.all_reduce(reference)
        out = sync_sparse(tensor, auto, average=False, output="dense")
        errors.append((out - reference).abs().max().item())
        chosen.append(auto.chosen)
        if count == 200:  # 4 calls here, 1 more below
            out = sync_sparse(tensor, timed, average=False, output="dense")
            errors.append((out - reference).abs().max().item())
    out = sync_sparse(tensor, timed, average=False, output="dense")  # the dense density, 40%
    errors.append((out - reference).abs().max().item())
    network = auto.network
    return {
        "choices": auto.choices,
        "chosen": chosen,
        "predicted": auto.predicted,
        "rate": None if network is None else network.rate,
        "error": max(errors),
        "timed_tried": [name for name, _ in timed.timings],
        "timed_chosen": timed.chosen,
    }


def _rank(path: str) -> dict[str, Any]:
    data = torch.load(path)
    cells = {c["key"]: _bench_cell(c, SCHEMES, reps=1) for c in data["cells"]}
    return {"cells": cells, "timed": _timed_choice(), "model": _model_choice()}


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = Path(tmp_path_factory.mktemp("zen")) / "inputs.pt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("thrifty.zen.workloads.UNIFORM_ROWS", 300_000)  # small and fast
        inputs = prepare_inputs(["uniform"], [0.002, 0.05], [3], 0, path)
    per_rank = run_ranks(_rank, 3, str(path))
    run = _merge_ranks(per_rank)
    out: dict[str, Any] = {"inputs": inputs, "runs": {"x/3": {"rate": "x", "nodes": 3, **run}}}
    out["timed"] = [r["timed"] for r in per_rank]
    out["model"] = [r["model"] for r in per_rank]
    out["summary"] = summary_rows(out)
    return out


def test_every_scheme_matches_dense_and_the_byte_model(payload: dict[str, Any]) -> None:
    assert len(payload["summary"]) == 2
    for row in payload["summary"]:
        assert row["max_error"] < 1e-5, row
        assert set(row["seconds"]) == set(SCHEMES)
        for scheme, ratio in row["bytes_vs_model"].items():
            assert 0.9 < ratio < 1.1, (row["source"], scheme, ratio)
        assert row["zen_vs_balanced_model"] < 1.1
        assert row["auto_chose"] in ("zen", "sparcml", "agsparse", "dense")
    cells = payload["runs"]["x/3"]["cells"]
    agsparse = cells["uniform@0.05"]["agsparse"]
    assert agsparse["total_bytes"] == sum(agsparse["bytes_per_rank"])
    assert agsparse["max_rank_bytes"] == max(agsparse["bytes_per_rank"])


def test_timed_selection_agrees_across_ranks(payload: dict[str, Any]) -> None:
    timed = payload["timed"]
    assert timed[0]["tried"] == ["agsparse", "zen", "agsparse", "zen"]  # two rounds, in order
    chosen = {r["chosen"] for r in timed}
    assert len(chosen) == 1 and chosen <= {"agsparse", "zen"}
    assert all(r["times"] == timed[0]["times"] for r in timed)  # the slowest rank's, everywhere
    best = min(zip(timed[0]["tried"], timed[0]["times"], strict=True), key=lambda x: x[1])[0]
    assert chosen == {best}
    assert all(r["error"] < 1e-5 for r in timed)


def test_model_selection_picks_the_predicted_fastest_and_rechecks_on_drift(
    payload: dict[str, Any],
) -> None:
    model = payload["model"]
    assert all(m == model[0] for m in model[1:])  # every rank chose alike, from the same data
    first = model[0]
    assert first["error"] < 1e-4  # whatever it chose is lossless
    assert first["rate"] is not None and first["rate"] > 0  # measured on the first call
    predicted = first["predicted"]
    assert set(predicted) == {"zen", "sparcml", "agsparse", "dense"}
    assert first["choices"][-1] == min(predicted, key=predicted.get)
    # Chosen after call 1; the drift check at call 3 sees no change; the density jumps x100
    # at call 5 and the check at call 5 starts a new profile, which chooses at once again.
    assert len(first["choices"]) == 2, first
    assert first["chosen"][0] is not None and first["chosen"][4] is not None
    # The shortlist path: call 1 profiles, calls 2-5 time the four close calls, one each,
    # and the fastest of them is kept.
    assert first["timed_tried"] == ["zen", "sparcml", "agsparse", "dense"]
    assert first["timed_chosen"] in first["timed_tried"]


def test_timed_selection_rejects_unknown_candidates() -> None:
    with pytest.raises(ValueError, match="candidates must be distinct"):
        AutoScheme(criterion="time", candidates=("zen", "bogus"))
    with pytest.raises(ValueError, match="criterion must be one of"):
        AutoScheme(criterion="fastest")  # type: ignore[arg-type]


def test_goal_checks_flag_what_fails(payload: dict[str, Any]) -> None:
    good = copy.deepcopy(payload)
    for row in good["summary"]:
        row["auto_vs_best_scheme"] = 1.0
    assert goal_checks(good)["auto_never_5pct_slower_than_best"]["holds"]
    assert goal_checks(good)["bytes_within_10pct_of_model"]["holds"]
    bad = copy.deepcopy(good)
    bad["summary"][0]["auto_vs_best_scheme"] = 1.06
    bad["summary"][1]["bytes_vs_model"]["zen"] = 1.2
    goals = goal_checks(bad)
    assert not goals["auto_never_5pct_slower_than_best"]["holds"]
    assert goals["auto_never_5pct_slower_than_best"]["violations"][0]["density"] == 0.002
    assert not goals["bytes_within_10pct_of_model"]["holds"]
    assert goals["bytes_within_10pct_of_model"]["outside"] == [
        {
            "scheme": "zen",
            "ratio": 1.2,
            "rate": "x",
            "nodes": 3,
            "source": "uniform",
            "density": 0.05,
        }
    ]
    assert goals["lstm_n8_1gbit"]["rows"] == []  # not measured here: not claimed either
    assert not goals["lstm_n8_1gbit"]["holds_2x_agsparse"]


def test_cli_analyze(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THRIFTY_RESULTS", str(tmp_path))
    result = CliRunner().invoke(
        app,
        [
            "zen",
            "analyze",
            "--workloads",
            "deepfm",
            "--workers",
            "2",
            "--steps",
            "1",
            "--sizes",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "deepfm" in result.output and "gamma" in result.output
    saved = json.loads((tmp_path / "zen_analysis.json").read_text())
    assert saved["workloads"]["deepfm"]["by_n"]["2"]["density"] > 0
    assert (tmp_path / "zen_analysis.png").stat().st_size > 10_000
    bad = CliRunner().invoke(app, ["zen", "analyze", "--workloads", "bert"])
    assert bad.exit_code != 0 and "unknown workload 'bert'" in bad.output
    assert "Invalid value for '--workloads'" in bad.output


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--sources", "bert", "unknown sources ['bert']"),
        ("--schemes", "zen,fast", "unknown schemes ['fast']"),
        ("--rates", "fast", "cannot parse rate 'fast'"),
        ("--nodes", "1", "nodes must be >= 2"),
        ("--densities", "150%", "densities must be in (0, 1]"),
    ],
)
def test_cli_bench_names_the_bad_flag_before_launching(flag: str, value: str, says: str) -> None:
    bad = CliRunner().invoke(app, ["zen", "bench", "--rates", "loopback", flag, value])
    assert bad.exit_code == 2, bad.output
    assert f"Invalid value for '{flag}'" in bad.output and says in bad.output
