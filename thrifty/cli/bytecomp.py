"""`thrifty bytecomp`: ByteComp's benchmarks and decisions."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from thrifty.cli.params import console

app = typer.Typer(help="ByteComp (Espresso): a compression strategy per tensor.")


def _bytecomp_table(payload: dict) -> Table:
    from thrifty.bytecomp.benchmark import summary_rows

    table = Table(title=f"ByteComp, {payload['rate']} per node: seconds per iteration (measured)")
    columns = ("nodes x ranks", "model", "compressor", "DDP fp32", "PowerSGD hook",
               "best uniform", "MergeComp", "ByteComp", "ByteComp predicted", "zero-cost bound",
               "decide ms")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for r in summary_rows(payload):
        best_other = min(r["uniform_s"], r["mergecomp_s"])
        table.add_row(
            r["topology"], r["model"], r["compressor"], f"{r['ddp_s']:.3f}",
            f"{r['powersgd_s']:.3f}", f"{r['uniform_s']:.3f}", f"{r['mergecomp_s']:.3f}",
            f"[bold]{r['bytecomp_s']:.3f}[/bold] ({best_other / r['bytecomp_s']:.2f}x)",
            f"{r['bytecomp_predicted_s']:.3f} "
            f"({(r['bytecomp_predicted_s'] - r['bytecomp_s']) / r['bytecomp_s']:+.0%})",
            f"{r['zero_cost_bound_s']:.3f}", f"{r['decide_ms']:.0f}",
        )  # fmt: skip
    return table


@app.command("bench")
def bytecomp_bench(
    models: Annotated[str, typer.Option(help="Comma-separated: cnn, gpt.")] = "cnn,gpt",
    topologies: Annotated[
        str, typer.Option(help="Comma-separated nodes x ranks, e.g. 2x2,1x2.")
    ] = "2x2,1x2",
    rate: Annotated[str, typer.Option(help="Emulated rate of each node's NIC.")] = "1gbit",
    compressors: Annotated[str, typer.Option(help="Comma-separated.")] = "randomk,dgc,efsignsgd",
    iters: Annotated[int, typer.Option(help="Timed iterations per configuration.")] = 4,
) -> None:
    """DDP, PowerSGD hook, best uniform strategy, MergeComp and ByteComp, side by side."""
    from thrifty.bytecomp.benchmark import run_bytecomp_benchmark

    shapes = []
    for item in topologies.split(","):
        try:
            nodes, k = (int(x) for x in item.strip().lower().split("x"))
        except ValueError:
            raise typer.BadParameter(f"topology {item!r}: expected NODESxRANKS, e.g. 2x2") from None
        shapes.append((nodes, k))
    payload = run_bytecomp_benchmark(
        [m.strip() for m in models.split(",") if m.strip()],
        shapes,
        rate,
        [c.strip() for c in compressors.split(",") if c.strip()],
        iters=iters,
    )
    console.print(_bytecomp_table(payload))
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")


@app.command("bench-selection")
def bytecomp_bench_selection(
    layers: Annotated[int, typer.Option(help="GPT blocks (25: 304 tensors).")] = 25,
    reps: Annotated[int, typer.Option(help="Runs per setting (median kept).")] = 5,
) -> None:
    """Time ByteComp's decision for a ~300-tensor model (paper's algorithms, and refined)."""
    from thrifty.bytecomp.benchmark import run_selection_benchmark

    payload = run_selection_benchmark(layers=layers, reps=reps)
    table = Table(title=f"ByteComp decision time, {payload['tensors']} tensors, 2x2 ranks")
    for column in ("compressor", "algorithm", "units", "decide ms", "predicted s", "fp32 s"):
        table.add_column(column, justify="right")
    for r in payload["rows"]:
        algorithm = ("Alg. 1+2 + refinement" if r["refine"] else "Alg. 1+2") + (
            ", buckets" if r["buckets"] == "auto" else ", per tensor"
        )
        table.add_row(r["compressor"], algorithm, str(r["units"]), f"{r['decide_ms']:.0f}",
                      f"{r['predicted_s']:.3f}", f"{r['fp32_s']:.3f}")  # fmt: skip
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
    from thrifty.demo import bytecomp_decision

    console.print(bytecomp_decision(model, compressor, nodes, ranks_per_node, rate))
