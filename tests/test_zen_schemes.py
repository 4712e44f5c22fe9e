"""Every sparse scheme equals the dense all-reduce, on real gloo groups of 1-4 ranks.

Starting ranks costs more than the checks (more so on a busy machine), so
one ``run_ranks`` call per world size runs every check (:func:`check_suite`)
and the test functions below read their part of its cached result. The
reference is plain ``dist.all_reduce`` of the densified inputs, outside thrifty.
Measured bytes are compared with :mod:`thrifty.zen.analytic` here too.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from thrifty.bench import run_ranks
from thrifty.comm import collectives
from thrifty.zen import (
    AutoScheme,
    SparseSyncError,
    make_scheme,
    measure_sparsity,
    predict_wire_bytes,
    sync_sparse,
)
from thrifty.zen.analytic import SCHEME_NAMES
from thrifty.zen.schemes import BalancedParallelism
from thrifty.zen.schemes.block_parallelism import rows_per_block

ROWS = 3000


def _coo(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    coords = indices.reshape(1, -1) if indices.dim() == 1 else indices
    return torch.sparse_coo_tensor(coords, values, shape, check_invariants=True)


def _random(gen: torch.Generator, rows: int, density: float, dtype=torch.float32) -> torch.Tensor:
    nnz = int(rows * density)
    idx = torch.randperm(rows, generator=gen)[:nnz]
    return _coo(idx, torch.randn(nnz, generator=gen, dtype=dtype), (rows,))


def case_random(rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return _random(gen, ROWS, 0.05)


def case_random_fp64(rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return _random(gen, ROWS, 0.02, torch.float64)


def case_all_zero(rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return _coo(torch.empty(0, dtype=torch.int64), torch.empty(0), (ROWS,))


def case_fully_dense(rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return _coo(torch.arange(ROWS), torch.randn(ROWS, generator=gen), (ROWS,))


def case_index_zero(rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return _coo(torch.tensor([0]), torch.tensor([rank + 1.5]), (ROWS,))


def case_index_zero_one_rank(rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.tensor([0]) if rank == n - 1 else torch.empty(0, dtype=torch.int64)
    return _coo(idx, torch.full((idx.numel(),), -2.0), (ROWS,))


def case_skew(rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    head = ROWS // 100  # all indices in the first 1%
    idx = torch.randperm(head, generator=gen)[: head // 2 + rank]
    return _coo(idx, torch.randn(idx.numel(), generator=gen), (ROWS,))


def case_duplicates(rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, 40, (200,), generator=gen)  # uncoalesced, many repeats, 0 likely
    idx[:3] = torch.tensor([0, 0, ROWS - 1])
    return _coo(idx, torch.randn(200, generator=gen), (ROWS,))


def case_mixed_density(rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return _random(gen, ROWS, (0.0, 0.6, 0.01, 0.2)[rank % 4])


def case_embedding_grad(rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    torch.manual_seed(1234)  # same weights on every rank, as under DDP
    emb = nn.Embedding(500, 16, sparse=True)
    tokens = torch.randint(0, 500, (8, 20), generator=gen)
    tokens[0, 0] = 0
    (emb(tokens) ** 2).sum().backward()
    grad = emb.weight.grad
    assert grad is not None and grad.is_sparse and not grad.is_coalesced()
    return grad


def case_sparse_matrix(rank: int, n: int, gen: torch.Generator) -> torch.Tensor:
    coords = torch.stack(
        [torch.randint(0, 40, (90,), generator=gen), torch.randint(0, 70, (90,), generator=gen)]
    )
    return torch.sparse_coo_tensor(
        coords, torch.randn(90, generator=gen), (40, 70), check_invariants=True
    )


CASES: dict[str, Callable[[int, int, torch.Generator], torch.Tensor]] = {
    name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")
}
SCHEME_VARIANTS: dict[str, Callable[[], object]] = {
    "dense": lambda: "dense",
    "agsparse": lambda: "agsparse",
    "sparcml": lambda: "sparcml",
    "sparcml_threshold": lambda: make_scheme("sparcml", dense_threshold=0.03),
    "omnireduce": lambda: "omnireduce",
    "omnireduce_block16": lambda: make_scheme("omnireduce", block_size=16),
    "zen": lambda: "zen",
    "zen_bitmap": lambda: BalancedParallelism(pull_format="bitmap"),
    "zen_coo": lambda: BalancedParallelism(pull_format="coo"),
    "zen_hierarchical": lambda: BalancedParallelism(partitioner="hierarchical", seed=99),
    "auto": lambda: "auto",
    "auto_bytes": lambda: AutoScheme(criterion="bytes"),
}
# Schemes that keep exactly the union of the input rows (block/dense ones keep non-zero rows).
STRUCTURAL = ("agsparse", "sparcml", "zen", "auto")
# Dense output goes through one of two conversions: from a dense sum or from rows.
DENSE_OUTPUT = ("dense", "zen")


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    # torch.testing.assert_close would import ~500 modules in every rank (1.5 s each).
    tight = expected.dtype == torch.float64
    rtol, atol = (1e-10, 1e-12) if tight else (1e-5, 1e-5)
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        worst = (actual - expected).abs().max().item()
        raise AssertionError(f"{where}: max abs error {worst:g}")


def _same_on_all_ranks(results: list[torch.Tensor], where: str) -> None:
    mine = torch.stack(results)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    for other in gathered:
        assert torch.equal(other, mine), f"{where}: ranks disagree on the result"


def check_all_cases() -> dict[str, int]:
    rank, n = dist.get_rank(), dist.get_world_size()
    checked = 0
    for case, build in CASES.items():
        gen = torch.Generator().manual_seed(1000 * rank + zlib.crc32(case.encode()) % 997)
        tensor = build(rank, n, gen)
        reference = tensor.to_dense()
        dist.all_reduce(reference)
        union = tensor.coalesce().indices()
        union_list = [None] * n
        dist.all_gather_object(union_list, union)
        union_rows = torch.unique(torch.cat(union_list, dim=1), dim=1)
        results = []
        for variant, make in SCHEME_VARIANTS.items():
            where = f"case {case}, scheme {variant}, n={n}"
            average = variant != "dense"  # sums for one scheme, means for the rest
            expected = reference / n if average else reference
            out = sync_sparse(tensor, make(), average=average)
            assert out.is_sparse and out.is_coalesced(), where
            assert out.shape == tensor.shape and out.dtype == tensor.dtype, where
            _assert_close(out.to_dense(), expected, where)
            if variant.startswith(STRUCTURAL):
                assert torch.equal(out.indices(), union_rows), f"{where}: rows lost or added"
            results.append(out.to_dense())
            if variant in DENSE_OUTPUT:
                dense_out = sync_sparse(tensor, make(), average=average, output="dense")
                assert dense_out.layout == torch.strided, where
                _assert_close(dense_out, expected, where + ", dense output")
            checked += 1
        _same_on_all_ranks(results, f"case {case}")
    return {"checked": checked}


def check_auto_choice() -> list[str | None]:
    """``auto``'s choice on disjoint-ish and on identical index sets, by either criterion."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    chosen = []
    for criterion, overlap in itertools.product(("paper", "bytes"), (False, True)):
        auto = AutoScheme(profile_steps=2, criterion=criterion)
        shared = torch.Generator().manual_seed(7)
        for _ in range(3):
            idx = torch.randperm(20_000, generator=shared if overlap else gen)[:400]
            tensor = _coo(idx, torch.randn(400, generator=gen), (20_000,))
            reference = tensor.to_dense()
            dist.all_reduce(reference)
            out = sync_sparse(tensor, auto, average=False)
            _assert_close(out.to_dense(), reference, f"auto, overlap={overlap}")
        assert len(auto.profile) == 2
        chosen.append(auto.chosen)
    return chosen


def _raises_everywhere(tensor: object, match: str, **kwargs: object) -> None:
    with pytest.raises(SparseSyncError, match=match):
        sync_sparse(tensor, **kwargs)  # type: ignore[arg-type]


def check_bad_inputs() -> None:
    rank, n = dist.get_rank(), dist.get_world_size()
    last = n - 1
    good = _coo(torch.tensor([0, 5]), torch.tensor([1.0, 2.0]), (100,))

    _raises_everywhere(good.to_dense() if rank == 0 else good, r"rank 0: expected a sparse COO")
    _raises_everywhere(good.to_dense(), r"dense \(strided\)")
    wrong_shape = _coo(torch.tensor([0]), torch.tensor([1.0]), (101,))
    _raises_everywhere(wrong_shape if rank == last else good, r"same shape.*\(101,\)")
    _raises_everywhere(good.double() if rank == 0 else good, r"same shape, dtype.*float64")
    nan = _coo(torch.tensor([3]), torch.tensor([float("nan")]), (100,))
    _raises_everywhere(nan if rank == last else good, rf"rank {last}: 1 value\(s\) are NaN or Inf")
    inf = _coo(torch.tensor([0, 1]), torch.tensor([float("inf"), 1.0]), (100,))
    _raises_everywhere(inf, r"NaN or Inf")
    ints = _coo(torch.tensor([0]), torch.tensor([3]), (100,))
    _raises_everywhere(ints, r"floating point .*got torch.int64")
    _raises_everywhere("not a tensor" if rank == 0 else good, r"rank 0: .*not a tensor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
        csr = good.to_dense().reshape(10, 10).to_sparse_csr()
    _raises_everywhere(csr if rank == 0 else good, "another sparse layout")
    _raises_everywhere(
        good, rf"rank {last}: unknown scheme", scheme="zenn" if rank == last else "zen"
    )
    _raises_everywhere(
        good, r"different schemes or scheme settings", scheme=BalancedParallelism(seed=rank)
    )
    _raises_everywhere(good, r"different schemes", scheme="agsparse" if rank else "zen")
    _raises_everywhere(good, r"output must be", output="csr")
    # The group is still in step: a good call works afterwards.
    out = sync_sparse(good, average=False)
    assert torch.equal(out.to_dense(), good.to_dense() * n)


_RAW_COLLECTIVES = ("all_to_all_single", "all_reduce")
_FORBIDDEN = (
    "send",
    "recv",
    "isend",
    "irecv",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "all_to_all",
)


def check_ledger_sees_every_call() -> None:
    """Every raw torch.distributed call a scheme makes is one the byte ledger recorded."""
    raw_calls = 0
    saved = {name: getattr(dist, name) for name in _RAW_COLLECTIVES + _FORBIDDEN}

    def counting(fn):
        def wrapper(*args, **kwargs):
            nonlocal raw_calls
            raw_calls += 1
            return fn(*args, **kwargs)

        return wrapper

    def forbidden(name):
        def wrapper(*args, **kwargs):
            raise AssertionError(f"dist.{name} bypasses the byte ledger")

        return wrapper

    rank = dist.get_rank()
    tensor = _random(torch.Generator().manual_seed(rank), 5000, 0.1)
    try:
        for name in _RAW_COLLECTIVES:
            setattr(dist, name, counting(saved[name]))
        for name in _FORBIDDEN:
            setattr(dist, name, forbidden(name))
        for variant, make in SCHEME_VARIANTS.items():
            raw_calls = 0
            with collectives.count_bytes() as ledger:
                sync_sparse(tensor, make())
            assert raw_calls == ledger.calls, (variant, raw_calls, ledger.as_dict())
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


# (rows, values per row, density): a sparse vector and an embedding-like gradient.
BYTE_CASES = {"vector": (200_000, 1, 0.01), "rows": (20_000, 16, 0.02)}


def check_bytes() -> dict[str, Any]:
    """Bytes each scheme sent (ledger), with the index sets the model needs; and under skew."""
    rank = dist.get_rank()
    out: dict[str, Any] = {}
    for layout, (rows, width, density) in BYTE_CASES.items():
        gen = torch.Generator().manual_seed(17 + rank)
        nnz = int(rows * density)
        idx = torch.randperm(rows, generator=gen)[:nnz]
        shape = (rows,) if width == 1 else (rows, width)
        tensor = _coo(idx, torch.randn(nnz, *shape[1:], generator=gen), shape)
        sent = {}
        for scheme in SCHEME_NAMES:
            with collectives.count_bytes() as ledger:
                sync_sparse(tensor, scheme)
            sent[scheme] = ledger.wire_bytes
        out[layout] = {"indices": idx.sort().values, "sent": sent}
    # Skew: every index in the first 1% of the rows, the same head on all ranks.
    head = torch.randperm(2000, generator=torch.Generator().manual_seed(rank))[:1000]
    skewed = _coo(head, torch.randn(1000), (200_000,))
    out["skew"] = {}
    for scheme in ("omnireduce", "zen"):
        with collectives.count_bytes() as ledger:
            sync_sparse(skewed, scheme)
        out["skew"][scheme] = ledger.wire_bytes
    return out


def check_suite() -> dict[str, Any]:
    """Everything this file checks, in one process group (all ranks run the same sections)."""
    n = dist.get_world_size()
    out: dict[str, Any] = {"cases": check_all_cases()}
    if n in (2, 4):
        out["auto"] = check_auto_choice()
    if n > 1:
        check_bad_inputs()
        out["bad_input"] = "ok"
        check_ledger_sees_every_call()
        out["ledger"] = "ok"
    if n in (3, 4):
        out["bytes"] = check_bytes()
    return out


@functools.cache
def _suite(world_size: int) -> list[dict[str, Any]] | BaseException:
    try:
        return run_ranks(check_suite, world_size, timeout=240)
    except Exception as exc:  # cached too: one failing run, not one per test
        return exc


def suite(world_size: int) -> list[dict[str, Any]]:
    result = _suite(world_size)
    if isinstance(result, BaseException):
        raise result
    return result


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_scheme_equals_dense_allreduce(world_size: int) -> None:
    results = suite(world_size)
    assert results[0]["cases"]["checked"] == len(CASES) * len(SCHEME_VARIANTS)


def test_auto_selects_hc_or_bp_from_gamma() -> None:
    # Order: (paper, random), (paper, identical), (bytes, random), (bytes, identical).
    # n = 2: HC's one exchange wins unless the indices coincide (gamma = 1: Eq. 1 = Eq. 2,
    # a tie that goes to BP; by bytes HC still wins by its one size exchange fewer).
    assert suite(2)[0]["auto"] == ["sparcml", "zen", "sparcml", "sparcml"]
    four = [r["auto"] for r in suite(4)]
    assert all(c == four[0] for c in four)  # every rank decided alike
    # n = 4, 2% random indices: little overlap, so by Eq. 1/2 (COO) HC; but the hash
    # bitmap cuts BP's Pull enough that by bytes BP wins. Identical indices: BP.
    assert four[0] == ["sparcml", "zen", "zen", "zen"]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_bad_input_raises_on_every_rank(world_size: int) -> None:
    assert all(r["bad_input"] == "ok" for r in suite(world_size))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_byte_ledger_sees_every_collective(world_size: int) -> None:
    assert all(r["ledger"] == "ok" for r in suite(world_size))


@pytest.mark.parametrize("world_size", [3, 4])
@pytest.mark.parametrize("layout", list(BYTE_CASES))
def test_measured_bytes_match_analytic_model(world_size: int, layout: str) -> None:
    results = [r["bytes"][layout] for r in suite(world_size)]
    rows, width, _ = BYTE_CASES[layout]
    stats = measure_sparsity([r["indices"] for r in results], rows, rows_per_block(256, width))
    for scheme in SCHEME_NAMES:
        measured = sum(r["sent"][scheme] for r in results)
        predicted = predict_wire_bytes(scheme, stats, values_per_index=width).total_bytes
        assert abs(measured / predicted - 1) < 0.10, (scheme, measured, predicted)


@pytest.mark.parametrize("world_size", [3, 4])
def test_zen_stays_balanced_under_skew_where_omnireduce_does_not(world_size: int) -> None:
    sent = [r["bytes"]["skew"] for r in suite(world_size)]
    for scheme, bound in (("zen", 1.3), ("omnireduce", None)):
        per_rank = [s[scheme] for s in sent]
        ratio = max(per_rank) / (sum(per_rank) / world_size)
        if bound is not None:
            assert ratio < bound, (scheme, per_rank)
        else:  # owner 0 pulls (n-1) copies of everything, the others push one: max/mean = n/2
            assert ratio > 0.9 * world_size / 2, (scheme, per_rank)
