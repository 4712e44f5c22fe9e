"""`thrifty lazarus`: resilient MoE training, its benchmark and simulator.

Each command builds its config (a config's ValueError becomes a usage error
against the flags its message names), calls the entry point in
:mod:`thrifty.lazarus` and prints tables.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from thrifty.bench.results import results_dir, write_json
from thrifty.cli.params import console, int_list
from thrifty.lazarus.benchmark import LazarusBenchConfig, measured_costs, run_bench, train
from thrifty.lazarus.runtime import LazarusConfig
from thrifty.lazarus.simulate import SimConfig, simulate_all

app = typer.Typer(help="Lazarus: resilient MoE training with replicated experts.")

# Config field -> the option that sets it, per command.
TRAIN_FLAGS = {
    "workers": "--workers",
    "slots": "--slots",
    "experts": "--experts",
    "top_k": "--top-k",
    "steps": "--steps",
    "kill_ranks": "--kill-rank",
    "kill_at_step": "--kill-at-step",
    "checkpoint_every": "--checkpoint-every",
    "joiners": "--joiners",
    "join_at_step": "--join-at-step",
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


def _ranks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int_list(text))
    except typer.BadParameter as exc:
        raise typer.BadParameter(exc.message, param_hint="'--kill-rank'") from exc


@app.command("train")
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
    kill_ranks = _ranks(kill_rank)
    with _flags(TRAIN_FLAGS):
        cfg = LazarusConfig(
            workers=workers,
            slots=slots,
            experts=experts,
            top_k=top_k,
            steps=steps,
            kill_ranks=kill_ranks,
            kill_at_step=kill_at_step,
            checkpoint_every=checkpoint_every,
            joiners=joiners,
            join_at_step=join_at_step,
            reallocate_every=reallocate_every,
        )
    report = train(cfg)
    path = write_json("lazarus_train", report)
    table = Table(title=f"Lazarus: {workers} ranks, kill {kill_rank} at step {kill_at_step}")
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
            "yes" if rec["checkpoint_reload"] else "no",
        )
    console.print(table)
    loss = report["loss"]
    console.print(
        f"steps done {report['steps_done']}, loss {loss[0]:.3f} -> {loss[-1]:.3f}, "
        f"checkpoint reloads {report['checkpoint_reloads']}; wrote {path}"
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
