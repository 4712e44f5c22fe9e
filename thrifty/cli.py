"""The ``thrifty`` command: ``thrifty demo`` plus one subcommand group per system."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import thrifty

app = typer.Typer(
    help="thrifty: LLM training and serving that spend less network, recomputation and lost work.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(help="Measurements of the substrates (results/*.json + plots).")
app.add_typer(bench_app, name="bench")
compress_app = typer.Typer(help="Gradient compression: kernels and end-to-end training benchmarks.")
app.add_typer(compress_app, name="compress")
mergecomp_app = typer.Typer(help="MergeComp: compression over merged tensor groups.")
app.add_typer(mergecomp_app, name="mergecomp")
bytecomp_app = typer.Typer(help="ByteComp (Espresso): a compression strategy per tensor.")
app.add_typer(bytecomp_app, name="bytecomp")
zen_app = typer.Typer(help="Zen: sparse gradient synchronisation (analysis and benchmark).")
app.add_typer(zen_app, name="zen")
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"thrifty {thrifty.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)


@app.command()
def demo() -> None:
    """Run a short tour of every system and print one summary table."""
    from thrifty.demo import TOUR

    table = Table(title="thrifty tour")
    for column in ("system", "what ran", "result", "s"):
        table.add_column(column, overflow="fold")
    for stop in TOUR:
        console.print(f"[bold]>[/bold] {stop.__name__.removesuffix('_stop')} ...")
        row = stop()
        table.add_row(row.system, row.what, row.result, f"{row.seconds:.1f}")
    console.print(table)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from exc


@bench_app.command("collectives")
def bench_collectives(
    rates: Annotated[
        str, typer.Option(help="Comma-separated: 'loopback' and/or tc rates like 1gbit.")
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
    from thrifty.bench.collectives import DEFAULT_SIZES, run_benchmark, run_from_env, summary_rows

    sizes = [s for s in DEFAULT_SIZES if s <= max_mb << 20]
    if from_env:
        payload = run_from_env(sizes, budget)
        if payload is None:  # not rank 0
            return
    else:
        payload = run_benchmark(
            [r.strip() for r in rates.split(",") if r.strip()],
            _int_list(world_sizes),
            sizes,
            budget,
        )
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


@compress_app.command("bench-kernels")
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


def _training_table(payload: dict, title: str) -> Table:
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


def _run_training(
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
    console.print(_training_table(payload, f"{model}, {workers} workers: iteration time"))
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")


@compress_app.command("bench")
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
    _run_training(model, workers, rate, compressors, iters, ("layerwise", "whole"), "compress")


@mergecomp_app.command("bench")
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
    _run_training(
        model, workers, rate, compressors, iters, ("layerwise", "whole", "mergecomp"), "mergecomp"
    )


def _bytecomp_table(payload: dict) -> Table:
    from thrifty.bench.bytecomp import summary_rows

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


@bytecomp_app.command("bench")
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
    from thrifty.bench.bytecomp import run_bytecomp_benchmark

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


@bytecomp_app.command("bench-selection")
def bytecomp_bench_selection(
    layers: Annotated[int, typer.Option(help="GPT blocks (25: 304 tensors).")] = 25,
    reps: Annotated[int, typer.Option(help="Runs per setting (median kept).")] = 5,
) -> None:
    """Time ByteComp's decision for a ~300-tensor model (paper's algorithms, and refined)."""
    from thrifty.bench.bytecomp import run_selection_benchmark

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


@bytecomp_app.command("decide")
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


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    try:
        return [float(x.rstrip("%")) / (100 if x.endswith("%") else 1) for x in _str_list(text)]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from exc


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


@zen_app.command("analyze")
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
        payload = run_analysis(_str_list(workloads), workers, steps, _int_list(sizes))
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


@zen_app.command("bench")
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
    from thrifty.bench.zen import run_zen_benchmark

    try:
        payload = run_zen_benchmark(
            _int_list(nodes), _str_list(rates), _float_list(densities), _str_list(sources),
            _str_list(schemes), reps=reps, train_iters=train_iters,
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


# --------------------------------------------------------------------------- marconi

marconi_app = typer.Typer(help="Marconi: prefix caching for hybrid (attention + SSM) LLMs.")
app.add_typer(marconi_app, name="marconi")


def _marconi_names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _marconi_numbers(text: str) -> list[float]:
    try:
        return [float(x) for x in _marconi_names(text)]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from exc


def _marconi_load_trace(
    trace: str | None,
    source: str,
    sessions: int,
    *,
    min_turns: int = 10,
    skip_sessions: int = 0,
    sps: float = 1.0,
    max_input_tokens: int = 32_768,
    message_format: str = "json",
    seed: int = 0,
):  # -> thrifty.marconi.Trace
    """A JSONL file (``trace``), else the ShareGPT or synthetic trace."""
    from thrifty.marconi import TraceFormatError, read_jsonl, sharegpt_trace, synthetic_trace

    try:
        if trace:
            return read_jsonl(trace)
        if source == "sharegpt":
            return sharegpt_trace(
                num_sessions=sessions,
                min_turns=min_turns,
                skip_sessions=skip_sessions,
                sessions_per_second=sps,
                max_input_tokens=max_input_tokens,
                message_format=message_format,
            )
        if source == "synthetic":
            return synthetic_trace(num_sessions=sessions, sessions_per_second=sps, seed=seed)
    except (OSError, TraceFormatError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    raise typer.BadParameter(f"source must be 'sharegpt' or 'synthetic', got {source!r}")


@marconi_app.command("trace")
def marconi_trace(
    source: Annotated[str, typer.Option(help="sharegpt (the paper's) or synthetic.")] = "sharegpt",
    sessions: Annotated[int, typer.Option(help="Sessions in the trace.")] = 100,
    min_turns: Annotated[int, typer.Option(help="ShareGPT: minimum turns per session.")] = 10,
    skip_sessions: Annotated[int, typer.Option(help="ShareGPT: eligible sessions to skip.")] = 0,
    sps: Annotated[float, typer.Option(help="Sessions arriving per second.")] = 1.0,
    max_input_tokens: Annotated[int, typer.Option(help="A session stops above this.")] = 32_768,
    message_format: Annotated[str, typer.Option(help="json (artifact) or text.")] = "json",
    seed: Annotated[int, typer.Option(help="Synthetic: random seed.")] = 0,
    out: Annotated[str, typer.Option(help="JSONL path; default results/<trace name>.jsonl.")] = "",
) -> None:
    """Build a request trace and write it in the Marconi artifact's JSONL format."""
    from thrifty.bench.results import results_dir
    from thrifty.marconi import write_jsonl

    trace = _marconi_load_trace(
        None, source, sessions, min_turns=min_turns, skip_sessions=skip_sessions, sps=sps,
        max_input_tokens=max_input_tokens, message_format=message_format, seed=seed,
    )  # fmt: skip
    path = write_jsonl(trace, out or results_dir() / f"{trace.name}.jsonl")
    table = Table(title=f"trace {trace.name}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key in ("sessions", "requests", "input_tokens", "output_tokens", "longest_input_tokens",
                "duration_s"):  # fmt: skip
        value = trace.summary()[key]
        table.add_row(key, f"{value:,.1f}" if isinstance(value, float) else f"{value:,}")
    console.print(table)
    console.print(f"wrote {path}")


def marconi_sweep_table(payload: dict) -> Table:
    """One row per cache size: each policy's hit rate, FLOPs saved, TTFT and evictions."""
    policies = payload["policies"]
    by = {(r["policy"], r["capacity_gb"]): r for r in payload["results"]}
    table = Table(
        title=f"{payload['trace']['name']} ({payload['trace']['requests']} requests), "
        f"{payload['model']['name']}: token hit rate (FLOPs saved) | TTFT P50/P95 ms | evictions",
        caption=f"TTFT model: {payload['ttft_model']['source']}",
    )
    table.add_column("GB", justify="right")
    for policy in policies:
        table.add_column(policy, justify="right")
    if "marconi" in policies:
        table.add_column("marconi / vllm+", justify="right")
        table.add_column("marconi / sglang+", justify="right")
    for gb in payload["capacities_gb"]:
        cells = []
        for policy in policies:
            r = by.get((policy, gb))
            cells.append(
                "-" if r is None else
                f"{r['token_hit_rate']:.1%} ({r['flops_saved_fraction']:.1%}) | "
                f"{r['ttft_p50_ms']:.0f}/{r['ttft_p95_ms']:.0f} | {r['evictions']}"
            )  # fmt: skip
        if "marconi" in policies:
            m = by.get(("marconi", gb))
            for base in ("vllm+", "sglang+"):
                b = by.get((base, gb))
                ok = m is not None and b is not None and b["token_hit_rate"] > 0
                cells.append(f"{m['token_hit_rate'] / b['token_hit_rate']:.2f}x" if ok else "-")
        table.add_row(f"{gb:g}", *cells)
    return table


@marconi_app.command("simulate")
def marconi_simulate(
    trace: Annotated[str, typer.Option(help="A JSONL trace; default: --source.")] = "",
    source: Annotated[str, typer.Option(help="sharegpt or synthetic.")] = "sharegpt",
    sessions: Annotated[int, typer.Option(help="Sessions (--source).")] = 100,
    skip_sessions: Annotated[
        int, typer.Option(help="ShareGPT: eligible sessions to skip (a disjoint slice).")
    ] = 0,
    sizes_gb: Annotated[str, typer.Option(help="Comma-separated cache sizes in GB.")] = (
        "1,2,3,4,5,10"
    ),
    policies: Annotated[str, typer.Option(help="Comma-separated policies.")] = (
        "vllm+,sglang+,marconi"
    ),
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    tuner: Annotated[str, typer.Option(help="Marconi's alpha tuner: window, paper, none.")] = (
        "window"
    ),
    alpha: Annotated[
        float | None, typer.Option(help="A fixed alpha for Marconi (no tuner).")
    ] = None,
    ttft: Annotated[
        str,
        typer.Option(
            help="TTFT model: auto (engine fit if measured, else paper), paper, engine, "
            "or a serve-trace JSON."
        ),
    ] = "auto",
    name: Annotated[str, typer.Option(help="Results file stem.")] = "marconi_sweep",
) -> None:
    """Replay a trace for every policy x cache size (the paper's 7B hybrid, sizes only)."""
    from thrifty.marconi.benchmark import run_sweep

    the_trace = _marconi_load_trace(trace or None, source, sessions, skip_sessions=skip_sessions)
    try:
        payload = run_sweep(
            the_trace, policies=_marconi_names(policies), capacities_gb=_marconi_numbers(sizes_gb),
            workers=workers, ttft=ttft, tuner=None if tuner == "none" else tuner, alpha=alpha,
            name=name,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    Console(width=max(console.width, 160)).print(marconi_sweep_table(payload))
    for goal, result in payload["goals"].items():
        detail = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
        verdict = {True: "holds", False: "NOT met", None: "undefined"}[result["holds"]]
        console.print(f"goal {goal}: {verdict} {detail}")
    for gain in payload["p95_ttft_vs_sglang"]:
        console.print(
            f"P95 TTFT at {gain['capacity_gb']:g} GB: marconi {gain['marconi_p95_ms']:.0f} ms vs "
            f"sglang+ {gain['sglang_p95_ms']:.0f} ms ({gain['change']:+.1%})"
        )
    console.print(
        f"sweep took {payload['sweep_wall_s']:.1f} s ({payload['sweep_cpu_s']:.1f} CPU s, "
        f"{payload['workers']} workers)"
    )
    console.print(f"wrote {payload['json_path']} and {payload['plot_path']}")


def marconi_serve_table(payload: dict) -> Table:
    table = Table(
        title=f"engine TTFT, {payload['model']['arch']} (tiny, random weights) on CPU, "
        f"{payload['trace']['requests']} ShareGPT requests",
        caption=f"modelled = fit {payload['ttft_fit']['intercept_ms']:.1f} ms + "
        f"{payload['ttft_fit']['per_token_ms']:.3f} ms/token prefilled "
        f"(R^2 {payload['ttft_fit']['r2']:.2f}) applied to each request",
    )
    columns = ("engine", "budget MB", "hit rate", "mean ms", "P50 ms", "P95 ms",
               "modelled mean", "pieces>1", "evictions")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "engine" else "right")
    for r in payload["rows"]:
        table.add_row(
            r["policy"], "-" if r["capacity_mb"] is None else f"{r['capacity_mb']:g}",
            f"{r['token_hit_rate']:.1%}", f"{r['ttft_mean_ms']:.0f}", f"{r['ttft_p50_ms']:.0f}",
            f"{r['ttft_p95_ms']:.0f}", f"{r['modelled_ttft_mean_ms']:.0f}",
            str(r["multi_piece_prefills"]), str(r.get("evictions", "-")),
        )  # fmt: skip
    return table


@marconi_app.command("serve-trace")
def marconi_serve_trace(
    trace: Annotated[str, typer.Option(help="A JSONL trace; default: a ShareGPT slice.")] = "",
    sessions: Annotated[int, typer.Option(help="ShareGPT sessions in the slice.")] = 8,
    max_input_tokens: Annotated[int, typer.Option(help="A session stops above this.")] = 1024,
    budgets_mb: Annotated[str, typer.Option(help="Comma-separated budgets (MB).")] = "8,16",
    policies: Annotated[str, typer.Option(help="Comma-separated policies.")] = (
        "vllm+,sglang+,marconi"
    ),
    arch: Annotated[str, typer.Option(help="Hybrid architecture of the tiny model.")] = (
        "nemotron_h"
    ),
    hidden_size: Annotated[int, typer.Option(help="Model width.")] = 128,
    layers: Annotated[int, typer.Option(help="Decoder layers (1 in 4 is attention).")] = 8,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary (cl100k: 100277).")] = 100_277,
    repeats: Annotated[int, typer.Option(help="Timings per request (fastest kept).")] = 3,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
    name: Annotated[str, typer.Option(help="Results file stem.")] = "marconi_serve",
) -> None:
    """Serve a ShareGPT slice through a tiny hybrid model per policy; measure TTFT."""
    import transformers

    from thrifty.marconi.benchmark import run_serve_trace

    transformers.logging.set_verbosity_error()  # the reference-kernel fallback notices
    the_trace = _marconi_load_trace(
        trace or None, "sharegpt", sessions, max_input_tokens=max_input_tokens
    )
    try:
        payload = run_serve_trace(
            the_trace, capacities_mb=_marconi_numbers(budgets_mb),
            policies=_marconi_names(policies), repeats=repeats, threads=threads, name=name,
            model_options={"arch": arch, "hidden_size": hidden_size, "num_layers": layers,
                           "vocab_size": vocab_size},
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    Console(width=max(console.width, 140)).print(marconi_serve_table(payload))
    goal = payload["goals"]["marconi_mean_ttft_lowest"]
    console.print(
        f"goal marconi_mean_ttft_lowest: {'holds' if goal['holds'] else 'NOT met'} "
        f"{goal['per_budget']}"
    )
    console.print(f"wrote {payload['json_path']} and {payload['plot_path']}")


lazarus_app = typer.Typer(help="Lazarus: resilient MoE training with replicated experts.")
app.add_typer(lazarus_app, name="lazarus")


@lazarus_app.command("train")
def lazarus_train(
    workers: Annotated[int, typer.Option(help="Ranks (nodes) at the start.")] = 4,
    slots: Annotated[int, typer.Option(help="Expert slots per node per MoE layer.")] = 3,
    experts: Annotated[int, typer.Option(help="Experts per MoE layer.")] = 6,
    top_k: Annotated[int, typer.Option(help="Gating: 1 or 2 experts per token.")] = 2,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 40,
    kill_rank: Annotated[str, typer.Option(help="Comma-separated ranks to kill -9.")] = "2",
    kill_at_step: Annotated[int, typer.Option(help="Step whose forward ends in the kill.")] = 20,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint interval (steps).")] = 10,
    joiners: Annotated[int, typer.Option(help="New ranks that join during the run.")] = 0,
    join_at_step: Annotated[int, typer.Option(help="Step at which joiners ask in.")] = -1,
    reallocate_every: Annotated[
        int, typer.Option(help="Re-plan replicas from recent token loads every K steps (0: off).")
    ] = 0,
) -> None:
    """Train a small MoE GPT on ShareGPT, kill ranks mid-step, recover without reload."""
    from thrifty.bench.results import write_json
    from thrifty.lazarus.runtime import LazarusConfig, train

    try:
        cfg = LazarusConfig(
            workers=workers, slots=slots, experts=experts, top_k=top_k, steps=steps,
            kill_ranks=tuple(_int_list(kill_rank)), kill_at_step=kill_at_step,
            checkpoint_every=checkpoint_every, joiners=joiners, join_at_step=join_at_step,
            reallocate_every=reallocate_every,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    report = train(cfg)
    path = write_json("lazarus_train", report)
    table = Table(title=f"Lazarus: {workers} ranks, kill {kill_rank} at step {kill_at_step}")
    for column in ("kind", "step", "members", "detect s", "regroup s", "transfer s", "moved",
                   "reload"):  # fmt: skip
        table.add_column(column)
    for rec in report["reconfigurations"]:
        table.add_row(
            rec["kind"],
            str(rec["step"]),
            f"{rec['members_before']} -> {rec['members_after']}",
            f"{rec['detection_s']:.3f}" if rec["detection_s"] is not None else "-",
            f"{rec['regroup_s']:.3f}",
            f"{rec['transfer_s']:.3f}",
            str(rec["replicas_moved"]),
            "yes" if rec["checkpoint_reload"] else "no",
        )
    console.print(table)
    loss = report["loss"]
    console.print(
        f"steps done {report['steps_done']}, loss {loss[0]:.3f} -> {loss[-1]:.3f}, "
        f"checkpoint reloads {report['checkpoint_reloads']}; wrote {path}"
    )


def _measured_costs(path: Path) -> dict[str, float]:
    """The simulator's costs from a ``thrifty lazarus bench`` result (medians, seconds)."""
    try:
        median = json.loads(path.read_text())["recovery"]["median"]
        lazarus, torchrun = median["lazarus"], median["torchrun"]
        return {
            "step_s": lazarus["step_s"],
            "reconfig_s": lazarus["total_s"],
            # The simulator rolls back to the checkpoint itself: the redo is not a fixed cost.
            "restart_s": torchrun["total_s"] - torchrun["redo_s"],
            "checkpoint_s": lazarus["checkpoint_s"],
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise typer.BadParameter(f"{path}: not a `thrifty lazarus bench` result ({exc})") from exc


@lazarus_app.command("bench")
def lazarus_bench(
    repeats: Annotated[int, typer.Option(help="Interleaved repetitions of each recovery.")] = 3,
    workers: Annotated[int, typer.Option(help="Ranks of the recovery job.")] = 4,
    kill_at_step: Annotated[int, typer.Option(help="Step whose forward ends in the kill.")] = 15,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint interval (steps).")] = 10,
    nodes: Annotated[int, typer.Option(help="Placement: nodes (Fig. 8: 10).")] = 10,
    slots: Annotated[int, typer.Option(help="Placement: slots per node (Fig. 8: 6).")] = 6,
    experts: Annotated[int, typer.Option(help="Placement: experts (Fig. 8: 16).")] = 16,
) -> None:
    """Measured recovery (Lazarus vs torchrun restart) and recovery probability by placement."""
    from thrifty.bench.lazarus import (
        placement_comparison,
        placement_scaling,
        plot_placement_comparison,
        plot_recovery,
        recovery_vs_restart,
    )
    from thrifty.bench.results import results_dir, write_json

    recovery = recovery_vs_restart(
        workers=workers, kill_at_step=kill_at_step, checkpoint_every=checkpoint_every,
        steps=kill_at_step + 9, repeats=repeats,
    )  # fmt: skip
    placement = placement_comparison(nodes=nodes, slots=slots, experts=experts)
    scaling = placement_scaling()
    plots = [
        plot_recovery(recovery, results_dir() / "lazarus_recovery.png"),
        plot_placement_comparison(placement, results_dir() / "lazarus_placement.png"),
    ]
    path = write_json(
        "lazarus_bench", {"recovery": recovery, "placement": placement, "scaling": scaling}
    )
    table = Table(title=f"Recovery from kill -9 ({workers} ranks, medians of {repeats})")
    for column in ("system", "kill -> training again", "parts", "steps lost", "vs Lazarus"):
        table.add_column(column)
    for name, med in recovery["median"].items():
        parts = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in med.items()
                          if k not in ("total_s", "step_s", "checkpoint_s"))  # fmt: skip
        lost = recovery["runs"][name][0]["steps_lost"]
        ratio = "1.00x" if name == "lazarus" else f"{recovery['speedup'][name]:.2f}x slower"
        table.add_row(name, f"{med['total_s']:.2f} s", parts, str(lost), ratio)
    console.print(table)
    console.print(
        f"Lazarus: parameter/optimizer elements lost {recovery['elements_lost']}, checkpoint "
        f"reloads {recovery['checkpoint_reloads']}, "
        f"step {recovery['median']['lazarus']['step_s']:.3f} s"
    )
    ptable = Table(title=f"Recovery probability, {nodes} nodes x {slots} slots, {experts} experts")
    ks = placement["config"]["failures"]
    ptable.add_column("placement")
    for k in ks:
        ptable.add_column(f"{k} failed")
    for name, data in placement["placements"].items():
        ptable.add_row(name, *(f"{p:.3f}" for p in data["probability"]))
    console.print(ptable)
    console.print(
        f"place_experts at {scaling['config']['nodes']} nodes x {scaling['config']['slots']} "
        f"slots x {scaling['config']['experts']} experts: median {scaling['median_s']:.3f} s"
    )
    console.print(f"wrote {path}, {plots[0]} and {plots[1]}")


@lazarus_app.command("simulate")
def lazarus_simulate(
    nodes: Annotated[int, typer.Option(help="Nodes at the start.")] = 16,
    experts: Annotated[int, typer.Option(help="Experts per layer.")] = 16,
    slots: Annotated[int, typer.Option(help="Slots per node.")] = 4,
    mtbf: Annotated[float, typer.Option(help="Cluster MTBF in seconds (Poisson).")] = 1200.0,
    step_s: Annotated[float, typer.Option(help="Seconds per training step.")] = 1.0,
    reconfig_s: Annotated[float, typer.Option(help="Lazarus reconfiguration seconds.")] = 1.0,
    restart_s: Annotated[float, typer.Option(help="Checkpoint-restart seconds.")] = 30.0,
    checkpoint_s: Annotated[float, typer.Option(help="Seconds to write a checkpoint.")] = 5.0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint interval (steps).")] = 100,
    hours: Annotated[float, typer.Option(help="Simulated hours.")] = 6.0,
    seed: Annotated[int, typer.Option(help="Trace seed.")] = 0,
    from_bench: Annotated[
        Path | None,
        typer.Option(
            help="Take step, reconfiguration, restart and checkpoint seconds from this "
            "`thrifty lazarus bench` JSON (the measured costs) instead of the options."
        ),
    ] = None,
) -> None:
    """Goodput of Lazarus vs DS(FT) vs DS under Poisson and spot-like traces."""
    from thrifty.bench.results import results_dir, write_json
    from thrifty.lazarus.simulate import SimConfig, simulate_all

    costs = dict(step_s=step_s, reconfig_s=reconfig_s, restart_s=restart_s,
                 checkpoint_s=checkpoint_s)  # fmt: skip
    if from_bench is not None:
        costs = _measured_costs(from_bench)
        console.print("measured costs: " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()))
    cfg = SimConfig(
        nodes=nodes, experts=experts, slots=slots, checkpoint_every=checkpoint_every,
        horizon_s=hours * 3600, **costs,
    )  # fmt: skip
    plot = str(results_dir() / "lazarus_simulate.png")
    out = simulate_all(cfg, mtbf_s=mtbf, seed=seed, plot_path=plot)
    path = write_json("lazarus_simulate", out)
    table = Table(title="Lazarus goodput (samples trained)")
    for column in ("trace", "events", "Lazarus", "DS(FT)", "DS", "Laz/DS", "Laz/DS(FT)"):
        table.add_column(column)
    for name, t in out["traces"].items():
        s = t["samples"]
        table.add_row(
            name, str(t["events"]), f"{s['lazarus']:.0f}", f"{s['ds_ft']:.0f}", f"{s['ds']:.0f}",
            f"{t['lazarus_over_ds']:.2f}x", f"{t['lazarus_over_ds_ft']:.2f}x",
        )  # fmt: skip
    console.print(table)
    console.print(f"wrote {path} and {plot}")
