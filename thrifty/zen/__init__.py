"""Zen: sparse tensor synchronisation (Wang et al., OSDI'25) and the schemes it is compared with.

* :func:`sync_sparse` sums or averages a sparse COO tensor over ranks with one
  of ``"zen"`` (Balanced Parallelism with hash bitmaps), ``"dense"``,
  ``"agsparse"``, ``"sparcml"`` (Hierarchical Centralization),
  ``"omnireduce"`` or ``"auto"`` (BP or HC from the measured densification;
  ``AutoScheme(criterion="time")`` instead keeps the fastest of BP, HC,
  AGsparse and dense, timed on the first calls);
* :func:`measure_sparsity` and :func:`predict_wire_bytes`: density, overlap,
  densification and skew of index sets, and the bytes each scheme sends
  (Eq. 1, Eq. 2).

Importing this package registers every scheme of :data:`SCHEMES` with the
gradient-sync substrate, so ``GradientSync(model, sparse_scheme="zen")``
(:mod:`thrifty.sync.engine`) sends ``nn.Embedding(sparse=True)`` gradients
through a scheme during training; a scheme object or a factory works too.

Every module but ``benchmark`` is library code and imports no benchmark code:
``sync``, ``schemes``, ``selection``, ``analytic``, ``sparse_rows``,
``hash_bitmap``, ``hierarchical_hashing``, ``owner_hash``, ``validation``, and
``workloads`` and ``analysis`` (real sparse gradients and their statistics; the
GPT workload takes its model from the caller). ``benchmark`` is ``thrifty zen
bench|analyze``: it runs them on the harness and writes the result files.
"""

from __future__ import annotations

from thrifty.sync import register_sparse_scheme
from thrifty.zen.analytic import SparsityStats, WireVolume, measure_sparsity, predict_wire_bytes
from thrifty.zen.schemes import SparseScheme
from thrifty.zen.selection import AutoScheme
from thrifty.zen.sync import SCHEMES, make_scheme, sync_sparse
from thrifty.zen.validation import SparseSyncError

__all__ = [
    "SCHEMES",
    "AutoScheme",
    "SparseScheme",
    "SparseSyncError",
    "SparsityStats",
    "WireVolume",
    "make_scheme",
    "measure_sparsity",
    "predict_wire_bytes",
    "sync_sparse",
]

# GradientSync(model, sparse_scheme=name): each scheme class is its own factory.
for _name, _scheme in SCHEMES.items():
    register_sparse_scheme(_name, _scheme)
