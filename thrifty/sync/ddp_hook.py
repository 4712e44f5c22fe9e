"""Any thrifty compressor as a PyTorch DDP communication hook.

For users who keep ``DistributedDataParallel``: its buckets become the groups.
Compressors whose payloads sum elementwise (FP16, BF16, shared-seed Random-k)
are all-reduced with the input divided by the world size first, exactly as
``fp16_compress_hook`` does; every other compressor is all-gathered and
aggregated. Multi-round compressors (PowerSGD, TernGrad with scaler sharing,
the int8 sign vote) run their rounds inside the hook, without overlap; prefer
PyTorch's own ``powerSGD_hook`` or :class:`~thrifty.sync.GradientSync` for those.

On its first call the hook checks that every rank uses the same compressor,
options, memory and world size (one all-gather of a 32-byte digest; DDP has
checked the parameters already) and raises the same
:class:`~thrifty.comm.agreement.RankMismatchError` on every rank otherwise.
``state.state_dict()`` carries error feedback and compressor state into a
checkpoint.

NaN/Inf in a bucket on any rank (``nonfinite="raise"``, the default): each
rank's count rides in the bucket's own collective (one slot per rank appended
to an all-reduced payload, 8 bytes packed with a gathered one), so every rank
fails the same ``backward()`` with the same message, that of a
:class:`~thrifty.comm.agreement.NonFiniteGradientError` (DDP re-raises a
hook's error as a ``RuntimeError`` carrying it). With ``nonfinite="skip"``
every rank zeroes the bucket, leaves error feedback as it was and sets
``state.skipped_last_step``: DDP writes the other buckets' gradients anyway,
so check it and skip ``optimizer.step()`` (as ``GradScaler.step`` does).
``timeout=`` bounds every collective the hook issues.

Example::

    ddp = DistributedDataParallel(model)
    state = CompressionHookState("topk", ratio=0.01)
    ddp.register_comm_hook(state, compression_hook)
    ...
    torch.save({"model": ddp.state_dict(), "hook": state.state_dict()}, path)
"""

# No `from __future__ import annotations` here: DDP inspects the hook's
# signature and insists that `bucket` is annotated with the real dist.GradBucket.
import datetime
import json
from typing import Any

import torch
import torch.distributed as dist

from thrifty.comm import collectives
from thrifty.comm.agreement import (
    Entry,
    NonFiniteGradientError,
    check_agreement,
    count_slots,
    nonfinite_count,
    nonfinite_message,
    read_slots,
)
from thrifty.compressors.base import decode_key, encode_key
from thrifty.sync.plan import Strategy, has_feedback

_STATE_FORMAT = "thrifty.CompressionHookState/1"

__all__ = ["CompressionHookState", "compression_hook"]


class CompressionHookState:
    """State of :func:`compression_hook` across iterations.

    Args:
        compressor: registry name, e.g. ``"fp16"`` or ``"topk"``.
        process_group: defaults to the world.
        memory: error feedback (``"default"``, ``"none"``, ``"residual"``, ``"dgc"``).
        check: on the hook's first call, check that every rank agrees on the
            compressor, its options, the memory, the world size and the first
            bucket (one small all-gather), raising the same
            :class:`~thrifty.comm.agreement.RankMismatchError` on every rank.
        nonfinite: ``"raise"``, ``"skip"`` or ``"off"``: see the module docstring.
        timeout: seconds (or a ``timedelta``) each collective of the hook may
            wait; None keeps the process group's. A silent peer then gives a
            :class:`~thrifty.comm.collectives.SyncTimeoutError` on every survivor.
        **options: the compressor's keyword arguments.

    Error feedback is kept per bucket, keyed by (bucket index, size). DDP
    rebuilds its buckets after the first iteration, in the order gradients
    became ready: a bucket may then hold the same parameters in another order
    (or others). Each parameter's part of the error feedback moves with it to
    its new place (the hook tracks every bucket's layout), so no residual is
    applied to the wrong element; the same happens when a resumed job's first
    buckets differ from the saved ones.
    """

    def __init__(
        self,
        compressor: str,
        process_group: dist.ProcessGroup | None = None,
        memory: str = "default",
        *,
        check: bool = True,
        nonfinite: str = "raise",
        timeout: float | datetime.timedelta | None = None,
        **options: Any,
    ) -> None:
        if nonfinite not in ("raise", "skip", "off"):
            raise ValueError(f"nonfinite must be 'raise', 'skip' or 'off', got {nonfinite!r}")
        timeout = collectives.timeout_seconds(timeout)
        self.nonfinite = nonfinite
        self.timeout: float | None = timeout
        self.skipped_last_step = False
        self.skipped_steps = 0
        self._dropping = False  # this iteration is being dropped (skip mode)
        self._snapshots: dict[Any, dict[str, torch.Tensor]] = {}  # this iteration's
        self.strategy = Strategy.make(compressor, None, memory, **options)
        self.compressor = self.strategy.build_compressor()
        if self.compressor is not None and nonfinite != "off":
            self.compressor.check_finite = False  # the hook checks, on every rank alike
        self.memory = self.strategy.build_memory()
        self.process_group = process_group
        self.ledger = collectives.CommLedger()
        self.checked = not check
        # A parameter's tag is its place in the first bucket it was seen in: DDP
        # builds its first buckets from the model alone, so tags are the same in
        # every process (a resumed one too); ids are not.
        self._tags: dict[int, str] = {}
        self._layouts: dict[Any, list[tuple[str, int]]] = {}  # key -> [(tag, numel)]

    def follow_layout(self, key: Any, bucket: dist.GradBucket) -> None:
        """Move error feedback when the bucket under ``key`` holds other parameters than before."""
        params = bucket.parameters()
        for position, p in enumerate(params):
            self._tags.setdefault(id(p), f"{bucket.index()}:{position}")
        layout = [(self._tags[id(p)], p.numel()) for p in params]
        previous = self._layouts.get(key)
        self._layouts[key] = layout
        if previous is None or previous == layout or not has_feedback(self.memory):
            return
        assert self.memory is not None
        old = self.memory.export_state(key)
        if not old:
            return
        segments: dict[str, dict[str, torch.Tensor]] = {}
        offset = 0
        for tag, numel in previous:
            segments[tag] = {kind: t[offset : offset + numel] for kind, t in old.items()}
            offset += numel
        moved = {
            kind: torch.cat(
                [
                    segments[tag][kind] if tag in segments else torch.zeros(numel)
                    for tag, numel in layout
                ]
            )
            for kind in old
        }
        self.memory.reset(key)
        self.memory.import_state(key, moved)

    def check_ranks_agree(self, bucket_numel: int, bucket_dtype: torch.dtype) -> None:
        """Every rank uses the same compressor set-up (the hook calls this once)."""
        hint = "pass the same compressor and options to CompressionHookState on every rank"
        options = ", ".join(f"{k}={v!r}" for k, v in self.strategy.options) or "none"
        entries = [
            Entry("world size", str(dist.get_world_size(self.process_group))),
            Entry("compressor", str(self.strategy.compressor), hint),
            Entry("compressor configuration", options, hint),
            Entry("memory", self.strategy.memory, hint),
            Entry("nonfinite", self.nonfinite, hint),
            Entry("first bucket", f"{bucket_numel} elements of {bucket_dtype}"),
        ]
        check_agreement(entries, self.process_group, "compression_hook")
        self.checked = True

    def begin_bucket(self, key: Any, flat: torch.Tensor) -> int:
        """This rank's NaN/Inf count of a bucket (zeroed then); keeps its error feedback."""
        if self.nonfinite == "off":
            return 0
        if key[0] == 0:  # DDP launches buckets in index order: a new iteration
            self._snapshots = {}
            self._dropping = False
            self.skipped_last_step = False
        if self.memory is not None:
            self._snapshots[key] = self.memory.export_state(key)  # replaced, never written
        count = nonfinite_count(flat)
        if count:
            flat.zero_()  # sent as zeros: every rank still runs the collective
        return count

    def end_bucket(self, key: Any, seen: dict[int, int], buffer: torch.Tensor) -> None:
        """Raise, or drop the iteration, alike on every rank when any rank saw NaN/Inf."""
        if not seen and not self._dropping:
            return
        restore = self._snapshots if seen and not self._dropping else {key: self._snapshots[key]}
        if self.memory is not None:
            for k, saved in restore.items():
                self.memory.reset(k)
                if saved:
                    self.memory.import_state(k, saved)
        buffer.zero_()
        if not seen:  # a later bucket of a dropped iteration
            return
        counts = {f"bucket {key[0]} ({key[1]} elements)": seen}
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                nonfinite_message(
                    "compression_hook",
                    counts,
                    "every rank raises this error; error feedback is unchanged. Lower the "
                    "learning rate, scale the loss, or pass nonfinite='skip'",
                ),
                counts,
            )
        if not self._dropping:
            self._dropping = True
            self.skipped_last_step = True
            self.skipped_steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Error feedback and compressor state of this rank, for a checkpoint.

        Tensors, strings and ints only (``torch.load(..., weights_only=True)``
        reads it). Each rank's state sits under its rank, so states saved by
        every rank can be merged into one dict.
        """
        rank = dist.get_rank(self.process_group)
        assert self.compressor is not None
        mine = {"compressor": self.compressor.state_dict()}
        if self.memory is not None:
            mine["memory"] = self.memory.state_dict()
        mine["layouts"] = json.dumps([[encode_key(k), v] for k, v in self._layouts.items()])
        return {
            "format": _STATE_FORMAT,
            "world_size": dist.get_world_size(self.process_group),
            "strategy": json.dumps(self.strategy.to_dict(), sort_keys=True, default=repr),
            "ranks": {str(rank): mine},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` of a hook state built the same way.

        Raises:
            ValueError: another world size, another compressor set-up, or not
                such a state at all.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a CompressionHookState state dict ({_STATE_FORMAT!r})")
        world = dist.get_world_size(self.process_group)
        if int(state["world_size"]) != world:
            raise ValueError(
                f"CompressionHookState was saved by {state['world_size']} ranks, this job has "
                f"{world}: error feedback is kept per rank and cannot be resharded"
            )
        strategy = json.dumps(self.strategy.to_dict(), sort_keys=True, default=repr)
        if state["strategy"] != strategy:
            raise ValueError(
                f"CompressionHookState was saved with {state['strategy']}, this one is "
                f"{strategy}: build it with the same compressor, options and memory"
            )
        rank = dist.get_rank(self.process_group)
        mine = state["ranks"].get(str(rank))
        if mine is None:
            raise ValueError(f"CompressionHookState holds no state of rank {rank}")
        assert self.compressor is not None
        self.compressor.load_state_dict(mine["compressor"])
        if self.memory is not None and "memory" in mine:
            self.memory.load_state_dict(mine["memory"])
        # The saved buckets' layouts: where this job's buckets differ (its first
        # ones, before DDP rebuilds them), the hook moves the state to match.
        self._layouts = {
            decode_key(k): [(tag, numel) for tag, numel in v]
            for k, v in json.loads(mine.get("layouts", "[]"))
        }


def compression_hook(
    state: CompressionHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Compress one DDP bucket, communicate it, return a future of its averaged gradient."""
    group = state.process_group
    n = dist.get_world_size(group)
    buffer = bucket.buffer()
    if not state.checked:  # once: mismatched set-ups would abort gloo or average nonsense
        state.check_ranks_agree(buffer.numel(), buffer.dtype)
    compressor = state.compressor
    assert compressor is not None
    key = (bucket.index(), buffer.numel())
    state.follow_layout(key, bucket)
    flat = buffer.to(torch.float32)
    count = state.begin_bucket(key, flat)
    checks = state.nonfinite != "off"
    compensated = state.memory.compensate(flat, key) if has_feedback(state.memory) else flat
    rank = dist.get_rank(group)
    scope = collectives.collective_timeout(state.timeout)

    if compressor.allreduce_compatible:
        rounds = compressor.allreduce_rounds(compensated / n, key)
        request = next(rounds)
        own = request.tensor
        send = own.clone()
        if checks:  # the sent copy carries the count slots
            send = torch.cat([own.reshape(-1), count_slots(count, rank, n, own.dtype)])
        with collectives.count_bytes(state.ledger), scope:
            pending = collectives.all_reduce(send, group=group, async_op=True)

        def finish_allreduce(reduced: torch.Tensor) -> torch.Tensor:
            seen = read_slots(reduced[own.numel() :]) if checks else {}
            reduced = reduced[: own.numel()].view_as(own)
            try:
                rounds.send(reduced)
            except StopIteration as stop:
                mean: torch.Tensor = stop.value
            else:
                raise RuntimeError(f"{compressor.name} asked for a second round in a DDP hook")
            if has_feedback(state.memory):
                sent = compressor.decompress((own,), flat.numel(), key) * n
                state.memory.update(key, compensated, sent)
            buffer.copy_(mean.to(buffer.dtype))
            state.end_bucket(key, seen, buffer)
            return buffer

        return pending.then(finish_allreduce)  # type: ignore[union-attr]

    if compressor.supports_allreduce_rounds:  # multi-round: synchronous, no overlap
        rounds = compressor.allreduce_rounds(compensated, key)
        reduced = None
        seen: dict[int, int] = {}
        with collectives.count_bytes(state.ledger), scope:
            while True:
                try:
                    request = rounds.send(reduced) if reduced is not None else next(rounds)
                except StopIteration as stop:
                    total: torch.Tensor = stop.value
                    break
                op = dist.ReduceOp.MAX if request.op == "max" else dist.ReduceOp.SUM
                if reduced is None and checks:  # the first round carries the count slots
                    first = request.tensor
                    slots = count_slots(count, rank, n, first.dtype)
                    both = torch.cat([first.reshape(-1), slots])
                    collectives.all_reduce(both, op, group)
                    seen = read_slots(both[first.numel() :])
                    reduced = both[: first.numel()].view_as(first)
                else:
                    reduced = collectives.all_reduce(request.tensor, op, group)
        if has_feedback(state.memory):
            state.memory.update(key, compensated, total / n)
        buffer.copy_((total / n).to(buffer.dtype))
        state.end_bucket(key, seen, buffer)
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done

    payload = compressor.compress(compensated, key)
    if has_feedback(state.memory):
        state.memory.update(key, compensated, compressor.decompress(payload, flat.numel(), key))
    if checks:
        payload = (*payload, torch.tensor([count], dtype=torch.int64))
    layout = collectives.Layout.of(payload)
    with collectives.count_bytes(state.ledger), scope:
        gather = collectives.all_gather(collectives.pack(payload), group, async_op=True)

    def finish_allgather(gathered: list[torch.Tensor]) -> torch.Tensor:
        payloads = [collectives.unpack(buf, layout) for buf in gathered]
        seen: dict[int, int] = {}
        if checks:
            seen = {r: int(p[-1][0]) for r, p in enumerate(payloads) if int(p[-1][0])}
            payloads = [p[:-1] for p in payloads]
        total = compressor.aggregate(payloads, flat.numel(), key)
        buffer.copy_((total / n).to(buffer.dtype))
        state.end_bucket(key, seen, buffer)
        return buffer

    return gather.then(finish_allgather)  # type: ignore[union-attr]
