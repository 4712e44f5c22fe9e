"""`thrifty marconi`: traces, the cache simulator and the engine benchmark."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from thrifty.cli.params import console, float_list, str_list

app = typer.Typer(help="Marconi: prefix caching for hybrid (attention + SSM) LLMs.")


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


@app.command("trace")
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


@app.command("simulate")
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
            the_trace, policies=str_list(policies), capacities_gb=float_list(sizes_gb),
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


@app.command("serve-trace")
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
            the_trace, capacities_mb=float_list(budgets_mb),
            policies=str_list(policies), repeats=repeats, threads=threads, name=name,
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
