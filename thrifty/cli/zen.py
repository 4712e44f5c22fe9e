"""`thrifty zen`: sparse-sync analysis and benchmark."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from thrifty.cli.params import console, float_list, int_list, str_list

app = typer.Typer(help="Zen: sparse gradient synchronisation (analysis and benchmark).")


def zen_analysis_table(payload: dict) -> Table:
    """Per workload and n: density, overlap, gamma(n), skewness, h0 imbalance, Eq. 1/2 choice."""
    table = Table(title=f"sparsity of real gradients ({payload['workers']} simulated workers, "
                        f"{payload['steps']} steps)")  # fmt: skip
    columns = ("workload", "n", "density", "overlap", "gamma(n)", "skew (n parts, union)",
               "skew (8 parts, one worker)", "h0 push/pull imbalance", "Eq.1 vs Eq.2")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for name, data in payload["workloads"].items():
        skew8 = data["skewness"][data["skewness_parts"].index(8)]
        for n, row in data["by_n"].items():
            table.add_row(
                name, n, f"{row['density']:.3%}", f"{row['overlap']:.2f}", f"{row['gamma']:.2f}",
                f"{row['union_skewness']:.2f}", f"{skew8:.2f}",
                f"{row['push_imbalance']:.2f} / {row['pull_imbalance']:.2f}",
                row["eq1_eq2_choice"],
            )  # fmt: skip
        table.add_section()
    return table


@app.command("analyze")
def zen_analyze(
    workloads: Annotated[str, typer.Option(help="Comma-separated: lstm, deepfm, gpt_dgc.")] = (
        "lstm,deepfm,gpt_dgc"
    ),
    workers: Annotated[int, typer.Option(help="Simulated data-parallel workers.")] = 16,
    steps: Annotated[int, typer.Option(help="Training steps measured.")] = 3,
    sizes: Annotated[str, typer.Option(help="Comma-separated n for gamma(n).")] = "2,4,8,16",
) -> None:
    """Density, overlap, densification gamma(n) and skewness of real sparse gradients."""
    from thrifty.zen.analysis import run_analysis

    try:
        payload = run_analysis(str_list(workloads), workers, steps, int_list(sizes))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    Console(width=max(console.width, 140)).print(zen_analysis_table(payload))
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")


def zen_bench_table(payload: dict) -> Table:
    """Per cell: each scheme's time (ms), Zen's speedups, selection vs the best baseline."""
    schemes = payload["schemes"]
    table = Table(title="sparse sync: slowest rank's time per call in ms (median of reps)")
    columns = ("rate", "n", "source", "density", "gamma", *schemes, "auto chose",
               "auto / best other", "zen vs agsparse", "zen vs dense", "zen vs omni",
               "bytes / model (worst)", "max err")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for r in payload["summary"]:
        best = r["best_baseline"]
        times = [
            f"[bold]{r['seconds'][s] * 1e3:.1f}[/bold]" if s == best else
            f"{r['seconds'][s] * 1e3:.1f}" if s in r["seconds"] else "-"
            for s in schemes
        ]  # fmt: skip
        worst = max(r["bytes_vs_model"].values(), key=lambda v: abs(v - 1), default=None)

        def ratio(key: str, row: dict = r) -> str:
            return f"{row[key]:.2f}x" if key in row else "-"

        table.add_row(
            r["rate"], str(r["nodes"]), r["source"], f"{r['density']:g}", f"{r['gamma']:.2f}",
            *times, str(r.get("auto_chose") or "-"), ratio("auto_vs_best_baseline"),
            ratio("speedup_vs_agsparse"), ratio("speedup_vs_dense"),
            ratio("speedup_vs_omnireduce"), "-" if worst is None else f"{worst:.3f}",
            f"{r['max_error']:.1e}",
        )  # fmt: skip
    return table


def zen_train_table(payload: dict) -> Table:
    table = Table(title="LSTM LM training (full cl100k embedding, sparse): median iteration")
    for column in ("rate", "n", "config", "s/iter", "tokens/s", "vs dense", "MB sent/iter"):
        table.add_column(column, justify="right")
    for run in payload["runs"].values():
        train = run.get("train") or {}
        base = train.get("dense", {}).get("iteration_s")
        for label, row in train.items():
            table.add_row(
                run["rate"], str(run["nodes"]), label, f"{row['iteration_s']:.3f}",
                f"{row['tokens_per_s']:.0f}",
                f"{base / row['iteration_s']:.2f}x" if base else "-",
                f"{row['wire_bytes_per_iter'] / 1e6:.2f}",
            )  # fmt: skip
    return table


@app.command("bench")
def zen_bench(
    nodes: Annotated[str, typer.Option(help="Comma-separated node counts (one rank each).")] = (
        "2,4,8"
    ),
    rates: Annotated[
        str, typer.Option(help="Comma-separated NIC rates; 'loopback' runs without root.")
    ] = "1gbit,10gbit",
    densities: Annotated[str, typer.Option(help="Comma-separated, e.g. 0.1%,1%,5%.")] = (
        "0.1%,1%,5%"
    ),
    sources: Annotated[
        str, typer.Option(help="Comma-separated: lstm, deepfm, gpt_dgc, uniform.")
    ] = "lstm,deepfm,gpt_dgc,uniform",
    schemes: Annotated[
        str, typer.Option(help="Comma-separated schemes; auto = Zen + selection.")
    ] = ("dense,agsparse,sparcml,omnireduce,zen,auto"),
    reps: Annotated[int, typer.Option(help="Timed calls per scheme and cell.")] = 5,
    train_iters: Annotated[int, typer.Option(help="Timed LSTM iterations (0: no training).")] = 6,
) -> None:
    """Five sparse schemes (+ selection) on emulated nodes; LSTM training throughput."""
    from thrifty.bench.netem import NetemUnavailable
    from thrifty.zen.benchmark import run_zen_benchmark

    try:
        payload = run_zen_benchmark(
            int_list(nodes), str_list(rates), float_list(densities), str_list(sources),
            str_list(schemes), reps=reps, train_iters=train_iters,
        )  # fmt: skip
    except NetemUnavailable as exc:
        console.print(f"[red]{exc}[/red] (use --rates loopback for a smoke run without root)")
        raise typer.Exit(1) from exc
    wide = Console(width=max(console.width, 180))  # a table per cell is wide; never truncate
    wide.print(zen_bench_table(payload))
    if train_iters:
        wide.print(zen_train_table(payload))
    for goal, result in payload["goals"].items():
        holds = result.get("holds", result.get("holds_2x_agsparse"))
        console.print(f"goal {goal}: {'holds' if holds else 'NOT met'} {_goal_detail(result)}")
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")


def _goal_detail(result: dict) -> str:
    keep = {
        k: v for k, v in result.items() if k not in ("holds", "outside", "violations", "slower")
    }
    return str(keep)[:400]
