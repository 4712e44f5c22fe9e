"""Compressor kernel throughput: compress + decompress time vs tensor size, next to torch.clone.

For every compressor (with the options of :data:`DEFAULT_OPTIONS`) and every size
(1M, 16M and 64M float32 elements by default), one flat tensor of standard
normal values is compressed and decompressed: one warm-up, then up to ``reps``
timed repetitions (at least ``min_reps``; a point stops early once its
repetitions have taken ``budget_s``, so the 64M point costs two or three). The
median of each phase and of their sum per repetition is kept.

Throughput is *input bytes per second*: ``4 * numel / (compress + decompress)``.
``torch.clone`` of the same tensor is timed in the same run and reported the
same way (input bytes, although a clone reads and writes them): it is the
memory-bandwidth ceiling, and ``vs_clone`` is a compressor's fraction of it. A
compressor below ~1 GB/s per core costs more than a 10 Gbit/s link saves.

Timing runs on ``threads`` intra-op threads (default 1): one rank per core, as
in data-parallel training on a CPU box. With ``device="cuda"`` the GPU is
synchronised around every timed phase.

Writes ``results/compress_kernels.json`` (machine info included) and a grouped
bar chart ``results/compress_kernels.png``. Run with
``thrifty compress bench-kernels`` or ``python benchmarks/compress_kernels.py``.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from thrifty.bench.results import results_dir, write_json
from thrifty.bench.training import DEFAULT_OPTIONS  # the same options as in training
from thrifty.compressors import available_compressors, get_compressor

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_SIZES",
    "format_size",
    "parse_size",
    "plot_kernels",
    "run_kernel_benchmark",
]

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1 << 20, 16 << 20, 64 << 20)
"""Elements per tensor: 1M, 16M, 64M float32 (4, 64, 256 MiB)."""


CLONE = "torch.clone"
KEY = "bench"  # one key, so stateful compressors (DGC, PowerSGD) reach steady state

_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """Elements from ``"4096"``, ``"64K"``, ``"16M"`` or ``"1G"`` (binary multiples)."""
    raw = text.strip().upper()
    scale = _SUFFIXES.get(raw[-1:], 1)
    digits = raw[:-1] if scale > 1 else raw
    try:
        value = int(digits) * scale
    except ValueError:
        raise ValueError(
            f"bad size {text!r}: expected an element count like 4096, 64K or 16M"
        ) from None
    if value < 1:
        raise ValueError(f"bad size {text!r}: must be at least 1 element")
    return value


def format_size(numel: int) -> str:
    """``16777216`` -> ``"16M"``; counts that are not a binary multiple stay digits."""
    for suffix, scale in sorted(_SUFFIXES.items(), key=lambda kv: -kv[1]):
        if numel >= scale and numel % scale == 0:
            return f"{numel // scale}{suffix}"
    return str(numel)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _repeat(
    step: Callable[[], list[float]], reps: int, min_reps: int, budget_s: float
) -> list[list[float]]:
    """Warm up once, then run ``step`` (which returns phase times) ``min_reps..reps`` times."""
    step()
    runs: list[list[float]] = []
    spent = 0.0
    while len(runs) < reps and (len(runs) < min_reps or spent < budget_s):
        phases = step()
        runs.append(phases)
        spent += sum(phases)
    return runs


def _time_clone(
    x: torch.Tensor, sync: Callable[[], None], reps: int, min_reps: int, budget_s: float
) -> dict[str, Any]:
    def step() -> list[float]:
        sync()
        start = time.perf_counter()
        copy = torch.clone(x)
        sync()
        del copy
        return [time.perf_counter() - start]

    runs = _repeat(step, reps, min_reps, budget_s)
    seconds = statistics.median(r[0] for r in runs)
    return {
        "numel": x.numel(),
        "input_bytes": 4 * x.numel(),
        "seconds": seconds,
        "GB_per_s": 4 * x.numel() / seconds / 1e9,
        "reps": [r[0] for r in runs],
    }


def _time_compressor(
    name: str,
    options: Mapping[str, Any],
    x: torch.Tensor,
    sync: Callable[[], None],
    reps: int,
    min_reps: int,
    budget_s: float,
) -> dict[str, Any]:
    compressor = get_compressor(name, **options)
    numel = x.numel()

    def step() -> list[float]:
        sync()
        start = time.perf_counter()
        payload = compressor.compress(x, KEY)
        sync()
        middle = time.perf_counter()
        out = compressor.decompress(payload, numel, KEY)
        sync()
        end = time.perf_counter()
        del payload, out
        return [middle - start, end - middle]

    runs = _repeat(step, reps, min_reps, budget_s)
    payload_bytes = compressor.payload_nbytes(numel)
    seconds = statistics.median(c + d for c, d in runs)
    return {
        "compressor": name,
        "options": dict(options),
        "numel": numel,
        "input_bytes": 4 * numel,
        "payload_bytes": payload_bytes,
        "compression_ratio": 4 * numel / payload_bytes,
        "compress_s": statistics.median(c for c, _ in runs),
        "decompress_s": statistics.median(d for _, d in runs),
        "seconds": seconds,
        "GB_per_s": 4 * numel / seconds / 1e9,
        "reps": [c + d for c, d in runs],
    }


def run_kernel_benchmark(
    sizes: Sequence[int] = DEFAULT_SIZES,
    compressors: Sequence[str] | None = None,
    reps: int = 5,
    threads: int | None = 1,
    device: str = "cpu",
    *,
    min_reps: int = 2,
    budget_s: float = 1.0,
    check_finite: bool = True,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    plot: bool = True,
) -> dict[str, Any]:
    """Time compress + decompress of every compressor at every size, and torch.clone.

    Args:
        sizes: float32 elements per tensor.
        compressors: registry names; all of :func:`available_compressors` when None.
        reps: most timed repetitions per point (after one warm-up).
        threads: ``torch.set_num_threads`` for the run (restored after); None
            leaves PyTorch's setting.
        device: ``"cpu"`` or ``"cuda"``.
        min_reps: fewest timed repetitions; more run until ``budget_s`` is spent.
        budget_s: seconds of repetitions after which a point stops at ``min_reps``.
        check_finite: passed to every compressor; True (the library default)
            includes the NaN/Inf scan in the compress time.
        options: constructor options per compressor; :data:`DEFAULT_OPTIONS` when None.
        plot: also write ``compress_kernels.png``.

    Returns:
        The payload written to ``results/compress_kernels.json`` (``rows`` per
        compressor and size, ``clone`` per size), plus ``json_path`` and
        ``plot_path``.
    """
    names = list(available_compressors() if compressors is None else compressors)
    unknown = sorted(set(names) - set(available_compressors()))
    if unknown:
        raise ValueError(
            f"unknown compressors {unknown}; available: {', '.join(available_compressors())}"
        )
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be positive element counts, got {list(sizes)}")
    if reps < 1 or not 1 <= min_reps <= reps:
        raise ValueError(f"need 1 <= min_reps <= reps, got min_reps={min_reps}, reps={reps}")
    dev = torch.device(device) if device in ("cpu", "cuda") or device.startswith("cuda:") else None
    if dev is None:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    defaults = DEFAULT_OPTIONS if options is None else options
    chosen = {n: {**defaults.get(n, {}), "check_finite": check_finite} for n in names}
    sync = _synchronizer(dev)

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    clone_rows: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    try:
        bar = tqdm(
            total=len(sizes) * (len(names) + 1), desc="kernels", unit="point", file=sys.stderr
        )
        with bar:
            for numel in sizes:
                generator = torch.Generator().manual_seed(numel)
                x = torch.randn(numel, generator=generator).to(dev)
                bar.set_postfix_str(f"{CLONE} {format_size(numel)}")
                clone_rows.append(_time_clone(x, sync, reps, min_reps, budget_s))
                bar.update()
                clone_gbps = clone_rows[-1]["GB_per_s"]
                for name in names:
                    bar.set_postfix_str(f"{name} {format_size(numel)}")
                    row = _time_compressor(name, chosen[name], x, sync, reps, min_reps, budget_s)
                    row["vs_clone"] = row["GB_per_s"] / clone_gbps
                    rows.append(row)
                    bar.update()
                    log.info("%s %s: %.3f GB/s", name, format_size(numel), row["GB_per_s"])
                del x
    finally:
        torch.set_num_threads(previous_threads)

    payload: dict[str, Any] = {
        "device": str(dev),
        "threads": threads if threads is not None else previous_threads,
        "sizes": list(sizes),
        "compressors": names,
        "options": chosen,
        "reps": reps,
        "min_reps": min_reps,
        "budget_s": budget_s,
        "throughput": "input bytes (4 * numel) / median(compress + decompress) seconds",
        "clone": clone_rows,
        "rows": rows,
    }
    payload["json_path"] = str(write_json("compress_kernels", payload))
    if plot:
        payload["plot_path"] = str(plot_kernels(payload, results_dir() / "compress_kernels.png"))
    return payload


def plot_kernels(payload: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars of GB/s per compressor (one bar per size); torch.clone as a line per size."""
    import matplotlib  # optional: [bench]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: [bench]

    names = list(payload["compressors"])
    sizes = list(payload["sizes"])
    by_key = {(r["compressor"], r["numel"]): r["GB_per_s"] for r in payload["rows"]}
    width = 0.8 / len(sizes)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4.5))
    for j, numel in enumerate(sizes):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(names))]
        color = f"C{j}"
        heights = [by_key[(n, numel)] for n in names]
        ax.bar(xs, heights, width, color=color, label=f"{format_size(numel)} elements")
        clone = next(c for c in payload["clone"] if c["numel"] == numel)
        ax.axhline(
            clone["GB_per_s"],
            color=color,
            linestyle="--",
            linewidth=1,
            label=f"baseline: torch.clone {format_size(numel)}",
        )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("GB/s of input (compress + decompress)")
    ax.set_title(f"compressor kernels, {payload['device']}, {payload['threads']} thread(s)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
