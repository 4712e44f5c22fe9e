"""The ``thrifty`` command: ``thrifty demo`` plus one subcommand group per system.

Each group lives in its own module and only parses options, calls the system's
entry point and prints tables; what a command computes lives in the system's
package (``thrifty.<system>.benchmark`` for benchmarks). Ctrl-C and SIGTERM stop
any command the same way (:mod:`thrifty.cli.interrupts`): children and network
namespaces cleaned up, partial results written, exit code 130 / 143.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.table import Table

import thrifty
from thrifty.cli import bench, bytecomp, compress, lazarus, marconi, mergecomp, zen
from thrifty.cli.interrupts import InterruptibleGroup
from thrifty.cli.params import console
from thrifty.demo import TOUR

app = typer.Typer(
    cls=InterruptibleGroup,
    help="thrifty: LLM training and serving that spend less network, recomputation and lost work.",
    no_args_is_help=True,
    add_completion=False,
)
for _name, _module in (
    ("bench", bench),
    ("compress", compress),
    ("mergecomp", mergecomp),
    ("bytecomp", bytecomp),
    ("zen", zen),
    ("marconi", marconi),
    ("lazarus", lazarus),
):
    app.add_typer(_module.app, name=_name)


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
    table = Table(title="thrifty tour")
    for column in ("system", "what ran", "result", "s"):
        table.add_column(column, overflow="fold")
    for stop in TOUR:
        console.print(f"[bold]>[/bold] {stop.__name__.removesuffix('_stop')} ...")
        row = stop()
        table.add_row(row.system, row.what, row.result, f"{row.seconds:.1f}")
    console.print(table)
