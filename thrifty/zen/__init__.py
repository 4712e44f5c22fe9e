"""Zen: sparse tensor synchronisation (Wang et al., OSDI'25) and the schemes it is compared with.

* :func:`sync_sparse` sums or averages a sparse COO tensor over ranks with one
  of ``"zen"`` (Balanced Parallelism with hash bitmaps), ``"dense"``,
  ``"agsparse"``, ``"sparcml"`` (Hierarchical Centralization),
  ``"omnireduce"`` or ``"auto"`` (BP or HC from the measured densification;
  ``AutoScheme(criterion="time")`` instead keeps the fastest of BP, HC,
  AGsparse and dense, timed on the first calls);
* :mod:`~thrifty.zen.hierarchical_hashing`: Zen's Algorithm 1, vectorised;
* :mod:`~thrifty.zen.analytic`: bytes on the wire per scheme (Eq. 1, Eq. 2);
* :mod:`~thrifty.zen.selection`: BP or HC from gamma (or by measured time);
* :mod:`~thrifty.zen.workloads` and :mod:`~thrifty.zen.analysis`: real sparse
  gradients (LSTM LM on ShareGPT, DeepFM on Zipf features, DGC on a GPT) and
  their density, overlap, densification and skew (``thrifty zen analyze``).

``GradientSync(model, sparse_scheme="zen")`` (:mod:`thrifty.sync.engine`)
sends ``nn.Embedding(sparse=True)`` gradients through a scheme during training.
"""

from __future__ import annotations

from thrifty.zen.analytic import (
    SparsityStats,
    WireVolume,
    densification_ratios,
    measure_sparsity,
    predict_wire_bytes,
)
from thrifty.zen.hierarchical_hashing import (
    HashedPartition,
    h0_imbalance,
    hierarchical_hash_partition,
    imbalance_ratio,
    partition_by_owner,
)
from thrifty.zen.owner_hash import OwnerHash
from thrifty.zen.schemes import (
    AllGatherSparse,
    BalancedParallelism,
    ContiguousBlockParallelism,
    DenseAllReduce,
    HierarchicalCentralization,
    SparseScheme,
)
from thrifty.zen.selection import (
    AutoScheme,
    choose_bp_or_hc,
    choose_bp_or_hc_by_bytes,
    estimate_sparsity,
)
from thrifty.zen.sparse_rows import SparseRows
from thrifty.zen.sync import SCHEMES, agree_seed, make_scheme, sync_sparse
from thrifty.zen.validation import SparseSyncError

__all__ = [
    "SCHEMES",
    "AllGatherSparse",
    "AutoScheme",
    "BalancedParallelism",
    "ContiguousBlockParallelism",
    "DenseAllReduce",
    "HashedPartition",
    "HierarchicalCentralization",
    "OwnerHash",
    "SparseRows",
    "SparseScheme",
    "SparseSyncError",
    "SparsityStats",
    "WireVolume",
    "agree_seed",
    "choose_bp_or_hc",
    "choose_bp_or_hc_by_bytes",
    "densification_ratios",
    "estimate_sparsity",
    "h0_imbalance",
    "hierarchical_hash_partition",
    "imbalance_ratio",
    "make_scheme",
    "measure_sparsity",
    "partition_by_owner",
    "predict_wire_bytes",
    "sync_sparse",
]
