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
Users who keep ``DistributedDataParallel`` (on NCCL, which has no sparse
all-reduce) register :func:`sparse_comm_hook` with a :class:`SparseHookState`
instead (:mod:`thrifty.zen.ddp_hook`: DDP hands every sparse gradient to the hook
as a bucket of its own).

Where Zen wins beyond the 8 nodes this machine runs: :mod:`thrifty.zen.simulator`
predicts each scheme's sync time on ``n`` nodes with one NIC each (alpha-beta per
collective, incast at the owners, optional local work), and
:mod:`thrifty.zen.scaling` feeds it the sparsity of real gradients up to 256
ranks and checks it against real runs. ``AutoScheme(criterion="model")``
chooses with it.

Every module but ``benchmark`` is library code and imports no benchmark code:
``sync``, ``ddp_hook``, ``schemes``, ``selection``, ``analytic``, ``simulator``,
``scaling``, ``sparse_rows``, ``hash_bitmap``, ``hierarchical_hashing``,
``owner_hash``, ``validation``, and ``workloads`` and ``analysis`` (real sparse
gradients and their statistics; the GPT workload takes its model from the
caller). ``benchmark`` is ``thrifty zen bench|analyze|simulate``: it runs them
on the harness and writes the result files.
"""

from __future__ import annotations

from thrifty.sync import register_sparse_scheme
from thrifty.zen.analytic import SparsityStats, WireVolume, measure_sparsity, predict_wire_bytes
from thrifty.zen.ddp_hook import SparseHookState, sparse_comm_hook
from thrifty.zen.schemes import SparseScheme
from thrifty.zen.selection import AutoScheme
from thrifty.zen.sync import SCHEMES, make_scheme, sync_sparse
from thrifty.zen.validation import SparseSyncError

__all__ = [
    "SCHEMES",
    "AutoScheme",
    "SparseHookState",
    "SparseScheme",
    "SparseSyncError",
    "SparsityStats",
    "WireVolume",
    "make_scheme",
    "measure_sparsity",
    "predict_wire_bytes",
    "sparse_comm_hook",
    "sync_sparse",
]

# GradientSync(model, sparse_scheme=name): each scheme class is its own factory.
for _name, _scheme in SCHEMES.items():
    register_sparse_scheme(_name, _scheme)
