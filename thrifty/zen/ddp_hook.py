"""Sparse gradients through ``DistributedDataParallel`` on any backend: a comm hook.

Open-source NCCL has no sparse all-reduce, so DDP on NCCL cannot sync the
gradient of ``nn.Embedding(sparse=True)``. DDP does hand sparse gradients to a
communication hook, though; :func:`sparse_comm_hook` sends them through a Zen
scheme (:mod:`thrifty.zen.sync`) and averages dense buckets with one all-reduce
(or hands them to a hook of the user's, e.g.
:func:`thrifty.sync.ddp_hook.compression_hook`).

What DDP does with sparse gradients (measured on torch 2.13, 2 and 3 gloo
ranks; ``tests/test_zen_ddp_hook.py`` checks the parts this hook relies on):

1. every parameter with a sparse gradient gets a bucket of its own, and the
   registered hook gets that bucket: ``bucket.buffer()`` is the uncoalesced
   sparse COO gradient itself (``sparse_dim`` 1 for an embedding, the
   parameter's shape), ``bucket.parameters()`` the one parameter, and
   ``bucket.gradients()`` is empty;
2. dense buckets go to the same hook, so one hook must serve both kinds;
3. DDP divides neither kind by the world size when a hook is registered
   (pytorch#42400): the hook returns the mean itself;
4. the future must hold a sparse COO tensor of the gradient's shape *and*
   ``sparse_dim`` (a dense result fails in DDP's ``copy_``; one with
   ``sparse_dim`` 2 fails too); its nnz may differ from the input's, and DDP
   copies it into ``param.grad`` (coalesced when the result was);
5. DDP renumbers its buckets after the first iteration (in the order gradients
   became ready), so bucket indices are no key for per-tensor state: the
   hook keeps one scheme object per *parameter*, as ``GradientSync`` does
   (``AutoScheme`` profiles per tensor);
6. without a hook, DDP over gloo averages sparse gradients correctly (the
   sum over ranks / ``world_size``, checked on 2 and 3 ranks with torchrun):
   the hook's mean is what users already get on gloo;
7. a sparse parameter that some rank did not use in a step makes DDP itself
   fail before any hook runs ("Expected sparse gradient to be defined", with
   ``find_unused_parameters=True`` too): for such models use
   ``GradientSync(model, sparse_scheme="zen")`` (:mod:`thrifty.sync.engine`).

The schemes run on CPU tensors over gloo. A CUDA sparse bucket is therefore
copied to the host, synced over a gloo group, and copied back, while dense
buckets stay on the fast path (NCCL). :class:`SparseHookState` makes that gloo
group itself when ``process_group`` has no CPU backend (an NCCL-only group),
so build it on every rank at the same point, like the DDP model.

Example::

    model = DistributedDataParallel(Net().cuda(), device_ids=[local_rank])  # NCCL
    state = SparseHookState("zen")  # or "agsparse", "auto", a scheme object
    model.register_comm_hook(state, sparse_comm_hook)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()  # sparse grads: Zen; dense: all-reduce
        opt.step()
"""

# No `from __future__ import annotations` here: DDP inspects the hook's
# signature and insists that `bucket` is annotated with the real dist.GradBucket.
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from thrifty.comm import collectives
from thrifty.zen.schemes import SparseScheme
from thrifty.zen.sync import make_scheme

__all__ = ["SparseHookState", "sparse_comm_hook"]

DenseHook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]
_CPU_BACKENDS = ("gloo", "mpi")


class SparseHookState:
    """State of :func:`sparse_comm_hook`: the scheme, the groups, the dense path.

    Args:
        scheme: a name from :data:`thrifty.zen.SCHEMES` (``"zen"``, ``"agsparse"``,
            ``"auto"``, ...) built with ``options``, or a scheme object used as
            a prototype: each sparse parameter gets its own copy, since a
            scheme may keep state per tensor (``AutoScheme``'s profile).
        process_group: the group DDP syncs over (its ``process_group``);
            defaults to the world.
        dense_hook: a DDP hook ``(dense_state, bucket) -> Future`` for the dense
            buckets; None averages them with one all-reduce, as DDP does.
        dense_state: the state passed to ``dense_hook``. With
            :func:`~thrifty.sync.ddp_hook.compression_hook`, keep its
            ``nonfinite`` at ``"raise"`` or ``"off"``: its ``"skip"`` mode
            starts a new iteration at bucket 0, which may be a sparse bucket
            that never reaches it.
        sparse_group: the group the schemes run over, which must carry CPU
            tensors. None: ``process_group`` when it has a CPU backend (gloo,
            or ``"cpu:gloo,cuda:nccl"``), else a new gloo group of the same
            ranks (``dist.new_group`` is collective: build this state on every
            rank at the same point).
        check: check every rank's sparse gradient together before each sync
            (one small all-gather per sparse bucket), so that bad input (NaN,
            shapes that differ) raises the same error on every rank instead of
            hanging one.
        **options: the scheme's keyword arguments, with a scheme name.

    ``ledger`` counts the bytes of every collective the hook issues, sparse
    and dense (not those of a ``dense_hook``, which keeps its own).
    """

    def __init__(
        self,
        scheme: str | SparseScheme = "zen",
        process_group: dist.ProcessGroup | None = None,
        *,
        dense_hook: DenseHook | None = None,
        dense_state: Any = None,
        sparse_group: dist.ProcessGroup | None = None,
        check: bool = True,
        **options: Any,
    ) -> None:
        if isinstance(scheme, SparseScheme):
            if options:
                raise TypeError(
                    f"options {sorted(options)} are for a scheme given by name; a scheme "
                    f"object ({scheme.describe()}) carries its own settings"
                )
            prototype = scheme
        elif isinstance(scheme, str):
            prototype = make_scheme(scheme, **options)  # ValueError names the known schemes
        else:
            raise TypeError(
                f"scheme must be a scheme name or a SparseScheme object, got "
                f"{type(scheme).__name__} {scheme!r}"
            )
        if dense_hook is not None and not callable(dense_hook):
            raise TypeError(f"dense_hook must be a DDP comm hook function, got {dense_hook!r}")
        self.prototype = prototype
        self.process_group = process_group
        self.dense_hook = dense_hook
        self.dense_state = dense_state
        self.sparse_group = sparse_group if sparse_group is not None else _cpu_group(process_group)
        self.check = check
        self.ledger = collectives.CommLedger()
        self._schemes: dict[int, SparseScheme] = {}  # id(parameter) -> its scheme

    def scheme_for(self, parameter: torch.Tensor) -> SparseScheme:
        """The scheme object of one sparse parameter, made on first use."""
        scheme = self._schemes.get(id(parameter))
        if scheme is None:
            scheme = self._schemes[id(parameter)] = copy.deepcopy(self.prototype)
        return scheme


def _cpu_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """``group`` when it carries CPU tensors, else a new gloo group of its ranks."""
    backend = str(dist.get_backend(group))  # "gloo", "nccl", "cpu:gloo,cuda:nccl", ...
    if backend in _CPU_BACKENDS or "cpu:" in backend:
        return group
    ranks = dist.get_process_group_ranks(group) if group is not None else None
    return dist.new_group(ranks, backend="gloo")


def _done(value: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(value)
    return future


def sparse_comm_hook(
    state: SparseHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average one DDP bucket: sparse ones through the scheme, dense ones by all-reduce.

    A sparse bucket is synced synchronously (the schemes' collectives block),
    so it does not overlap with the rest of the backward pass; the size
    exchanges of the schemes read counts back to the host anyway. Dense
    buckets are all-reduced asynchronously, overlapping as with DDP's own hook.
    """
    buffer = bucket.buffer()
    if not buffer.is_sparse:
        if state.dense_hook is not None:
            return state.dense_hook(state.dense_state, bucket)
        buffer.div_(dist.get_world_size(state.process_group))
        with collectives.count_bytes(state.ledger):
            pending = collectives.all_reduce(buffer, group=state.process_group, async_op=True)
        return pending.then(lambda reduced: reduced)  # type: ignore[union-attr]

    (parameter,) = bucket.parameters()  # DDP gives every sparse gradient its own bucket
    scheme = state.scheme_for(parameter)
    with collectives.count_bytes(state.ledger):
        mean = scheme.sync(buffer.cpu(), state.sparse_group, average=True, check=state.check)
    return _done(mean.to(buffer.device))
