"""Any thrifty compressor as a PyTorch DDP communication hook.

For users who keep ``DistributedDataParallel``: its buckets become the groups.
Compressors whose payloads sum elementwise (FP16, BF16, shared-seed Random-k)
are all-reduced with the input divided by the world size first, exactly as
``fp16_compress_hook`` does; every other compressor is all-gathered and
aggregated. Multi-round compressors (PowerSGD, TernGrad with scaler sharing,
the int8 sign vote) run their rounds inside the hook, without overlap; prefer
PyTorch's own ``powerSGD_hook`` or :class:`~thrifty.sync.GradientSync` for those.

Example::

    ddp = DistributedDataParallel(model)
    state = CompressionHookState("topk", ratio=0.01)
    ddp.register_comm_hook(state, compression_hook)
"""

# No `from __future__ import annotations` here: DDP inspects the hook's
# signature and insists that `bucket` is annotated with the real dist.GradBucket.
from typing import Any

import torch
import torch.distributed as dist

from thrifty.comm import collectives
from thrifty.sync.plan import Strategy, has_feedback

__all__ = ["CompressionHookState", "compression_hook"]


class CompressionHookState:
    """State of :func:`compression_hook` across iterations.

    Args:
        compressor: registry name, e.g. ``"fp16"`` or ``"topk"``.
        process_group: defaults to the world.
        memory: error feedback (``"default"``, ``"none"``, ``"residual"``, ``"dgc"``).
        **options: the compressor's keyword arguments.

    Error feedback is kept per bucket, keyed by (bucket index, size): DDP
    rebuilds its buckets after the first iteration, which starts fresh state.
    """

    def __init__(
        self,
        compressor: str,
        process_group: dist.ProcessGroup | None = None,
        memory: str = "default",
        **options: Any,
    ) -> None:
        self.strategy = Strategy.make(compressor, None, memory, **options)
        self.compressor = self.strategy.build_compressor()
        self.memory = self.strategy.build_memory()
        self.process_group = process_group
        self.ledger = collectives.CommLedger()


def compression_hook(
    state: CompressionHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Compress one DDP bucket, communicate it, return a future of its averaged gradient."""
    group = state.process_group
    n = dist.get_world_size(group)
    buffer = bucket.buffer()
    compressor = state.compressor
    assert compressor is not None
    key = (bucket.index(), buffer.numel())
    flat = buffer.to(torch.float32)
    compensated = state.memory.compensate(flat, key) if has_feedback(state.memory) else flat

    if compressor.allreduce_compatible:
        rounds = compressor.allreduce_rounds(compensated / n, key)
        request = next(rounds)
        own = request.tensor.clone()
        with collectives.count_bytes(state.ledger):
            pending = collectives.all_reduce(request.tensor, group=group, async_op=True)

        def finish_allreduce(reduced: torch.Tensor) -> torch.Tensor:
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
            return buffer

        return pending.then(finish_allreduce)  # type: ignore[union-attr]

    if compressor.supports_allreduce_rounds:  # multi-round: synchronous, no overlap
        rounds = compressor.allreduce_rounds(compensated, key)
        reduced = None
        with collectives.count_bytes(state.ledger):
            while True:
                try:
                    request = rounds.send(reduced) if reduced is not None else next(rounds)
                except StopIteration as stop:
                    total: torch.Tensor = stop.value
                    break
                op = dist.ReduceOp.MAX if request.op == "max" else dist.ReduceOp.SUM
                reduced = collectives.all_reduce(request.tensor, op, group)
        if has_feedback(state.memory):
            state.memory.update(key, compensated, total / n)
        buffer.copy_((total / n).to(buffer.dtype))
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done

    payload = compressor.compress(compensated, key)
    if has_feedback(state.memory):
        state.memory.update(key, compensated, compressor.decompress(payload, flat.numel(), key))
    layout = collectives.Layout.of(payload)
    with collectives.count_bytes(state.ledger):
        gather = collectives.all_gather(collectives.pack(payload), group, async_op=True)

    def finish_allgather(gathered: list[torch.Tensor]) -> torch.Tensor:
        payloads = [collectives.unpack(buf, layout) for buf in gathered]
        total = compressor.aggregate(payloads, flat.numel(), key)
        buffer.copy_((total / n).to(buffer.dtype))
        return buffer

    return gather.then(finish_allgather)  # type: ignore[union-attr]
