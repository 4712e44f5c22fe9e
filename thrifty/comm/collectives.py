"""Collectives over torch.distributed with variable sizes, packing and byte accounting.

gloo has no allgatherv and its list-form ``all_to_all`` fails on uneven sizes,
but ``all_to_all_single`` with split sizes works. Everything variable-sized
here is therefore built on ``all_to_all_single`` plus, when the receiver cannot
know the sizes, a small size exchange first.

Byte accounting. Every call adds to the active :class:`CommLedger` objects:

* ``payload_bytes``: the useful bytes this rank contributes (its tensor for
  all-reduce and all-gather; what it sends to *other* ranks for all-to-all);
* ``wire_bytes``: what this rank puts on the network under the algorithm the
  timeline model assumes: ring all-reduce sends ``2(n-1)/n`` of the tensor,
  all-gather sends its contribution to ``n-1`` peers, all-to-all sends each
  peer its chunk; size exchanges are included. A rank's bytes to itself are free.

Devices. Buffers and size counts are allocated on the input's device, so CUDA
tensors work over NCCL (which needs CUDA counts too); a size exchange then
reads the counts back to the host (``.tolist()``), one synchronisation.

Timeouts. A dead peer makes gloo fail at once ("Connection closed by peer"),
but a *silent* one (stopped, stuck in a debugger, swapping) leaves every other
rank blocked until the process group's timeout, 30 minutes by default. Inside
``with collective_timeout(seconds):`` every collective of this module issued
by this thread carries its own timeout (gloo fails the operation itself, so
nothing stays blocked in its worker thread either), and whatever fails comes
out as a :class:`CollectiveError` naming the collective, the process group and
the timeout: :class:`SyncTimeoutError` for a peer that never answered.

Example::

    with count_bytes() as ledger:
        parts = all_gather_v(torch.arange(dist.get_rank() + 1))
    ledger.wire_bytes   # (n-1) * own bytes + size exchange
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

__all__ = [
    "CollectiveError",
    "CommLedger",
    "Layout",
    "Pending",
    "SyncTimeoutError",
    "all_gather",
    "all_gather_packed",
    "all_gather_v",
    "all_reduce",
    "all_to_all_v",
    "backend_timeout",
    "collective_timeout",
    "count_bytes",
    "explained",
    "pack",
    "unpack",
    "wire_bytes",
]

T = TypeVar("T")
_SIZE_DTYPE = torch.int64
_SIZE_BYTES = 8


# --------------------------------------------------------------------------- accounting


@dataclass
class OpBytes:
    """Totals for one kind of collective."""

    calls: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0


@dataclass
class CommLedger:
    """What this rank sent, per collective kind. Add it with :func:`count_bytes`."""

    ops: dict[str, OpBytes] = field(default_factory=dict)

    def add(self, op: str, payload_bytes: int, wire_bytes: int) -> None:
        entry = self.ops.setdefault(op, OpBytes())
        entry.calls += 1
        entry.payload_bytes += payload_bytes
        entry.wire_bytes += wire_bytes

    @property
    def payload_bytes(self) -> int:
        return sum(o.payload_bytes for o in self.ops.values())

    @property
    def wire_bytes(self) -> int:
        return sum(o.wire_bytes for o in self.ops.values())

    @property
    def calls(self) -> int:
        return sum(o.calls for o in self.ops.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {name: vars(o).copy() for name, o in self.ops.items()}


_active_ledgers: list[CommLedger] = []


@contextlib.contextmanager
def count_bytes(ledger: CommLedger | None = None) -> Iterator[CommLedger]:
    """Count the bytes of every collective of this module called inside the block.

    Blocks nest: an outer ledger also sees what inner ones see. Pass an existing
    ledger to keep adding to it (the engine keeps one for its lifetime).
    """
    ledger = CommLedger() if ledger is None else ledger
    _active_ledgers.append(ledger)
    try:
        yield ledger
    finally:
        _active_ledgers.remove(ledger)


def _record(op: str, payload_bytes: int, wire: int) -> None:
    for ledger in _active_ledgers:
        ledger.add(op, payload_bytes, wire)


def wire_bytes(primitive: str, nbytes: int, world_size: int) -> float:
    """Bytes one rank sends for a collective of ``nbytes`` under the model's algorithm.

    ``nbytes`` is the message size in the nccl-tests convention: the tensor for
    all-reduce, the *gathered result* for all-gather, one rank's whole send
    buffer for all-to-all. This is the volume the alpha-beta model is fitted on.
    """
    n = world_size
    if n <= 1:
        return 0.0
    if primitive == "all_reduce":
        return 2.0 * (n - 1) / n * nbytes
    if primitive in ("all_gather", "all_to_all"):
        return (n - 1) / n * nbytes
    raise ValueError(
        f"unknown primitive {primitive!r}; expected all_reduce, all_gather, all_to_all"
    )


# --------------------------------------------------------------------------- timeouts

Timeout = float | datetime.timedelta


class CollectiveError(RuntimeError):
    """A collective failed on this rank because a peer is gone or closed its connection.

    ``op`` is the collective, ``group`` describes the process group, ``timeout``
    the seconds the operation was allowed. The process group cannot be used
    after this: end the job (every survivor gets such an error) and restart it.
    """

    def __init__(self, message: str, op: str, group: str, timeout: float | None) -> None:
        super().__init__(message)
        self.op = op
        self.group = group
        self.timeout = timeout


class SyncTimeoutError(CollectiveError, TimeoutError):
    """A collective got no answer within its timeout: a peer is stopped, stuck or unreachable."""


_scope = threading.local()  # .timeout: seconds for collectives issued by this thread
_timeout_lock = threading.Lock()  # the backend's default timeout is set around each issue
_TIMED_OUT = ("timed out", "timeout")
_PEER_LOST = ("connection closed by peer", "connection reset", "broken pipe", "pair closure")


def timeout_seconds(timeout: Timeout | None) -> float | None:
    """A user's ``timeout=`` (seconds, a ``timedelta`` or None) as seconds, checked once.

    Engines validate it at construction with this, so a wrong value fails
    there, named, and not at the first collective.
    """
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    elif isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(
            f"timeout must be a number of seconds, a timedelta or None, got {timeout!r}"
        )
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds (or None), got {timeout!r}")
    return float(timeout)


def _seconds(timeout: Timeout) -> float:
    value = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)
    if not value > 0:
        raise ValueError(f"a collective timeout must be > 0 seconds, got {timeout!r}")
    return value


@contextlib.contextmanager
def collective_timeout(timeout: Timeout | None) -> Iterator[None]:
    """Collectives of this module issued by this thread in the block fail after ``timeout``.

    ``timeout`` is seconds or a ``timedelta``; None keeps the process group's
    own (``init_process_group(timeout=...)``). Each operation carries the
    timeout from when it is issued, so an asynchronous one waited for after
    the block still ends in time. Blocks nest; the innermost wins.
    """
    previous = getattr(_scope, "timeout", None)
    _scope.timeout = previous if timeout is None else _seconds(timeout)
    try:
        yield
    finally:
        _scope.timeout = previous


def _backend(group: dist.ProcessGroup | None) -> Any:
    """The CPU backend of ``group`` when it can take a per-operation timeout (gloo), else None."""
    try:
        pg = group if group is not None else distributed_c10d._get_default_group()
        backend = pg._get_backend(torch.device("cpu"))
    except (RuntimeError, AttributeError, ValueError):
        return None
    if not hasattr(backend, "_set_default_timeout") or not hasattr(backend, "options"):
        return None
    return backend


@contextlib.contextmanager
def backend_timeout(group: dist.ProcessGroup | None, timeout: Timeout | None) -> Iterator[None]:
    """Every operation issued on ``group`` in the block, by any code, fails after ``timeout``.

    For code that calls ``torch.distributed`` directly (a planner's broadcast)
    rather than this module; only one thread should issue on ``group`` meanwhile.
    """
    backend = None if timeout is None else _backend(group)
    if backend is None:
        yield
        return
    with _timeout_lock:
        old = backend.options._timeout
        backend._set_default_timeout(datetime.timedelta(seconds=_seconds(timeout)))  # type: ignore[arg-type]
    try:
        yield
    finally:
        with _timeout_lock:
            backend._set_default_timeout(old)


def _current_timeout(group: dist.ProcessGroup | None) -> float | None:
    scoped = getattr(_scope, "timeout", None)
    if scoped is not None:
        return scoped
    backend = _backend(group)
    return None if backend is None else backend.options._timeout.total_seconds()


def _start(
    op: str, group: dist.ProcessGroup | None, call: Callable[[], dist.Work | None]
) -> dist.Work | None:
    """Issue one asynchronous operation with this thread's timeout, if any."""
    seconds = getattr(_scope, "timeout", None)
    backend = None if seconds is None else _backend(group)
    try:
        if backend is None:
            return call()
        with _timeout_lock:
            old = backend.options._timeout
            backend._set_default_timeout(datetime.timedelta(seconds=seconds))
            try:
                return call()
            finally:
                backend._set_default_timeout(old)
    except RuntimeError as exc:
        raise explained(exc, op, group, seconds) from exc


def _describe_group(group: dist.ProcessGroup | None) -> str:
    try:
        ranks = dist.get_process_group_ranks(group or distributed_c10d._get_default_group())
    except (RuntimeError, ValueError):
        return "an unknown process group"
    if group is None or group is dist.group.WORLD:
        return f"the default process group ({len(ranks)} ranks)"
    return f"the process group of ranks {ranks}"


def explained(
    exc: RuntimeError, op: str, group: dist.ProcessGroup | None, seconds: float | None
) -> RuntimeError:
    """``exc`` as a :class:`CollectiveError` when it says a peer is silent or gone."""
    text = str(exc).lower()
    timed_out = any(m in text for m in _TIMED_OUT)
    if isinstance(exc, CollectiveError) or not (timed_out or any(m in text for m in _PEER_LOST)):
        return exc
    where = _describe_group(group)
    if seconds is None:
        seconds = _current_timeout(group)
    limit = f"{seconds:g} s" if seconds is not None else "the process group's timeout"
    rank = dist.get_rank() if dist.is_initialized() else "?"
    if timed_out:
        return SyncTimeoutError(
            f"{op} over {where} got no answer within {limit} on rank {rank}: a peer rank is "
            "stopped, hung (in data loading, a debugger, a deadlock) or much slower, or the "
            "network between ranks is down. Check every rank's log and stack (py-spy dump), "
            "or raise the timeout (GradientSync(timeout=...), init_process_group(timeout=...)). "
            f"The process group is unusable now: restart the job. ({exc})",
            op,
            where,
            seconds,
        )
    return CollectiveError(
        f"{op} over {where} failed on rank {rank}: a peer closed its connection, so it died "
        "or raised; its own log names the cause. The process group is unusable now: "
        f"restart the job. ({exc})",
        op,
        where,
        seconds,
    )


# --------------------------------------------------------------------------- async handles


class Pending(Generic[T]):
    """The result of an ``async_op=True`` collective: call :meth:`wait` to get it.

    A failure of the operation (a peer gone or silent past its timeout) comes
    out of :meth:`wait` and :meth:`then` as a :class:`CollectiveError`.
    """

    def __init__(
        self,
        work: dist.Work | None,
        finish: Callable[[], T],
        op: str = "collective",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self._work = work
        self._finish = finish
        self._done = False
        self._value: T | None = None
        self._op = op
        self._group = group
        self._timeout = getattr(_scope, "timeout", None)

    def is_completed(self) -> bool:
        return self._done or self._work is None or self._work.is_completed()

    def get_future(self) -> torch.futures.Future[Any]:
        """The underlying ``torch.futures.Future`` (for DDP hooks and ``then`` chains)."""
        if self._work is not None:
            return self._work.get_future()
        done: torch.futures.Future[Any] = torch.futures.Future()
        done.set_result(None)
        return done

    def then(self, fn: Callable[[T], Any]) -> torch.futures.Future[Any]:
        """A future of ``fn(result)``, run when the collective completes.

        Use this instead of :meth:`wait` inside future callbacks (DDP hooks):
        waiting there on the work that is completing would deadlock.
        """

        def on_done(fut: torch.futures.Future[Any]) -> Any:
            try:
                fut.value()  # re-raises the collective's error, if any
            except RuntimeError as exc:
                raise explained(exc, self._op, self._group, self._timeout) from exc
            if not self._done:
                self._value, self._done = self._finish(), True
            return fn(self._value)  # type: ignore[arg-type]

        return self.get_future().then(on_done)

    def wait(self) -> T:
        if not self._done:
            if self._work is not None:
                _wait(self._work, self._op, self._group, self._timeout)
            self._value = self._finish()
            self._done = True
        return self._value  # type: ignore[return-value]


def _wait(
    work: dist.Work | None, op: str, group: dist.ProcessGroup | None, seconds: float | None
) -> None:
    if work is None:
        return
    try:
        work.wait()
    except RuntimeError as exc:
        raise explained(exc, op, group, seconds) from exc


def _run(op: str, group: dist.ProcessGroup | None, call: Callable[[], dist.Work | None]) -> None:
    """Issue ``call`` (an ``async_op=True`` operation) with the timeout and wait for it."""
    _wait(_start(op, group, call), op, group, getattr(_scope, "timeout", None))


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call dist.init_process_group first "
            "(torchrun sets up the environment for it)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _done(value: T, async_op: bool) -> T | Pending[T]:
    return Pending(None, lambda: value) if async_op else value


# --------------------------------------------------------------------------- collectives


def all_reduce(
    tensor: torch.Tensor,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
) -> torch.Tensor | Pending[torch.Tensor]:
    """In-place all-reduce of ``tensor``; returns it (or a :class:`Pending` of it)."""
    _, n = _world(group)
    _record("all_reduce", _nbytes(tensor), math.ceil(wire_bytes("all_reduce", _nbytes(tensor), n)))

    def call() -> dist.Work | None:
        return dist.all_reduce(tensor, op=op, group=group, async_op=True)

    if async_op:
        return Pending(_start("all_reduce", group, call), lambda: tensor, "all_reduce", group)
    _run("all_reduce", group, call)
    return tensor


def all_gather(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor] | Pending[list[torch.Tensor]]:
    """All-gather of tensors that have the same shape and dtype on every rank.

    Built on ``all_to_all_single`` like :func:`all_gather_v`: on this machine
    gloo's own allgather was 1.3-1.8x slower for 1-64 MB (it copies through a
    fresh flat buffer every call), for the same bytes on the wire. ``out`` (one
    tensor like ``tensor`` per rank) receives the result; when its tensors are
    adjacent slices of one buffer nothing is copied or allocated for it.
    """
    _, n = _world(group)
    tensor = tensor.contiguous()
    if out is not None and len(out) != n:
        raise ValueError(f"out has {len(out)} tensors but the group has {n} ranks")
    if out is not None and any(o.shape != tensor.shape or o.dtype != tensor.dtype for o in out):
        raise ValueError(f"every out tensor must be {tensor.dtype} of shape {tuple(tensor.shape)}")
    _record("all_gather", _nbytes(tensor), (n - 1) * _nbytes(tensor))
    flat = tensor.reshape(-1)
    recv = _adjacent_view([o.reshape(-1) for o in out]) if out is not None else None
    if recv is None:
        recv = torch.empty(n * flat.numel(), dtype=flat.dtype, device=flat.device)
    if async_op:
        send = flat.repeat(n)  # stays in flight: a buffer of its own
    else:
        send = _workspace(n * flat.numel(), flat.dtype, flat.device)
        send.view(n, -1).copy_(flat.expand(n, -1))

    def call() -> dist.Work | None:
        return dist.all_to_all_single(recv, send, group=group, async_op=True)

    def finish() -> list[torch.Tensor]:
        parts = (
            [p.view(tensor.shape) for p in recv.split(flat.numel())]
            if flat.numel()
            else [torch.empty_like(tensor) for _ in range(n)]
        )
        if out is None:
            return parts
        for o, p in zip(out, parts, strict=True):
            if o.data_ptr() != p.data_ptr():
                o.copy_(p)
        return out

    if async_op:
        return Pending(_start("all_gather", group, call), finish, "all_gather", group)
    _run("all_gather", group, call)
    return finish()


_workspaces: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable send buffer for synchronous calls.

    glibc serves every allocation of 32 MB and more with a fresh mmap, so a new
    64 MB buffer per call costs ~16K page faults, more than the transfer itself
    on a fast link. Synchronous calls are done with the buffer when they return.
    """
    buf = _workspaces.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _workspaces[(dtype, device)] = buf
    return buf[:numel]


def _exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-to-all of one int64 per peer: returns what every peer will send us."""
    _, n = _world(group)
    received = torch.empty_like(counts)
    _run(
        "size exchange",
        group,
        lambda: dist.all_to_all_single(received, counts, group=group, async_op=True),
    )
    _record("size_exchange", 0, (n - 1) * _SIZE_BYTES)
    return received


def all_gather_v(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
    sizes: Sequence[int] | None = None,
) -> list[torch.Tensor] | Pending[list[torch.Tensor]]:
    """All-gather of 1-D tensors whose length differs across ranks (allgatherv).

    Every rank sends its tensor to every other rank with one ``all_to_all_single``
    (no padding on the wire). When ``sizes`` (every rank's numel) is not given it
    is exchanged first, which costs one small blocking collective.
    """
    rank, n = _world(group)
    if tensor.dim() != 1:
        raise ValueError(f"all_gather_v takes a 1-D tensor, got shape {tuple(tensor.shape)}")
    tensor = tensor.contiguous()
    if sizes is None:
        mine = torch.full((n,), tensor.numel(), dtype=_SIZE_DTYPE, device=tensor.device)
        sizes = _exchange_counts(mine, group).tolist()
    elif len(sizes) != n:
        raise ValueError(f"sizes has {len(sizes)} entries but the group has {n} ranks")
    elif sizes[rank] != tensor.numel():
        raise ValueError(
            f"sizes[{rank}] = {sizes[rank]} but this rank's tensor has {tensor.numel()}"
        )
    sizes = [int(s) for s in sizes]
    _record("all_gather_v", _nbytes(tensor), (n - 1) * _nbytes(tensor))
    send = tensor.repeat(n) if n > 1 else tensor
    recv = torch.empty(sum(sizes), dtype=tensor.dtype, device=tensor.device)

    def call() -> dist.Work | None:
        return dist.all_to_all_single(
            recv,
            send,
            output_split_sizes=sizes,
            input_split_sizes=[tensor.numel()] * n,
            group=group,
            async_op=True,
        )

    def finish() -> list[torch.Tensor]:
        return list(torch.split(recv, sizes))

    if async_op:
        return Pending(_start("all_gather_v", group, call), finish, "all_gather_v", group)
    _run("all_gather_v", group, call)
    return finish()


def _adjacent_view(chunks: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One flat view over the chunks when they are adjacent slices of one tensor, else None."""
    if not chunks or any(c.numel() == 0 or not c.is_contiguous() for c in chunks):
        return None
    first = chunks[0]
    for a, b in itertools.pairwise(chunks):
        same = b.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not same or b.data_ptr() != a.data_ptr() + _nbytes(a):
            return None
    total = sum(c.numel() for c in chunks)
    return first.as_strided((total,), (1,), first.storage_offset())


def _concatenated(chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The chunks as one flat tensor: a view when they are adjacent slices, else a copy."""
    view = _adjacent_view(chunks)
    return view if view is not None else torch.cat([c.contiguous() for c in chunks])


def all_to_all_v(
    chunks: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
    recv_sizes: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
) -> list[torch.Tensor] | Pending[list[torch.Tensor]]:
    """Send ``chunks[j]`` to rank ``j``; return the list of chunks received, by sender.

    Chunks are 1-D tensors of one dtype and any lengths, empty included. When
    ``recv_sizes`` is not given, the lengths are exchanged first. Chunks that are
    adjacent slices of one tensor are sent without a copy; ``out`` (a flat
    buffer of the total received length) is reused instead of allocated.
    """
    rank, n = _world(group)
    if len(chunks) != n:
        raise ValueError(
            f"all_to_all_v needs one chunk per rank: got {len(chunks)}, world size {n}"
        )
    dtypes = {c.dtype for c in chunks}
    if len(dtypes) != 1:
        raise TypeError(f"all chunks must share one dtype, got {sorted(map(str, dtypes))}")
    for j, c in enumerate(chunks):
        if c.dim() != 1:
            raise ValueError(f"chunk {j} must be 1-D, got shape {tuple(c.shape)}")
    send_sizes = [c.numel() for c in chunks]
    if recv_sizes is None:
        counts = torch.tensor(send_sizes, dtype=_SIZE_DTYPE, device=chunks[0].device)
        recv_sizes = _exchange_counts(counts, group).tolist()
    elif len(recv_sizes) != n:
        raise ValueError(f"recv_sizes has {len(recv_sizes)} entries but the group has {n} ranks")
    recv_sizes = [int(s) for s in recv_sizes]
    itemsize = chunks[0].element_size()
    sent = sum(s for j, s in enumerate(send_sizes) if j != rank) * itemsize
    _record("all_to_all_v", sent, sent)
    send = _concatenated(chunks)
    if out is None:
        recv = torch.empty(sum(recv_sizes), dtype=send.dtype, device=send.device)
    elif out.dim() != 1 or out.numel() != sum(recv_sizes) or out.dtype != send.dtype:
        raise ValueError(
            f"out must be a 1-D {send.dtype} tensor of {sum(recv_sizes)} elements, got "
            f"{out.dtype} {tuple(out.shape)}"
        )
    else:
        recv = out

    def call() -> dist.Work | None:
        return dist.all_to_all_single(
            recv,
            send,
            output_split_sizes=recv_sizes,
            input_split_sizes=send_sizes,
            group=group,
            async_op=True,
        )

    def finish() -> list[torch.Tensor]:
        return list(torch.split(recv, recv_sizes))

    if async_op:
        return Pending(_start("all_to_all_v", group, call), finish, "all_to_all_v", group)
    _run("all_to_all_v", group, call)
    return finish()


# --------------------------------------------------------------------------- packing

# Stable codes for the self-describing header: never reorder, only append.
_DTYPE_CODES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


@dataclass(frozen=True)
class Layout:
    """dtype and shape of each tensor in a packed byte buffer, in order."""

    entries: tuple[tuple[torch.dtype, tuple[int, ...]], ...]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * _itemsize(dtype) for dtype, shape in self.entries)

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> Layout:
        return cls(tuple((t.dtype, tuple(t.shape)) for t in tensors))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def pack(tensors: Sequence[torch.Tensor], header: bool = False) -> torch.Tensor:
    """Concatenate tensors of any dtypes and shapes into one uint8 buffer.

    With ``header=False`` the receiver must know the :class:`Layout` (e.g. it
    follows from numel, as for compressor payloads). With ``header=True`` the
    buffer starts with a small int64 header (count, then dtype code, ndim and
    dims per tensor) and :func:`unpack` needs nothing else.
    """
    parts = [_as_bytes(t) for t in tensors]
    if header:
        words = _encode_header(Layout.of(tensors))
        parts.insert(0, _as_bytes(words.to(parts[0].device if parts else words.device)))
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts)


def unpack(buffer: torch.Tensor, layout: Layout | None = None) -> list[torch.Tensor]:
    """Inverse of :func:`pack`. Pass the layout unless the buffer was packed with a header."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise TypeError(f"expected a 1-D uint8 buffer, got {buffer.dtype} {tuple(buffer.shape)}")
    offset = 0
    if layout is None:
        layout, offset = _decode_header(buffer)
    if offset + layout.nbytes != buffer.numel():
        raise ValueError(
            f"buffer has {buffer.numel()} bytes but the layout describes {offset + layout.nbytes}"
        )
    out = []
    for dtype, shape in layout.entries:
        size = math.prod(shape) * _itemsize(dtype)
        raw = buffer[offset : offset + size]
        if raw.storage_offset() % _itemsize(dtype):
            raw = raw.clone()  # a dtype view needs an aligned storage offset
        out.append(raw.view(dtype).reshape(shape))
        offset += size
    return out


def _encode_header(layout: Layout) -> torch.Tensor:
    words = [len(layout.entries)]
    for dtype, shape in layout.entries:
        if dtype not in _DTYPE_CODES:
            raise TypeError(f"cannot pack dtype {dtype}; supported: {_DTYPE_CODES}")
        words += [_DTYPE_CODES.index(dtype), len(shape), *shape]
    words.insert(0, len(words))  # header length in words, itself excluded
    return torch.tensor(words, dtype=torch.int64)


def _decode_header(buffer: torch.Tensor) -> tuple[Layout, int]:
    if buffer.numel() < 8:
        raise ValueError("buffer too short to hold a pack header")
    nwords = int(buffer[:8].clone().view(torch.int64)[0])
    end = 8 * (nwords + 1)
    if nwords < 1 or end > buffer.numel():
        raise ValueError(f"corrupt pack header: claims {nwords} words in {buffer.numel()} bytes")
    words = buffer[8:end].clone().view(torch.int64).tolist()
    count, i, entries = words[0], 1, []
    for _ in range(count):
        code, ndim = words[i], words[i + 1]
        entries.append((_DTYPE_CODES[code], tuple(words[i + 2 : i + 2 + ndim])))
        i += 2 + ndim
    return Layout(tuple(entries)), end


def all_gather_packed(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None
) -> list[list[torch.Tensor]]:
    """All-gather a list of tensors of mixed dtypes and shapes, which may differ by rank.

    Returns, for every rank, the list of tensors it contributed.
    """
    gathered = all_gather_v(pack(tensors, header=True), group=group)
    return [unpack(buf) for buf in gathered]  # type: ignore[union-attr]
