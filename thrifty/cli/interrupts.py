"""Ctrl-C and SIGTERM stop any ``thrifty`` command promptly and tidily.

Every command runs under :class:`InterruptibleGroup`: SIGINT and SIGTERM
raise :class:`~thrifty.bench.results.Interrupted` in the main thread, so the
harness's ``finally`` blocks run (rank processes, torchrun agents and their
children are killed, network namespaces deleted) and a benchmark writes what
it finished (:func:`~thrifty.bench.results.write_partial`). The command then
says so on stderr and exits with 130 (SIGINT) or 143 (SIGTERM), as a shell
does for a process the signal killed.

The handler is installed explicitly, also where the process started with
SIGINT ignored (a background job of a non-interactive shell), where Python's
own Ctrl-C handling would otherwise never fire. A second signal during the
clean-up is reported and ignored for :data:`CLEANUP_GRACE_S` seconds, so
that pressing Ctrl-C twice does not abandon a half-deleted namespace; after
that another signal interrupts again.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from thrifty.bench.results import Interrupted, interrupted_by, partial_paths

__all__ = ["CLEANUP_GRACE_S", "InterruptibleGroup", "install_handlers"]

CLEANUP_GRACE_S = 10.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_stderr = Console(stderr=True)
_first_signal_at: float | None = None


def _handler(signum: int, frame: Any) -> None:
    global _first_signal_at
    now = time.monotonic()
    if _first_signal_at is not None and now - _first_signal_at < CLEANUP_GRACE_S:
        name = signal.Signals(signum).name
        print(f"thrifty: {name} again: still stopping (cleaning up)", file=sys.stderr, flush=True)
        return
    _first_signal_at = now
    raise Interrupted(signum)


def install_handlers() -> dict[int, Any]:
    """SIGINT and SIGTERM raise :class:`Interrupted`; returns the handlers they replaced.

    Main thread only (elsewhere a no-op that returns ``{}``).
    """
    global _first_signal_at
    if threading.current_thread() is not threading.main_thread():
        return {}
    _first_signal_at = None
    return {signum: signal.signal(signum, _handler) for signum in SIGNALS}


def report(exc: BaseException) -> int:
    """Say on stderr what an interrupt left behind; return the exit code (130 / 143)."""
    name = interrupted_by(exc)
    paths = partial_paths(exc)
    if paths:
        where = ", ".join(str(p) for p in paths)
        _stderr.print(f"interrupted by {name}: wrote partial results to {where}")
    else:
        _stderr.print(f"interrupted by {name}: stopped; no partial results to write")
    return exc.exit_code if isinstance(exc, Interrupted) else 130


class InterruptibleGroup(TyperGroup):
    """The ``thrifty`` group: its commands run with :func:`install_handlers` in force."""

    def invoke(self, ctx: click.Context) -> Any:
        previous = install_handlers()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise typer.Exit(report(exc)) from None
        finally:  # a command invoked in-process (tests, CliRunner) leaves no handler behind
            for signum, handler in previous.items():
                if handler is not None:  # None: installed outside Python, cannot be restored
                    signal.signal(signum, handler)
