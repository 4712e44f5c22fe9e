"""`thrifty mergecomp`: MergeComp's benchmark (parse, call, print the table)."""

from __future__ import annotations

from typing import Annotated

import typer

from thrifty.cli.compress import (
    POINTS_HELP,
    RATES_HELP,
    REPEATS_HELP,
    at_least,
    compressors_option,
    model_option,
    points_option,
    print_training,
    rates_option,
)
from thrifty.mergecomp.benchmark import run_mergecomp_benchmark

app = typer.Typer(help="MergeComp: compression over merged tensor groups.")


@app.command("bench")
def mergecomp_bench(
    model: Annotated[str, typer.Option(help="cnn, gpt or digits.")] = "cnn",
    workers: Annotated[int, typer.Option(help="Ranks (processes) on this machine.")] = 2,
    rate: Annotated[str, typer.Option(help=RATES_HELP)] = "1gbit,10gbit",
    compressors: Annotated[
        str, typer.Option(help="Comma-separated; empty for all.")
    ] = "dgc,topk,efsignsgd",
    mode: Annotated[
        str, typer.Option(help="hybrid (model candidates, then measured) or online (measured).")
    ] = "hybrid",
    warmup: Annotated[int, typer.Option(help="Untimed iterations per configuration.")] = 3,
    iters: Annotated[int, typer.Option(help="Timed iterations per configuration.")] = 4,
    points: Annotated[str, typer.Option(help=POINTS_HELP)] = "heavy,gpu-like",
    repeats: Annotated[int, typer.Option(help=REPEATS_HELP)] = 3,
) -> None:
    """The compute bound, DDP fp32 and its hooks vs layer-wise, whole-model and MergeComp,
    with MergeComp's search cost."""
    if mode not in ("hybrid", "online"):
        raise typer.BadParameter(f"{mode!r}: expected hybrid or online", param_hint="'--mode'")
    result = run_mergecomp_benchmark(
        model_option(model),
        at_least(workers, 1, "--workers"),
        rates_option(rate),
        compressors_option(compressors),
        at_least(warmup, 0, "--warmup"),
        at_least(iters, 1, "--iters"),
        mode=mode,
        points=points_option(points),
        repeats=at_least(repeats, 1, "--repeats"),
    )
    print_training(result)
