"""`thrifty compress`: compressor kernels and end-to-end training benchmarks."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from thrifty.cli.params import console

app = typer.Typer(help="Gradient compression: kernels and end-to-end training benchmarks.")


@app.command("bench-kernels")
def compress_bench_kernels(
    sizes: Annotated[
        str, typer.Option(help="Comma-separated float32 element counts, e.g. 4096,64K,16M.")
    ] = "1M,16M,64M",
    compressors: Annotated[
        str, typer.Option(help="Comma-separated registry names; empty for all.")
    ] = "",
    reps: Annotated[int, typer.Option(help="Most timed repetitions per point.")] = 5,
    min_reps: Annotated[int, typer.Option(help="Fewest timed repetitions per point.")] = 2,
    budget: Annotated[
        float, typer.Option(help="Seconds of repetitions after which a point stops at min-reps.")
    ] = 1.0,
    threads: Annotated[
        int, typer.Option(help="torch intra-op threads (1 = one rank per core).")
    ] = 1,
    device: Annotated[str, typer.Option(help="cpu, or cuda when a GPU is available.")] = "cpu",
    check_finite: Annotated[
        bool, typer.Option(help="Include the compressors' NaN/Inf check (library default).")
    ] = True,
) -> None:
    """Time every compressor's compress + decompress vs size, beside torch.clone (GB/s)."""
    from thrifty.bench.kernels import parse_size, run_kernel_benchmark

    try:
        numels = [parse_size(s) for s in sizes.split(",") if s.strip()]
        names = [c.strip() for c in compressors.split(",") if c.strip()] or None
        payload = run_kernel_benchmark(
            numels,
            names,
            reps,
            threads,
            device,
            min_reps=min_reps,
            budget_s=budget,
            check_finite=check_finite,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    table = _kernels_table(payload)
    console.print(table)
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")


def _kernels_table(payload: dict) -> Table:
    """One row per (size, compressor), torch.clone first in each size's section."""
    from rich import box

    from thrifty.bench.kernels import format_size

    table = Table(
        title=f"compress + decompress, {payload['device']}, {payload['threads']} thread(s)",
        caption="clone = torch.clone; GB/s = 4 numel / (comp. + decomp.); "
        "ratio = 4 numel / wire bytes",
        box=box.SIMPLE_HEAD,
    )
    columns = (
        "compressor",
        "size",
        "comp.\nms",
        "decomp.\nms",
        "GB/s",
        "x clone",
        "wire\nbytes",
        "ratio",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "compressor" else "right")
    for numel in payload["sizes"]:
        clone = next(c for c in payload["clone"] if c["numel"] == numel)
        table.add_row(
            "[bold]clone[/bold]",
            format_size(numel),
            f"{clone['seconds'] * 1e3:.1f}",
            "",
            f"[bold]{clone['GB_per_s']:.3f}[/bold]",
            "1",
            str(clone["input_bytes"]),
            "1",
        )
        for row in (r for r in payload["rows"] if r["numel"] == numel):
            table.add_row(
                row["compressor"],
                format_size(numel),
                f"{row['compress_s'] * 1e3:.1f}",
                f"{row['decompress_s'] * 1e3:.1f}",
                f"{row['GB_per_s']:.3f}",
                f"{row['vs_clone']:.3f}",
                str(row["payload_bytes"]),
                f"{row['compression_ratio']:.4g}",
            )
        table.add_section()
    return table


def training_table(payload: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("rate", "configuration", "s/iter", "vs DDP fp32", "MB sent/iter", "predicted"):
        table.add_column(column, justify="right")
    for rate, result in payload["rates"].items():
        for row in result["rows"]:
            sent = row.get("wire_bytes_per_iter")
            pred = row.get("predicted_s")
            table.add_row(
                rate,
                row["label"],
                f"{row['iteration_s']:.3f}",
                f"{row['speedup_vs_ddp']:.2f}x",
                "-" if sent is None else f"{sent / 1e6:.2f}",
                "-" if pred is None else f"{pred:.3f} ({row['prediction_error']:+.0%})",
            )
    return table


def run_training(
    model: str,
    workers: int,
    rates: str,
    compressors: str,
    iters: int,
    plans: tuple[str, ...],
    name: str,
) -> None:
    from thrifty.bench.training import run_training_benchmark

    chosen = [c.strip() for c in compressors.split(",") if c.strip()] or None
    payload = run_training_benchmark(
        model,
        workers,
        [r.strip() for r in rates.split(",")],
        chosen,
        iters=iters,
        plans=plans,
        name=name,
    )
    console.print(training_table(payload, f"{model}, {workers} workers: iteration time"))
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")


@app.command("bench")
def compress_bench(
    model: Annotated[str, typer.Option(help="cnn (ResNet-style, ~10M) or gpt (~19M).")] = "cnn",
    workers: Annotated[int, typer.Option(help="Ranks (processes) on this machine.")] = 2,
    rate: Annotated[
        str, typer.Option(help="Comma-separated emulated rates, e.g. 1gbit,200mbit.")
    ] = "1gbit",
    compressors: Annotated[str, typer.Option(help="Comma-separated; empty for all.")] = "",
    iters: Annotated[int, typer.Option(help="Timed iterations per configuration.")] = 4,
) -> None:
    """DDP fp32, DDP + powerSGD_hook, thrifty layer-wise and whole-model per compressor."""
    run_training(model, workers, rate, compressors, iters, ("layerwise", "whole"), "compress")
