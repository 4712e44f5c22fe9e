"""Every benchmark command runs end to end at its smallest setting (real ranks, real processes).

Each command gets at least two configurations (or operating points) where it
takes a list: the ``compress bench`` crash this guards against happened on the
second one. The
plain-loopback runs need nothing special; the emulated-rate run (network
namespaces, ``tc``) is marked ``netem`` and skips without root or iproute2.
Results go to a temporary directory (``THRIFTY_RESULTS``), never to ``results/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from thrifty.bench import netem
from thrifty.bench.operating_points import GPU_LIKE_S
from thrifty.bench.training import (
    BASELINE,
    COMPUTE_BOUND,
    HOOK,
    LAYERWISE,
    TrainingResult,
    TrainingRow,
    TrainingRun,
    draw_training,
    family_colours,
)
from thrifty.cli import app

DIGITS_TENSORS = 8  # DigitsCNN: two convs and two linears, weight and bias each


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("THRIFTY_RESULTS", str(tmp_path))
    return tmp_path


def run(*args: str) -> str:
    """Run ``thrifty <args>``; fail with its output and traceback unless it exits 0."""
    result = CliRunner().invoke(app, list(args))
    if result.exit_code != 0:
        raise AssertionError(
            f"thrifty {' '.join(args)} exited {result.exit_code}:\n{result.output}"
        ) from result.exception
    return result.output


def load(path: Path) -> dict[str, Any]:
    assert path.stat().st_size > 0
    return json.loads(path.read_text())


def assert_timed(rows: list[dict[str, Any]], iters: int, repeats: int = 1) -> None:
    for row in rows:
        assert math.isfinite(row["iteration_s"]) and row["iteration_s"] > 0, row["label"]
        assert len(row["times"]) == iters * repeats, row["label"]
        assert all(t > 0 for t in row["times"]), row["label"]
        assert len(row["repeats_s"]) == repeats, row["label"]
        assert min(row["repeats_s"]) <= row["iteration_s"] <= max(row["repeats_s"])
        # The compute bound sends nothing; every other row sends its gradients.
        assert (row["wire_bytes_per_iter"] > 0) == (row["kind"] != "local"), row["label"]


def test_compress_bench(results: Path) -> None:
    output = run(
        "compress",
        "bench",
        "--model",
        "digits",
        "--rate",
        "loopback",
        "--compressors",
        "fp16,topk",
        "--warmup",
        "2",
        "--iters",
        "2",
        "--points",
        "heavy",
        "--repeats",
        "1",
    )
    assert "fp16 whole" in output and "topk layerwise" in output
    doc = load(results / "compress_digits.json")
    assert (results / "compress_digits.png").stat().st_size > 0
    rows = doc["runs"]["loopback"]["rows"]
    assert [r["label"] for r in rows] == [
        COMPUTE_BOUND,
        "DDP fp32",
        "DDP fp16_compress_hook",
        "DDP powerSGD_hook r4",
        "fp16 layerwise",
        "fp16 whole",
        "topk layerwise",
        "topk whole",
    ]
    assert_timed(rows, iters=2)
    by = {r["label"]: r for r in rows}
    # One definition of bytes for every row: DDP's fp32 ring all-reduce of every
    # gradient (2 ranks: 2 * 1/2 * 4 bytes per parameter), fp16 half of it,
    # PowerSGD and Top-k far less.
    ddp = by["DDP fp32"]["wire_bytes_per_iter"]
    assert ddp == 4 * doc["runs"]["loopback"]["meta"]["parameters"]
    assert by["fp16 layerwise"]["wire_bytes_per_iter"] == pytest.approx(ddp / 2, rel=0.01)
    assert by["fp16 whole"]["wire_bytes_per_iter"] == pytest.approx(ddp / 2, rel=0.01)
    assert by["DDP fp16_compress_hook"]["wire_bytes_per_iter"] == pytest.approx(ddp / 2, rel=0.01)
    assert by["DDP powerSGD_hook r4"]["wire_bytes_per_iter"] < ddp / 4
    assert by["topk whole"]["wire_bytes_per_iter"] < ddp / 10
    assert by["DDP fp32"]["speedup_vs_ddp"] == 1.0
    assert by["fp16 layerwise"]["groups"] == DIGITS_TENSORS and by["fp16 whole"]["groups"] == 1
    again = TrainingResult.load(results / "compress_digits.json")
    assert again.runs["loopback"].baseline().label == "DDP fp32"  # type: ignore[union-attr]


def test_mergecomp_bench(results: Path) -> None:
    run(
        "mergecomp",
        "bench",
        "--model",
        "digits",
        "--rate",
        "loopback",
        "--compressors",
        "dgc",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--points",
        "heavy,gpu-like",
        "--repeats",
        "2",
    )
    doc = load(results / "mergecomp_digits.json")
    assert (results / "mergecomp_digits.png").stat().st_size > 0
    points = {p["name"]: p for p in doc["settings"]["points"]}
    assert list(points) == ["heavy", "gpu-like"] and list(doc["runs"]) == [
        "heavy loopback",
        "gpu-like loopback",
    ]
    # The GPU-like batch is the largest probed one within the compute target.
    gpu = points["gpu-like"]
    fitting = [b for b, s in gpu["probes"] if s <= GPU_LIKE_S[1]]
    assert gpu["batch"]["batch_size"] == max(fitting) and gpu["compute_s"] > 0
    for key, run_ in doc["runs"].items():
        rows = run_["rows"]
        assert run_["meta"]["batch"] == points[key.split()[0]]["batch"]
        assert [r["label"] for r in rows] == [
            COMPUTE_BOUND,
            "DDP fp32",
            "DDP fp16_compress_hook",
            "DDP powerSGD_hook r4",
        ] + [f"dgc {p}" for p in ("layerwise", "whole", "mergecomp")]
        assert_timed(rows, iters=2, repeats=2)
        for row in (r for r in rows if r["family"] == "MergeComp"):
            # It searched once; the second repetition timed the plan it chose.
            assert row["search_iterations"] > 0 and row["search_s"] > 0
            assert sum(row["extra"]["chosen_lengths"]) == DIGITS_TENSORS
            assert row["groups"] == len(row["extra"]["chosen_lengths"])


def test_bytecomp_bench(results: Path) -> None:
    output = run(
        "bytecomp",
        "bench",
        "--models",
        "digits",
        "--topologies",
        "1x2",
        "--rate",
        "loopback",
        "--compressors",
        "randomk,dgc",
        "--iters",
        "2",
        "--calibration",
        "0",
        "--points",
        "gpu-like",
        "--repeats",
        "1",
        "--calibrate-under-load",
    )
    assert "ByteComp" in output
    doc = load(results / "bytecomp.json")
    assert doc["settings"]["calibrated_under_load"] is True
    assert (results / "bytecomp.png").stat().st_size > 0
    rows = doc["runs"]["1x2 digits"]["rows"]
    assert doc["runs"]["1x2 digits"]["meta"]["point"] == "gpu-like"
    assert [r["label"] for r in rows] == [
        COMPUTE_BOUND,
        "DDP fp32",
        "DDP fp16_compress_hook",
        "DDP powerSGD_hook r4",
    ] + [
        f"{c} {s}"
        for c in ("randomk", "dgc")
        for s in ("layerwise", "whole", "uniform", "MergeComp", "bytecomp")
    ]
    assert_timed(rows, iters=2)
    for row in rows[4:]:
        assert row["predicted_s"] > 0 and math.isfinite(row["prediction_error"])
    for row in (r for r in rows if r["family"] == "ByteComp"):
        assert math.isfinite(row["bound_s"]) and row["bound_s"] > 0
        assert sum(row["extra"]["strategies"].values()) == DIGITS_TENSORS


def test_bytecomp_bench_selection(results: Path) -> None:
    run(
        "bytecomp",
        "bench-selection",
        "--layers",
        "1",
        "--reps",
        "1",
        "--compressors",
        "randomk,dgc",
    )
    rows = load(results / "bytecomp_selection.json")["rows"]
    assert len(rows) == 2 * 2 * 2  # compressors x (refine or not) x (buckets or not)
    assert {r["compressor"] for r in rows} == {"randomk", "dgc"}
    assert all(r["decide_ms"] > 0 and r["predicted_s"] > 0 for r in rows)


def test_bytecomp_decide() -> None:
    output = run(
        "bytecomp",
        "decide",
        "--model",
        "digits",
        "--compressor",
        "randomk",
        "--nodes",
        "1",
        "--ranks-per-node",
        "2",
        "--rate",
        "100mbit",
    )
    text = " ".join(output.split())
    assert "digits (8 tensors, randomk) on 1x2 ranks at 100mbit" in text and "Predicted" in text


def test_bench_collectives(results: Path) -> None:
    run(
        "bench",
        "collectives",
        "--rates",
        "loopback",
        "--world-sizes",
        "2,3",
        "--max-mb",
        "1",
        "--budget",
        "0",
    )
    doc = load(results / "collectives.json")
    assert (results / "collectives.png").stat().st_size > 0
    sizes = len(doc["sizes"])  # 4 KB, 16 KB, ... 1 MB
    assert sizes == 5 and len(doc["rows"]) == 3 * sizes * 2  # primitives x sizes x world sizes
    assert all(r["seconds"] > 0 for r in doc["rows"])
    assert [m["name"] for m in doc["models"]] == ["loopback"]


def test_compress_bench_kernels(results: Path) -> None:
    run(
        "compress",
        "bench-kernels",
        "--sizes",
        "4096,16K",
        "--compressors",
        "topk,fp16",
        "--reps",
        "2",
        "--budget",
        "0",
    )
    doc = load(results / "compress_kernels.json")
    assert (results / "compress_kernels.png").stat().st_size > 0
    assert len(doc["rows"]) == 2 * 2 and all(r["GB_per_s"] > 0 for r in doc["rows"])


@pytest.mark.netem
def test_compress_bench_guards(results: Path) -> None:
    run(
        "compress",
        "bench-guards",
        "--models",
        "digits",
        "--compressors",
        "fp32,topk",
        "--rounds",
        "2",
        "--iters",
        "1",
    )
    doc = load(results / "sync_guards.json")
    assert (results / "sync_guards.png").stat().st_size > 0
    assert [(r["model"], r["compressor"]) for r in doc["rows"]] == [
        ("digits", "fp32"),
        ("digits", "topk"),
    ]
    assert all(r["samples"] == 2 and r["median_s"]["raise"] > 0 for r in doc["rows"])
    assert len(doc["load_average_before"]) == 3


def test_emulated_rates(results: Path) -> None:
    """The same commands inside rate-limited namespaces (root, ip and tc)."""
    try:
        netem.check_available()
    except netem.NetemUnavailable as exc:
        pytest.skip(str(exc))
    run(
        "compress",
        "bench",
        "--model",
        "digits",
        "--rate",
        "1gbit,200mbit",
        "--compressors",
        "fp16",
        "--warmup",
        "2",
        "--iters",
        "2",
        "--points",
        "heavy",
        "--repeats",
        "1",
    )
    runs = load(results / "compress_digits.json")["runs"]
    assert list(runs) == ["1gbit", "200mbit"]
    for run_ in runs.values():
        assert len(run_["rows"]) == 6
        assert_timed(run_["rows"], iters=2)
    run(
        "bytecomp",
        "bench",
        "--models",
        "digits",
        "--topologies",
        "2x1",
        "--rate",
        "1gbit",
        "--compressors",
        "randomk",
        "--iters",
        "2",
        "--calibration",
        "0",
        "--points",
        "heavy",
        "--repeats",
        "1",
    )
    rows = load(results / "bytecomp.json")["runs"]["2x1 digits"]["rows"]
    assert len(rows) == 4 + 5
    assert_timed(rows, iters=2)


def test_plot_legend_matches_bars_and_shows_baseline_and_bound() -> None:
    """Every bar's colour is its family's legend colour; the baseline and the bound are drawn."""
    from matplotlib.colors import to_hex  # optional: [bench]

    def row(label: str, family: str, seconds: float, **kw: Any) -> TrainingRow:
        kind = {BASELINE: "ddp", HOOK: "ddp_hook"}.get(family, "sync")
        return TrainingRow(label, kind, family, seconds, [seconds], 1.0, **kw)

    rows = [
        row("DDP fp32", BASELINE, 1.0),
        row("DDP powerSGD_hook r4", HOOK, 0.9),
        row("dgc layerwise", LAYERWISE, 0.8),
        row("dgc whole", "thrifty whole-model", 0.7, predicted_s=0.6),
        row("dgc bytecomp", "ByteComp", 0.5, predicted_s=0.45, bound_s=0.4),
    ]
    run_ = TrainingRun(rows)
    run_.compare()
    assert [r.speedup_vs_ddp for r in rows] == pytest.approx([1, 1 / 0.9, 1.25, 1 / 0.7, 2])
    result = TrainingResult("unit", "unit", {"loopback": run_}, bound_label="zero-cost bound")
    fig = draw_training(result)
    try:
        ax = fig.axes[0]
        legend = {
            t.get_text(): h
            for t, h in zip(
                ax.get_legend().get_texts(), ax.get_legend().legend_handles, strict=True
            )
        }
        colours = family_colours(rows)
        assert len(set(colours.values())) == len(colours)  # one colour per family
        for bar, r in zip(ax.patches, rows, strict=True):
            assert to_hex(bar.get_facecolor()) == to_hex(legend[r.family].get_facecolor())
        assert {"baseline: DDP fp32", "timeline prediction", "zero-cost bound"} <= set(legend)
    finally:
        import matplotlib.pyplot as plt  # optional: [bench]

        plt.close(fig)
