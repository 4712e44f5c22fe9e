"""Alpha-beta network model per collective, fitted on measured timings.

``time = max(floor, alpha + beta * wire_bytes(primitive, nbytes, n))``: floor
is the fixed cost of one small call (latency, synchronisation, launch), beta
the seconds per byte a rank puts on the wire (see :func:`thrifty.comm.collectives.wire_bytes` for
each primitive's volume). One pair is fitted per (primitive, world size)
because on a shared link all ranks' bytes queue on one bottleneck, which the
per-rank volume alone cannot tell. The timeline of MergeComp and ByteComp asks
this model what a collective costs.

Example::

    model = NetworkModel.load("results/collectives.json", "1gbit")
    model.time("all_reduce", 4 << 20, world_size=2)   # seconds
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from thrifty.comm.collectives import wire_bytes

__all__ = ["PRIMITIVES", "AlphaBeta", "Measurement", "NetworkModel"]

PRIMITIVES = ("all_reduce", "all_gather", "all_to_all")
LARGE_MESSAGE = 1 << 20  # bandwidth is fitted on messages at least this big


@dataclass(frozen=True)
class AlphaBeta:
    """``max(floor, alpha + beta * volume)`` seconds for ``volume`` wire bytes per rank.

    ``floor`` is the cost of the smallest call (latency, synchronising the
    ranks); large messages overlap it with the transfer, so their line has its
    own, usually smaller, intercept ``alpha``.
    """

    alpha: float  # seconds: intercept of the bandwidth line
    beta: float  # seconds per wire byte of one rank
    floor: float = 0.0  # seconds: no call is faster than this

    def __post_init__(self) -> None:
        # A NaN or negative coefficient would make every planner's timeline
        # (and so its chosen plan) meaningless without any error.
        for name in ("alpha", "beta", "floor"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def time(self, volume: float) -> float:
        return max(self.floor, self.alpha + self.beta * volume)


@dataclass(frozen=True)
class Measurement:
    primitive: str
    world_size: int
    nbytes: int  # message size, nccl-tests convention (see wire_bytes)
    seconds: float


def _relative_lstsq(vol: np.ndarray, t: np.ndarray) -> AlphaBeta:
    """Least squares on relative error; negative coefficients clamped to zero."""
    design = np.stack([np.ones_like(vol), vol], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    if alpha < 0:
        alpha, beta = 0.0, float(np.sum(vol / t) / np.sum((vol / t) ** 2))
    if beta < 0:
        alpha, beta = float(len(t) / np.sum(1 / t)), 0.0
    return AlphaBeta(float(alpha), float(beta))


def _fit_one(points: list[Measurement]) -> AlphaBeta:
    """Bandwidth line from the large messages, latency floor from the smallest.

    One least-squares line through 4 KB ... 64 MB fits neither end: small calls
    cost a fixed synchronisation time (milliseconds when several ranks share a
    core), while large ones grow linearly with an intercept well below it, and
    a token-bucket link lets mid-size bursts through faster than the sustained
    rate. So ``alpha`` and ``beta`` minimise the relative error of messages
    >= 1 MB (or of the larger half when fewer than two are that big), and
    ``floor`` is the cheapest of the smaller messages (each a median of reps), and
    the line never passes above that point. With fewer than four sizes, one relative least-squares
    line over all of them.
    """
    points = sorted(points, key=lambda p: p.nbytes)
    vol = np.array([wire_bytes(p.primitive, p.nbytes, p.world_size) for p in points])
    t = np.array([p.seconds for p in points])
    if len(points) < 4:
        return _relative_lstsq(vol, t)
    large = np.array([p.nbytes >= LARGE_MESSAGE for p in points])
    if large.sum() < 2:
        large = np.arange(len(points)) >= len(points) // 2
    # The cheapest small call, not just the smallest: one noisy small median on
    # a busy machine would otherwise lift the floor above mid-size messages.
    floor = float(t[~large].min()) if (~large).any() else float(t[0])
    v, tl = vol[large], t[large]
    line = _relative_lstsq(v, tl)
    if line.time(vol[0]) > floor:
        # Large messages say little about the intercept; a line above the
        # smallest call would over-predict every smaller message. Make the line
        # pass through the smallest call instead.
        dv = v - vol[0]
        beta = max(float(np.sum((dv / tl) * (1 - floor / tl)) / np.sum((dv / tl) ** 2)), 0.0)
        line = AlphaBeta(max(floor - beta * float(vol[0]), 0.0), beta)
    return AlphaBeta(line.alpha, line.beta, floor)


@dataclass
class NetworkModel:
    """Fitted alpha-beta per primitive and world size for one network condition."""

    name: str
    fits: dict[str, dict[int, AlphaBeta]] = field(default_factory=dict)

    def coefficients(self, primitive: str, world_size: int) -> AlphaBeta:
        by_n = self.fits.get(primitive)
        if not by_n:
            raise KeyError(f"network model {self.name!r} has no fit for {primitive!r}")
        if world_size in by_n:
            return by_n[world_size]
        # An unmeasured world size borrows the nearest measured one; the wire
        # volume already scales with n.
        nearest = min(by_n, key=lambda n: (abs(math.log(n / world_size)), n))
        return by_n[nearest]

    def time(self, primitive: str, nbytes: int, world_size: int) -> float:
        """Predicted seconds for one collective of ``nbytes`` on ``world_size`` ranks."""
        if not 0 <= nbytes < math.inf:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
        if not isinstance(world_size, numbers.Integral) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if world_size == 1:
            return 0.0
        volume = wire_bytes(primitive, nbytes, world_size)
        return self.coefficients(primitive, world_size).time(volume)

    @classmethod
    def fit(cls, name: str, measurements: Iterable[Measurement]) -> NetworkModel:
        groups: dict[tuple[str, int], list[Measurement]] = {}
        for m in measurements:
            if not 0 < m.seconds < math.inf:
                raise ValueError(f"seconds must be a finite time > 0 in every measurement, got {m}")
            groups.setdefault((m.primitive, m.world_size), []).append(m)
        model = cls(name)
        for (primitive, n), points in groups.items():
            if len(points) < 2:
                raise ValueError(f"need >= 2 sizes to fit {primitive} on {n} ranks")
            model.fits.setdefault(primitive, {})[n] = _fit_one(points)
        return model

    @classmethod
    def analytic(cls, name: str, rate_bits: float, latency: float = 50e-6) -> NetworkModel:
        """An unfitted model of an ideal link: ``latency`` per call, ``rate_bits`` per rank."""
        if not 0 < rate_bits < math.inf:
            raise ValueError(f"rate_bits must be a finite number > 0 bits/s, got {rate_bits!r}")
        if not 0 <= latency < math.inf:
            raise ValueError(f"latency must be a finite number >= 0 seconds, got {latency!r}")
        ab = AlphaBeta(latency, 8.0 / rate_bits)
        return cls(name, {p: {2: ab} for p in PRIMITIVES})

    def relative_errors(self, measurements: Iterable[Measurement]) -> list[float]:
        """(predicted - measured) / measured for each measurement."""
        return [
            (self.time(m.primitive, m.nbytes, m.world_size) - m.seconds) / m.seconds
            for m in measurements
        ]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "fits": {
                p: {
                    str(n): {"alpha": ab.alpha, "beta": ab.beta, "floor": ab.floor}
                    for n, ab in by_n.items()
                }
                for p, by_n in self.fits.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> NetworkModel:
        fits = {
            p: {
                int(n): AlphaBeta(v["alpha"], v["beta"], v.get("floor", 0.0))
                for n, v in by_n.items()
            }
            for p, by_n in data["fits"].items()
        }
        return cls(data["name"], fits)

    @classmethod
    def load(cls, path: str | Path, name: str) -> NetworkModel:
        """Read the model called ``name`` (e.g. ``"1gbit"``) from a collectives benchmark JSON."""
        data = json.loads(Path(path).read_text())
        models = {m["name"]: m for m in data.get("models", [])}
        if name not in models:
            raise KeyError(f"{path} has no network model {name!r}; it has {sorted(models)}")
        return cls.from_dict(models[name])
