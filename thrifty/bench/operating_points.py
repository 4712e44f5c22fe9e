"""Operating points: the batch a training benchmark runs at, and why.

Gradient compression pays off when communication is a large share of an
iteration. On this machine's CPU cores the default batches (``BATCH``) make
compute dominate, which is not the regime the papers target: there a GPU
finishes a step in tens of milliseconds against the same network. So every
training benchmark can run at two points:

* ``"heavy"``: the model's default batch (compute-heavy);
* ``"gpu-like"``: the largest batch whose compute per iteration on one rank
  (one thread, no communication) is at most :data:`GPU_LIKE_S`'s upper end,
  found by measurement here (:func:`gpu_like_batch`) and recorded with its
  probes, so a reader sees how it was chosen. For the GPT that means one
  sequence shorter than the default's 128 tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from thrifty.bench.models import MODEL_NAMES, build_model, training_loss

__all__ = [
    "BATCH",
    "GPU_LIKE_S",
    "POINTS",
    "OperatingPoint",
    "compute_seconds",
    "gpu_like_batch",
    "operating_points",
]

BATCH: dict[str, dict[str, int]] = {
    "cnn": {"batch_size": 16},
    "gpt": {"batch_size": 4, "seq_len": 128},
    "digits": {"batch_size": 64},
}
"""The compute-heavy point: each model's default batch."""

GPU_LIKE_S = (0.05, 0.15)
"""One rank's compute per iteration at the GPU-like point, in seconds (low, high)."""

POINTS = ("heavy", "gpu-like")


@dataclass
class OperatingPoint:
    """A named batch for one model, with the compute per iteration measured at it.

    ``probes`` are ``(batch_size, seconds)`` pairs measured while choosing it.
    """

    name: str
    model: str
    batch: dict[str, int]
    compute_s: float
    probes: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "batch": dict(self.batch),
            "compute_s": self.compute_s,
            "probes": [list(p) for p in self.probes],
        }


def compute_seconds(model_name: str, batch: dict[str, int], iters: int = 3) -> float:
    """Median seconds of one SGD iteration (forward, backward, step) here, one thread.

    One warm-up iteration first (allocator, autograd graph), then ``iters`` timed.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # a benchmark rank runs one thread
    try:
        torch.manual_seed(0)
        model = build_model(model_name)
        x, y = model.example_batch(**batch, generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            training_loss(model_name, model, (x, y)).backward()
            opt.step()

        step()
        times = []
        for _ in range(iters):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        torch.set_num_threads(saved)


def _candidates(model_name: str) -> list[dict[str, int]]:
    """Batches in increasing work up to the default one: halve the batch, then (GPT) the
    sequence, since one GPT sequence of 128 tokens alone is too much compute here."""
    default = BATCH[model_name]
    out = []
    size = 1
    while size <= default["batch_size"]:
        out.append({**default, "batch_size": size})
        size *= 2
    if "seq_len" in default:
        seq = default["seq_len"] // 2
        while seq >= 16:
            out.insert(0, {**default, "batch_size": 1, "seq_len": seq})
            seq //= 2
    return out


def gpu_like_batch(model_name: str, target: tuple[float, float] = GPU_LIKE_S) -> OperatingPoint:
    """The largest batch whose one-rank compute is at most ``target[1]`` seconds.

    Candidates (batch 1, 2, 4, ... and, for the GPT, shorter sequences first)
    are timed in increasing work until one exceeds the upper end. If even the
    smallest is slower, it is taken anyway: that is as GPU-like as this model
    gets here. A point below the lower end (a tiny model) is kept too; the
    probes, ``(tokens or images per rank, seconds)``, show how it was chosen.
    """
    low, high = target
    if not 0 < low <= high:
        raise ValueError(f"target must be 0 < low <= high seconds, got {target}")
    probes: list[tuple[int, float]] = []
    chosen: tuple[dict[str, int], float] | None = None
    for batch in _candidates(model_name):
        seconds = compute_seconds(model_name, batch)
        probes.append((batch["batch_size"] * batch.get("seq_len", 1), seconds))
        if seconds > high:
            break
        chosen = (batch, seconds)
    if chosen is None:  # the smallest is already too slow: keep it
        chosen = (_candidates(model_name)[0], probes[0][1])
    return OperatingPoint("gpu-like", model_name, chosen[0], chosen[1], probes)


def operating_points(model_name: str, names: Sequence[str]) -> list[OperatingPoint]:
    """Resolve point names (:data:`POINTS`) for ``model_name``, measuring each here."""
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; expected one of {list(MODEL_NAMES)}")
    unknown = [n for n in names if n not in POINTS]
    if unknown or not names:
        raise ValueError(f"bad operating points {list(names)}; expected some of {list(POINTS)}")
    points = []
    for name in dict.fromkeys(names):
        if name == "heavy":
            batch = dict(BATCH[model_name])
            seconds = compute_seconds(model_name, batch)
            points.append(OperatingPoint(name, model_name, batch, seconds))
        else:
            points.append(gpu_like_batch(model_name))
    return points
