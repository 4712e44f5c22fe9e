"""Collective input checks: every rank raises the same clear error, and none hangs.

A rank that raised on its own before the first collective would leave the
others waiting in that collective until the timeout. So each rank first
*describes* its input in a fixed-size int64 vector (error code, dtype, shape,
nnz, scheme settings), all ranks all-gather these vectors (a few hundred
bytes, counted like every other byte), and then every rank applies the same
checks to the same gathered table and raises the same :class:`SparseSyncError`
if anything is wrong anywhere: a dense tensor where a sparse one was expected,
an unsupported dtype, NaN/Inf values, or shapes, dtypes or scheme settings that
differ across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from thrifty.comm import collectives
from thrifty.zen.sparse_rows import SUPPORTED_DTYPES

__all__ = ["MAX_DIMS", "METADATA_WORDS", "InputSummary", "SparseSyncError", "check_inputs"]

MAX_DIMS = 8
# error, dtype, sparse_dim, ndim, shape[MAX_DIMS], nnz, scheme key (3 words)
METADATA_WORDS = 4 + MAX_DIMS + 1 + 3

# Error codes a rank sends about its own input (0: none).
_OK = 0
_NOT_TENSOR = 1
_DENSE = 2
_OTHER_LAYOUT = 3
_BAD_DTYPE = 4
_NON_FINITE = 5
_TOO_MANY_DIMS = 6
_BAD_SCHEME = 7
_NOT_CPU = 8
# Stable codes to name dtypes in messages on every rank; -1 for anything else.
_OTHER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
_DTYPES: tuple[torch.dtype, ...] = (
    *SUPPORTED_DTYPES,
    *_OTHER_DTYPES,
    torch.complex64,
    torch.complex128,
)


class SparseSyncError(ValueError):
    """Bad input to a sparse synchronisation, raised alike on every rank of the group."""

    nonfinite: dict[int, int] | None = None  # {rank: NaN/Inf count} when that was all


@dataclass(frozen=True)
class InputSummary:
    """What the ranks told each other: every rank's nnz (schemes and selection use it)."""

    nnz_per_rank: list[int]


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else "an unnamed dtype"


def _describe(tensor: object, scheme_error: bool, scheme_key: tuple[int, int, int]) -> Tensor:
    words = torch.zeros(METADATA_WORDS, dtype=torch.int64)
    words[-3:] = torch.tensor(scheme_key, dtype=torch.int64)
    error, detail = _OK, 0
    if scheme_error:
        error = _BAD_SCHEME
    elif not isinstance(tensor, Tensor):
        error = _NOT_TENSOR
    elif tensor.layout == torch.strided:
        error = _DENSE
    elif tensor.layout != torch.sparse_coo:
        error = _OTHER_LAYOUT
    elif tensor.dtype not in SUPPORTED_DTYPES:
        error = _BAD_DTYPE
        detail = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1
    elif tensor.device.type != "cpu":
        error = _NOT_CPU
    elif tensor.dim() > MAX_DIMS:
        error, detail = _TOO_MANY_DIMS, tensor.dim()
    else:
        bad = int((~torch.isfinite(tensor._values())).sum())
        if bad:
            error, detail = _NON_FINITE, bad
    words[0], words[1] = error, detail
    if error == _OK:
        assert isinstance(tensor, Tensor)
        words[1] = _DTYPES.index(tensor.dtype)
        words[2], words[3] = tensor.sparse_dim(), tensor.dim()
        words[4 : 4 + MAX_DIMS] = -1
        words[4 : 4 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        words[4 + MAX_DIMS] = tensor._nnz()
    return words


def _error_text(error: int, detail: int) -> str:
    if error == _NOT_TENSOR:
        return "expected a torch sparse COO tensor, got something that is not a tensor"
    if error == _DENSE:
        return (
            "expected a sparse COO tensor (e.g. the .grad of nn.Embedding(sparse=True)), got a "
            "dense (strided) tensor; call .to_sparse() first, or all-reduce dense tensors"
        )
    if error == _OTHER_LAYOUT:
        return "expected a sparse COO tensor, got another sparse layout; call .to_sparse_coo()"
    if error == _BAD_DTYPE:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        return f"values must be floating point ({names}), got {_dtype_name(detail)}"
    if error == _TOO_MANY_DIMS:
        return f"at most {MAX_DIMS} dimensions are supported, got {detail}"
    if error == _NON_FINITE:
        return f"{detail} value(s) are NaN or Inf"
    if error == _NOT_CPU:
        return (
            "the tensor is not on the CPU; the schemes run over gloo on CPU tensors, "
            "so move it with .cpu() first"
        )
    if error == _BAD_SCHEME:
        return "unknown scheme or bad scheme settings (see the error raised on that rank)"
    return f"error code {error}"


def _shape_text(words: list[int]) -> str:
    ndim = words[3]
    shape = tuple(words[4 : 4 + ndim])
    return f"{_dtype_name(words[1])} {shape} with {words[2]} sparse dim(s)"


def check_inputs(
    tensor: object,
    group: dist.ProcessGroup | None,
    scheme_key: tuple[int, int, int],
    scheme_error: bool = False,
) -> InputSummary:
    """Check every rank's input together; raise :class:`SparseSyncError` on all ranks if bad.

    ``scheme_key`` identifies the scheme and its settings that must agree
    across ranks (e.g. Zen's hash seed); ``scheme_error`` reports that this rank
    could not even resolve its scheme.
    """
    mine = _describe(tensor, scheme_error, scheme_key)
    table = [w.tolist() for w in collectives.all_gather(mine, group=group)]  # type: ignore[union-attr]
    problems = [f"rank {r}: {_error_text(w[0], w[1])}" for r, w in enumerate(table) if w[0] != _OK]
    if problems:
        error = SparseSyncError("sync_sparse: bad input on " + "; ".join(problems))
        if all(w[0] in (_OK, _NON_FINITE) for w in table):  # {rank: count}, for GradientSync
            error.nonfinite = {r: w[1] for r, w in enumerate(table) if w[0] == _NON_FINITE}
        raise error
    layouts = {tuple(w[1 : 4 + MAX_DIMS]) for w in table}
    if len(layouts) > 1:
        per_rank = "; ".join(f"rank {r}: {_shape_text(w)}" for r, w in enumerate(table))
        raise SparseSyncError(
            "sync_sparse: every rank must pass a tensor of the same shape, dtype and sparse "
            f"dims, got {per_rank}"
        )
    keys = {tuple(w[-3:]) for w in table}
    if len(keys) > 1:
        per_rank = "; ".join(f"rank {r}: {tuple(w[-3:])}" for r, w in enumerate(table))
        raise SparseSyncError(
            "sync_sparse: ranks chose different schemes or scheme settings (scheme code, "
            f"settings) : {per_rank}; every rank must use the same scheme and hash seed"
        )
    return InputSummary([w[4 + MAX_DIMS] for w in table])
