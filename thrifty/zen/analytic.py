"""Bytes on the wire per scheme, from the sparsity of the tensors (Zen §2.3, Eq. 1-2).

Notation (Zen's): ``M`` rows (indices), ``n`` ranks, ``d`` the mean density of
one rank's tensor, ``gamma^k`` the densification after summing ``k`` ranks'
tensors (``density of the sum / d``; ``gamma^1 = 1``, ``gamma = gamma^n``),
``s_i`` index bytes and ``s_v`` value bytes per index (a row of an embedding
gradient: ``values_per_index * value_bytes``). Volumes count what ranks
*send*, as :class:`thrifty.comm.collectives.CommLedger` does, summed over all
ranks (``total``) and per rank (``/ n``):

============  =====================================================================
dense         ``n * 2(n-1)/n * M s_v``                     (ring all-reduce)
agsparse      ``n * (n-1) d M (s_i + s_v)``
sparcml (HC)  ``n * sum_{i=1..log n} min(gamma^(2^(i-1)) d M (s_i+s_v), M s_v)``  (Eq. 2,
              with the switch to dense; non-power-of-two ``n`` adds a fold and unfold)
omnireduce    ``(n-1) (f_B + f_B^n) (M/R) (s_b + R s_v)``, ``R`` rows per block,
              ``f_B`` / ``f_B^n`` the non-zero block fractions before / after summing
zen (BP)      ``(n-1) [d M (s_i + s_v) + gamma d M s_v + n min(gamma d M s_i / n, M/(8n))]``
============  =====================================================================

``zen`` with COO on both phases is Eq. 1 (``((n-1)/n)(1 + gamma) d M (s_i+s_v)``
per rank). The model also counts the small control messages our
implementation sends (the input check and the size exchange before each
variable-size collective), so measured and predicted bytes can be compared
directly. Time is ``bytes / bandwidth`` on the busiest link (no latency term),
as in the paper.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from thrifty.zen.hash_bitmap import bitmap_bytes
from thrifty.zen.validation import METADATA_WORDS

__all__ = [
    "SCHEME_NAMES",
    "SparsityStats",
    "WireVolume",
    "densification_ratios",
    "eq1_bp_volume",
    "eq2_hc_volume",
    "gamma_at",
    "measure_sparsity",
    "predict_wire_bytes",
]

SCHEME_NAMES = ("dense", "agsparse", "sparcml", "omnireduce", "zen")
_SIZE_WORD = 8  # one int64 per peer in each size exchange


def gamma_at(gammas: Mapping[int, float], k: float) -> float:
    """``gamma^k``, linearly interpolated between measured points (``gamma^1 = 1``).

    Linear is exact for no overlap (``gamma^k = k``) and full overlap (1), and
    exact on average for HC's fractional group sizes (see :func:`predict_wire_bytes`).
    """
    points = sorted({1: 1.0, **gammas}.items())
    if k <= points[0][0]:
        return points[0][1]
    for (k0, g0), (k1, g1) in itertools.pairwise(points):
        if k <= k1:
            return g0 + (g1 - g0) * (k - k0) / (k1 - k0)
    return points[-1][1]


def _hc_stage_sizes(n: int) -> tuple[int, list[float]]:
    """Ranks folded in (``n - m``) and the mean group size each HC stage sends."""
    core = 1 << (n.bit_length() - 1)
    # A folded core rank starts with 2 tensors, the others with 1: on average n/core.
    return n - core, [(n / core) * 2 ** (i - 1) for i in range(1, core.bit_length())]


def eq1_bp_volume(gamma: float, n: int, density: float, num_rows: int, entry_bytes: float) -> float:
    """Eq. 1: bytes per rank of BP with COO, ``((n-1)/n)(gamma + 1) d M (s_i + s_v)``."""
    return (n - 1) / n * (gamma + 1) * density * num_rows * entry_bytes


def eq2_hc_volume(
    gammas: Mapping[int, float], n: int, density: float, num_rows: int, entry_bytes: float
) -> float:
    """Eq. 2: bytes per rank of HC with COO, ``sum_i gamma^(2^(i-1)) d M (s_i + s_v)``.

    For ``n`` not a power of two (Eq. 2 assumes one) the fold stage (``d M``),
    the stages over groups of ``2^(i-1) n/m`` tensors, and the unfold stage
    (``gamma^n d M``) are added, as they run one after another.
    """
    extra, sizes = _hc_stage_sizes(n)
    words = sum(gamma_at(gammas, k) for k in sizes)
    if extra:
        words += 1.0 + gamma_at(gammas, n)
    return words * density * num_rows * entry_bytes


@dataclass(frozen=True)
class SparsityStats:
    """The sparsity of ``n`` ranks' tensors that the volumes depend on."""

    num_rows: int
    world_size: int
    density: float
    gammas: dict[int, float] = field(default_factory=dict)
    block_density: float | None = None
    block_union_density: float | None = None
    skewness: float = 1.0
    overlap: float | None = None
    block_skew: tuple[float, float] | None = None  # OmniReduce owners: (push-in, pull-out)

    @property
    def gamma(self) -> float:
        """``gamma^n``: densification of the full sum."""
        return gamma_at(self.gammas, self.world_size)


@dataclass(frozen=True)
class WireVolume:
    """Predicted bytes sent, summed over ranks: payload and control messages."""

    payload_bytes: float
    control_bytes: float
    max_rank_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.payload_bytes + self.control_bytes


def densification_ratios(
    index_sets: Sequence[Tensor], sizes: Sequence[int] | None = None
) -> dict[int, float]:
    """``gamma^k`` of unique index sets, averaged over aligned groups of ``k`` consecutive ranks.

    ``sizes`` defaults to the powers of two up to ``n`` and ``n`` itself (what
    HC's stages and BP need); the groups of a power of two are exactly HC's.
    """
    n = len(index_sets)
    if sizes is None:
        sizes = sorted({1 << i for i in range(n.bit_length()) if 1 << i <= n} | {n})
    mean = sum(s.numel() for s in index_sets) / max(n, 1)
    ratios: dict[int, float] = {}
    for k in sizes:
        groups = [index_sets[g : g + k] for g in range(0, n - k + 1, k)]
        unions = [torch.unique(torch.cat(list(g))).numel() for g in groups]
        ratios[k] = (sum(unions) / len(unions)) / mean if mean else 1.0
    return ratios


def _check_index_sets(index_sets: Sequence[Tensor], num_rows: int) -> None:
    """Bad indices would give wrong statistics (or a cryptic bincount error) silently."""
    if isinstance(num_rows, bool) or not isinstance(num_rows, numbers.Integral) or num_rows < 1:
        raise ValueError(f"num_rows must be an int >= 1, got {num_rows!r}")
    if len(index_sets) == 0:
        raise ValueError("index_sets is empty: need one index tensor per rank")
    for r, s in enumerate(index_sets):
        if not isinstance(s, Tensor) or s.dim() != 1 or s.is_floating_point() or s.is_complex():
            got = f"{s.dtype} of shape {tuple(s.shape)}" if isinstance(s, Tensor) else type(s)
            raise TypeError(
                f"index_sets[{r}] must be a 1-D integer tensor of row indices, got {got}"
            )
        if s.numel() and not 0 <= int(s.min()) <= int(s.max()) < num_rows:
            bad = int(s.max()) if int(s.max()) >= num_rows else int(s.min())
            raise ValueError(
                f"index_sets[{r}] holds row {bad}, outside 0..{num_rows - 1} (num_rows={num_rows})"
            )


def measure_sparsity(
    index_sets: Sequence[Tensor],
    num_rows: int,
    rows_per_block: int | None = None,
    overlap: bool = True,
) -> SparsityStats:
    """Exact statistics of every rank's set of non-zero row indices (unique int64 tensors).

    ``rows_per_block`` adds the non-zero block fractions of OmniReduce-like
    blocks. Also measured: the skewness ratio of the union (``n`` contiguous
    equal parts, ``max part density / density``) and the mean pairwise
    overlap ratio ``|I_a & I_b| / min(|I_a|, |I_b|)`` (unless not ``overlap``:
    it takes ``n^2 / 2`` set intersections, half a minute at ``n = 256``).
    """
    _check_index_sets(index_sets, num_rows)
    n = len(index_sets)
    mean = sum(s.numel() for s in index_sets) / n
    union = torch.unique(torch.cat(list(index_sets)))
    block_density = block_union_density = None
    block_skew = None
    if rows_per_block:
        num_blocks = math.ceil(num_rows / rows_per_block)
        blocks = [torch.unique(s // rows_per_block) for s in index_sets]
        block_density = sum(b.numel() for b in blocks) / n / num_blocks
        union_blocks = torch.unique(union // rows_per_block)
        block_union_density = union_blocks.numel() / num_blocks
        block_skew = _owner_skew(blocks, union_blocks, num_blocks)
    skewness = 1.0
    if union.numel():
        part = torch.div(union * n, num_rows, rounding_mode="floor")
        skewness = float(torch.bincount(part, minlength=n).max()) * n / union.numel()
    overlaps = []
    for a in range(n if overlap else 0):
        for b in range(a + 1, n):
            small = min(index_sets[a].numel(), index_sets[b].numel())
            if small:
                common = torch.isin(index_sets[a], index_sets[b]).sum().item()
                overlaps.append(common / small)
    return SparsityStats(
        num_rows=num_rows,
        world_size=n,
        density=mean / num_rows if num_rows else 0.0,
        gammas=densification_ratios(index_sets),
        block_density=block_density,
        block_union_density=block_union_density,
        skewness=skewness,
        overlap=sum(overlaps) / len(overlaps) if overlaps else None,
        block_skew=block_skew,
    )


def _owner_skew(
    blocks: Sequence[Tensor], union_blocks: Tensor, num_blocks: int
) -> tuple[float, float]:
    """Busiest contiguous owner over the mean: blocks pushed to it, union blocks it sends.

    OmniReduce-like owners take equal contiguous ranges of blocks
    (:class:`~thrifty.zen.schemes.block_parallelism.ContiguousBlockParallelism`);
    under skew the first owners receive most pushes and send most of the sum.
    """
    n = len(blocks)
    bounds = torch.tensor([(p * num_blocks) // n for p in range(1, n + 1)], dtype=torch.int64)

    def per_owner(ids: Tensor) -> Tensor:
        return torch.bincount(torch.searchsorted(bounds, ids, right=True), minlength=n)

    pushed = sum(per_owner(b) for b in blocks)
    union = per_owner(union_blocks)
    push = float(pushed.max()) * n / max(float(pushed.sum()), 1.0)  # type: ignore[union-attr]
    pull = float(union.max()) * n / max(float(union.sum()), 1.0)
    return push, pull


def predict_wire_bytes(
    scheme: str,
    stats: SparsityStats,
    *,
    index_bytes: int = 4,
    value_bytes: int = 4,
    values_per_index: int = 1,
    block_size: int = 256,
    checked: bool = True,
    push_imbalance: float = 1.0,
    pull_imbalance: float = 1.0,
) -> WireVolume:
    """Predicted bytes of one :func:`thrifty.zen.sync.sync_sparse` call (see the module table).

    ``checked`` adds the input check's all-gather. ``max_rank_bytes`` is the
    busiest rank's share: Zen's by the given imbalance ratios (Theorem 2: about
    1), OmniReduce's by ``stats.skewness``, the others' the mean.
    """
    if scheme not in SCHEME_NAMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEME_NAMES}")
    n, m, d = stats.world_size, stats.num_rows, stats.density
    row = values_per_index * value_bytes
    entry = index_bytes + row
    nnz = d * m
    control = n * (n - 1) * METADATA_WORDS * 8 if checked else 0.0
    exchange = n * (n - 1) * _SIZE_WORD  # one size exchange, all ranks
    if n <= 1:
        return WireVolume(0.0, 0.0, 0.0)
    if scheme == "dense":
        per_rank = math.ceil(2 * (n - 1) / n * m * row)
        return WireVolume(n * per_rank, control, per_rank + control / n)
    if scheme == "agsparse":
        payload = n * (n - 1) * nnz * entry
        return WireVolume(payload, control + exchange, (payload + control + exchange) / n)
    if scheme == "sparcml":
        extra, sizes = _hc_stage_sizes(n)
        core = n - extra
        dense = m * row
        payload = core * sum(min(gamma_at(stats.gammas, k) * nnz * entry, dense) for k in sizes)
        if extra:
            payload += extra * (min(nnz * entry, dense) + min(stats.gamma * nnz * entry, dense))
        stages = len(sizes) + (2 if extra else 0)
        control += stages * exchange
        return WireVolume(payload, control, (payload + control) / n)
    if scheme == "omnireduce":
        per_block = max(1, block_size // values_per_index)
        num_blocks = math.ceil(m / per_block)
        f_b = stats.block_density
        f_bn = stats.block_union_density
        if f_b is None or f_bn is None:  # indices spread uniformly at random
            f_b = 1 - (1 - d) ** per_block
            f_bn = 1 - (1 - min(1.0, stats.gamma * d)) ** per_block
        block_entry = index_bytes + per_block * row
        push = (n - 1) * f_b * num_blocks * block_entry
        pull = (n - 1) * f_bn * num_blocks * block_entry
        control += 2 * exchange
        busiest = push / n * min(stats.skewness, n / (n - 1)) + pull / n * stats.skewness
        return WireVolume(push + pull, control, busiest + control / n)
    if scheme == "zen":
        union = stats.gamma * nnz
        push = (n - 1) * nnz * entry
        list_bytes = bitmap_bytes(math.ceil(m / n))
        pull = (n - 1) * (union * row + n * min(union / n * index_bytes, list_bytes))
        control += 2 * exchange
        busiest = (push * push_imbalance + pull * pull_imbalance) / n
        return WireVolume(push + pull, control, busiest + control / n)
    raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEME_NAMES}")
