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
    print_training,
    rates_option,
)
from thrifty.cli.params import console, str_list
from thrifty.compressors import available_compressors
from thrifty.demo import bytecomp_decision
from thrifty.mergecomp.benchmark import FAMILY as MERGECOMP
from thrifty.mergecomp.benchmark import search_planner

app = typer.Typer(help="ByteComp (Espresso): a compression strategy per tensor.")


def bytecomp_table(result: TrainingResult) -> Table:
    """Per run and compressor, ByteComp against the best other plan, the hooks and the bound.

    Every configuration's own row is in :func:`thrifty.cli.compress.training_table`;
    this is the verdict, narrow enough for an 80-column terminal.
    """
    table = Table(
        title=f"ByteComp, {result.settings['rate']} per node: the verdict",
        caption=f"s/iter, median of {result.settings.get('repeats', 1)} repetitions "
        "[fastest-slowest]; x = the other's time over ByteComp's",
    )
    columns = ("run", "comp.", "ByteComp", "best other plan", "best hook", "bound", "decide")
    for column in columns:
        table.add_column(column, justify="right")
    for r in summary_rows(result):
        measured = r["bytecomp_s"]
        low, high = r["bytecomp_spread_s"]
        others = {"best uniform": r["uniform_s"], **r["others"]}
        name, best = min(others.items(), key=lambda kv: kv[1])
        hooks = {k: v for k, v in (("fp16", r["fp16_s"]), ("PowerSGD", r["powersgd_s"])) if v}
        hook = min(hooks.items(), key=lambda kv: kv[1]) if hooks else None
        bound = r["compute_bound_s"]
        batch = (r["batch"] or {}).get("batch_size", "?")
        table.add_row(
            f"{r['topology']} {r['model']} {r['point']} (b{batch})",
            r["compressor"],
            f"[bold]{measured:.3f}[/bold] [{low:.3f}-{high:.3f}]",
            f"{name} {best:.3f} ({best / measured:.2f}x)",
            "-" if hook is None else f"{hook[0]} {hook[1]:.3f} ({hook[1] / measured:.2f}x)",
            "-" if bound is None else f"{bound:.3f} ({measured / bound:.2f}x)",
            f"{r['decide_ms']:.0f} ms",
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
    calibrate_under_load: Annotated[
        bool,
        typer.Option(
            "--calibrate-under-load/--calibrate-idle",
            help="Time the calibration's collectives while every rank also computes (or on "
            "idle cores, the default: neither predicted better here, see the README).",
        ),
    ] = False,
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
        under_load=calibrate_under_load,
        points=points_option(points),
        repeats=at_least(repeats, 1, "--repeats"),
    )
    print_training(result)
    console.print(bytecomp_table(result))


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
