"""h0, hierarchical hashing, hash bitmaps and the row view: single-process, property-based."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.zen.hash_bitmap import (
    bitmap_bytes,
    decode_pull,
    encode_pull,
    expected_pull_bytes,
    pack_bits,
    pull_uses_bitmap,
    unpack_bits,
)
from thrifty.zen.hierarchical_hashing import (
    h0_imbalance,
    hierarchical_hash_partition,
    imbalance_ratio,
    partition_by_owner,
)
from thrifty.zen.owner_hash import OwnerHash
from thrifty.zen.sparse_rows import SparseRows, wire_index_dtype

FAST = settings(max_examples=40, deadline=None)


@FAST
@given(
    num_rows=st.integers(0, 3000),
    owners=st.integers(1, 9),
    seed=st.integers(0, 2**62 - 1),
    tabulated=st.booleans(),
)
def test_owner_hash_is_a_permutation_split_evenly(
    num_rows: int, owners: int, seed: int, tabulated: bool
) -> None:
    h0 = OwnerHash(num_rows, owners, seed, table_limit=1 << 22 if tabulated else 0)
    rows = torch.arange(num_rows)
    code = h0.permute(rows)
    assert torch.equal(code.sort().values, rows)
    assert torch.equal(h0.unpermute(code), rows)
    owner, position = h0.split(rows)
    sizes = [h0.list_size(p) for p in range(owners)]
    assert sum(sizes) == num_rows and max(sizes) - min(sizes) <= 1
    for p in range(owners):
        mine = rows[owner == p]
        assert torch.equal(h0.owner_list(p).sort().values, mine)
        assert torch.equal(h0.rows(p, position[owner == p]), mine)  # positions map back


def test_owner_hash_is_the_same_with_and_without_tables() -> None:
    """Ranks may differ in whether they tabulate; they must still agree on h0."""
    rows = torch.arange(5000)
    table = OwnerHash(5000, 4, seed=11).split(rows)
    on_the_fly = OwnerHash(5000, 4, seed=11, table_limit=0).split(rows)
    assert all(torch.equal(a, b) for a, b in zip(table, on_the_fly, strict=True))


def test_owner_hash_known_answer() -> None:
    """Pure integer arithmetic: every rank, torch version and device must give these owners."""
    owners = OwnerHash(1000, 4, seed=1, table_limit=0).owner(torch.arange(12)).tolist()
    assert owners == OwnerHash(1000, 4, seed=1).owner(torch.arange(12)).tolist()
    assert owners == [0, 0, 1, 2, 0, 1, 0, 1, 1, 3, 2, 3]


def test_owner_hash_balances_heavy_skew() -> None:
    h0 = OwnerHash(1_000_000, 8, table_limit=0)  # hash 10K indices, skip the 1M table
    head = torch.arange(10_000)  # every index in the first 1%
    assert imbalance_ratio(torch.bincount(h0.owner(head), minlength=8)) < 1.1
    gen = torch.Generator().manual_seed(3)
    sets = [torch.randperm(5_000, generator=gen)[:2_000] for _ in range(8)]  # first 0.5%
    push, pull = h0_imbalance(sets, 1_000_000)
    assert 1.0 <= push < 1.25 and 1.0 <= pull < 1.15
    assert imbalance_ratio([10, 10, 10, 10]) == 1.0
    assert imbalance_ratio([40, 0, 0, 0]) == 4.0
    assert imbalance_ratio([0, 0]) == 1.0


@FAST
@given(
    data=st.data(),
    num_rows=st.integers(1, 5000),
    owners=st.integers(1, 8),
    probes=st.integers(0, 4),
    slack=st.floats(0.05, 3.0),
    serial_fraction=st.floats(0.0, 0.5),
)
def test_hierarchical_hashing_equals_h0_partition(
    data: st.DataObject,
    num_rows: int,
    owners: int,
    probes: int,
    slack: float,
    serial_fraction: float,
) -> None:
    count = data.draw(st.integers(0, num_rows))
    seed = data.draw(st.integers(0, 2**40))
    indices = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))[:count]
    if count:
        indices[0] = 0  # index 0 is a real index, never an empty slot
    indices = indices.sort().values
    h0 = OwnerHash(num_rows, owners, seed)
    owner = h0.owner(indices)
    hashed = hierarchical_hash_partition(
        indices,
        owner,
        owners,
        probes=probes,
        slack=slack,
        serial_fraction=serial_fraction,
        seed=seed,
    )
    simple = partition_by_owner(owner, owners)
    assert len(hashed.parts) == owners
    for got, want in zip(hashed.parts, simple, strict=True):
        assert torch.equal(got.sort().values, want)  # same sets: nothing lost, nothing moved
    assert hashed.sizes == [p.numel() for p in simple]
    assert hashed.imbalance == imbalance_ratio(hashed.sizes)
    if probes == 0:
        assert hashed.serial_entries == count


def test_hierarchical_hashing_grows_a_full_serial_area_instead_of_dropping() -> None:
    indices = torch.arange(1000)
    owners = torch.zeros(1000, dtype=torch.int64)  # everything to one owner
    hashed = hierarchical_hash_partition(indices, owners, 4, probes=1, slack=0.1)
    assert hashed.serial_grown and hashed.serial_entries > 0
    assert torch.equal(hashed.parts[0].sort().values, indices)


def test_hierarchical_hashing_with_paper_parameters_rarely_goes_serial() -> None:
    h0 = OwnerHash(1_000_000, 8, table_limit=0)
    indices = torch.randperm(1_000_000, generator=torch.Generator().manual_seed(0))[:20_000]
    hashed = hierarchical_hash_partition(indices, h0.owner(indices), 8, probes=3, slack=2.0)
    assert hashed.serial_share < 0.05 and not hashed.serial_grown
    assert hashed.imbalance < 1.1


@FAST
@given(st.data(), st.integers(0, 200))
def test_bitmap_roundtrip(data: st.DataObject, list_size: int) -> None:
    positions = data.draw(st.sets(st.integers(0, max(list_size - 1, 0)), max_size=list_size))
    positions_t = torch.tensor(sorted(positions), dtype=torch.int64)
    bitmap = pack_bits(positions_t, list_size)
    assert bitmap.numel() == bitmap_bytes(list_size) and bitmap.dtype == torch.uint8
    assert torch.equal(unpack_bits(bitmap, list_size), positions_t)


@FAST
@given(
    data=st.data(),
    list_size=st.integers(0, 400),
    row_numel=st.integers(1, 5),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    value_dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
    fmt=st.sampled_from(["auto", "coo", "bitmap"]),
)
def test_pull_message_size_tells_its_format(
    data: st.DataObject,
    list_size: int,
    row_numel: int,
    index_dtype: torch.dtype,
    value_dtype: torch.dtype,
    fmt: str,
) -> None:
    count = data.draw(st.integers(0, list_size))
    positions = torch.randperm(list_size)[:count].sort().values
    values = torch.randn(count, row_numel).to(value_dtype)
    message = encode_pull(positions, values, list_size, index_dtype, fmt)  # type: ignore[arg-type]
    got_positions, got_values = decode_pull(
        message,
        list_size,
        row_numel,
        value_dtype,
        index_dtype,
        fmt,  # type: ignore[arg-type]
    )
    assert torch.equal(got_positions, positions) and torch.equal(got_values, values)
    if fmt == "auto":
        row_bytes = row_numel * value_dtype.itemsize
        expected = expected_pull_bytes(count, list_size, index_dtype.itemsize, row_bytes)
        assert message.numel() == expected
        coo = count * (index_dtype.itemsize + row_bytes)
        assert message.numel() <= coo  # never worse than COO


def test_bitmap_is_chosen_only_when_smaller() -> None:
    assert not pull_uses_bitmap(count=10, list_size=800, index_bytes=4)  # 100 B vs 40 B
    assert pull_uses_bitmap(count=30, list_size=800, index_bytes=4)  # 100 B vs 120 B
    assert not pull_uses_bitmap(count=25, list_size=800, index_bytes=4)  # tie: COO
    assert pull_uses_bitmap(count=0, list_size=8, index_bytes=4, fmt="bitmap")


def test_sparse_rows_roundtrip_and_duplicates() -> None:
    coords = torch.tensor([[0, 2, 0, 1], [3, 1, 3, 0]])
    tensor = torch.sparse_coo_tensor(
        coords, torch.tensor([1.0, 2.0, 3.0, 4.0]), (3, 5), check_invariants=True
    )
    rows = SparseRows.from_sparse(tensor)
    assert rows.num_rows == 15 and rows.row_numel == 1
    assert rows.indices.tolist() == [3, 5, 11] and rows.values.flatten().tolist() == [4.0, 4.0, 2.0]
    assert torch.equal(rows.to_sparse().to_dense(), tensor.to_dense())
    hybrid = torch.sparse_coo_tensor(
        torch.tensor([[4, 0, 4]]), torch.ones(3, 2, 2), (6, 2, 2), check_invariants=True
    )
    rows = SparseRows.from_sparse(hybrid)
    assert rows.num_rows == 6 and rows.row_numel == 4 and rows.indices.tolist() == [0, 4]
    assert torch.equal(rows.to_sparse().to_dense(), hybrid.to_dense())
    assert torch.equal(rows.to_dense_rows().reshape(6, 2, 2), hybrid.to_dense())


@pytest.mark.parametrize("num_rows", [1, 2**31 - 1, 2**31])
def test_wire_index_dtype(num_rows: int) -> None:
    assert wire_index_dtype(num_rows) == (torch.int32 if num_rows < 2**31 else torch.int64)
