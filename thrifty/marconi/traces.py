"""Request traces: the Marconi artifact's JSONL format, multi-turn sessions, synthetic traces.

A trace is a list of requests, each with its session, turn, arrival time and
token ids. In a chat session a request's input is the whole history (every
earlier input and reply) plus the new user message, and its output is the
recorded reply, so each turn's input starts with the previous turn's input +
output: that is the reuse a prefix cache sees.

The JSONL format is the artifact's: one object per line with ``session_id``,
``turn_id``, ``ts``, ``input_tokens`` and ``output_tokens`` (optional
``num_input_tokens`` / ``num_output_tokens`` are checked when present), so
LMSys or SWE-bench traces built for Marconi load as they are. Bad lines raise
:class:`TraceFormatError` naming the file and line. Nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Request",
    "Trace",
    "TraceFormatError",
    "build_sessions",
    "read_jsonl",
    "synthetic_trace",
    "with_resends",
    "write_jsonl",
]

log = logging.getLogger(__name__)

# Typing speed used to space chat turns: 90 words per minute, as the paper.
WORDS_PER_SECOND = 1.5


class TraceFormatError(ValueError):
    """A trace file line that is not a valid request."""


@dataclass(slots=True)
class Request:
    session_id: int | str
    turn_id: int
    ts: float
    input_tokens: list[int]
    output_tokens: list[int]

    def __post_init__(self) -> None:
        # Checked once here, so the cache (which sees these on every lookup)
        # need not: a negative or float id would be cached as a token silently.
        for name in ("input_tokens", "output_tokens"):
            tokens = getattr(self, name)
            if not isinstance(tokens, list):
                raise TypeError(
                    f"{name} must be a list of token ids (ints >= 0), got {type(tokens).__name__}"
                )
            for i, t in enumerate(tokens):
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise ValueError(f"{name}[{i}]={t!r}: token ids must be ints >= 0")

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "ts": self.ts,
            "num_input_tokens": len(self.input_tokens),
            "num_output_tokens": len(self.output_tokens),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }


@dataclass
class Trace:
    """Requests in arrival order (sorted by ``ts``; ties keep session/turn order)."""

    requests: list[Request]
    name: str = "trace"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.requests.sort(key=lambda r: r.ts)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)

    def session_ids(self) -> list[int | str]:
        """Session ids in order of first arrival."""
        return list(dict.fromkeys(r.session_id for r in self.requests))

    def summary(self) -> dict[str, Any]:
        inputs = [len(r.input_tokens) for r in self.requests]
        return {
            "name": self.name,
            "sessions": len(self.session_ids()),
            "requests": len(self.requests),
            "input_tokens": sum(inputs),
            "output_tokens": sum(len(r.output_tokens) for r in self.requests),
            "longest_input_tokens": max(inputs, default=0),
            "duration_s": (self.requests[-1].ts - self.requests[0].ts) if self.requests else 0.0,
            **self.meta,
        }


def with_resends(trace: Trace, rate: float, *, seed: int = 0) -> Trace:
    """``trace`` where, after a request, its session sends input + output again.

    A chat trace's next turn adds a user message, so no input ends exactly
    where an earlier request ended and whole-input hits (zero-prefill hits,
    :class:`~thrifty.marconi.cache.PrefixCache`'s ``store_logits``) never
    happen. Engines do see such inputs: "continue" after a cut-off answer, an
    agent loop that resends the transcript, a client retrying a request whose
    reply it lost. Here each request is followed, with probability ``rate``,
    by one whose input is that request's input + output, arriving at the same
    time; its output stands in the original's tokens (same length). The
    session's next turn still continues the original, so a resend is a side
    branch, not part of the session's history.

    Args:
        trace: the trace.
        rate: probability in [0, 1] that a request is resent.
        seed: the random choices.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must lie in [0, 1], got {rate!r}")
    rng = random.Random(seed)
    requests: list[Request] = []
    resent = 0
    for r in trace.requests:
        requests.append(r)
        if rng.random() < rate:
            again = Request(
                r.session_id, r.turn_id, r.ts, r.input_tokens + r.output_tokens, r.output_tokens
            )
            requests.append(again)
            resent += 1
    meta = {**trace.meta, "resend_rate": rate, "resends": resent}
    return Trace(requests, f"{trace.name}+resend{rate:g}", meta)


# --------------------------------------------------------------------------- JSONL


def _token_list(value: Any, key: str, where: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise TraceFormatError(f"{where}: {key!r} must be a list of non-negative ints")
    return value


def parse_request(obj: Any, where: str) -> Request:
    """One JSONL object as a :class:`Request`; ``where`` prefixes error messages."""
    if not isinstance(obj, dict):
        raise TraceFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [
        k for k in ("session_id", "turn_id", "ts", "input_tokens", "output_tokens") if k not in obj
    ]
    if missing:
        raise TraceFormatError(f"{where}: missing field(s) {', '.join(missing)}")
    session, turn, ts = obj["session_id"], obj["turn_id"], obj["ts"]
    if isinstance(session, bool) or not isinstance(session, int | str):
        raise TraceFormatError(f"{where}: session_id must be an int or a string, got {session!r}")
    if isinstance(turn, bool) or not isinstance(turn, int) or turn < 0:
        raise TraceFormatError(f"{where}: turn_id must be a non-negative int, got {turn!r}")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise TraceFormatError(f"{where}: ts must be a finite number, got {ts!r}")
    inputs = _token_list(obj["input_tokens"], "input_tokens", where)
    outputs = _token_list(obj["output_tokens"], "output_tokens", where)
    for key, tokens in (("num_input_tokens", inputs), ("num_output_tokens", outputs)):
        if key in obj and obj[key] != len(tokens):
            raise TraceFormatError(f"{where}: {key} is {obj[key]!r} but the list has {len(tokens)}")
    return Request(session, turn, float(ts), inputs, outputs)


def read_jsonl(path: str | Path, name: str | None = None) -> Trace:
    """Load a trace in the Marconi artifact's JSONL format (blank lines are skipped)."""
    path = Path(path)
    requests = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(
                    f"{where}: invalid JSON ({e.msg} at column {e.colno})"
                ) from None
            requests.append(parse_request(obj, where))
    if not requests:
        raise TraceFormatError(f"{path}: no requests")
    return Trace(requests, name or path.stem)


def write_jsonl(trace: Trace | Iterable[Request], path: str | Path) -> Path:
    """Write requests in the artifact's JSONL format (readable by :func:`read_jsonl`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for request in trace:
            f.write(json.dumps(request.to_json(), separators=(",", ":")))
            f.write("\n")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- chat sessions


def build_sessions(
    conversations: Iterable[Sequence[dict[str, Any]]],
    tokenize: Callable[[str], list[int]],
    *,
    num_sessions: int = 100,
    min_turns: int = 10,
    skip_sessions: int = 0,
    sessions_per_second: float = 1.0,
    max_input_tokens: int = 32_768,
    words_per_second: float = WORDS_PER_SECOND,
    message_format: str = "json",
    assistant_roles: Sequence[str] = ("gpt", "assistant", "chatgpt", "bard", "bing"),
) -> list[Request]:
    """Multi-turn requests from chat conversations, as the paper builds them.

    Each message is tokenised on its own: with ``message_format="json"`` its
    ``json.dumps`` (role and text, as the artifact), with ``"text"`` its text
    only. Every assistant message that follows at least one other message
    since the previous assistant message is a request: its input is all
    earlier messages, its output the message. A session is kept if it has at
    least ``min_turns`` requests; it stops before the first input longer than
    ``max_input_tokens``. Session ``i`` starts at ``i / sessions_per_second``
    and each later turn arrives after the user's typing time (its words at
    ``words_per_second``).

    Args:
        conversations: message lists (dicts with ``from``/``value``, or
            ``role``/``content``).
        tokenize: text -> token ids.
        num_sessions: sessions to return (fewer if the conversations run out).
        min_turns: minimum requests per session.
        skip_sessions: eligible sessions to skip first (for disjoint slices).
    """
    if sessions_per_second <= 0:
        raise ValueError(f"sessions_per_second must be positive, got {sessions_per_second}")
    if message_format not in ("json", "text"):
        raise ValueError(f"message_format must be 'json' or 'text', got {message_format!r}")

    def encode(message: dict[str, Any]) -> list[int]:
        return tokenize(json.dumps(message) if message_format == "json" else str(_text(message)))

    requests: list[Request] = []
    kept = skipped = 0
    for messages in conversations:
        if kept >= num_sessions:
            break
        turns = _turns(messages, assistant_roles)
        if len(turns) < min_turns:
            continue
        if skipped < skip_sessions:
            skipped += 1
            continue
        history: list[int] = []
        ts = kept / sessions_per_second
        session: list[Request] = []
        for turn_id, (user_messages, reply) in enumerate(turns):
            for message in user_messages:
                history.extend(encode(message))
            if len(history) > max_input_tokens:
                break
            if turn_id:
                words = sum(
                    len(str(_text(m)).split())
                    for m in user_messages
                    if _role(m) not in assistant_roles
                )
                ts += words / words_per_second
            output = encode(reply)
            session.append(Request(kept, turn_id, ts, list(history), output))
            history.extend(output)
        requests.extend(session)
        kept += 1
    if kept < num_sessions:
        log.warning(
            "only %d sessions with >= %d turns (asked for %d)", kept, min_turns, num_sessions
        )
    return requests


def _text(message: dict[str, Any]) -> Any:
    return message.get("value", message.get("content", ""))


def _role(message: dict[str, Any]) -> str:
    return str(message.get("from", message.get("role", ""))).lower()


def _turns(
    messages: Sequence[dict[str, Any]], assistant_roles: Sequence[str]
) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Pairs (messages since the last request, reply).

    An assistant message with no other message before it since the previous
    reply (a conversation opening with the assistant, or two replies in a row)
    is not a request; it joins the next request's input as history.
    """
    turns: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
    pending: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        is_reply = _role(message) in assistant_roles
        if is_reply and any(_role(m) not in assistant_roles for m in pending):
            turns.append((pending, message))
            pending = []
        else:
            pending.append(message)
    return turns


# --------------------------------------------------------------------------- synthetic


def synthetic_trace(
    *,
    num_sessions: int = 40,
    num_system_prompts: int = 4,
    system_prompt_tokens: int = 512,
    chat_turns: tuple[int, int] = (2, 10),
    agent_fraction: float = 0.25,
    agent_turns: tuple[int, int] = (15, 40),
    user_tokens: tuple[int, int] = (16, 160),
    tool_tokens: tuple[int, int] = (100, 600),
    output_tokens: tuple[int, int] = (16, 256),
    sessions_per_second: float = 1.0,
    think_time_s: float = 8.0,
    vocab_size: int = 32_000,
    seed: int = 0,
) -> Trace:
    """Random sessions that exercise both kinds of reuse.

    Every session starts with one of ``num_system_prompts`` shared system
    prompts (purely-input reuse across sessions); chat sessions add short user
    turns, agent sessions many turns of long tool output (input-and-output
    reuse along a growing context). Token ids are random; lengths are uniform
    in the given ranges; inter-turn gaps are exponential with mean
    ``think_time_s``.
    """
    for name, count in (
        ("num_sessions", num_sessions),
        ("num_system_prompts", num_system_prompts),
        ("vocab_size", vocab_size),
    ):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{name} must be an int >= 1, got {count!r}")
    if not 0 <= agent_fraction <= 1:
        raise ValueError(f"agent_fraction must be in [0, 1], got {agent_fraction!r}")
    rates = (("sessions_per_second", sessions_per_second), ("think_time_s", think_time_s))
    for name, rate in rates:
        if not 0 < rate < math.inf:
            raise ValueError(f"{name} must be a finite number > 0, got {rate!r}")
    for name, (low, high) in (
        ("chat_turns", chat_turns),
        ("agent_turns", agent_turns),
        ("user_tokens", user_tokens),
        ("tool_tokens", tool_tokens),
        ("output_tokens", output_tokens),
    ):
        if not 0 <= low <= high:
            raise ValueError(
                f"{name} must be a range (low, high) with 0 <= low <= high, got {(low, high)!r}"
            )
    rng = random.Random(seed)

    def tokens(bounds: tuple[int, int]) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(rng.randint(*bounds))]

    prompts = [
        [rng.randrange(vocab_size) for _ in range(system_prompt_tokens)]
        for _ in range(num_system_prompts)
    ]
    requests = []
    for session in range(num_sessions):
        agent = rng.random() < agent_fraction
        n_turns = rng.randint(*(agent_turns if agent else chat_turns))
        history = list(rng.choice(prompts))
        ts = session / sessions_per_second
        for turn in range(n_turns):
            history.extend(tokens(tool_tokens if agent and turn else user_tokens))
            output = tokens(output_tokens)
            requests.append(Request(session, turn, ts, list(history), output))
            history.extend(output)
            ts += rng.expovariate(1.0 / think_time_s)
    return Trace(
        requests,
        "synthetic",
        {"seed": seed, "num_system_prompts": num_system_prompts},
    )
