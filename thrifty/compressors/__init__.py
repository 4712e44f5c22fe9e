"""Gradient compressors and error feedback (GRACE's Compressor and Memory roles).

A :class:`Compressor` decides what one rank sends for a flat gradient tensor; a
:class:`Memory` adds error feedback around it; communication is the engine's
(:mod:`thrifty.sync`). See :mod:`thrifty.compressors.base` for the contract.

Example::

    from thrifty.compressors import get_compressor, default_memory

    compressor, memory = get_compressor("topk", ratio=0.01), default_memory("topk")
    compensated = memory.compensate(grad, key="fc.weight")
    payload = compressor.compress(compensated, key="fc.weight")
    memory.update("fc.weight", compensated, compressor.decompress(payload, grad.numel()))
    # ... all-gather the payloads, then:
    total = compressor.aggregate(gathered_payloads, grad.numel())

This package exports the entry points (the registries and the two base classes)
and the types a :class:`Compressor` subclass returns. The compressors themselves
(``TopK``, ``PowerSGD``, ...), the memories and the bit-packing and local
all-reduce helpers are imported from their modules, e.g.
``from thrifty.compressors.sparsifiers import TopK``.
"""

from __future__ import annotations

from thrifty.compressors.base import AllreduceRounds, Compressor, Reduce, RoundSpec, TensorSpec
from thrifty.compressors.memory import Memory
from thrifty.compressors.registry import (
    available_compressors,
    default_memory,
    get_compressor,
    get_memory,
)

__all__ = [
    "AllreduceRounds",
    "Compressor",
    "Memory",
    "Reduce",
    "RoundSpec",
    "TensorSpec",
    "available_compressors",
    "default_memory",
    "get_compressor",
    "get_memory",
]
