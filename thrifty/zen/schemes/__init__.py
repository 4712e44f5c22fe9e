"""The five ways to sum sparse tensors across ranks (Zen's Table 3 plus the dense baseline)."""

from __future__ import annotations

from thrifty.zen.schemes.agsparse import AllGatherSparse
from thrifty.zen.schemes.balanced_parallelism import BalancedParallelism
from thrifty.zen.schemes.base import Reduced, SparseScheme
from thrifty.zen.schemes.block_parallelism import ContiguousBlockParallelism
from thrifty.zen.schemes.dense_allreduce import DenseAllReduce
from thrifty.zen.schemes.hierarchical_centralization import HierarchicalCentralization

__all__ = [
    "AllGatherSparse",
    "BalancedParallelism",
    "ContiguousBlockParallelism",
    "DenseAllReduce",
    "HierarchicalCentralization",
    "Reduced",
    "SparseScheme",
]
