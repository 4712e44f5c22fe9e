"""The ``thrifty`` command: ``thrifty demo`` plus one subcommand group per system."""

from __future__ import annotations

import logging
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
