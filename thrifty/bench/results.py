"""Result files: every benchmark JSON says where, when and on what it was measured."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import thrifty

__all__ = ["git_commit", "machine_info", "result_path", "results_dir", "write_json"]


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


def machine_info() -> dict[str, Any]:
    return {
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
