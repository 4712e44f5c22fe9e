"""Profile: what the timeline needs to know about one model on this machine.

Per gradient tensor, in the order backward produces them: numel, dtype and the
time it becomes ready (seconds after backward starts). Per iteration: forward,
backward and optimizer-step times. Per compressor: the measured cost of
encoding (error feedback + compress, the sender's whole work) and of decoding
one payload, at a grid of sizes, interpolated for any size in between.

Ready times are measured *without* communication (local backward only), as
Espresso traces its models without compression: the timeline adds the
communication and compression itself. :func:`profile_model` measures them in
iterations of its own; planners that watch the first training iterations
instead (one uncompressed whole-model group sends nothing during backward)
turn what they saw into a profile with :func:`profile_from_ready_times`.

Example::

    prof = profile_model(model, lambda: F.cross_entropy(model(x), y), optimizer=opt,
                         compressors=[Strategy.make("topk", ratio=0.01)])
    prof.save("results/profile-cnn.json")
"""

from __future__ import annotations

import bisect
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thrifty.sync.plan import Strategy, has_feedback

__all__ = [
    "CompressionCost",
    "Profile",
    "TensorProfile",
    "measure_compression",
    "profile_from_ready_times",
    "profile_model",
    "ready_order",
]


@dataclass(frozen=True)
class TensorProfile:
    name: str
    numel: int
    dtype: str
    ready: float  # seconds after backward starts


@dataclass
class CompressionCost:
    """Measured (size -> seconds) for one strategy's encode and decode, interpolated."""

    sizes: list[int]
    encode: list[float]
    decode: list[float]

    def _at(self, values: list[float], numel: int) -> float:
        if numel <= 0:
            return 0.0
        i = bisect.bisect_left(self.sizes, numel)
        if i == 0:
            return values[0]
        if i == len(self.sizes):  # beyond the grid: cost grows linearly with size
            return values[-1] * numel / self.sizes[-1]
        lo, hi = self.sizes[i - 1], self.sizes[i]
        w = (numel - lo) / (hi - lo)
        return values[i - 1] * (1 - w) + values[i] * w

    def encode_time(self, numel: int) -> float:
        return self._at(self.encode, numel)

    def decode_time(self, numel: int) -> float:
        return self._at(self.decode, numel)


@dataclass
class Profile:
    tensors: list[TensorProfile]
    forward: float
    backward: float
    step: float
    world_size: int = 1
    costs: dict[str, CompressionCost] = field(default_factory=dict)  # by Strategy.cost_key()

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def cost(self, strategy: Strategy) -> CompressionCost:
        key = strategy.cost_key()
        if key in self.costs:
            return self.costs[key]
        if strategy.label() in self.costs:  # profiles saved before cost_key existed
            return self.costs[strategy.label()]
        raise KeyError(f"profile has no compression cost for {key}; profiled: {sorted(self.costs)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors": [asdict(t) for t in self.tensors],
            "forward": self.forward,
            "backward": self.backward,
            "step": self.step,
            "world_size": self.world_size,
            "costs": {k: asdict(v) for k, v in self.costs.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        return cls(
            tensors=[TensorProfile(**t) for t in data["tensors"]],
            forward=data["forward"],
            backward=data["backward"],
            step=data["step"],
            world_size=data.get("world_size", 1),
            costs={k: CompressionCost(**v) for k, v in data.get("costs", {}).items()},
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def ready_order(ready: Mapping[str, Sequence[float]], names: Sequence[str]) -> list[str]:
    """``names`` in the order backward produced them: by median observed ready time.

    Tensors never seen ready (unused parameters, no gradient) go last, in the
    order of ``names``: the engine only finishes them once backward is over.
    """
    seen = sorted((n for n in names if ready.get(n)), key=lambda n: statistics.median(ready[n]))
    return seen + [n for n in names if not ready.get(n)]


def _tensor_profiles(
    params: Mapping[str, torch.Tensor], ready: Mapping[str, Sequence[float]]
) -> list[TensorProfile]:
    """One TensorProfile per parameter, with its real dtype, in backward order.

    A tensor never seen ready is placed last and ready when backward ends (the
    latest observed time), so the ready times never go back in time.
    """
    order = ready_order(ready, list(params))
    end = max((_median(ready[n]) for n in order if ready.get(n)), default=0.0)
    return [
        TensorProfile(
            name,
            params[name].numel(),
            str(params[name].dtype).removeprefix("torch."),
            _median(ready[name]) if ready.get(name) else end,
        )
        for name in order
    ]


def profile_from_ready_times(
    params: Mapping[str, torch.Tensor],
    ready: Mapping[str, Sequence[float]],
    compressors: Sequence[Strategy] = (),
    world_size: int = 1,
) -> Profile:
    """A profile from ready times observed while training, for a planner deciding in place.

    Args:
        params: the parameters the plan covers, by name.
        ready: each one's ready times (seconds after backward starts) over the
            iterations watched; the median is kept, so one slow iteration on a
            shared machine does not skew the profile.
        compressors: strategies whose encode/decode cost is measured here.
        world_size: ranks the plan will run on.

    Tensors are in backward order (:func:`ready_order`), each with its own
    dtype. Backward time is the last ready time; forward and step are unknown
    (0): the timeline only needs them to report a whole iteration.
    """
    tensors = _tensor_profiles(params, ready)
    backward = max((t.ready for t in tensors), default=0.0)
    total = sum(t.numel for t in tensors)
    costs = {s.cost_key(): measure_compression(s, max_numel=total) for s in compressors}
    return Profile(tensors, 0.0, backward, 0.0, world_size, costs)


def profile_model(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    iters: int = 5,
    warmup: int = 2,
    compressors: Sequence[Strategy] = (),
    world_size: int = 1,
) -> Profile:
    """Time ``iters`` local iterations (after ``warmup``) and the given compressors.

    ``loss_fn`` runs the forward pass on a batch and returns the loss. Medians
    are kept, so one slow iteration on a shared machine does not skew the profile.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ready: dict[str, list[float]] = {n: [] for n, _ in named}
    clock: dict[str, float] = {}

    def make_hook(name: str) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            if "start" in clock:
                ready[name].append(time.perf_counter() - clock["start"])

        return hook

    hooks = [p.register_post_accumulate_grad_hook(make_hook(n)) for n, p in named]
    forward, backward, step = [], [], []
    try:
        for i in range(warmup + iters):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = loss_fn()
            t1 = time.perf_counter()
            clock["start"] = t1
            loss.backward()
            t2 = time.perf_counter()
            clock.pop("start")
            if optimizer is not None:
                optimizer.step()
            t3 = time.perf_counter()
            if i < warmup:
                for v in ready.values():
                    v.clear()
                continue
            forward.append(t1 - t0)
            backward.append(t2 - t1)
            step.append(t3 - t2)
    finally:
        for h in hooks:
            h.remove()
    tensors = _tensor_profiles(dict(named), ready)
    total = sum(t.numel for t in tensors)
    costs = {s.cost_key(): measure_compression(s, max_numel=total) for s in compressors}
    return Profile(tensors, _median(forward), _median(backward), _median(step), world_size, costs)


def measure_compression(
    strategy: Strategy, max_numel: int, min_numel: int = 256, reps: int = 3
) -> CompressionCost:
    """Encode and decode seconds at sizes min_numel, 4x, 16x, ... up to max_numel.

    Encode is the sender's whole work in the engine: error feedback compensate,
    compress, decompress for the feedback, update. Decode is one payload's
    decompression (the receiver pays it once per rank it hears from).
    """
    sizes = []
    s = min_numel
    while s < max_numel:
        sizes.append(s)
        s *= 4
    sizes.append(max(max_numel, min_numel))
    enc, dec = [], []
    gen = torch.Generator().manual_seed(0)
    for numel in sizes:
        compressor = strategy.build_compressor()
        memory = strategy.build_memory()
        x = torch.randn(numel, generator=gen)
        if compressor is None:
            enc.append(0.0)
            dec.append(0.0)
            continue
        e_times, d_times = [], []
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            comp = memory.compensate(x, "p") if memory is not None else x
            payload = compressor.compress(comp, "p")
            t1 = time.perf_counter()
            out = compressor.decompress(payload, numel, "p")
            t2 = time.perf_counter()
            if has_feedback(memory):
                memory.update("p", comp, out)
            t3 = time.perf_counter()
            if rep:  # the first call allocates state
                feedback = (t2 - t1) + (t3 - t2) if has_feedback(memory) else 0.0
                e_times.append((t1 - t0) + feedback)
                d_times.append(t2 - t1)
        enc.append(_median(e_times))
        dec.append(_median(d_times))
    return CompressionCost(sizes, enc, dec)
