"""Drive the all-reduce rounds of several ranks in one process.

Used by tests and by the engine's reference checks: it plays the collective,
reducing each round's tensors elementwise across the list, in their own dtype
(as NCCL and gloo do), and checks that every rank asked for the same thing.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from thrifty.compressors.base import AllreduceRounds, Compressor, Reduce


def reduce_locally(requests: Sequence[Reduce]) -> Tensor:
    """What an all-reduce of ``requests`` (one per rank) returns to every rank."""
    first = requests[0]
    for rank, request in enumerate(requests):
        if (
            request.op != first.op
            or request.tensor.shape != first.tensor.shape
            or (request.tensor.dtype != first.tensor.dtype)
        ):
            raise RuntimeError(
                f"rank {rank} asked for {request.op} of {tuple(request.tensor.shape)} "
                f"{request.tensor.dtype}, rank 0 for {first.op} of "
                f"{tuple(first.tensor.shape)} {first.tensor.dtype}"
            )
    stacked = torch.stack([r.tensor for r in requests])
    if first.op == "sum":
        return stacked.sum(dim=0, dtype=first.tensor.dtype)
    if first.op == "max":
        return stacked.amax(dim=0)
    raise ValueError(f"unknown reduce op {first.op!r}; expected 'sum' or 'max'")


def run_allreduce_rounds_locally(
    compressors_per_rank: Sequence[Compressor],
    xs_per_rank: Sequence[Tensor],
    key: Hashable = None,
) -> list[Tensor]:
    """Run ``allreduce_rounds`` of every rank in lockstep; return each rank's result.

    ``compressors_per_rank[i]`` is rank ``i``'s compressor instance (each rank
    keeps its own state) and ``xs_per_rank[i]`` its tensor. Every rank receives
    its own copy of each reduced tensor.

    Raises:
        RuntimeError: ranks disagree on a round's op, shape or dtype, or on the
            number of rounds.
    """
    if len(compressors_per_rank) != len(xs_per_rank) or not xs_per_rank:
        raise ValueError(
            f"need one compressor per tensor, got {len(compressors_per_rank)} compressors "
            f"and {len(xs_per_rank)} tensors"
        )
    generators: list[AllreduceRounds] = [
        c.allreduce_rounds(x, key) for c, x in zip(compressors_per_rank, xs_per_rank, strict=True)
    ]
    results: list[Tensor | None] = [None] * len(generators)
    requests: list[Reduce | None] = []
    for rank, gen in enumerate(generators):
        try:
            requests.append(next(gen))
        except StopIteration as stop:
            results[rank] = stop.value
            requests.append(None)
    round_index = 0
    while any(r is not None for r in requests):
        if any(r is None for r in requests):
            raise RuntimeError(f"ranks finished after different numbers of rounds ({round_index})")
        reduced = reduce_locally([r for r in requests if r is not None])
        for rank, gen in enumerate(generators):
            try:
                requests[rank] = gen.send(reduced.clone())
            except StopIteration as stop:
                results[rank] = stop.value
                requests[rank] = None
        round_index += 1
    return [r for r in results if r is not None]
