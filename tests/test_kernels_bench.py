"""Kernel benchmark: JSON with machine info, GB/s beside torch.clone, wire bytes, plot, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from thrifty.bench.kernels import DEFAULT_OPTIONS, format_size, parse_size, run_kernel_benchmark
from thrifty.cli import app
from thrifty.compressors import get_compressor

SIZES = [4096, 65536]


def test_benchmark_writes_json_and_plot(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("THRIFTY_RESULTS", str(tmp_path))
    payload = run_kernel_benchmark(SIZES, ["topk", "fp16"], reps=3, threads=1, budget_s=0.0)
    doc = json.loads((tmp_path / "compress_kernels.json").read_text())
    assert doc["machine"]["torch"] and doc["machine"]["cpu_count"]
    assert doc["threads"] == 1 and doc["device"] == "cpu"
    assert (tmp_path / "compress_kernels.png").stat().st_size > 0
    assert payload["plot_path"] == str(tmp_path / "compress_kernels.png")

    assert [c["numel"] for c in doc["clone"]] == SIZES
    assert all(c["GB_per_s"] > 0 and c["seconds"] > 0 for c in doc["clone"])
    assert len(doc["rows"]) == 2 * len(SIZES)
    for row in doc["rows"]:
        assert row["GB_per_s"] > 0 and row["vs_clone"] > 0
        assert row["compress_s"] > 0 and row["decompress_s"] > 0
        assert len(row["reps"]) == 2  # min_reps, since the budget is spent at once
        compressor = get_compressor(row["compressor"], **DEFAULT_OPTIONS.get(row["compressor"], {}))
        assert row["payload_bytes"] == compressor.payload_nbytes(row["numel"])
        assert row["compression_ratio"] == pytest.approx(4 * row["numel"] / row["payload_bytes"])
        assert row["GB_per_s"] == pytest.approx(4 * row["numel"] / row["seconds"] / 1e9)
    topk = next(r for r in doc["rows"] if r["compressor"] == "topk")
    assert topk["options"]["ratio"] == 0.01


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="unknown compressors"):
        run_kernel_benchmark([4096], ["nope"], plot=False)
    with pytest.raises(ValueError, match="min_reps"):
        run_kernel_benchmark([4096], ["fp16"], reps=1, min_reps=2, plot=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            run_kernel_benchmark([4096], ["fp16"], device="cuda", plot=False)
    with pytest.raises(ValueError, match="bad size"):
        parse_size("12X")
    assert parse_size("64K") == 65536 and parse_size("16m") == 16 << 20
    assert format_size(64 << 20) == "64M" and format_size(1000) == "1000"


def test_cli_runs_with_tiny_sizes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("THRIFTY_RESULTS", str(tmp_path))
    result = CliRunner().invoke(
        app,
        [
            "compress",
            "bench-kernels",
            "--sizes",
            "4096,16K",
            "--compressors",
            "signsgd,powersgd",
            "--reps",
            "2",
            "--budget",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "torch.clone" in result.output and "powersgd" in result.output
    doc = json.loads((tmp_path / "compress_kernels.json").read_text())
    assert doc["sizes"] == [4096, 16384] and doc["compressors"] == ["signsgd", "powersgd"]
    bad = CliRunner().invoke(app, ["compress", "bench-kernels", "--sizes", "lots"])
    assert bad.exit_code != 0 and "bad size" in bad.output
