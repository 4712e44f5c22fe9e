"""`thrifty marconi`: traces, the cache simulator and the engine benchmark (parse, call, print)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from thrifty.bench.results import results_dir
from thrifty.cli.params import console, float_list, str_list
from thrifty.marconi import (
    POLICIES,
    Trace,
    TraceFormatError,
    load_trace,
    with_resends,
    write_jsonl,
)
from thrifty.marconi.benchmark import (
    ZERO_PREFILL,
    check_fits_vocabulary,
    engine_spec,
    load_ttft_model,
    run_serve_trace,
    run_sweep,
)
from thrifty.marconi.engine import ARCHITECTURES
from thrifty.marconi.sharegpt import MESSAGE_FORMATS, TRACE_SOURCES
from thrifty.marconi.simulate import FULL_HITS
from thrifty.marconi.tuner import TUNERS

app = typer.Typer(help="Marconi: prefix caching for hybrid (attention + SSM) LLMs.")


def _trace(path: str, source: str, sessions: int, hint: str, **options: Any) -> Trace:
    """:func:`thrifty.marconi.load_trace`, its errors reported against the flags they concern.

    ``hint`` names the flags that select the ShareGPT slice: a ValueError left
    after the checks here means no session of that slice qualifies.
    """
    if not path and source not in TRACE_SOURCES:
        raise typer.BadParameter(
            f"expected one of {TRACE_SOURCES}, got {source!r}", param_hint="'--source'"
        )
    if options.get("message_format", "json") not in MESSAGE_FORMATS:
        raise typer.BadParameter(
            f"expected one of {MESSAGE_FORMATS}, got {options['message_format']!r}",
            param_hint="'--message-format'",
        )
    if options.get("sessions_per_second", 1.0) <= 0:
        raise typer.BadParameter("must be positive", param_hint="'--sps'")
    try:
        return load_trace(path or None, source, sessions=sessions, **options)
    except (OSError, TraceFormatError) as exc:
        raise typer.BadParameter(str(exc), param_hint="'--trace'") from exc
    except ValueError as exc:  # documented: no session of the slice qualifies
        raise typer.BadParameter(str(exc), param_hint=hint) from exc


def _resend(trace: Trace, rate: float) -> Trace:
    """``trace`` with resends (:func:`thrifty.marconi.with_resends`) when ``rate`` > 0."""
    return with_resends(trace, rate) if rate > 0 else trace


RESEND_HELP = (
    "Probability that a request is followed by one whose input is its input + output "
    "(a continue / agent-loop resend: the only inputs a zero-prefill hit can serve)."
)


def _policies(text: str) -> list[str]:
    policies = str_list(text)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise typer.BadParameter(
            f"unknown policy {unknown or policies}; expected some of {POLICIES}",
            param_hint="'--policies'",
        )
    return policies


def _sizes(text: str, flag: str) -> list[float]:
    sizes = float_list(text)
    if not sizes or min(sizes) <= 0:
        raise typer.BadParameter(f"sizes must be positive, got {text!r}", param_hint=flag)
    return sizes


@app.command("trace")
def marconi_trace(
    source: Annotated[str, typer.Option(help="sharegpt (the paper's) or synthetic.")] = "sharegpt",
    sessions: Annotated[int, typer.Option(min=1, help="Sessions in the trace.")] = 100,
    min_turns: Annotated[
        int, typer.Option(min=1, help="ShareGPT: minimum turns per session.")
    ] = 10,
    skip_sessions: Annotated[
        int, typer.Option(min=0, help="ShareGPT: eligible sessions to skip.")
    ] = 0,
    sps: Annotated[float, typer.Option(help="Sessions arriving per second.")] = 1.0,
    max_input_tokens: Annotated[
        int, typer.Option(min=1, help="A session stops above this.")
    ] = 32_768,
    message_format: Annotated[str, typer.Option(help="json (artifact) or text.")] = "json",
    seed: Annotated[int, typer.Option(help="Synthetic: random seed.")] = 0,
    out: Annotated[str, typer.Option(help="JSONL path; default results/<trace name>.jsonl.")] = "",
) -> None:
    """Build a request trace and write it in the Marconi artifact's JSONL format."""
    trace = _trace(
        "",
        source,
        sessions,
        "'--sessions', '--min-turns', '--skip-sessions', '--max-input-tokens'",
        min_turns=min_turns,
        skip_sessions=skip_sessions,
        sessions_per_second=sps,
        max_input_tokens=max_input_tokens,
        message_format=message_format,
        seed=seed,
    )
    path = write_jsonl(trace, out or results_dir() / f"{trace.name}.jsonl")
    table = Table(title=f"trace {trace.name}")
    table.add_column("field")
    table.add_column("value", justify="right")
    summary = trace.summary()
    keys = ("sessions", "requests", "input_tokens", "output_tokens", "longest_input_tokens")
    for key in (*keys, "duration_s"):
        value = summary[key]
        table.add_row(key, f"{value:,.1f}" if isinstance(value, float) else f"{value:,}")
    console.print(table)
    console.print(f"wrote {path}")


def marconi_sweep_table(payload: dict[str, Any]) -> Table:
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
            if r is None:
                cells.append("-")
                continue
            cells.append(
                f"{r['token_hit_rate']:.1%} ({r['flops_saved_fraction']:.1%}) | "
                f"{r['ttft_p50_ms']:.0f}/{r['ttft_p95_ms']:.0f} | {r['evictions']}"
            )
        if "marconi" in policies:
            m = by.get(("marconi", gb))
            for base in ("vllm+", "sglang+"):
                b = by.get((base, gb))
                ok = m is not None and b is not None and b["token_hit_rate"] > 0
                cells.append(f"{m['token_hit_rate'] / b['token_hit_rate']:.2f}x" if ok else "-")
        table.add_row(f"{gb:g}", *cells)
    return table


def marconi_ratio_table(payload: dict[str, Any]) -> Table:
    """One row per cache size: every policy's hit rate over the best baseline's there."""
    policies = payload["policies"]
    rows = payload["hit_rate_table"]["rows"]
    table = Table(title="token hit rate / best baseline's (the best non-Marconi policy per size)")
    table.add_column("GB", justify="right")
    table.add_column("best baseline")
    for policy in policies:
        table.add_column(policy, justify="right")
    for row in rows:
        ratios = row.get("vs_best", {})
        cells = [f"{ratios[p]:.2f}x" if p in ratios else "-" for p in policies]
        table.add_row(f"{row['capacity_gb']:g}", row.get("best_baseline", "-"), *cells)
    summary = payload["hit_rate_table"]
    if "mean_ratio_vs_best" in summary:
        table.caption = (
            f"marconi / best baseline: mean {summary['mean_ratio_vs_best']:.2f}x, "
            f"min {summary['min_ratio_vs_best']:.2f}x"
        )
    return table


def marconi_full_hit_table(payload: dict[str, Any]) -> Table:
    """Per policy and size: requests that hit their whole input, and bytes held at the end."""
    table = Table(
        title=f"whole-input hits ({payload['full_hits']}): requests | final MB (of which logits MB)"
    )
    table.add_column("GB", justify="right")
    for policy in payload["policies"]:
        table.add_column(policy, justify="right")
    by = {(r["policy"], r["capacity_gb"]): r for r in payload["results"]}
    for gb in payload["capacities_gb"]:
        cells = []
        for policy in payload["policies"]:
            r = by.get((policy, gb))
            cells.append(
                "-"
                if r is None
                else f"{r['full_hit_requests']} | {r['final_bytes'] / 1e6:,.0f} "
                f"({r['final_logits_bytes'] / 1e6:,.1f})"
            )
        table.add_row(f"{gb:g}", *cells)
    return table


@app.command("simulate")
def marconi_simulate(
    trace: Annotated[str, typer.Option(help="A JSONL trace; default: --source.")] = "",
    source: Annotated[str, typer.Option(help="sharegpt or synthetic.")] = "sharegpt",
    sessions: Annotated[int, typer.Option(min=1, help="Sessions (--source).")] = 100,
    skip_sessions: Annotated[
        int, typer.Option(min=0, help="ShareGPT: eligible sessions to skip (a disjoint slice).")
    ] = 0,
    sizes_gb: Annotated[
        str, typer.Option(help="Comma-separated cache sizes in GB.")
    ] = "1,2,3,4,5,10",
    policies: Annotated[
        str,
        typer.Option(
            help="Comma-separated policies: the paper's vllm+, sglang+, marconi and "
            "today's sglang, seglen, vllm."
        ),
    ] = "vllm+,sglang+,marconi",
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
    tuner: Annotated[
        str, typer.Option(help="Marconi's alpha tuner: window, paper, none.")
    ] = "window",
    alpha: Annotated[
        float | None, typer.Option(min=0.0, help="A fixed alpha for Marconi (no tuner).")
    ] = None,
    ttft: Annotated[
        str,
        typer.Option(
            help="TTFT model: auto (engine fit if measured, else paper), paper, engine, "
            "or a serve-trace JSON."
        ),
    ] = "auto",
    message_format: Annotated[
        str, typer.Option(help="ShareGPT: json (the artifact's reading) or text turns.")
    ] = "json",
    name: Annotated[str, typer.Option(help="Results file stem.")] = "marconi_sweep",
    full_hits: Annotated[
        str,
        typer.Option(
            help="A request whose whole input is cached: free (counted as a hit, the paper's "
            "simulator), recompute (an engine without stored logits: back to the checkpoint "
            "before), logits (zero-prefill hits: logits stored beside sequence-end "
            "checkpoints, charged at vocab x dtype bytes)."
        ),
    ] = "free",
    resend_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help=RESEND_HELP)] = 0.0,
) -> None:
    """Replay a trace for every policy x cache size (the paper's 7B hybrid, sizes only)."""
    chosen = _policies(policies)
    if full_hits not in FULL_HITS:
        raise typer.BadParameter(
            f"expected one of {FULL_HITS}, got {full_hits!r}", param_hint="'--full-hits'"
        )
    capacities = _sizes(sizes_gb, "'--sizes-gb'")
    if tuner not in TUNERS:
        raise typer.BadParameter(f"expected one of {TUNERS}, got {tuner!r}", param_hint="'--tuner'")
    try:
        load_ttft_model(ttft)
    except ValueError as exc:  # documented: a fit that cannot be read
        raise typer.BadParameter(str(exc), param_hint="'--ttft'") from exc
    hint = "'--sessions', '--skip-sessions'"
    the_trace = _trace(
        trace, source, sessions, hint, skip_sessions=skip_sessions, message_format=message_format
    )
    the_trace = _resend(the_trace, resend_rate)
    payload = run_sweep(
        the_trace,
        policies=chosen,
        capacities_gb=capacities,
        workers=workers,
        ttft=ttft,
        tuner=None if tuner == "none" else tuner,
        alpha=alpha,
        name=name,
        full_hits=full_hits,
    )
    wide = Console(width=max(console.width, 160))
    wide.print(marconi_sweep_table(payload))
    if full_hits != "free":
        wide.print(marconi_full_hit_table(payload))
    wide.print(marconi_ratio_table(payload))
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


def marconi_serve_table(payload: dict[str, Any]) -> Table:
    fit = payload["ttft_fit"]
    table = Table(
        title=f"engine TTFT, {payload['model']['arch']} (tiny, random weights) on CPU, "
        f"{payload['trace']['requests']} ShareGPT requests",
        caption=f"modelled = fit {fit['intercept_ms']:.1f} ms + {fit['per_token_ms']:.3f} "
        f"ms/token prefilled (R^2 {fit['r2']:.2f}) applied to each request",
    )
    columns = (
        "engine",
        "budget MB",
        "hit rate",
        "mean ms",
        "P50 ms",
        "P95 ms",
        "modelled mean",
        "pieces>1",
        "zero-prefill",
        "evictions",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "engine" else "right")
    for r in payload["rows"]:
        table.add_row(
            r["policy"],
            "-" if r["capacity_mb"] is None else f"{r['capacity_mb']:g}",
            f"{r['token_hit_rate']:.1%}",
            f"{r['ttft_mean_ms']:.0f}",
            f"{r['ttft_p50_ms']:.0f}",
            f"{r['ttft_p95_ms']:.0f}",
            f"{r['modelled_ttft_mean_ms']:.0f}",
            str(r["multi_piece_prefills"]),
            str(r.get("zero_prefill_hits", 0)),
            str(r.get("evictions", "-")),
        )
    return table


@app.command("serve-trace")
def marconi_serve_trace(
    trace: Annotated[str, typer.Option(help="A JSONL trace; default: a ShareGPT slice.")] = "",
    sessions: Annotated[int, typer.Option(min=1, help="ShareGPT sessions in the slice.")] = 8,
    max_input_tokens: Annotated[
        int, typer.Option(min=1, help="A session stops above this.")
    ] = 1024,
    budgets_mb: Annotated[str, typer.Option(help="Comma-separated budgets (MB).")] = "8,16",
    policies: Annotated[
        str, typer.Option(help="Comma-separated policies.")
    ] = "vllm+,sglang+,marconi",
    arch: Annotated[
        str, typer.Option(help="Hybrid architecture of the tiny model.")
    ] = "nemotron_h",
    hidden_size: Annotated[int, typer.Option(help="Model width.")] = 128,
    layers: Annotated[int, typer.Option(help="Decoder layers (1 in 4 is attention).")] = 8,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary (cl100k: 100277).")] = 100_277,
    repeats: Annotated[int, typer.Option(min=1, help="Timings per request (fastest kept).")] = 3,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 1,
    name: Annotated[str, typer.Option(help="Results file stem.")] = "marconi_serve",
    zero_prefill_hits: Annotated[
        str,
        typer.Option(
            help="off, on (caches store logits for zero-prefill hits), or both (each "
            "policy x budget twice; the second is labelled <policy>/zp)."
        ),
    ] = "off",
    resend_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help=RESEND_HELP)] = 0.0,
) -> None:
    """Serve a ShareGPT slice through a tiny hybrid model per policy; measure TTFT."""
    chosen = _policies(policies)
    if zero_prefill_hits not in ZERO_PREFILL:
        raise typer.BadParameter(
            f"expected one of {ZERO_PREFILL}, got {zero_prefill_hits!r}",
            param_hint="'--zero-prefill-hits'",
        )
    budgets = _sizes(budgets_mb, "'--budgets-mb'")
    if arch not in ARCHITECTURES:
        raise typer.BadParameter(
            f"expected one of {ARCHITECTURES}, got {arch!r}", param_hint="'--arch'"
        )
    model_options = {
        "arch": arch,
        "hidden_size": hidden_size,
        "num_layers": layers,
        "vocab_size": vocab_size,
    }
    try:
        engine_spec(model_options)
    except ValueError as exc:  # documented: a size the architecture cannot take
        raise typer.BadParameter(str(exc), param_hint="'--hidden-size', '--layers'") from exc
    hint = "'--sessions', '--max-input-tokens'"
    the_trace = _trace(trace, "sharegpt", sessions, hint, max_input_tokens=max_input_tokens)
    the_trace = _resend(the_trace, resend_rate)
    try:
        check_fits_vocabulary(the_trace, vocab_size)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--vocab-size'") from exc
    payload = run_serve_trace(
        the_trace,
        capacities_mb=budgets,
        policies=chosen,
        repeats=repeats,
        threads=threads,
        name=name,
        model_options=model_options,
        zero_prefill=zero_prefill_hits,
    )
    Console(width=max(console.width, 140)).print(marconi_serve_table(payload))
    goal = payload["goals"]["marconi_mean_ttft_lowest"]
    console.print(
        f"goal marconi_mean_ttft_lowest: {'holds' if goal['holds'] else 'NOT met'} "
        f"{goal['per_budget']}"
    )
    console.print(f"wrote {payload['json_path']} and {payload['plot_path']}")
