"""Online tuning of Marconi's alpha (weight of FLOP efficiency against recency).

Both tuners replay recent requests through size-only copies of the cache, one
per candidate alpha, and keep the alpha that did best. Replays only need byte
sizes, so an engine with real tensors tunes with the same code.

* :class:`PaperAlphaTuner` is the paper's procedure (artifact config_tuner.py):
  alpha = 0 until the first eviction; with R requests seen by then, once 5R
  requests have arrived, replay all of them from an empty cache for each alpha
  in 0, 0.1, ..., 2.0 and keep the one with the most FLOPs saved over the last
  500; tune once.
* :class:`WindowAlphaTuner` is this project's tuner. On this repository's
  ShareGPT trace the paper's procedure loses to SGLang+'s plain LRU at small
  caches: its one replay starts from an empty cache (not the steady state the
  choice will run in), its scores are nearly flat over alpha, so the pick is a
  near-tie that generalises badly, and it never revisits the pick. Here:

  1. every ``window`` requests, the cache is snapshotted; at the end of the
     window each alpha of the grid replays that window *from the snapshot*, so
     it is judged in the state it would actually run from;
  2. the score is the objective (token hits by default: the goal metric) summed
     over the window, accumulated over rounds with exponential decay, so one
     noisy window cannot flip the choice;
  3. near-ties (within ``tolerance`` of the best) keep the current alpha, else
     go to the smallest alpha among them; rounds in which the cache did not
     evict are skipped (every alpha would score the same).

  The chosen alpha is used for the *next* window, which the tuner has not
  seen: every decision is tested on held-out requests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# cache.py names AlphaTuner for type checkers only, so this import is not circular.
from thrifty.marconi.cache import PrefixCache, RequestOutcome

__all__ = [
    "TUNERS",
    "AlphaTuner",
    "PaperAlphaTuner",
    "WindowAlphaTuner",
    "choose_alpha",
    "make_tuner",
    "replay",
]

log = logging.getLogger(__name__)

TUNERS = ("window", "paper", "none")
"""What :func:`make_tuner` accepts (``"none"``: a fixed alpha)."""
PAPER_GRID = tuple(round(0.1 * i, 1) for i in range(21))
OBJECTIVES = ("hit_tokens", "flops_saved")


class AlphaTuner(Protocol):
    name: str

    def after_request(
        self,
        cache: PrefixCache,
        input_tokens: list[int],
        output_tokens: list[int],
        outcome: RequestOutcome,
    ) -> None: ...

    def report(self) -> dict[str, Any]: ...


def replay(
    start: PrefixCache,
    requests: Sequence[tuple[list[int], list[int]]],
    alpha: float,
    *,
    score_last: int | None = None,
    objective: str = "hit_tokens",
) -> float:
    """Serve ``requests`` from a size-only copy of ``start`` with ``alpha``; return the score.

    ``score_last`` counts only the last that many requests (the paper: 500).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    cache = start.snapshot()
    cache.eviction.alpha = alpha
    first_scored = len(requests) - score_last if score_last is not None else 0
    score = 0.0
    for i, (inputs, outputs) in enumerate(requests):
        outcome = cache.serve(inputs, outputs)
        if i >= first_scored:
            score += outcome.hit_tokens if objective == "hit_tokens" else outcome.flops_saved
    return score


@dataclass
class PaperAlphaTuner:
    """The paper's one-shot tuner (see the module docstring)."""

    grid: tuple[float, ...] = PAPER_GRID
    window_multiplier: int = 5
    score_last: int = 500
    objective: str = "flops_saved"
    name: str = "paper"
    history: list[tuple[int, float]] = field(default_factory=list)
    _log: list[tuple[list[int], list[int]]] = field(default_factory=list, repr=False)
    _tune_at: int | None = None
    _done: bool = False

    def after_request(
        self,
        cache: PrefixCache,
        input_tokens: list[int],
        output_tokens: list[int],
        outcome: RequestOutcome,
    ) -> None:
        self._log.append((input_tokens, output_tokens))
        if self._done:
            return
        if self._tune_at is None and cache.stats.evictions > 0:
            self._tune_at = self.window_multiplier * len(self._log)
        if self._tune_at is not None and len(self._log) >= self._tune_at:
            empty = _empty_like(cache)
            scores = [
                replay(
                    empty,
                    self._log,
                    alpha,
                    score_last=min(self.score_last, len(self._log)),
                    objective=self.objective,
                )
                for alpha in self.grid
            ]
            best = max(range(len(self.grid)), key=lambda i: (scores[i], -i))
            cache.eviction.alpha = self.grid[best]
            self.history.append((len(self._log), self.grid[best]))
            self._done = True
            self._log.clear()
            log.debug("paper tuner: alpha=%s from scores %s", self.grid[best], scores)

    def report(self) -> dict[str, Any]:
        return {"tuner": self.name, "alpha_history": list(self.history)}


@dataclass
class WindowAlphaTuner:
    """This project's tuner: periodic replays from a snapshot (see the module docstring).

    Args:
        grid: candidate alphas (ascending).
        window: requests per tuning round.
        decay: weight of past rounds' scores (0 = only the last round).
        tolerance: relative score gap under which alphas count as tied.
        objective: ``"hit_tokens"`` or ``"flops_saved"``.
        initial_alpha: alpha before the first decision.
    """

    grid: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    window: int = 100
    decay: float = 0.5
    tolerance: float = 0.01
    objective: str = "hit_tokens"
    initial_alpha: float = 0.0
    name: str = "window"
    history: list[tuple[int, float]] = field(default_factory=list)
    rounds: int = 0
    _seen: int = 0
    _snapshot: PrefixCache | None = field(default=None, repr=False)
    _evictions_at_snapshot: int = 0
    _pending: list[tuple[list[int], list[int]]] = field(default_factory=list, repr=False)
    _scores: list[float] | None = field(default=None, repr=False)
    _actual: float = 0.0
    _started: bool = False

    def __post_init__(self) -> None:
        if list(self.grid) != sorted(self.grid) or not self.grid:
            raise ValueError(f"grid must be a non-empty ascending sequence, got {self.grid}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must lie in [0, 1), got {self.decay}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    def after_request(
        self,
        cache: PrefixCache,
        input_tokens: list[int],
        output_tokens: list[int],
        outcome: RequestOutcome,
    ) -> None:
        self._seen += 1
        if not self._started:
            # A window's snapshot must be the state before its first request:
            # an empty cache if this is the cache's first request, else the
            # first window starts after this one.
            self._started = True
            cache.eviction.alpha = self.initial_alpha
            self.history.append((self._seen - 1, self.initial_alpha))
            if cache.stats.requests > 1:
                self._snapshot = cache.snapshot()
                self._evictions_at_snapshot = cache.stats.evictions
                return
            self._snapshot = _empty_like(cache)
        self._pending.append((input_tokens, output_tokens))
        self._actual += (
            outcome.hit_tokens if self.objective == "hit_tokens" else outcome.flops_saved
        )
        if len(self._pending) < self.window:
            return
        if cache.stats.evictions > self._evictions_at_snapshot:
            self._tune(cache, self._actual)
        self._pending = []
        self._actual = 0.0
        self._snapshot = cache.snapshot()
        self._evictions_at_snapshot = cache.stats.evictions

    def _tune(self, cache: PrefixCache, actual: float) -> None:
        assert self._snapshot is not None
        # The live cache already ran this window with the current alpha from
        # the snapshot's state, so that alpha needs no replay.
        current = cache.eviction.alpha
        round_scores = [
            actual
            if alpha == current
            else replay(self._snapshot, self._pending, alpha, objective=self.objective)
            for alpha in self.grid
        ]
        if self._scores is None:
            self._scores = round_scores
        else:
            self._scores = [
                self.decay * old + new for old, new in zip(self._scores, round_scores, strict=True)
            ]
        self.rounds += 1
        alpha = choose_alpha(self.grid, self._scores, current, self.tolerance)
        if alpha != cache.eviction.alpha:
            self.history.append((self._seen, alpha))
        cache.eviction.alpha = alpha
        log.debug("window tuner at %d: scores %s -> alpha %s", self._seen, self._scores, alpha)

    def report(self) -> dict[str, Any]:
        return {"tuner": self.name, "rounds": self.rounds, "alpha_history": list(self.history)}


def choose_alpha(
    grid: Sequence[float], scores: Sequence[float], current: float, tolerance: float
) -> float:
    """The decision rule: among alphas within ``tolerance`` (relative) of the best
    score, keep ``current`` if it is one of them, else take the smallest."""
    best = max(scores)
    tied = [a for a, s in zip(grid, scores, strict=True) if s >= best - abs(best) * tolerance]
    return current if current in tied else tied[0]


def _empty_like(cache: PrefixCache) -> PrefixCache:
    return PrefixCache(
        cache.capacity_bytes,
        cache.spec,
        cache.admission,
        cache.eviction.fresh(),
        truncate_oversized=cache.truncate_oversized,
        state_capacity_bytes=cache.state_capacity_bytes,
        source=cache.source,
        store_logits=cache.store_logits,
        need_logits=cache.need_logits,
    )


def make_tuner(name: str | None, **kwargs: Any) -> AlphaTuner | None:
    """``"window"`` (this project's), ``"paper"`` or ``None``/``"none"``."""
    if name in (None, "none"):
        return None
    if name == "window":
        return WindowAlphaTuner(**kwargs)
    if name == "paper":
        return PaperAlphaTuner(**kwargs)
    raise ValueError(f"unknown tuner {name!r}; expected one of {TUNERS}")
