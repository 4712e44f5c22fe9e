"""`thrifty zen`: sparse-sync analysis and benchmark (parse, call, print tables)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from thrifty.bench.netem import NetemUnavailable, parse_rate
from thrifty.cli.params import console, float_list, int_list, str_list
from thrifty.zen.benchmark import (
    GridError,
    check_grid,
    run_analysis,
    run_simulation,
    run_zen_benchmark,
)
from thrifty.zen.scaling import (
    KNOWN_SOURCES,
    SIM_NODES,
    SIM_RATES,
    SIM_SOURCES,
    describe_crossover,
)
from thrifty.zen.workloads import WORKLOADS

app = typer.Typer(help="Zen: sparse gradient synchronisation (analysis, benchmark, simulator).")


def zen_analysis_table(payload: dict[str, Any]) -> Table:
    """Per workload and n: density, overlap, gamma(n), skewness, h0 imbalance, Eq. 1/2 choice."""
    workers, steps = payload["workers"], payload["steps"]
    table = Table(title=f"sparsity of real gradients ({workers} simulated workers, {steps} steps)")
    columns = (
        "workload",
        "n",
        "density",
        "overlap",
        "gamma(n)",
        "skew (n parts, union)",
        "skew (8 parts, one worker)",
        "h0 push/pull imbalance",
        "Eq.1 vs Eq.2",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for name, data in payload["workloads"].items():
        skew8 = data["skewness"][data["skewness_parts"].index(8)]
        for n, row in data["by_n"].items():
            table.add_row(
                name,
                n,
                f"{row['density']:.3%}",
                f"{row['overlap']:.2f}",
                f"{row['gamma']:.2f}",
                f"{row['union_skewness']:.2f}",
                f"{skew8:.2f}",
                f"{row['push_imbalance']:.2f} / {row['pull_imbalance']:.2f}",
                row["eq1_eq2_choice"],
            )
        table.add_section()
    return table


@app.command("analyze")
def zen_analyze(
    workloads: Annotated[
        str, typer.Option(help=f"Comma-separated, some of: {', '.join(WORKLOADS)}.")
    ] = ",".join(WORKLOADS),
    workers: Annotated[int, typer.Option(min=2, help="Simulated data-parallel workers.")] = 16,
    steps: Annotated[int, typer.Option(min=1, help="Training steps measured.")] = 3,
    sizes: Annotated[str, typer.Option(help="Comma-separated n for gamma(n).")] = "2,4,8,16",
) -> None:
    """Density, overlap, densification gamma(n) and skewness of real sparse gradients."""
    names = str_list(workloads)
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown workload {(unknown or [''])[0]!r}; expected some of {WORKLOADS}",
            param_hint="'--workloads'",
        )
    ns = int_list(sizes)
    if not ns or min(ns) < 2:
        raise typer.BadParameter(f"sizes must be >= 2, got {sizes!r}", param_hint="'--sizes'")
    payload = run_analysis(names, workers, steps, ns)
    Console(width=max(console.width, 140)).print(zen_analysis_table(payload))
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")


def zen_bench_table(payload: dict[str, Any]) -> Table:
    """Per cell: each scheme's time (ms), Zen's speedups, selection vs the best baseline."""
    schemes = payload["schemes"]
    table = Table(title="sparse sync: slowest rank's time per call in ms (median of reps)")
    columns = (
        "rate",
        "n",
        "source",
        "density",
        "gamma",
        *schemes,
        "auto chose",
        "auto / best other",
        "auto's choice / best",
        "zen vs agsparse",
        "zen vs dense",
        "zen vs omni",
        "bytes / model (worst)",
        "max err",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for r in payload["summary"]:
        times = []
        for s in schemes:
            ms = f"{r['seconds'][s] * 1e3:.1f}" if s in r["seconds"] else "-"
            times.append(f"[bold]{ms}[/bold]" if s == r["best_baseline"] else ms)
        worst = max(r["bytes_vs_model"].values(), key=lambda v: abs(v - 1), default=None)

        def ratio(key: str, row: dict[str, Any] = r) -> str:
            return f"{row[key]:.2f}x" if key in row else "-"

        table.add_row(
            r["rate"],
            str(r["nodes"]),
            r["source"],
            f"{r['density']:g}",
            f"{r['gamma']:.2f}",
            *times,
            str(r.get("auto_chose") or "-"),
            ratio("auto_vs_best_scheme"),
            ratio("auto_choice_vs_best"),
            ratio("speedup_vs_agsparse"),
            ratio("speedup_vs_dense"),
            ratio("speedup_vs_omnireduce"),
            "-" if worst is None else f"{worst:.3f}",
            f"{r['max_error']:.1e}",
        )
    return table


def zen_train_table(payload: dict[str, Any]) -> Table:
    table = Table(title="LSTM LM training (full cl100k embedding, sparse): median iteration")
    for column in ("rate", "n", "config", "s/iter", "tokens/s", "vs dense", "MB sent/iter"):
        table.add_column(column, justify="right")
    for run in payload["runs"].values():
        train = run.get("train") or {}
        base = train.get("dense", {}).get("iteration_s")
        for label, row in train.items():
            table.add_row(
                run["rate"],
                str(run["nodes"]),
                label,
                f"{row['iteration_s']:.3f}",
                f"{row['tokens_per_s']:.0f}",
                f"{base / row['iteration_s']:.2f}x" if base else "-",
                f"{row['wire_bytes_per_iter'] / 1e6:.2f}",
            )
    return table


@app.command("bench")
def zen_bench(
    nodes: Annotated[
        str, typer.Option(help="Comma-separated node counts (one rank each).")
    ] = "2,4,8",
    rates: Annotated[
        str,
        typer.Option(help="Comma-separated NIC rates (root); 'loopback': no rate limit, no root."),
    ] = "1gbit,10gbit",
    densities: Annotated[
        str, typer.Option(help="Comma-separated, e.g. 0.1%,1%,5%.")
    ] = "0.1%,1%,5%",
    sources: Annotated[
        str, typer.Option(help="Comma-separated: lstm, deepfm, gpt_dgc, transformer, uniform.")
    ] = "lstm,deepfm,gpt_dgc,uniform",
    schemes: Annotated[
        str, typer.Option(help="Comma-separated schemes; auto = Zen + selection.")
    ] = "dense,agsparse,sparcml,omnireduce,zen,auto",
    reps: Annotated[int, typer.Option(min=1, help="Timed calls per scheme and cell.")] = 5,
    train_iters: Annotated[
        int, typer.Option(min=0, help="Timed LSTM iterations (0: no training).")
    ] = 6,
) -> None:
    """Five sparse schemes (+ selection) on emulated nodes; LSTM training throughput."""
    grid = {
        "nodes": int_list(nodes),
        "rates": str_list(rates),
        "densities": float_list(densities),
        "sources": str_list(sources),
        "schemes": str_list(schemes),
    }
    try:
        check_grid(**grid)
    except GridError as exc:
        raise typer.BadParameter(str(exc), param_hint=f"'--{exc.setting}'") from exc
    try:
        payload = run_zen_benchmark(**grid, reps=reps, train_iters=train_iters)
    except NetemUnavailable as exc:
        message = f"{exc} (use --rates loopback for a run without root)"
        raise typer.BadParameter(message, param_hint="'--rates'") from exc
    wide = Console(width=max(console.width, 180))  # a table per cell is wide; never truncate
    wide.print(zen_bench_table(payload))
    if train_iters:
        wide.print(zen_train_table(payload))
    for goal, result in payload["goals"].items():
        verdict = "holds" if result["holds"] else "NOT met"
        console.print(f"goal {goal}: {verdict} {_goal_detail(result)}")
    simulator = payload.get("simulator") or {}
    if "median_abs_error" in simulator:
        console.print(
            f"simulator vs these runs: median |error| {simulator['median_abs_error']:.1%}, "
            f"{simulator['within_15pct']} of {simulator['predictions']} within 15% "
            f"(local work from loopback; with the fitted compute model: median "
            f"{simulator['compute_model']['median_abs_error']:.1%})"
        )
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")


def _goal_detail(result: dict[str, Any]) -> str:
    """The goal's numbers, without its verdict and its (long) lists of offending rows."""
    listed = ("holds", "outside", "violations", "slower")
    return str({k: v for k, v in result.items() if k not in listed})[:400]


def zen_simulate_table(payload: dict[str, Any]) -> Table:
    """Per source and rate: gamma at the largest n, Zen's 2x crossovers and speedups."""
    table = Table(
        title=f"simulated sync, density {payload['density']:g}: "
        "from which n is Zen >= 2x faster (and its speedup at 16 nodes / the largest n)"
    )
    columns = (
        "source",
        "rate",
        "gamma(max n)",
        "2x AGsparse from",
        "2x SparCML from",
        "2x OmniReduce from",
        "vs AGsparse @16 / max",
        "vs SparCML @16 / max",
        "vs Omni @16 / max",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for row in describe_crossover(payload):
        at16, at_max = row["speedup_at_16"] or {}, row["speedup_at_max"]

        def pair(scheme: str, a: dict[str, float] = at16, b: dict[str, float] = at_max) -> str:
            first = f"{a[scheme]:.2f}x" if scheme in a else "-"
            return f"{first} / {b[scheme]:.2f}x" if scheme in b else first

        cross = row["crossover_2x"]
        table.add_row(
            row["source"],
            row["rate"],
            f"{row['gamma_at_max']:.1f}",
            *(str(cross.get(s) or "never") for s in ("agsparse", "sparcml", "omnireduce")),
            pair("agsparse"),
            pair("sparcml"),
            pair("omnireduce"),
        )
    return table


@app.command("simulate")
def zen_simulate(
    sources: Annotated[
        str, typer.Option(help=f"Comma-separated, some of: {', '.join(KNOWN_SOURCES)}.")
    ] = ",".join(SIM_SOURCES),
    density: Annotated[str, typer.Option(help="Each rank's density, e.g. 1% or 0.01.")] = "1%",
    nodes: Annotated[
        str, typer.Option(help="Comma-separated node counts; index sets of max(nodes) ranks.")
    ] = ",".join(str(n) for n in SIM_NODES),
    rates: Annotated[str, typer.Option(help="Comma-separated NIC rates.")] = ",".join(SIM_RATES),
    calibration: Annotated[
        str | None,
        typer.Option(help="A zen_bench.json with a fitted simulator: its latencies are used."),
    ] = None,
    compute: Annotated[
        bool, typer.Option(help="Add this machine's local work (one core per node).")
    ] = False,
) -> None:
    """Predicted sync time per scheme for n up to 256 nodes from real sparsity; Zen's crossovers."""
    names = str_list(sources)
    unknown = [name for name in names if name not in KNOWN_SOURCES]
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown source {(unknown or [''])[0]!r}; expected some of {KNOWN_SOURCES}",
            param_hint="'--sources'",
        )
    values = float_list(density)
    if len(values) != 1 or not 0 < values[0] <= 1:
        raise typer.BadParameter(
            f"one density in (0, 1], got {density!r}", param_hint="'--density'"
        )
    ns = int_list(nodes)
    if not ns or min(ns) < 2:
        raise typer.BadParameter(f"nodes must be >= 2, got {nodes!r}", param_hint="'--nodes'")
    rate_list = str_list(rates)
    for rate in rate_list:
        try:
            parse_rate(rate)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--rates'") from exc
    if compute and calibration is None:
        raise typer.BadParameter(
            "--compute needs --calibration (a zen_bench.json)", param_hint="'--compute'"
        )
    try:
        payload = run_simulation(
            names, values[0], sorted(ns), rate_list, calibration=calibration, with_compute=compute
        )
    except (OSError, ValueError) as exc:
        if calibration is None:
            raise
        raise typer.BadParameter(str(exc), param_hint="'--calibration'") from exc
    Console(width=max(console.width, 160)).print(zen_simulate_table(payload))
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")
