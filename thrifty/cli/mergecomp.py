"""`thrifty mergecomp`: MergeComp's benchmark."""

from __future__ import annotations

from typing import Annotated

import typer

from thrifty.cli.compress import run_training

app = typer.Typer(help="MergeComp: compression over merged tensor groups.")


@app.command("bench")
def mergecomp_bench(
    model: Annotated[str, typer.Option(help="cnn or gpt.")] = "cnn",
    workers: Annotated[int, typer.Option(help="Ranks (processes) on this machine.")] = 2,
    rate: Annotated[str, typer.Option(help="Comma-separated emulated rates.")] = "1gbit,10gbit",
    compressors: Annotated[
        str, typer.Option(help="Comma-separated; empty for all.")
    ] = "dgc,topk,efsignsgd",
    iters: Annotated[int, typer.Option(help="Timed iterations per configuration.")] = 4,
) -> None:
    """DDP fp32 vs layer-wise, whole-model and MergeComp, with MergeComp's search cost."""
    run_training(
        model, workers, rate, compressors, iters, ("layerwise", "whole", "mergecomp"), "mergecomp"
    )
