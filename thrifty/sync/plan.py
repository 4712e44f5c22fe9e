"""Plan: ordered groups of parameters, each synchronised by one Strategy.

A plan is what MergeComp and ByteComp produce and what :class:`GradientSync`
executes. It names parameters (``model.named_parameters()`` names) in backward
order, so it can be saved, compared across ranks and read by a person.

* :class:`Strategy`: which compressor (or none), with which error feedback,
  over which collective:

  - ``all_reduce``: uncompressed, or a compressor whose payloads sum
    elementwise (FP16, BF16, shared-seed Random-k, PowerSGD, TernGrad with
    scaler sharing);
  - ``all_gather``: every rank gathers every payload and aggregates (any compressor);
  - ``all_to_all``: the "divisible" scheme: the tensor is cut into one shard
    per rank, rank j receives every rank's compressed shard j, aggregates it,
    re-compresses the sum and all-gathers it. Less traffic than all-gather,
    two rounds of compression. Uncompressed, it is reduce-scatter + all-gather.

  Two switches change where the work happens (Espresso's dimensions 2 and 3):

  - ``offload``: (de)compression runs on a CPU worker thread instead of the
    thread that runs backward, so it does not delay backward (it still takes
    CPU time; on a GPU machine it frees the GPU);
  - ``hierarchical``: with several ranks per node, an uncompressed
    reduce-scatter inside each node first, then the collective above across
    nodes on each rank's shard (ranks with the same local index, all at once),
    then an all-gather inside the node. Only the inter-node step is compressed.

* :class:`Plan`: the groups. ``Plan.layer_wise`` (one group per tensor),
  ``Plan.whole_model`` (one group), ``Plan.contiguous`` (given group lengths).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from thrifty.compressors import Compressor, default_memory, get_compressor, get_memory
from thrifty.compressors.memory import Memory, NoMemory
from thrifty.compressors.registry import MEMORIES

__all__ = ["COLLECTIVES", "Collective", "Group", "Plan", "Strategy"]

Collective = Literal["all_reduce", "all_gather", "all_to_all"]
COLLECTIVES: tuple[str, ...] = ("all_reduce", "all_gather", "all_to_all")


@dataclass(frozen=True)
class Strategy:
    """How one group is synchronised. Immutable and hashable, so plans compare and hash.

    Args:
        compressor: registry name (``thrifty.compressors.available_compressors()``)
            or None for plain fp32.
        options: the compressor's keyword arguments, as sorted ``(name, value)`` pairs.
        collective: see the module docstring. None picks all-reduce when the
            compressor allows it, else all-gather.
        memory: error feedback: ``"default"`` (the compressor's usual one),
            ``"none"``, ``"residual"`` or ``"dgc"``.
    """

    compressor: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    collective: Collective = "all_reduce"
    memory: str = "default"
    offload: bool = False
    hierarchical: bool = False

    @classmethod
    def make(
        cls,
        compressor: str | None = None,
        collective: Collective | None = None,
        memory: str = "default",
        *,
        offload: bool = False,
        hierarchical: bool = False,
        **options: Any,
    ) -> Strategy:
        """Build and validate a strategy; ``collective=None`` chooses the natural one."""
        if compressor is None and options:
            raise ValueError(f"compressor options {sorted(options)} given without a compressor")
        if collective is None:
            if compressor is None:
                collective = "all_reduce"
            else:
                probe = get_compressor(compressor, **options)
                collective = "all_reduce" if probe.supports_allreduce_rounds else "all_gather"
        strategy = cls(
            compressor, tuple(sorted(options.items())), collective, memory, offload, hierarchical
        )
        strategy.validate()
        return strategy

    def validate(self) -> None:
        if self.collective not in COLLECTIVES:
            raise ValueError(
                f"unknown collective {self.collective!r}; expected one of {COLLECTIVES}"
            )
        if self.memory != "default" and self.memory not in MEMORIES:
            raise ValueError(
                f"unknown memory {self.memory!r}; expected one of {('default', *sorted(MEMORIES))}"
            )
        if self.compressor is None:
            if self.collective == "all_gather":
                raise ValueError(
                    "uncompressed groups use all_reduce or all_to_all (reduce-scatter + "
                    "all-gather); all_gather would send every rank's full gradient"
                )
            if self.offload:
                raise ValueError("offload moves (de)compression; an uncompressed group has none")
            return
        compressor = self.build_compressor()
        if self.collective == "all_reduce" and not compressor.supports_allreduce_rounds:
            raise ValueError(
                f"{self.compressor} payloads cannot be summed by all-reduce (their aggregation "
                "is not elementwise); use collective='all_gather' or 'all_to_all'"
            )

    def build_compressor(self) -> Compressor | None:
        """A fresh compressor instance (each group owns its state)."""
        if self.compressor is None:
            return None
        return get_compressor(self.compressor, **dict(self.options))

    def build_memory(self) -> Memory | None:
        if self.compressor is None:
            return None
        if self.memory == "default":
            return default_memory(self.compressor)
        return get_memory(self.memory)

    def label(self) -> str:
        """Short readable name, e.g. ``topk(ratio=0.01)/all_gather``; profiles key costs by it."""
        return _label(self)

    def cost_key(self) -> str:
        """What the (de)compression cost depends on: compressor, options, memory.

        Not the collective, nor where it runs: profiles key measured costs by this.
        """
        if self.compressor is None:
            return "fp32"
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        memory = "" if self.memory == "default" else f"[memory={self.memory}]"
        return f"{self.compressor}{'(' + opts + ')' if opts else ''}{memory}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "compressor": self.compressor,
            "options": dict(self.options),
            "collective": self.collective,
            "memory": self.memory,
            "offload": self.offload,
            "hierarchical": self.hierarchical,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Strategy:
        return cls(
            data["compressor"],
            tuple(sorted(data.get("options", {}).items())),
            data["collective"],
            data.get("memory", "default"),
            bool(data.get("offload", False)),
            bool(data.get("hierarchical", False)),
        )


@functools.lru_cache(maxsize=1024)
def _label(strategy: Strategy) -> str:
    suffix = ("+offload" if strategy.offload else "") + ("+hier" if strategy.hierarchical else "")
    if strategy.compressor is None:
        return f"fp32/{strategy.collective}{suffix}"
    opts = ",".join(f"{k}={v}" for k, v in strategy.options)
    name = f"{strategy.compressor}{'(' + opts + ')' if opts else ''}/{strategy.collective}"
    return name + suffix


def has_feedback(memory: Memory | None) -> bool:
    """Whether a memory keeps state (so the sender must decompress its own payload)."""
    return memory is not None and not isinstance(memory, NoMemory)


@dataclass(frozen=True)
class Group:
    """Parameters (by name, backward order) flattened and synchronised together."""

    names: tuple[str, ...]
    strategy: Strategy = field(default_factory=Strategy)


@dataclass(frozen=True)
class Plan:
    """Ordered groups covering every trainable parameter exactly once."""

    groups: tuple[Group, ...]

    @property
    def names(self) -> list[str]:
        return [n for g in self.groups for n in g.names]

    @classmethod
    def layer_wise(cls, names: Sequence[str], strategy: Strategy | None = None) -> Plan:
        strategy = strategy or Strategy()
        return cls(tuple(Group((n,), strategy) for n in names))

    @classmethod
    def whole_model(cls, names: Sequence[str], strategy: Strategy | None = None) -> Plan:
        strategy = strategy or Strategy()
        return cls((Group(tuple(names), strategy),) if names else ())

    @classmethod
    def contiguous(
        cls,
        names: Sequence[str],
        lengths: Sequence[int],
        strategies: Strategy | Sequence[Strategy] | None = None,
    ) -> Plan:
        """Consecutive groups of the given lengths (MergeComp's partitions)."""
        if sum(lengths) != len(names) or any(n <= 0 for n in lengths):
            raise ValueError(
                f"group lengths {list(lengths)} must be positive and sum to {len(names)}"
            )
        if strategies is None or isinstance(strategies, Strategy):
            strategies = [strategies or Strategy()] * len(lengths)
        if len(strategies) != len(lengths):
            raise ValueError(f"{len(strategies)} strategies for {len(lengths)} groups")
        groups, start = [], 0
        for length, strategy in zip(lengths, strategies, strict=True):
            groups.append(Group(tuple(names[start : start + length]), strategy))
            start += length
        return cls(tuple(groups))

    def check_covers(self, names: Iterable[str]) -> None:
        """Every given (trainable) parameter appears exactly once, and nothing else."""
        wanted = list(names)
        seen: dict[str, int] = {}
        for n in self.names:
            seen[n] = seen.get(n, 0) + 1
        twice = sorted(n for n, c in seen.items() if c > 1)
        missing = sorted(set(wanted) - set(seen))
        unknown = sorted(set(seen) - set(wanted))
        if twice or missing or unknown:
            raise ValueError(
                "plan does not cover the model's trainable parameters exactly once: "
                f"repeated {twice[:5]}, missing {missing[:5]}, unknown {unknown[:5]}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [
                {"names": list(g.names), "strategy": g.strategy.to_dict()} for g in self.groups
            ]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            tuple(
                Group(tuple(g["names"]), Strategy.from_dict(g["strategy"])) for g in data["groups"]
            )
        )

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON: equal on two ranks iff the plans are equal."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> str:
        return "; ".join(f"[{len(g.names)} tensors: {g.strategy.label()}]" for g in self.groups)
