"""Result files: every benchmark JSON says where, when and on what it was measured.

A benchmark stopped by Ctrl-C or SIGTERM still leaves what it finished: it
catches the :class:`KeyboardInterrupt` (the ``thrifty`` command raises
:class:`Interrupted`, a subclass naming the signal), writes its payload with
:func:`write_partial` (``"partial": true, "interrupted_by": "SIGINT"``) and
re-raises; the command then says where the partial file went
(:func:`partial_paths`) and exits with 128 + the signal's number.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
from pathlib import Path
from typing import Any

import torch

import thrifty

__all__ = [
    "Interrupted",
    "git_commit",
    "interrupted_by",
    "machine_info",
    "note_partial",
    "partial_paths",
    "result_path",
    "results_dir",
    "write_json",
    "write_partial",
]


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread so that every ``finally`` block runs.

    A :class:`KeyboardInterrupt`, so code that stops cleanly on Ctrl-C stops
    the same way on SIGTERM. ``exit_code`` is the shell's 128 + signal number
    (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(self.signal_name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interrupted_by(exc: BaseException) -> str:
    """The signal's name: ``"SIGTERM"`` for an :class:`Interrupted` one, else ``"SIGINT"``."""
    return exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"


def partial_paths(exc: BaseException) -> list[Path]:
    """The partial result files written while ``exc`` unwound (see :func:`write_partial`)."""
    return list(getattr(exc, "partial_paths", []))


def results_dir() -> Path:
    """``results/`` of the working directory (git-ignored), created on demand.

    ``THRIFTY_RESULTS=<dir>`` puts every result file there instead (the tests
    point it at a temporary directory so that they never touch ``results/``).
    """
    path = Path(os.environ.get("THRIFTY_RESULTS", "results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(thrifty.__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The load when this process started (a benchmark command imports this module
# at start-up): numbers taken on a loaded machine are not evidence, so every
# result file says what the machine was doing before the run and when it ended.
_LOAD_AT_START = os.getloadavg()


def machine_info() -> dict[str, Any]:
    return {
        "load_average_at_start": _LOAD_AT_START,
        "load_average_at_write": os.getloadavg(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "thrifty": thrifty.__version__,
        "git_commit": git_commit(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def result_path(target: str | Path, suffix: str) -> Path:
    """Where a result goes: a bare name -> ``results/<name><suffix>``; a path stays as given.

    A name is a string without a directory part and without a suffix, such as
    ``"compress_cnn"``; anything else (``Path("out/run.json")``, ``"run.json"``)
    is taken as the file to write, its directory created on demand.
    """
    path = Path(target)
    if isinstance(target, str) and path.name == target and not path.suffix:
        return results_dir() / f"{target}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, payload: dict[str, Any], path: str | Path | None = None) -> Path:
    """Write ``payload`` with machine info and a timestamp added; return the file written.

    The file is ``results/<name>.json`` unless ``path`` says where (see
    :func:`result_path`); ``name`` is recorded in the document as ``benchmark``.
    """
    path = result_path(name if path is None else path, ".json")
    doc = {
        "benchmark": name,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **payload,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def write_partial(
    name: str, payload: dict[str, Any], exc: BaseException, path: str | Path | None = None
) -> Path:
    """Write what a benchmark finished before ``exc`` (Ctrl-C, SIGTERM) stopped it.

    Like :func:`write_json`, with ``"partial": true`` and ``"interrupted_by"``
    (the signal's name) added; the file is recorded on ``exc`` so the command
    that catches it can say where it went. The caller re-raises ``exc``.
    """
    doc = {**payload, "partial": True, "interrupted_by": interrupted_by(exc)}
    written = write_json(name, doc, path)
    note_partial(exc, written)
    return written


def note_partial(exc: BaseException, path: Path) -> None:
    """Record on ``exc`` that a partial result went to ``path`` (see :func:`partial_paths`)."""
    exc.partial_paths = [*partial_paths(exc), path]  # type: ignore[attr-defined]
