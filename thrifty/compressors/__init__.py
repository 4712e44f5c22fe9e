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
"""

from __future__ import annotations

from thrifty.compressors.base import (
    AllreduceRounds,
    Compressor,
    Reduce,
    ReduceOp,
    RoundSpec,
    TensorSpec,
    stable_key_hash,
)
from thrifty.compressors.bitpacking import (
    pack_bits,
    pack_codes,
    packed_nbytes,
    unpack_bits,
    unpack_codes,
)
from thrifty.compressors.low_precision import BF16, FP16, NoCompression
from thrifty.compressors.memory import DGCMemory, Memory, NoMemory, ResidualMemory
from thrifty.compressors.powersgd import PowerSGD
from thrifty.compressors.quantizers import QSGD, TernGrad
from thrifty.compressors.registry import (
    COMPRESSORS,
    available_compressors,
    default_memory,
    get_compressor,
    get_memory,
)
from thrifty.compressors.rounds import reduce_locally, run_allreduce_rounds_locally
from thrifty.compressors.sign import EFSignSGD, OneBit, SignSGD, Signum
from thrifty.compressors.sparsifiers import DGC, RandomK, SparsityWarmup, TopK

__all__ = [
    "BF16",
    "COMPRESSORS",
    "DGC",
    "FP16",
    "QSGD",
    "AllreduceRounds",
    "Compressor",
    "DGCMemory",
    "EFSignSGD",
    "Memory",
    "NoCompression",
    "NoMemory",
    "OneBit",
    "PowerSGD",
    "RandomK",
    "Reduce",
    "ReduceOp",
    "ResidualMemory",
    "RoundSpec",
    "SignSGD",
    "Signum",
    "SparsityWarmup",
    "TensorSpec",
    "TernGrad",
    "TopK",
    "available_compressors",
    "default_memory",
    "get_compressor",
    "get_memory",
    "pack_bits",
    "pack_codes",
    "packed_nbytes",
    "reduce_locally",
    "run_allreduce_rounds_locally",
    "stable_key_hash",
    "unpack_bits",
    "unpack_codes",
]
