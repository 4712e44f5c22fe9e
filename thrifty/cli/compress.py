"""`thrifty compress`: compressor kernels and end-to-end training benchmarks.

The option parsers of the training benchmarks (model, compressors, rates) live
here and are shared with ``thrifty mergecomp`` and ``thrifty bytecomp``: a
value the user got wrong is reported against its flag; anything that fails
later is a bug and shows its traceback.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from thrifty.bench import netem
from thrifty.bench.guards import MODES, run_guard_benchmark
from thrifty.bench.kernels import format_size, parse_size, run_kernel_benchmark
from thrifty.bench.models import MODEL_NAMES
from thrifty.bench.operating_points import GPU_LIKE_S, POINTS
from thrifty.bench.training import LOOPBACK, TrainingResult, check_rates, run_compress_benchmark
from thrifty.cli.params import console, str_list
from thrifty.compressors import available_compressors

app = typer.Typer(help="Gradient compression: kernels and end-to-end training benchmarks.")

RATES_HELP = (
    f"Comma-separated rates: '{LOOPBACK}' (plain loopback, no emulation, no root) "
    "and/or emulated rates such as 1gbit,200mbit (root, ip and tc)."
)


def model_option(model: str, flag: str = "--model") -> str:
    """``model`` if it is a benchmark model's name, else BadParameter against ``flag``."""
    if model not in MODEL_NAMES:
        raise typer.BadParameter(
            f"unknown model {model!r}; expected one of {', '.join(MODEL_NAMES)}",
            param_hint=f"'{flag}'",
        )
    return model


def compressors_option(text: str, flag: str = "--compressors") -> list[str]:
    """Comma-separated registry names (``"none"`` excluded); empty means all of them."""
    known = [c for c in available_compressors() if c != "none"]
    names = str_list(text) or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise typer.BadParameter(
            f"unknown compressors {unknown}; expected some of {', '.join(known)}",
            param_hint=f"'{flag}'",
        )
    return names


def rates_option(text: str, flag: str = "--rate") -> list[str]:
    """Comma-separated rates; an emulated one must be readable and emulable on this machine."""
    rates = str_list(text)
    try:
        check_rates(rates)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=f"'{flag}'") from exc
    if any(r != LOOPBACK for r in rates):
        try:
            netem.check_available()
        except netem.NetemUnavailable as exc:
            raise typer.BadParameter(
                f"{exc}; or pass {flag} {LOOPBACK} to run on the plain loopback",
                param_hint=f"'{flag}'",
            ) from exc
    return rates


POINTS_HELP = (
    "Comma-separated operating points: heavy (the default batch) and/or gpu-like "
    f"(the largest batch whose one-rank compute is at most {GPU_LIKE_S[1] * 1e3:.0f} ms here, "
    "chosen by measurement and printed)."
)
REPEATS_HELP = "Interleaved repetitions of every configuration (median and spread reported)."


def points_option(text: str, flag: str = "--points") -> list[str]:
    """Comma-separated operating point names, each one of :data:`POINTS`."""
    names = str_list(text)
    unknown = [n for n in names if n not in POINTS]
    if unknown or not names:
        raise typer.BadParameter(
            f"{text!r}: expected some of {', '.join(POINTS)}", param_hint=f"'{flag}'"
        )
    return names


def at_least(value: int, least: int, flag: str) -> int:
    if value < least:
        raise typer.BadParameter(f"{value}: expected >= {least}", param_hint=f"'{flag}'")
    return value


@app.command("bench-kernels")
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
    try:
        numels = [parse_size(s) for s in str_list(sizes)]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--sizes'") from exc
    if not numels:
        raise typer.BadParameter("expected at least one size", param_hint="'--sizes'")
    names = str_list(compressors) or available_compressors()
    unknown = [n for n in names if n not in available_compressors()]
    if unknown:
        raise typer.BadParameter(
            f"unknown compressors {unknown}; expected some of {', '.join(available_compressors())}",
            param_hint="'--compressors'",
        )
    at_least(reps, 1, "--reps")
    if not 1 <= min_reps <= reps:
        raise typer.BadParameter(
            f"{min_reps}: expected 1..--reps ({reps})", param_hint="'--min-reps'"
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise typer.BadParameter(f"{device!r}: expected cpu or cuda", param_hint="'--device'")
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
    console.print(_kernels_table(payload))
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")


def _kernels_table(payload: dict) -> Table:
    """One row per (size, compressor), torch.clone first in each size's section."""
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


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def training_table(result: TrainingResult) -> Table:
    """One row per (run, configuration): measured (and spread), vs DDP fp32, bytes, predicted."""
    searched = any(row.search_iterations for _, row in result.rows())
    points = ", ".join(
        f"{p['model']} {p['name']}: {p['batch']} ({p['compute_s'] * 1e3:.0f} ms compute)"
        for p in result.settings.get("points", [])
    )
    table = Table(
        title=f"{result.title}: seconds per iteration",
        caption=f"{points}; s/iter = median of {result.settings.get('repeats', 1)} repetitions "
        "[fastest-slowest]",
    )
    columns = ["run", "configuration", "s/iter", "vs DDP fp32", "sent/iter", "predicted"]
    for column in columns + (["search: iters (s)"] if searched else []):
        table.add_column(column, justify="right")
    for key, row in result.rows():
        speedup = "-" if row.speedup_vs_ddp is None else f"{row.speedup_vs_ddp:.2f}x"
        predicted = "-"
        if row.predicted_s is not None and row.prediction_error is not None:
            predicted = f"{row.predicted_s:.3f} ({row.prediction_error:+.0%})"
        low, high = row.spread()
        cells = [
            key,
            row.label,
            f"{row.iteration_s:.3f}" + (f" [{low:.3f}-{high:.3f}]" if high > low else ""),
            speedup,
            _bytes(row.wire_bytes_per_iter),
            predicted,
        ]
        if searched:
            search = row.search_iterations
            cells.append(f"{search} ({row.search_s:.1f})" if search else "-")
        table.add_row(*cells)
    return table


def print_training(result: TrainingResult) -> None:
    console.print(training_table(result))
    console.print(f"wrote {result.json_path} and {result.plot_path}")


@app.command("bench-guards")
def compress_bench_guards(
    models: Annotated[str, typer.Option(help="Comma-separated: cnn, gpt, digits.")] = "cnn,gpt",
    compressors: Annotated[
        str, typer.Option(help="Comma-separated: fp32 and/or registry names.")
    ] = "fp32,topk",
    workers: Annotated[int, typer.Option(help="Ranks (processes) on this machine.")] = 2,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds (order alternates).")] = 6,
    iters: Annotated[int, typer.Option(help="Timed iterations per mode and round.")] = 3,
) -> None:
    """What the NaN/Inf guard costs: GradientSync(nonfinite='raise') vs 'off', interleaved."""
    names = [model_option(m, "--models") for m in str_list(models)]
    chosen = str_list(compressors)
    unknown = [c for c in chosen if c != "fp32" and c not in available_compressors()]
    if unknown or not chosen:
        raise typer.BadParameter(
            f"{unknown or compressors!r}: expected fp32 and/or some of "
            f"{', '.join(available_compressors())}",
            param_hint="'--compressors'",
        )
    payload = run_guard_benchmark(
        names,
        chosen,
        at_least(workers, 1, "--workers"),
        at_least(rounds, 1, "--rounds"),
        at_least(iters, 1, "--iters"),
    )
    table = Table(box=box.SIMPLE_HEAD, title=f"NaN/Inf guard, {workers} ranks, loopback")
    table.add_column("model")
    table.add_column("compressor")
    for mode in MODES:
        table.add_column(f"{mode} (ms)", justify="right")
    table.add_column("overhead", justify="right")
    for row in payload["rows"]:
        table.add_row(
            row["model"],
            row["compressor"],
            *(f"{1e3 * row['median_s'][mode]:.1f}" for mode in MODES),
            f"{100 * row['overhead']:+.2f}%",
        )
    console.print(table)
    console.print(f"wrote {payload['json_path']} and {payload.get('plot_path')}")


@app.command("bench")
def compress_bench(
    model: Annotated[
        str, typer.Option(help="cnn (ResNet-style, ~10M), gpt (~19M) or digits (~38K).")
    ] = "cnn",
    workers: Annotated[int, typer.Option(help="Ranks (processes) on this machine.")] = 2,
    rate: Annotated[str, typer.Option(help=RATES_HELP)] = "1gbit",
    compressors: Annotated[str, typer.Option(help="Comma-separated; empty for all.")] = "",
    warmup: Annotated[int, typer.Option(help="Untimed iterations per configuration.")] = 3,
    iters: Annotated[int, typer.Option(help="Timed iterations per configuration.")] = 4,
    points: Annotated[str, typer.Option(help=POINTS_HELP)] = "heavy,gpu-like",
    repeats: Annotated[int, typer.Option(help=REPEATS_HELP)] = 3,
) -> None:
    """The compute bound, DDP fp32 and its fp16/PowerSGD hooks, thrifty layer-wise and
    whole-model per compressor."""
    result = run_compress_benchmark(
        model_option(model),
        at_least(workers, 1, "--workers"),
        rates_option(rate),
        compressors_option(compressors),
        at_least(warmup, 0, "--warmup"),
        at_least(iters, 1, "--iters"),
        points=points_option(points),
        repeats=at_least(repeats, 1, "--repeats"),
    )
    print_training(result)
