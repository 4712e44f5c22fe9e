"""`thrifty bench`: measurements of the substrates."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from thrifty.bench.collectives import DEFAULT_SIZES, run_benchmark, run_from_env, summary_rows
from thrifty.bench.training import LOOPBACK, check_rates
from thrifty.cli.params import console, int_list, str_list

app = typer.Typer(help="Measurements of the substrates (results/*.json + plots).")


@app.command("collectives")
def bench_collectives(
    rates: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated: '{LOOPBACK}' (plain loopback, no emulation) and/or "
            "emulated rates like 1gbit (root, ip and tc; skipped otherwise)."
        ),
    ] = "loopback,10gbit,1gbit",
    world_sizes: Annotated[str, typer.Option(help="Comma-separated world sizes.")] = "2,4",
    max_mb: Annotated[
        int, typer.Option(help="Largest message in MB (4 KB to this, x4 steps).")
    ] = 64,
    budget: Annotated[float, typer.Option(help="Seconds of repetitions per point (min 3).")] = 0.5,
    from_env: Annotated[
        bool,
        typer.Option(
            "--from-env",
            help="Measure the real network of a torchrun job (run on every rank with "
            "`torchrun ... --no-python thrifty bench collectives --from-env`).",
        ),
    ] = False,
) -> None:
    """Time all-reduce / all-gather / all-to-all vs size and fit the NetworkModel."""
    sizes = [s for s in DEFAULT_SIZES if s <= max_mb << 20]
    if not sizes:
        raise typer.BadParameter(f"{max_mb}: expected >= 1 (MB)", param_hint="'--max-mb'")
    if budget < 0:
        raise typer.BadParameter(f"{budget}: expected >= 0 seconds", param_hint="'--budget'")
    if from_env:
        payload = run_from_env(sizes, budget)
        if payload is None:  # not rank 0
            return
    else:
        chosen = str_list(rates)
        try:
            check_rates(chosen)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--rates'") from exc
        ranks = int_list(world_sizes)
        if not ranks or min(ranks) < 2:
            raise typer.BadParameter(
                f"{world_sizes!r}: expected world sizes >= 2", param_hint="'--world-sizes'"
            )
        payload = run_benchmark(chosen, ranks, sizes, budget)
    table = Table(title="fit per primitive: time = max(floor, alpha + bytes on wire / bandwidth)")
    columns = (
        "rate",
        "primitive",
        "ranks",
        "floor (us)",
        "alpha (us)",
        "GB/s per rank",
        "max err >= 1MB",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for row in summary_rows(payload):
        err = row["max_err_ge_1MB"]
        table.add_row(
            row["rate"],
            row["primitive"],
            str(row["world_size"]),
            f"{row['floor_us']:.0f}",
            f"{row['alpha_us']:.0f}",
            f"{row['GB_per_s']:.3f}",
            "-" if err is None else f"{err:.1%}",
        )
    console.print(table)
    for rate, reason in payload["skipped_rates"].items():
        console.print(f"[yellow]skipped {rate}: {reason}[/yellow]")
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")
