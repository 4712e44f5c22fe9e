"""Sync time of each sparse scheme on ``n`` nodes with one NIC each: a model to find where Zen wins.

This machine runs 8 emulated nodes at most, and there Zen's advantage is
small (the ranks' index sets barely overlap, so ``gamma(n)`` is close to
``n``). The paper's 5x appears at 16 nodes and beyond. :func:`simulate` predicts
one :func:`~thrifty.zen.sync_sparse` call from

* the sparsity (:class:`~thrifty.zen.analytic.SparsityStats`): density,
  ``gamma^k``, skew and the non-zero block fractions, measured on real
  gradients (:mod:`thrifty.zen.scaling` accumulates batches up to n = 256);
* the bytes each node sends and receives in each collective of the scheme,
  as our implementation issues them (every collective is one
  ``all_to_all_single`` or a ring all-reduce), including the control messages;
* a network of one NIC per node (:class:`NicNetwork`): each collective costs
  ``alpha + alpha_peer * peers + max(bytes out, bytes in) / rate`` on the
  busiest node, so an owner that many senders push to (incast) is limited by
  its own ingress, as on the emulated cluster (a ``tbf`` limit on both ends
  of every node's link);
* optionally the (de)compression work (:class:`ComputeModel`): seconds per
  element each scheme touches on one node, fitted on this machine; ranks
  that share cores run it ``n / cores`` times slower.

Time is the sum of the collectives and the compute: a scheme's steps run one
after another. The paper's model (Eq. 1, Eq. 2) is the special case with no
latency, no compute and no control messages.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from thrifty.zen.analytic import SCHEME_NAMES, SparsityStats, _hc_stage_sizes, gamma_at
from thrifty.zen.hash_bitmap import bitmap_bytes
from thrifty.zen.validation import METADATA_WORDS

__all__ = [
    "ComputeModel",
    "ComputeSample",
    "NicNetwork",
    "PrimitiveTiming",
    "SimulatedSync",
    "Step",
    "crossover",
    "fit_compute",
    "fit_network",
    "scheme_steps",
    "scheme_work",
    "simulate",
]

_SIZE_WORD = 8  # one int64 per peer in each size exchange


@dataclass(frozen=True)
class Step:
    """One collective of a scheme, seen from its busiest node."""

    op: str
    peers: int
    out_bytes: float
    in_bytes: float
    ring: bool = False  # a ring all-reduce: 2(n-1) sequential messages


@dataclass(frozen=True)
class NicNetwork:
    """One NIC per node, limited in both directions: alpha-beta per collective and per peer.

    Args:
        rate: bytes per second each NIC moves in each direction.
        alpha: seconds of fixed cost per collective call.
        alpha_peer: seconds per peer message in a call (all-to-all sends
            ``peers`` messages; a ring all-reduce ``2 (n-1)`` in sequence).
        ring_efficiency: the fraction of ``rate`` a ring all-reduce reaches
            (gloo's ring pipelines chunks; fitted, 1.0 on an ideal link).
    """

    rate: float
    alpha: float = 0.0
    alpha_peer: float = 0.0
    ring_efficiency: float = 1.0

    def __post_init__(self) -> None:
        for name in ("rate", "alpha", "alpha_peer", "ring_efficiency"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"NicNetwork.{name} must be a finite number >= 0, got {value!r}")
        if self.rate <= 0 or self.ring_efficiency <= 0:
            raise ValueError(
                f"NicNetwork.rate and ring_efficiency must be > 0, got {self.rate!r} "
                f"and {self.ring_efficiency!r}"
            )

    @classmethod
    def from_bits(
        cls, bits_per_s: float, alpha: float = 0.0, alpha_peer: float = 0.0
    ) -> NicNetwork:
        """A NIC of ``bits_per_s`` (e.g. ``25e9``) with the given latencies."""
        return cls(rate=bits_per_s / 8, alpha=alpha, alpha_peer=alpha_peer)

    def step_time(self, step: Step) -> float:
        """Seconds of one collective on the busiest node."""
        if step.ring:
            return (
                self.alpha
                + self.alpha_peer * step.peers
                + max(step.out_bytes, step.in_bytes) / (self.rate * self.ring_efficiency)
            )
        return (
            self.alpha
            + self.alpha_peer * step.peers
            + max(step.out_bytes, step.in_bytes) / self.rate
        )


@dataclass(frozen=True)
class ComputeModel:
    """Seconds of local work per scheme call: ``fixed + per_element * elements`` on one node.

    ``coefficients`` maps a scheme name to ``(fixed seconds, seconds per
    element)``; elements are those :func:`scheme_work` counts. ``cores`` is
    how many cores the simulated nodes share (this machine: 2, so 8 ranks run
    their work 4x slower); ``None`` gives every node its own.
    """

    coefficients: Mapping[str, tuple[float, float]]
    cores: int | None = None

    def seconds(self, scheme: str, elements: float, n: int) -> float:
        fixed, per_element = self.coefficients.get(scheme, (0.0, 0.0))
        sharing = max(1.0, n / self.cores) if self.cores else 1.0
        return sharing * (fixed + per_element * elements)

    def as_dict(self) -> dict[str, object]:
        return {
            "coefficients": {k: list(v) for k, v in self.coefficients.items()},
            "cores": self.cores,
        }


@dataclass(frozen=True)
class SimulatedSync:
    """The prediction for one scheme: network and compute seconds, and the steps behind them."""

    scheme: str
    nodes: int
    network_s: float
    compute_s: float
    max_rank_bytes: float
    steps: list[Step] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.network_s + self.compute_s

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["seconds"] = self.seconds
        return out


def _control(n: int, checked: bool) -> list[Step]:
    """The input check's all-gather of every rank's metadata (:mod:`thrifty.zen.validation`)."""
    if not checked:
        return []
    words = (n - 1) * METADATA_WORDS * 8
    return [Step("check", n - 1, words, words)]


def _exchange(n: int, op: str = "size exchange") -> Step:
    return Step(op, n - 1, (n - 1) * _SIZE_WORD, (n - 1) * _SIZE_WORD)


def scheme_steps(
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
) -> list[Step]:
    """The collectives one call of ``scheme`` issues, with the busiest node's bytes.

    Bytes follow :func:`~thrifty.zen.analytic.predict_wire_bytes` (the same
    formulas, per node and per direction instead of summed): AGsparse's
    all-gather, HC's ``log n`` pairwise stages (dense once COO is larger),
    BP's push (all-to-all) and pull (all-gather of each owner's share, COO or
    hash bitmap), OmniReduce's pushes and pulls to contiguous owners, where
    the owner of the densest range receives ``skewness`` times the mean.
    """
    if scheme not in SCHEME_NAMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEME_NAMES}")
    n, m, d = stats.world_size, stats.num_rows, stats.density
    if n <= 1:
        return []
    row = values_per_index * value_bytes
    entry = index_bytes + row
    nnz = d * m
    dense = m * row
    steps = _control(n, checked)
    if scheme == "dense":
        per_node = 2 * (n - 1) / n * dense
        return [*steps, Step("all_reduce", 2 * (n - 1), per_node, per_node, ring=True)]
    if scheme == "agsparse":
        volume = (n - 1) * nnz * entry
        return [*steps, _exchange(n), Step("all_gather_v", n - 1, volume, volume)]
    if scheme == "sparcml":
        extra, sizes = _hc_stage_sizes(n)
        if extra:
            steps += [
                _exchange(n),
                Step("fold", 1, min(nnz * entry, dense), min(nnz * entry, dense)),
            ]
        for k in sizes:
            volume = min(gamma_at(stats.gammas, k) * nnz * entry, dense)
            steps += [_exchange(n), Step(f"stage {k:g}", 1, volume, volume)]
        if extra:
            volume = min(stats.gamma * nnz * entry, dense)
            steps += [_exchange(n), Step("unfold", 1, volume, volume)]
        return steps
    if scheme == "zen":
        push = (n - 1) / n * nnz * entry * push_imbalance
        share = stats.gamma * nnz / n  # rows each owner holds after the push
        list_bytes = bitmap_bytes(math.ceil(m / n))
        pull = (n - 1) * (share * row + min(share * index_bytes, list_bytes)) * pull_imbalance
        return [
            *steps,
            _exchange(n),
            Step("push", n - 1, push, push),
            _exchange(n),
            Step("pull", n - 1, pull, pull),
        ]
    # omnireduce: non-zero blocks to contiguous owners; the densest range is the busiest
    per_block = max(1, block_size // values_per_index)
    num_blocks = math.ceil(m / per_block)
    f_b, f_bn = stats.block_density, stats.block_union_density
    if f_b is None or f_bn is None:  # indices spread uniformly at random
        f_b = 1 - (1 - d) ** per_block
        f_bn = 1 - (1 - min(1.0, stats.gamma * d)) ** per_block
    block_entry = index_bytes + per_block * row
    skew = min(stats.skewness, float(n))
    # Measured owner loads when the sets were there (measure_sparsity), else the union's skew.
    push_skew, pull_skew = stats.block_skew or (skew, skew)
    mine = f_b * num_blocks * block_entry  # one node's non-zero blocks
    union = f_bn * num_blocks * block_entry
    push_out = (n - 1) / n * mine * min(push_skew, n / max(n - 1, 1))
    push_in = (n - 1) * mine / n * push_skew
    pull_out = (n - 1) * union / n * pull_skew
    pull_in = (n - 1) / n * union
    return [
        *steps,
        _exchange(n),
        Step("push", n - 1, push_out, push_in),
        _exchange(n),
        Step("pull", n - 1, pull_out, pull_in),
    ]


def scheme_work(
    scheme: str, stats: SparsityStats, *, values_per_index: int = 1, block_size: int = 256
) -> float:
    """Elements one node encodes, sums and decodes in one call (the compute model's input).

    dense: the dense tensor (scatter, all-reduce's reduction, read back);
    AGsparse: every rank's rows it sums; HC: the running sum of each stage;
    BP: its own rows, what owners sum and the union it decodes; OmniReduce:
    its blocks, the owner's blocks and the union's blocks.
    """
    n, m = stats.world_size, stats.num_rows
    nnz = stats.density * m * values_per_index
    union = min(stats.gamma * nnz, m * values_per_index)
    if scheme == "dense":
        return m * values_per_index + union
    if scheme == "agsparse":
        return n * nnz + union
    if scheme == "sparcml":
        _, sizes = _hc_stage_sizes(n)
        dense = m * values_per_index
        return nnz + sum(min(gamma_at(stats.gammas, k) * nnz, dense) for k in sizes) + union
    if scheme == "zen":
        return 2 * nnz + union
    if scheme == "omnireduce":
        per_block = max(1, block_size // values_per_index)
        blocks = math.ceil(m / per_block) * per_block * values_per_index
        f_b = stats.block_density if stats.block_density is not None else stats.density
        f_bn = stats.block_union_density if stats.block_union_density is not None else union / m
        skew = min(stats.skewness, float(n))
        return f_b * blocks * (1 + skew) + f_bn * blocks
    raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEME_NAMES}")


def simulate(
    scheme: str,
    stats: SparsityStats,
    network: NicNetwork,
    compute: ComputeModel | None = None,
    *,
    index_bytes: int = 4,
    value_bytes: int = 4,
    values_per_index: int = 1,
    block_size: int = 256,
    checked: bool = True,
    push_imbalance: float = 1.0,
    pull_imbalance: float = 1.0,
) -> SimulatedSync:
    """Predicted seconds of one ``sync_sparse(..., scheme)`` call on ``stats.world_size`` nodes."""
    steps = scheme_steps(
        scheme,
        stats,
        index_bytes=index_bytes,
        value_bytes=value_bytes,
        values_per_index=values_per_index,
        block_size=block_size,
        checked=checked,
        push_imbalance=push_imbalance,
        pull_imbalance=pull_imbalance,
    )
    n = stats.world_size
    network_s = sum(network.step_time(s) for s in steps)
    compute_s = 0.0
    if compute is not None and n > 1:
        work = scheme_work(scheme, stats, values_per_index=values_per_index, block_size=block_size)
        compute_s = compute.seconds(scheme, work, n)
    max_rank = sum(max(s.out_bytes, s.in_bytes) for s in steps)
    return SimulatedSync(scheme, n, network_s, compute_s, max_rank, steps)


def crossover(
    nodes: Sequence[int],
    ours: Iterable[float],
    theirs: Iterable[float],
    factor: float = 2.0,
) -> int | None:
    """The smallest ``n`` from which ``theirs / ours >= factor`` holds at every larger ``n``.

    ``None`` when it never holds up to the last ``n``. Requiring it for every
    larger ``n`` ignores a lucky point before a dip.
    """
    ratios = [t / o if o > 0 else math.inf for o, t in zip(ours, theirs, strict=True)]
    if len(ratios) != len(nodes):
        raise ValueError(f"{len(nodes)} node counts but {len(ratios)} times")
    found = None
    for n, r in zip(reversed(nodes), reversed(ratios), strict=True):
        if r < factor:
            break
        found = n
    return found


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class PrimitiveTiming:
    """One timed collective on the cluster: the busiest node's bytes, its peers, seconds."""

    op: str  # "all_to_all" or "all_reduce"
    nodes: int
    peers: int
    node_bytes: float
    seconds: float


def _least_squares(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Non-negative least squares by elimination: drop a negative coefficient, refit."""
    import torch  # local: the model itself needs no torch

    active = list(range(len(rows[0])))
    while True:
        a = torch.tensor([[r[i] for i in active] for r in rows], dtype=torch.float64)
        b = torch.tensor(list(targets), dtype=torch.float64).unsqueeze(1)
        solution = torch.linalg.lstsq(a, b).solution.squeeze(1).tolist()
        negative = [i for i, v in zip(active, solution, strict=True) if v < 0]
        if not negative:
            out = [0.0] * len(rows[0])
            for i, v in zip(active, solution, strict=True):
                out[i] = v
            return out
        active.remove(negative[0])
        if not active:
            return [0.0] * len(rows[0])


def _through(timings: Sequence[PrimitiveTiming], fixed: float) -> float:
    """Seconds per byte of ``seconds = fixed + bytes * u``, least relative squares, u >= 0."""
    num = sum((t.node_bytes / t.seconds) * (1 - fixed / t.seconds) for t in timings)
    den = sum((t.node_bytes / t.seconds) ** 2 for t in timings)
    return max(num / den, 0.0) if den > 0 else 0.0


def fit_network(timings: Sequence[PrimitiveTiming]) -> NicNetwork:
    """``alpha`` and the rate from the all-to-all timings of one job; the ring's efficiency.

    ``alpha`` is the fastest call of the smallest size (there, the bytes cost
    nothing); the rate then fits the larger calls by least relative squares,
    so a 64 KB call counts as much as a 4 MB one. With timings from several
    world sizes, ``alpha_peer`` takes the growth of the small calls' time with
    the peers (ranks sharing cores wait for each other).
    """
    a2a = [t for t in timings if t.op == "all_to_all" and t.seconds > 0]
    if len(a2a) < 3:
        raise ValueError(f"fit_network needs >= 3 all_to_all timings, got {len(a2a)}")
    smallest = min(t.node_bytes / max(t.peers, 1) for t in a2a)
    small = [t for t in a2a if t.node_bytes / max(t.peers, 1) == smallest]
    large = [t for t in a2a if t not in small]
    alpha, alpha_peer, per_byte = 0.0, 0.0, 0.0
    for _ in range(4):  # the smallest calls' own bytes, refined away (exact on a line)
        by_peers: dict[int, float] = {}
        for t in small:
            rest = t.seconds - t.node_bytes * per_byte
            by_peers[t.peers] = min(rest, by_peers.get(t.peers, math.inf))
        if len(by_peers) > 1:
            lo, hi = min(by_peers), max(by_peers)
            alpha_peer = max(0.0, (by_peers[hi] - by_peers[lo]) / (hi - lo))
        alpha = max(0.0, min(by_peers[p] - alpha_peer * p for p in by_peers))
        shifted = [
            PrimitiveTiming(t.op, t.nodes, t.peers, t.node_bytes, t.seconds - alpha_peer * t.peers)
            for t in large
            if t.seconds - alpha_peer * t.peers > alpha
        ]
        per_byte = _through(shifted, alpha)

    def fixed(t: PrimitiveTiming) -> float:
        return alpha + alpha_peer * t.peers

    if per_byte <= 0:
        raise ValueError("the all_to_all timings do not grow with bytes: cannot fit a rate")
    network = NicNetwork(rate=1 / per_byte, alpha=alpha, alpha_peer=alpha_peer)
    ring = [
        PrimitiveTiming(t.op, t.nodes, t.peers, t.node_bytes, t.seconds - fixed(t) + alpha)
        for t in timings
        if t.op == "all_reduce" and t.seconds > fixed(t)
    ]
    ring_per_byte = _through(ring, alpha)
    if ring_per_byte <= 0:
        return network
    return NicNetwork(network.rate, alpha, alpha_peer, per_byte / ring_per_byte)


@dataclass(frozen=True)
class ComputeSample:
    """A measured call on a fast link: its scheme, nodes, the elements it touched, and seconds."""

    scheme: str
    nodes: int
    elements: float
    seconds: float


def fit_compute(samples: Sequence[ComputeSample], cores: int) -> ComputeModel:
    """Per scheme ``fixed + per_element * elements``, with ``n / cores`` sharing, relative error."""
    coefficients: dict[str, tuple[float, float]] = {}
    for scheme in sorted({s.scheme for s in samples}):
        mine = [s for s in samples if s.scheme == scheme and s.seconds > 0]
        if not mine:
            continue
        rows = []
        for s in mine:
            sharing = max(1.0, s.nodes / cores)
            rows.append([sharing / s.seconds, sharing * s.elements / s.seconds])
        fixed, per_element = _least_squares(rows, [1.0] * len(mine))
        coefficients[scheme] = (fixed, per_element)
    return ComputeModel(coefficients, cores)
