"""The `thrifty` command: version, help, demo, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import thrifty
from thrifty.cli import app

runner = CliRunner()


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and thrifty.__version__ in result.output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output and "bench" in result.output


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "thrifty"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"thrifty {thrifty.__version__}"


def test_demo_prints_the_summary_table() -> None:
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "thrifty tour" in result.output
    assert "all-reduce" in result.output and "MiB sent/rank" in result.output
    assert "ByteComp" in result.output


def test_bytecomp_decide_prints_a_decision_for_a_real_model() -> None:
    result = runner.invoke(
        app, ["bytecomp", "decide", "--model", "digits", "--rate", "10mbit", "--compressor", "dgc"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "digits (8 tensors, dgc) on 2x2 ranks at 10mbit" in text
    assert "dgc(ratio=0.01)" in text  # at 10 Mbit/s compression pays
    assert "Predicted" in text and "zero-cost compression bound" in text


def test_bad_bytecomp_topology_is_rejected() -> None:
    result = runner.invoke(app, ["bytecomp", "bench", "--topologies", "2by2"])
    assert result.exit_code != 0
    assert "NODESxRANKS" in result.output


def test_bad_world_sizes_are_rejected() -> None:
    result = runner.invoke(app, ["bench", "collectives", "--world-sizes", "two"])
    assert result.exit_code != 0
    assert "comma-separated integers" in result.output


def test_benchmark_flags_with_bad_values_are_blamed_by_name() -> None:
    """A bad value is the user's error: exit 2 naming the flag, before any rank starts."""
    cases = [
        (
            ["compress", "bench", "--rate", "loopback", "--compressors", "fp16,nope"],
            "--compressors",
        ),
        (["compress", "bench", "--rate", "loopback", "--model", "resnet"], "--model"),
        (["compress", "bench", "--rate", "fast"], "--rate"),
        (["compress", "bench", "--rate", "loopback", "--iters", "0"], "--iters"),
        (["compress", "bench", "--rate", "loopback", "--points", "tpu"], "--points"),
        (["mergecomp", "bench", "--rate", "loopback", "--repeats", "0"], "--repeats"),
        (["compress", "bench-kernels", "--compressors", "nope"], "--compressors"),
        (["mergecomp", "bench", "--rate", "loopback", "--mode", "greedy"], "--mode"),
        (["mergecomp", "bench", "--rate", "loopback", "--compressors", "nope"], "--compressors"),
        (["bytecomp", "bench", "--rate", "loopback", "--topologies", "2x2"], "--topologies"),
        (
            ["bytecomp", "bench", "--rate", "loopback", "--topologies", "1x2", "--models", "vit"],
            "--models",
        ),
        (["bytecomp", "bench-selection", "--compressors", "nope"], "--compressors"),
        (["bytecomp", "decide", "--compressor", "nope"], "--compressor"),
        (["bytecomp", "decide", "--model", "vit"], "--model"),
        (["bench", "collectives", "--rates", "loopback,fast"], "--rates"),
    ]
    for args, flag in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"'{flag}'" in result.output, (args, result.output)
