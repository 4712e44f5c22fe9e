"""What every ``thrifty`` command group shares: the console and the list-option parsers.

A parser that cannot read a user's value raises :class:`typer.BadParameter`, which
Typer reports against the flag it came from.
"""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()


def str_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def int_list(text: str) -> list[int]:
    """Comma-separated integers."""
    try:
        return [int(x) for x in str_list(text)]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from exc


def float_list(text: str) -> list[float]:
    """Comma-separated numbers; ``"1%"`` reads as ``0.01``."""
    try:
        return [float(x.rstrip("%")) / (100 if x.endswith("%") else 1) for x in str_list(text)]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from exc
