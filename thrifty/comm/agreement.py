"""Every rank checks one description of its set-up; a mismatch raises the same error on all.

Collectives assume that every rank sends tensors of matching sizes in the
same order. When two ranks disagree (a model built with another width, other
compressor options, another plan) the collective does not fail cleanly: gloo
aborts the process ("Received data size doesn't match expected size"), a rank
waits forever, or, when the sizes happen to match, unrelated numbers are
averaged and training goes on, silently wrong. And a rank that raises on its
own before a collective leaves the others waiting in it.

So each rank describes what must agree as a list of :class:`Entry` (a label
and a printable value, plus any error it met while building its part), and
:func:`check_agreement` compares the descriptions of all ranks:

* cost: one all-gather of a 32-byte SHA-256 digest per check;
* only when the digests differ are the full descriptions exchanged (a second
  all-gather, on the failure path only), and every rank raises the same
  :class:`RankMismatchError`, naming the first entry that differs and each
  rank's value, e.g. ``parameter 'weight': shape differs across ranks: rank 0
  (4, 8), rank 1 (5, 8)``;
* an error met on every rank alike is re-raised on every rank as it was.

Non-finite values are the same problem at run time: one rank's NaN makes its
compressor raise while the others wait in the collective, or, uncompressed,
spreads into every rank's average. :func:`count_slots` and :func:`read_slots`
fold one count per rank into a payload that is all-reduced anyway (one
element per rank, each rank writing only its own), so every rank learns every
rank's count in the same step without another round trip, and
:class:`NonFiniteGradientError` reports them alike on every rank.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from thrifty.comm import collectives

__all__ = [
    "Entry",
    "NonFiniteGradientError",
    "RankMismatchError",
    "check_agreement",
    "count_slots",
    "error_entry",
    "nonfinite_count",
    "nonfinite_message",
    "read_slots",
]

_ERROR_LABEL = "error while setting up"
_LISTED_RANKS = 4  # above this many ranks, ranks with the same value are grouped


class RankMismatchError(ValueError):
    """The ranks of a process group disagree about something every collective relies on.

    Raised with the same message on every rank of the group, so none is left
    waiting in a collective and every log names the same difference.
    """


class NonFiniteGradientError(FloatingPointError, ValueError):
    """A gradient held NaN or Inf on some rank; raised alike on every rank, in the same step.

    ``counts`` maps what held them (a parameter group, a bucket) to
    ``{rank: count}``; a count at the payload's cap is a lower bound.
    """

    def __init__(self, message: str, counts: dict[str, dict[int, int]]) -> None:
        super().__init__(message)
        self.counts = counts


def nonfinite_count(flat: torch.Tensor) -> int:
    """How many elements of ``flat`` are NaN or +-Inf (0 after one reduction when none is)."""
    if flat.numel() == 0:
        return 0
    # One reduction without a temporary: NaN and Inf reach the sum; only a
    # non-finite sum (which an overflow of finite values also gives) pays the
    # elementwise scan. The compressors' own check does the same.
    wide = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(flat.sum(dtype=wide))):
        return 0
    return int((~torch.isfinite(flat)).sum())


def _cap(dtype: torch.dtype) -> int:
    """The largest count a slot of ``dtype`` holds exactly."""
    if dtype.is_floating_point:
        return int(2 / torch.finfo(dtype).eps)  # 2**(mantissa bits + 1)
    if dtype == torch.bool:
        return 1
    return int(torch.iinfo(dtype).max)


def count_slots(count: int, rank: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """``size`` elements of ``dtype``, zero but for this rank's ``count`` (capped) at ``rank``.

    Appended to a payload that is summed (or max-reduced) over the group, the
    slots come back holding every rank's count: each rank writes only its own.
    """
    slots = torch.zeros(size, dtype=dtype)
    slots[rank] = min(count, _cap(dtype))
    return slots


def read_slots(slots: torch.Tensor) -> dict[int, int]:
    """``{rank: count}`` of the ranks whose slot is non-zero."""
    values = slots.to(torch.float64).tolist()
    return {r: int(v) for r, v in enumerate(values) if v}


def nonfinite_message(what: str, counts: dict[str, dict[int, int]], outcome: str) -> str:
    """``what: NaN/Inf gradient values on rank 1: 3 in group 0 (fc.weight); <outcome>``."""
    by_rank: dict[int, list[str]] = {}
    for place, per_rank in counts.items():
        for rank, n in per_rank.items():
            by_rank.setdefault(rank, []).append(f"{n} in {place}")
    parts = [f"rank {r}: {', '.join(places)}" for r, places in sorted(by_rank.items())]
    where = "; ".join(parts)
    return f"{what}: NaN/Inf gradient values on {len(by_rank)} rank(s) ({where}); {outcome}"


@dataclass(frozen=True)
class Entry:
    """One thing every rank must agree on.

    Args:
        label: what it is, e.g. ``"parameter 'fc.weight': shape"``.
        value: this rank's value, as printed in the error, e.g. ``"(4, 8)"``.
        hint: how to fix it, appended to the error when this entry differs.
    """

    label: str
    value: str
    hint: str = ""


def error_entry(exc: BaseException | None) -> Entry:
    """The entry that reports an error this rank met while building its description."""
    value = "none" if exc is None else f"{type(exc).__name__}: {exc}"
    return Entry(_ERROR_LABEL, value)


def _digest(entries: Sequence[Entry]) -> torch.Tensor:
    text = json.dumps([[e.label, e.value] for e in entries])
    return torch.frombuffer(bytearray(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8)


def check_agreement(
    entries: Sequence[Entry],
    group: dist.ProcessGroup | None = None,
    what: str = "set-up",
    error: BaseException | None = None,
) -> None:
    """Raise the same :class:`RankMismatchError` on every rank when descriptions differ.

    A collective over ``group``: every rank must call it at the same point.

    Args:
        entries: this rank's description, in an order every rank shares (put
            counts and names before per-item fields, so that the first
            difference is the most telling one).
        what: names the caller in the message, e.g. ``"GradientSync"``.
        error: an error this rank met while building its description (e.g. an
            unknown compressor name). Ranks that all met the same error re-raise
            it; when only some did, every rank raises :class:`RankMismatchError`
            naming it. Either way no rank is left waiting.

    Raises:
        RankMismatchError: the descriptions (or the errors) differ across ranks.
    """
    described = [error_entry(error), *entries]
    mine = _digest(described)
    digests = collectives.all_gather(mine, group=group)
    if all(torch.equal(d, digests[0]) for d in digests):  # type: ignore[union-attr]
        if error is not None:  # the same error on every rank: raise it as it was
            raise error
        return
    texts = collectives.all_gather_packed(
        [
            torch.frombuffer(
                bytearray(json.dumps([[e.label, e.value, e.hint] for e in described]).encode()),
                dtype=torch.uint8,
            )
        ],
        group=group,
    )
    tables = [[Entry(*row) for row in json.loads(bytes(t[0].tolist()))] for t in texts]
    raise RankMismatchError(_first_difference(tables, what)) from error


def _first_difference(tables: list[list[Entry]], what: str) -> str:
    """The message for the first position where the ranks' descriptions differ."""
    longest = max(len(t) for t in tables)
    for i in range(longest):
        row = [t[i] if i < len(t) else Entry("end of description", "absent") for t in tables]
        if len({(e.label, e.value) for e in row}) == 1:
            continue
        labels = {e.label for e in row}
        hint = next((e.hint for e in row if e.hint), "")
        if len(labels) == 1:
            label = row[0].label
            if label == _ERROR_LABEL:
                head = f"{what}: an error on some ranks only"
            else:
                head = f"{what}: {label} differs across ranks"
            body = _per_rank([e.value for e in row])
        else:  # the descriptions have drifted apart (should follow a count that differs)
            head = f"{what}: descriptions differ across ranks at item {i}"
            body = _per_rank([f"{e.label} = {e.value}" for e in row])
        return f"{head}: {body}" + (f" ({hint})" if hint else "")
    return f"{what}: descriptions differ across ranks"  # equal entries, unequal digests: never


def _per_rank(values: list[str]) -> str:
    """``rank 0 (4, 8), rank 1 (5, 8)``; with many ranks, ranks grouped by value."""
    if len(values) <= _LISTED_RANKS:
        return ", ".join(f"rank {r} {v}" for r, v in enumerate(values))
    by_value: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        by_value.setdefault(v, []).append(r)
    return "; ".join(
        f"{'rank' if len(ranks) == 1 else 'ranks'} {_ranges(ranks)}: {v}"
        for v, ranks in by_value.items()
    )


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    parts: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ", ".join(parts)
