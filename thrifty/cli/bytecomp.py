"""`thrifty bytecomp`: ByteComp's benchmarks and decisions (parse, call, print tables)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from thrifty.bench.netem import parse_rate
from thrifty.bench.training import LOOPBACK, TrainingResult
from thrifty.bytecomp.benchmark import (
    check_topologies,
    run_bytecomp_benchmark,
    run_selection_benchmark,
    summary_rows,
)
from thrifty.cli.compress import (
    POINTS_HELP,
    REPEATS_HELP,
    at_least,
    compressors_option,
    model_option,
    points_option,
    rates_option,
)
from thrifty.cli.params import console, str_list
from thrifty.compressors import available_compressors
from thrifty.demo import bytecomp_decision
from thrifty.mergecomp.benchmark import FAMILY as MERGECOMP
from thrifty.mergecomp.benchmark import search_planner

app = typer.Typer(help="ByteComp (Espresso): a compression strategy per tensor.")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def bytecomp_table(result: TrainingResult) -> Table:
    """Per (topology, model, compressor): every configuration's measured s/iter, and bounds."""
    rows = summary_rows(result)
    others = list(dict.fromkeys(name for r in rows for name in r["others"]))
    table = Table(
        title=f"ByteComp, {result.settings['rate']} per node: seconds per iteration (measured)",
        caption=f"median of {result.settings.get('repeats', 1)} repetitions; "
        "ByteComp: [fastest-slowest] (x the best other plan)",
    )
    columns = (
        "nodes x ranks",
        "model",
        "point (batch)",
        "compressor",
        "compute bound",
        "DDP fp32",
        "fp16 hook",
        "PowerSGD hook",
        "best uniform",
        *others,
        "ByteComp",
        "ByteComp predicted",
        "zero-cost bound",
        "decide ms",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for r in rows:
        best_other = min([r["uniform_s"], *r["others"].values()])
        predicted, measured = r["bytecomp_predicted_s"], r["bytecomp_s"]
        low, high = r["bytecomp_spread_s"]
        batch = (r["batch"] or {}).get("batch_size", "?")
        table.add_row(
            r["topology"],
            r["model"],
            f"{r['point']} ({batch})",
            r["compressor"],
            _seconds(r["compute_bound_s"]),
            _seconds(r["ddp_s"]),
            _seconds(r["fp16_s"]),
            _seconds(r["powersgd_s"]),
            _seconds(r["uniform_s"]),
            *(_seconds(r["others"].get(name)) for name in others),
            f"[bold]{measured:.3f}[/bold] [{low:.3f}-{high:.3f}] ({best_other / measured:.2f}x)",
            f"{predicted:.3f} ({(predicted - measured) / measured:+.0%})",
            _seconds(r["zero_cost_bound_s"]),
            f"{r['decide_ms']:.0f}",
        )
    return table


def _topologies(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in str_list(text):
        try:
            nodes, k = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise typer.BadParameter(
                f"topology {item!r}: expected NODESxRANKS, e.g. 2x2", param_hint="'--topologies'"
            ) from None
        shapes.append((nodes, k))
    return shapes


@app.command("bench")
def bytecomp_bench(
    models: Annotated[str, typer.Option(help="Comma-separated: cnn, gpt, digits.")] = "cnn,gpt",
    topologies: Annotated[
        str,
        typer.Option(
            help="Comma-separated nodes x ranks, e.g. 2x2,1x2 "
            "(several nodes need an emulated rate)."
        ),
    ] = "2x2,1x2",
    rate: Annotated[
        str,
        typer.Option(
            help=f"Each node's NIC, e.g. 1gbit (root, ip and tc), or '{LOOPBACK}' "
            "(one node on the plain loopback, no emulation)."
        ),
    ] = "1gbit",
    compressors: Annotated[str, typer.Option(help="Comma-separated.")] = "randomk,dgc,efsignsgd",
    warmup: Annotated[int, typer.Option(help="Untimed iterations per configuration.")] = 2,
    iters: Annotated[int, typer.Option(help="Timed iterations per configuration.")] = 4,
    calibration: Annotated[
        float, typer.Option(help="Seconds of repetitions per calibration point.")
    ] = 0.3,
    points: Annotated[str, typer.Option(help=POINTS_HELP)] = "heavy,gpu-like",
    repeats: Annotated[int, typer.Option(help=REPEATS_HELP)] = 3,
) -> None:
    """DDP, PowerSGD hook, best uniform strategy, MergeComp and ByteComp, side by side."""
    shapes = _topologies(topologies)
    rates = rates_option(rate)
    if len(rates) != 1:
        raise typer.BadParameter(f"{rate!r}: expected one rate", param_hint="'--rate'")
    try:
        check_topologies(shapes, rates[0])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--topologies'") from exc
    names = [model_option(name, "--models") for name in str_list(models)]
    if not names:
        raise typer.BadParameter("expected at least one model", param_hint="'--models'")
    result = run_bytecomp_benchmark(
        names,
        shapes,
        rates[0],
        compressors_option(compressors),
        at_least(warmup, 0, "--warmup"),
        at_least(iters, 1, "--iters"),
        comparisons={MERGECOMP: search_planner},
        calibration_s=calibration,
        points=points_option(points),
        repeats=at_least(repeats, 1, "--repeats"),
    )
    console.print(bytecomp_table(result))
    console.print(f"wrote {result.json_path} and {result.plot_path}")


@app.command("bench-selection")
def bytecomp_bench_selection(
    layers: Annotated[int, typer.Option(help="GPT blocks (25: 304 tensors).")] = 25,
    reps: Annotated[int, typer.Option(help="Runs per setting (median kept).")] = 5,
    compressors: Annotated[str, typer.Option(help="Comma-separated.")] = "randomk,dgc,efsignsgd",
    rate: Annotated[
        str, typer.Option(help="Inter-node rate of the analytic 2x2 topology (no emulation).")
    ] = "100mbit",
) -> None:
    """Time ByteComp's decision for a ~300-tensor model (paper's algorithms, and refined)."""
    try:
        parse_rate(rate)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--rate'") from exc
    payload = run_selection_benchmark(
        layers=at_least(layers, 1, "--layers"),
        compressors=compressors_option(compressors),
        rate=rate,
        reps=at_least(reps, 1, "--reps"),
    )
    table = Table(title=f"ByteComp decision time, {payload['tensors']} tensors, 2x2 ranks")
    for column in ("compressor", "algorithm", "units", "decide ms", "predicted s", "fp32 s"):
        table.add_column(column, justify="right")
    for r in payload["rows"]:
        algorithm = ("Alg. 1+2 + refinement" if r["refine"] else "Alg. 1+2") + (
            ", buckets" if r["buckets"] == "auto" else ", per tensor"
        )
        table.add_row(
            r["compressor"],
            algorithm,
            str(r["units"]),
            f"{r['decide_ms']:.0f}",
            f"{r['predicted_s']:.3f}",
            f"{r['fp32_s']:.3f}",
        )
    console.print(table)
    console.print(f"wrote {payload['json_path']}")


@app.command("decide")
def bytecomp_decide(
    model: Annotated[str, typer.Option(help="cnn, gpt or digits.")] = "cnn",
    compressor: Annotated[str, typer.Option(help="Compressor registry name.")] = "randomk",
    nodes: Annotated[int, typer.Option(help="Nodes.")] = 2,
    ranks_per_node: Annotated[int, typer.Option(help="Ranks per node.")] = 2,
    rate: Annotated[str, typer.Option(help="Inter-node rate (analytic model).")] = "1gbit",
) -> None:
    """Profile a model here and print ByteComp's decision for an analytic topology."""
    try:
        parse_rate(rate)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--rate'") from exc
    if compressor not in available_compressors():
        raise typer.BadParameter(
            f"unknown compressor {compressor!r}; expected one of "
            f"{', '.join(available_compressors())}",
            param_hint="'--compressor'",
        )
    console.print(
        bytecomp_decision(
            model_option(model),
            compressor,
            at_least(nodes, 1, "--nodes"),
            at_least(ranks_per_node, 1, "--ranks-per-node"),
            rate,
        )
    )
