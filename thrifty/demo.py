"""``thrifty demo``: a short tour of every system that exists, one summary table.

Each stop is a function returning a :class:`TourStop` row; systems add their own
stop here as they land. The whole tour must stay under 5 minutes on 2 cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from thrifty.bench.launch import run_ranks
from thrifty.dist import collectives as C

__all__ = ["TOUR", "TourStop", "collectives_stop"]


@dataclass
class TourStop:
    system: str
    what: str
    result: str
    seconds: float = 0.0


def _collectives_rank(nbytes: int, reps: int) -> dict[str, tuple[float, int]]:
    """Median time and wire bytes of each primitive on a ``nbytes`` message."""
    n = dist.get_world_size()
    x = torch.ones(nbytes // 4)
    ops = {
        "all-reduce": lambda: C.all_reduce(x),
        "all-gather": lambda: C.all_gather(x[: x.numel() // n]),
        "all-to-all (v)": lambda: C.all_to_all_v(list(x.chunk(n))),
    }
    out = {}
    for name, op in ops.items():
        op()  # warm-up
        times = []
        with C.count_bytes() as ledger:
            for _ in range(reps):
                dist.barrier()
                start = time.perf_counter()
                op()
                times.append(time.perf_counter() - start)
        out[name] = (sorted(times)[reps // 2], ledger.wire_bytes // reps)
    return out


def collectives_stop() -> TourStop:
    start = time.perf_counter()
    nbytes = 16 << 20
    timings = run_ranks(_collectives_rank, 2, nbytes, 5)[0]
    parts = [
        f"{name} {t * 1e3:.1f} ms, {wire / 2**20:.1f} MiB sent/rank"
        for name, (t, wire) in timings.items()
    ]
    return TourStop(
        "collectives (foundation)",
        "16 MiB on 2 gloo ranks, plain loopback, bytes counted",
        "; ".join(parts),
        time.perf_counter() - start,
    )


TOUR: list[Callable[[], TourStop]] = [collectives_stop]
