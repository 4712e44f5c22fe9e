"""Collectives against plain torch.distributed results on real gloo groups of 2-4 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from thrifty.bench import run_ranks
from thrifty.comm import collectives


def _uneven(rank: int, peer: int) -> torch.Tensor:
    """A chunk whose length depends on sender and receiver; some are empty."""
    n = (rank * 3 + peer * 2) % 5
    return torch.arange(n, dtype=torch.float32) + 100 * rank + 10 * peer


def check_all_to_all_v() -> list[list[list[float]]]:
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = [_uneven(rank, j) for j in range(n)]
    with collectives.count_bytes() as ledger:
        got = collectives.all_to_all_v(chunks)
    for src in range(n):
        assert torch.equal(got[src], _uneven(src, rank)), (src, got[src])
    sent = sum(chunks[j].numel() * 4 for j in range(n) if j != rank)
    assert ledger.ops["all_to_all_v"].payload_bytes == sent
    assert ledger.ops["all_to_all_v"].wire_bytes == sent
    assert ledger.ops["size_exchange"].wire_bytes == (n - 1) * 8
    # With the receive sizes known, no size exchange is needed.
    with collectives.count_bytes() as ledger2:
        again = collectives.all_to_all_v(chunks, recv_sizes=[g.numel() for g in got])
    assert "size_exchange" not in ledger2.ops
    assert all(torch.equal(a, b) for a, b in zip(again, got, strict=True))
    return [g.tolist() for g in got]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_all_to_all_v_uneven_and_empty(world_size: int) -> None:
    results = run_ranks(check_all_to_all_v, world_size)
    assert len(results) == world_size


def check_all_gather_v(async_op: bool) -> None:
    rank, n = dist.get_rank(), dist.get_world_size()
    mine = torch.arange(rank * 2, dtype=torch.int32) * (rank + 1)  # rank 0 sends nothing
    with collectives.count_bytes() as ledger:
        out = collectives.all_gather_v(mine, async_op=async_op)
        if async_op:
            out = out.wait()
    for src in range(n):
        assert torch.equal(out[src], torch.arange(src * 2, dtype=torch.int32) * (src + 1))
    assert ledger.ops["all_gather_v"].wire_bytes == (n - 1) * mine.numel() * 4
    # Reference: plain all_gather on padded tensors gives the same data.
    pad = torch.zeros(2 * (n - 1), dtype=torch.int32)
    pad[: mine.numel()] = mine
    ref = [torch.empty_like(pad) for _ in range(n)]
    dist.all_gather(ref, pad)
    for src in range(n):
        assert torch.equal(ref[src][: 2 * src], out[src])


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("async_op", [False, True])
def test_all_gather_v(world_size: int, async_op: bool) -> None:
    run_ranks(check_all_gather_v, world_size, async_op)


def check_all_reduce_and_gather() -> None:
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1000, generator=g)
    ref = x.clone()
    dist.all_reduce(ref)
    with collectives.count_bytes() as ledger:
        pending = collectives.all_reduce(x.clone(), async_op=True)
        ours = pending.wait()
        gathered = collectives.all_gather(x)
    assert torch.allclose(ours, ref)
    assert ledger.ops["all_reduce"].wire_bytes == -(-2 * (n - 1) * 4000 // n)
    assert ledger.ops["all_gather"].wire_bytes == (n - 1) * 4000
    ref_g = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(ref_g, x)
    assert all(torch.equal(a, b) for a, b in zip(gathered, ref_g, strict=True))


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_and_all_gather_match_torch(world_size: int) -> None:
    run_ranks(check_all_reduce_and_gather, world_size)


def check_packed() -> None:
    rank, n = dist.get_rank(), dist.get_world_size()
    mine = [
        torch.full((rank + 1, 2), rank, dtype=torch.float16),
        torch.arange(rank, dtype=torch.int64),
        torch.tensor([True, rank % 2 == 0]),
        torch.empty(0, dtype=torch.bfloat16),
        torch.tensor(3.5 + rank, dtype=torch.float64),
    ]
    everyone = collectives.all_gather_packed(mine)
    assert len(everyone) == n
    for src, tensors in enumerate(everyone):
        assert tensors[0].dtype == torch.float16 and tensors[0].shape == (src + 1, 2)
        assert torch.all(tensors[0] == src)
        assert torch.equal(tensors[1], torch.arange(src, dtype=torch.int64))
        assert tensors[2].tolist() == [True, src % 2 == 0]
        assert tensors[3].numel() == 0 and tensors[3].dtype == torch.bfloat16
        assert tensors[4].shape == () and tensors[4].item() == 3.5 + src


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_gather_packed_mixed_dtypes(world_size: int) -> None:
    run_ranks(check_packed, world_size)


def check_bad_chunk_count() -> None:
    with pytest.raises(ValueError, match="one chunk per rank"):
        collectives.all_to_all_v([torch.zeros(1)])
    with pytest.raises(TypeError, match="one dtype"):
        collectives.all_to_all_v([torch.zeros(1), torch.zeros(1, dtype=torch.int32)])


def test_all_to_all_v_rejects_wrong_world_size() -> None:
    run_ranks(check_bad_chunk_count, 2)


def test_pack_roundtrip_with_layout_and_misaligned_offsets() -> None:
    tensors = [
        torch.tensor([1, 2, 3], dtype=torch.uint8),  # puts the next tensor at offset 3
        torch.randn(4, 5).t(),  # non-contiguous
        torch.tensor([7], dtype=torch.int32),
    ]
    layout = collectives.Layout.of(tensors)
    buf = collectives.pack(tensors)
    assert buf.numel() == layout.nbytes == 3 + 80 + 4
    out = collectives.unpack(buf, layout)
    for a, b in zip(tensors, out, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="layout describes"):
        collectives.unpack(buf[:-1], layout)


def test_wire_bytes_model() -> None:
    assert collectives.wire_bytes("all_reduce", 1000, 4) == 1500
    assert collectives.wire_bytes("all_gather", 1000, 4) == 750
    assert collectives.wire_bytes("all_to_all", 1000, 1) == 0
    with pytest.raises(ValueError, match="unknown primitive"):
        collectives.wire_bytes("broadcast", 1, 2)


def test_collectives_need_an_initialised_group() -> None:
    with pytest.raises(RuntimeError, match="not initialised"):
        collectives.all_reduce(torch.zeros(1))


def check_reused_buffers_and_adjacent_chunks() -> None:
    rank, n = dist.get_rank(), dist.get_world_size()
    flat = torch.arange(n * 3, dtype=torch.float32) + 100 * rank
    out = torch.full((n * 3,), -1.0)
    got = collectives.all_to_all_v(list(flat.split(3)), recv_sizes=[3] * n, out=out)
    for src in range(n):
        assert torch.equal(got[src], torch.arange(3 * rank, 3 * rank + 3) + 100.0 * src)
        assert got[src].data_ptr() == out[3 * src :].data_ptr()  # written in place
    # Non-adjacent chunks (reversed) still go to the right ranks.
    backwards = list(reversed(flat.split(3)))
    got = collectives.all_to_all_v(backwards, recv_sizes=[3] * n)
    for src in range(n):
        assert torch.equal(got[src], torch.arange(3 * (n - 1 - rank), 3 * (n - rank)) + 100.0 * src)
    gathered = [torch.empty(2) for _ in range(n)]
    collectives.all_gather(torch.full((2,), float(rank)), out=gathered)
    assert [g.tolist() for g in gathered] == [[float(r)] * 2 for r in range(n)]
    with pytest.raises(ValueError, match="out must be"):
        collectives.all_to_all_v(list(flat.split(3)), recv_sizes=[3] * n, out=torch.empty(1))


@pytest.mark.parametrize("world_size", [2, 3])
def test_reused_buffers_and_adjacent_chunks(world_size: int) -> None:
    run_ranks(check_reused_buffers_and_adjacent_chunks, world_size)
