"""`thrifty lazarus`: resilient MoE training, its benchmark and simulator.

Each command builds its config (a config's ValueError becomes a usage error
against the flags its message names), calls the entry point in
:mod:`thrifty.lazarus` and prints tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from thrifty.bench.results import results_dir, write_json
from thrifty.cli.params import console
from thrifty.lazarus.benchmark import (
    HFBenchConfig,
    LazarusBenchConfig,
    measured_costs,
    run_bench,
    run_bench_hf,
)
from thrifty.lazarus.launch import LaunchError, LazarusJob
from thrifty.lazarus.simulate import SimConfig, simulate_all
from thrifty.lazarus.train import MODELS, TrainJob

app = typer.Typer(help="Lazarus: resilient MoE training with replicated experts.")

# Config field -> the option that sets it, per command.
TRAIN_FLAGS = {
    "workers": "--workers",
    "model": "--model",
    "slots": "--slots",
    "experts": "--experts",
    "top_k": "--top-k",
    "steps": "--steps",
    "fault_tolerance": "--fault-tolerance",
    "max_restarts": "--max-restarts",
    "checkpoint_every": "--checkpoint-every",
    "reallocate_every": "--reallocate-every",
}
BENCH_FLAGS = {
    "repeats": "--repeats",
    "workers": "--workers",
    "kill_at_step": "--kill-at-step",
    "checkpoint_every": "--checkpoint-every",
    "nodes": "--nodes",
    "slots": "--slots",
    "experts": "--experts",
    "scaling_nodes": "--scaling-nodes",
}
BENCH_HF_FLAGS = {
    "workers": "--workers",
    "repeats": "--repeats",
    "kill_at_step": "--kill-at-step",
    "kill_rank": "--kill-rank",
    "checkpoint_every": "--checkpoint-every",
    "duration_s": "--duration",
    "mtbf_s": "--mtbf",
    "max_failures": "--max-failures",
    "hidden": "--hidden",
    "experts": "--experts",
    "seq": "--seq",
    "batch": "--batch",
    "vocab": "--vocab",
    "slots": "--slots",
    "recovery": "--recovery",
    "goodput": "--goodput",
}
SIMULATE_FLAGS = {
    "nodes": "--nodes",
    "experts": "--experts",
    "slots": "--slots",
    "step_s": "--step-s",
    "reconfig_s": "--reconfig-s",
    "restart_s": "--restart-s",
    "checkpoint_s": "--checkpoint-s",
    "checkpoint_every": "--checkpoint-every",
    "horizon_s": "--hours",
}


@contextlib.contextmanager
def _flags(flags: dict[str, str]) -> Iterator[None]:
    """Report a config's ValueError as a usage error against the flags of the fields it names.

    The configs name a bad field as ``field=value`` in their messages.
    """
    try:
        yield
    except ValueError as exc:
        named = [flag for field, flag in flags.items() if re.search(rf"\b{field}\b", str(exc))]
        raise typer.BadParameter(str(exc), param_hint=named or None) from exc


@app.command("train")
def lazarus_train(
    workers: Annotated[int, typer.Option(help="Workers at the start (one torchrun each).")] = 4,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 100,
    model: Annotated[
        str, typer.Option(help=f"Tiny HF MoE model: {', '.join(MODELS)}.")
    ] = "mixtral",
    slots: Annotated[int, typer.Option(help="Expert slots per worker per MoE layer.")] = 3,
    experts: Annotated[int, typer.Option(help="Experts per MoE layer.")] = 4,
    top_k: Annotated[int, typer.Option(help="Experts per token.")] = 2,
    fault_tolerance: Annotated[int, typer.Option(help="Replicas per expert (f).")] = 2,
    max_restarts: Annotated[
        int, typer.Option(help="Per torchrun: restarts of a dead worker (it rejoins).")
    ] = 3,
    checkpoint_every: Annotated[
        int, typer.Option(help="Checkpoint interval, used only if an expert loses every replica.")
    ] = 20,
    reallocate_every: Annotated[
        int, typer.Option(help="Re-plan replicas from recent token loads every K steps (0: off).")
    ] = 0,
    run_dir: Annotated[
        Path | None, typer.Option(help="Workers' pids, progress, reports and logs.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Stop the job after this many seconds.")] = 1800,
) -> None:
    """Train a tiny HF MoE model on ShareGPT with Lazarus; kill -9 any worker at any time.

    A coordinator process holds the membership; each worker runs under its own
    ``torchrun --standalone --max-restarts R``, so a dead worker is restarted by
    its agent and rejoins as a new member while the others recover in place.
    Find the workers' pids in RUN_DIR/pids.
    """
    with _flags(TRAIN_FLAGS):
        job = TrainJob(
            model=model,
            steps=steps,
            slots=slots,
            experts=experts,
            top_k=top_k,
            fault_tolerance=fault_tolerance,
            checkpoint_every=checkpoint_every,
            reallocate_every=reallocate_every,
        )
        running = LazarusJob(
            job,
            workers,
            run_dir or results_dir() / "lazarus_train_run",
            max_restarts=max_restarts,
            timeout_s=timeout,
        )
    console.print(
        f"Lazarus: {workers} workers, {model}, pids and logs in {running.run_dir} "
        "(kill -9 any worker: it is restarted and rejoins)"
    )
    try:
        with running:
            report = running.wait()
    except LaunchError as exc:
        console.print(f"[red]Lazarus job failed[/red]: {exc}")
        raise typer.Exit(1) from exc
    path = write_json("lazarus_train", {"config": dataclasses.asdict(job), **report})
    table = Table(title=f"Lazarus: {workers} workers, {model}, {steps} steps")
    columns = ("kind", "step", "members", "detect s", "regroup s", "transfer s", "moved", "reload")
    for column in columns:
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
            "no" if rec["checkpoint_reload"] is None else f"step {rec['checkpoint_reload']}",
        )
    console.print(table)
    loss = report["loss"]
    console.print(
        f"members finished {report['finished_members']} (rejoined {report['joined_members']}), "
        f"loss {loss[0]:.3f} -> {loss[-1]:.3f}, checkpoint reloads "
        f"{report['checkpoint_reloads']}, {report['wall_s']:.1f} s; wrote {path}"
    )


@app.command("bench")
def lazarus_bench(
    repeats: Annotated[int, typer.Option(help="Interleaved repetitions of each recovery.")] = 3,
    workers: Annotated[int, typer.Option(help="Ranks of the recovery job (>= 3).")] = 4,
    kill_at_step: Annotated[int, typer.Option(help="Step whose forward ends in the kill.")] = 15,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint interval (steps).")] = 10,
    nodes: Annotated[int, typer.Option(help="Placement: nodes (Fig. 8: 10).")] = 10,
    slots: Annotated[int, typer.Option(help="Placement: slots per node (Fig. 8: 6).")] = 6,
    experts: Annotated[int, typer.Option(help="Placement: experts (Fig. 8: 16).")] = 16,
    scaling_nodes: Annotated[
        int, typer.Option(help="Placement time at this many nodes (paper: 1,000).")
    ] = 1000,
) -> None:
    """Measured recovery (Lazarus vs torchrun restart) and recovery probability by placement."""
    with _flags(BENCH_FLAGS):
        cfg = LazarusBenchConfig(
            repeats=repeats,
            workers=workers,
            kill_at_step=kill_at_step,
            checkpoint_every=checkpoint_every,
            nodes=nodes,
            slots=slots,
            experts=experts,
            scaling_nodes=scaling_nodes,
        )
    result = run_bench(cfg)
    recovery, placement, scaling = result.recovery, result.placement, result.scaling

    table = Table(title=f"Recovery from kill -9 ({workers} ranks, medians of {repeats})")
    for column in ("system", "kill -> training again", "parts", "steps lost", "vs Lazarus"):
        table.add_column(column)
    for name, med in recovery["median"].items():
        parts = ", ".join(
            f"{k[:-2]} {v:.2f}"
            for k, v in med.items()
            if k not in ("total_s", "step_s", "checkpoint_s")
        )
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
    ptable.add_column("placement")
    for k in placement["config"]["failures"]:
        ptable.add_column(f"{k} failed")
    for name, data in placement["placements"].items():
        ptable.add_row(name, *(f"{p:.3f}" for p in data["probability"]))
    console.print(ptable)

    size = scaling["config"]
    console.print(
        f"place_experts at {size['nodes']} nodes x {size['slots']} slots x {size['experts']} "
        f"experts: median {scaling['median_s']:.3f} s"
    )
    console.print(f"wrote {result.json_path}, " + " and ".join(str(p) for p in result.plots))


@app.command("bench-hf")
def lazarus_bench_hf(
    workers: Annotated[int, typer.Option(help="Worker processes (>= 3).")] = 4,
    repeats: Annotated[int, typer.Option(help="Interleaved repetitions of each recovery.")] = 3,
    kill_at_step: Annotated[int, typer.Option(help="Recovery: kill -9 during this step.")] = 15,
    kill_rank: Annotated[int, typer.Option(help="Recovery: the worker to kill.")] = 1,
    checkpoint_every: Annotated[
        int, typer.Option(help="Both systems checkpoint every this many steps.")
    ] = 10,
    duration: Annotated[
        float, typer.Option(help="Goodput: seconds of training per system.")
    ] = 120.0,
    mtbf: Annotated[float, typer.Option(help="Goodput: mean seconds between kills.")] = 30.0,
    max_failures: Annotated[
        int, typer.Option(help="Goodput: at most this many kills (0: no cap).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Goodput: failure schedule and victims.")] = 0,
    hidden: Annotated[int, typer.Option(help="Mixtral hidden size.")] = 64,
    experts: Annotated[int, typer.Option(help="Mixtral experts per layer.")] = 8,
    seq: Annotated[int, typer.Option(help="Tokens per sequence.")] = 64,
    batch: Annotated[int, typer.Option(help="Sequences per worker per step.")] = 4,
    vocab: Annotated[int, typer.Option(help="Compact ShareGPT vocabulary.")] = 2048,
    slots: Annotated[
        int, typer.Option(help="Lazarus slots per worker per layer (0: two replicas each).")
    ] = 0,
    recovery: Annotated[bool, typer.Option(help="Run the recovery benchmark.")] = True,
    goodput: Annotated[bool, typer.Option(help="Run the goodput benchmark.")] = True,
) -> None:
    """HF Mixtral: recovery from kill -9 and goodput under failures, Lazarus vs torchrun restart."""
    with _flags(BENCH_HF_FLAGS):
        cfg = HFBenchConfig(
            workers=workers,
            repeats=repeats,
            kill_at_step=kill_at_step,
            kill_rank=kill_rank,
            checkpoint_every=checkpoint_every,
            duration_s=duration,
            mtbf_s=mtbf,
            max_failures=max_failures,
            seed=seed,
            hidden=hidden,
            experts=experts,
            seq=seq,
            batch=batch,
            vocab=vocab,
            slots=slots,
            recovery=recovery,
            goodput=goodput,
        )
    result = run_bench_hf(cfg)
    if result.recovery is not None:
        rec = result.recovery
        table = Table(title=f"HF Mixtral: recovery from kill -9 ({workers} workers, {repeats}x)")
        for column in ("system", "kill -> training again", "min-max", "parts", "steps lost"):
            table.add_column(column)
        for name, summary in rec["summary"].items():
            parts = ", ".join(
                f"{k[:-2]} {v['median']:.2f}"
                for k, v in summary.items()
                if k not in ("total_s", "step_s", "checkpoint_s")
            )
            total = summary["total_s"]
            table.add_row(
                name,
                f"{total['median']:.2f} s",
                f"{total['min']:.2f}-{total['max']:.2f}",
                parts,
                str(rec["steps_lost"][name]),
            )
        console.print(table)
        console.print(
            f"Lazarus {rec['speedup']['median']:.1f}x faster (goal {rec['goal']['speedup']:g}x: "
            f"{'met' if rec['goal']['met'] else 'not met'}); parameter/optimizer elements lost "
            f"{rec['elements_lost']}"
        )
    if result.goodput is not None:
        good = result.goodput
        table = Table(title=f"HF Mixtral: goodput over {duration:g} s, MTBF {mtbf:g} s")
        for column in ("system", "tokens/s", "failures", "time lost s", "step s"):
            table.add_column(column)
        for name in ("lazarus", "checkpoint_restart"):
            g = good[name]
            table.add_row(
                name,
                f"{g['goodput_tokens_per_s']:.0f}",
                str(g["failures"]),
                f"{g['time_lost_s']:.1f}",
                f"{g['step_s']:.3f}",
            )
        console.print(table)
        console.print(f"goodput Lazarus / checkpoint-restart: {good['ratio']:.2f}x")
    console.print(f"wrote {result.json_path} and {result.plot}")


@app.command("simulate")
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
    costs = {
        "step_s": step_s,
        "reconfig_s": reconfig_s,
        "restart_s": restart_s,
        "checkpoint_s": checkpoint_s,
    }
    if from_bench is not None:
        try:
            costs = measured_costs(from_bench)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--from-bench'") from exc
        console.print("measured costs: " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()))
    if not mtbf > 0:
        raise typer.BadParameter(f"mtbf={mtbf}: expected > 0 seconds", param_hint="'--mtbf'")
    with _flags(SIMULATE_FLAGS):
        cfg = SimConfig(
            nodes=nodes,
            experts=experts,
            slots=slots,
            checkpoint_every=checkpoint_every,
            horizon_s=hours * 3600,
            **costs,
        )
    plot = str(results_dir() / "lazarus_simulate.png")
    out = simulate_all(cfg, mtbf_s=mtbf, seed=seed, plot_path=plot)
    path = write_json("lazarus_simulate", out)
    table = Table(title="Lazarus goodput (samples trained)")
    for column in ("trace", "events", "Lazarus", "DS(FT)", "DS", "Laz/DS", "Laz/DS(FT)"):
        table.add_column(column)
    for name, t in out["traces"].items():
        s = t["samples"]
        table.add_row(
            name,
            str(t["events"]),
            f"{s['lazarus']:.0f}",
            f"{s['ds_ft']:.0f}",
            f"{s['ds']:.0f}",
            f"{t['lazarus_over_ds']:.2f}x",
            f"{t['lazarus_over_ds_ft']:.2f}x",
        )
    console.print(table)
    console.print(f"wrote {path} and {plot}")
