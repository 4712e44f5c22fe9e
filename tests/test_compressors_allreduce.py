"""The all-reduce generator protocol, driven for several ranks in one process."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch

from thrifty.compressors import Compressor, Reduce, get_compressor
from thrifty.compressors.base import derive_seed, stable_key_hash
from thrifty.compressors.low_precision import BF16, FP16, NoCompression
from thrifty.compressors.powersgd import PowerSGD
from thrifty.compressors.quantizers import TernGrad
from thrifty.compressors.rounds import reduce_locally, run_allreduce_rounds_locally
from thrifty.compressors.sign import SignSGD, Signum
from thrifty.compressors.sparsifiers import RandomK, TopK

ROUND_CASES: dict[str, Callable[[], Compressor]] = {
    "none": NoCompression,
    "fp16": FP16,
    "bf16": BF16,
    "randomk_shared": lambda: RandomK(0.05, shared_seed=3),
    "terngrad": TernGrad,
    "signsgd": SignSGD,
    "signum": Signum,
    "powersgd": lambda: PowerSGD(2),
    "powersgd_raw": lambda: PowerSGD(2, min_compression_rate=1000.0),
}


@pytest.mark.parametrize("case", sorted(ROUND_CASES))
@pytest.mark.parametrize("numel", [0, 1, 333])
def test_rounds_follow_their_specs_and_all_ranks_agree(case: str, numel: int) -> None:
    torch.manual_seed(0)
    ranks = [ROUND_CASES[case]() for _ in range(3)]
    xs = [torch.randn(numel) for _ in ranks]
    # Drive rank 0 alone first and check each request against allreduce_round_specs.
    specs = ROUND_CASES[case]().allreduce_round_specs(numel)
    gen = ROUND_CASES[case]().allreduce_rounds(xs[0], "g")
    seen = []
    try:
        request = next(gen)
        while True:
            seen.append((tuple(request.tensor.shape), request.tensor.dtype, request.op))
            request = gen.send(request.tensor.clone())
    except StopIteration as stop:
        assert stop.value.shape == (numel,) and stop.value.dtype == torch.float32
    assert seen == [(s.spec.shape, s.spec.dtype, s.op) for s in specs]
    results = run_allreduce_rounds_locally(ranks, xs, "g")
    assert len(results) == 3
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("case", ["none", "fp16", "bf16", "randomk_shared"])
def test_single_round_allreduce_equals_aggregate_of_payloads(case: str) -> None:
    torch.manual_seed(1)
    xs = [torch.randn(500) for _ in range(3)]
    reduced = run_allreduce_rounds_locally([ROUND_CASES[case]() for _ in xs], xs, "g")[0]
    ranks = [ROUND_CASES[case]() for _ in xs]
    payloads = [c.compress(x, "g") for c, x in zip(ranks, xs, strict=True)]
    # fp16/bf16 all-reduces sum in the wire dtype; aggregate sums in float32.
    tolerance = {"fp16": 4e-3, "bf16": 3e-2}.get(case, 1e-6)
    assert torch.allclose(reduced, ranks[0].aggregate(payloads, 500, "g"), atol=tolerance)


def test_shared_seed_randomk_payloads_sum_elementwise() -> None:
    torch.manual_seed(2)
    ranks = [RandomK(0.1, shared_seed=11) for _ in range(3)]
    assert all(c.allreduce_compatible for c in ranks)
    assert not RandomK(0.1).allreduce_compatible
    xs = [torch.randn(200) for _ in ranks]
    payloads = [c.compress(x, "layer.w") for c, x in zip(ranks, xs, strict=True)]
    summed = (payloads[0][0] + payloads[1][0] + payloads[2][0],)
    via_sum = ranks[0].decompress(summed, 200, "layer.w")
    assert torch.allclose(via_sum, ranks[1].aggregate(payloads, 200, "layer.w"), atol=1e-6)
    # Every rank sent the entries at the same 20 indices.
    support = via_sum != 0
    assert int(support.sum()) == 20
    assert torch.allclose(via_sum[support], sum(xs)[support], atol=1e-6)


def test_shared_seed_indices_depend_on_seed_key_and_step_only() -> None:
    x = torch.arange(1.0, 101.0)

    def support(compressor: RandomK, key: str) -> set[int]:
        (values,) = compressor.compress(x, key)
        return {int(v) - 1 for v in values}

    a, b = RandomK(0.1, shared_seed=5), RandomK(0.1, shared_seed=5)
    first = support(a, "w")
    assert first == support(b, "w")  # another "rank", same seed and key
    assert support(a, "w") != first  # the next step draws new indices
    assert support(RandomK(0.1, shared_seed=5), "v") != first
    assert support(RandomK(0.1, shared_seed=6), "w") != first


def test_stable_key_hash_is_the_crc32_of_the_repr() -> None:
    # A literal, so a salted hash() (different in every process) would fail here.
    assert stable_key_hash("layer1.weight") == zlib.crc32(b"'layer1.weight'") == 3850921528
    assert stable_key_hash(("group", 3)) == zlib.crc32(b"('group', 3)")
    # The shared seed mixes (seed, key hash, step) with BLAKE2b: also process-independent.
    assert derive_seed(5, 3850921528, 0) == 1746697747276816989


def test_shared_seed_decompress_needs_a_prior_compress() -> None:
    with pytest.raises(ValueError, match="no shared indices"):
        RandomK(0.1, shared_seed=1).decompress((torch.zeros(10),), 100, "w")


@pytest.mark.parametrize("world", [2, 3])
def test_powersgd_is_exact_for_rank_one_sums(world: int) -> None:
    torch.manual_seed(3)
    u = torch.randn(8)
    xs = [torch.outer(u, torch.randn(8)) for _ in range(world)]  # numel 64 -> 8 x 8 view
    ranks = [PowerSGD(1) for _ in range(world)]
    assert ranks[0].compresses(64)
    results = run_allreduce_rounds_locally(ranks, xs, "w")
    assert torch.allclose(results[0], sum(xs).reshape(-1), atol=1e-5)


@pytest.mark.parametrize("world", [2, 3])
def test_powersgd_approximates_the_sum_like_a_truncated_svd(world: int) -> None:
    torch.manual_seed(4)
    basis_u, basis_v = torch.randn(48, 3), torch.randn(3, 40)
    xs = [
        basis_u @ torch.diag(torch.rand(3) + 0.5) @ basis_v + 0.05 * torch.randn(48, 40)
        for _ in range(world)
    ]
    ranks = [PowerSGD(3, shape=(48, 40)) for _ in range(world)]
    for _ in range(8):  # warm start: one power iteration per step
        result = run_allreduce_rounds_locally(ranks, xs, "w")[0].view(48, 40)
    total = sum(xs)
    best = float(torch.linalg.svdvals(total)[3:].square().sum().sqrt())
    assert float((result - total).norm()) <= 1.05 * best
    assert float((result - total).norm()) < 0.1 * float(total.norm())


def test_powersgd_sends_small_tensors_raw_and_exactly() -> None:
    xs = [torch.randn(5), torch.randn(5)]
    compressor = PowerSGD(1)
    assert not compressor.compresses(5)
    assert compressor.payload_spec(5)[0].shape == (5,)
    result = run_allreduce_rounds_locally([PowerSGD(1), PowerSGD(1)], xs, "b")[0]
    assert torch.allclose(result, xs[0] + xs[1])


def test_terngrad_scaler_sharing_uses_the_global_max() -> None:
    torch.manual_seed(5)
    xs = [torch.randn(300), 3 * torch.randn(300), torch.randn(300)]
    scale = max(float(x.abs().max()) for x in xs)
    result = run_allreduce_rounds_locally([TernGrad() for _ in xs], xs, "g")[0]
    units = result / scale
    assert torch.allclose(units, units.round(), atol=1e-5)
    assert units.abs().max() <= 3


def test_terngrad_scaler_sharing_is_unbiased() -> None:
    torch.manual_seed(6)
    xs = [torch.randn(20), torch.randn(20)]
    ranks = [TernGrad(), TernGrad()]
    trials = 1500
    mean = sum(run_allreduce_rounds_locally(ranks, xs, "g")[0] for _ in range(trials)) / trials
    scale = max(float(x.abs().max()) for x in xs)
    sd = sum((x.abs() * (scale - x.abs())).clamp(min=0) for x in xs).sqrt()
    assert torch.all((mean - sum(xs)).abs() <= 5 * sd / trials**0.5 + 1e-4)


def test_majority_vote_through_allreduce() -> None:
    xs = [
        torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5]),
        torch.tensor([2.0, -1.0, -3.0, 4.0, -0.5]),
        torch.tensor([-1.0, -5.0, 2.0, 1.0, -0.1]),
    ]
    result = run_allreduce_rounds_locally([SignSGD() for _ in xs], xs, "g")[0]
    assert result.tolist() == [3.0, -3.0, 3.0, 3.0, -3.0]
    compressor = SignSGD()
    payloads = [compressor.compress(x) for x in xs]
    assert torch.equal(result, compressor.aggregate(payloads, 5))


@pytest.mark.parametrize("name", ["topk", "randomk", "dgc", "qsgd", "efsignsgd", "onebit"])
def test_compressors_without_allreduce_refuse_it(name: str) -> None:
    compressor = get_compressor(name)
    assert not compressor.supports_allreduce_rounds
    with pytest.raises(TypeError, match="all-gather"):
        compressor.allreduce_rounds(torch.randn(10), "g")


def test_allreduce_rounds_validate_before_the_first_round() -> None:
    x = torch.randn(10)
    x[0] = float("nan")
    with pytest.raises(ValueError, match="'w'"):
        PowerSGD(1).allreduce_rounds(x, "w")


def test_reduce_locally_refuses_mismatched_ranks() -> None:
    with pytest.raises(RuntimeError, match="rank 1"):
        reduce_locally([Reduce(torch.zeros(3)), Reduce(torch.zeros(4))])
    maxed = reduce_locally([Reduce(torch.ones(2), "max"), Reduce(torch.tensor([3.0, 0.0]), "max")])
    assert maxed.tolist() == [3.0, 1.0]
    with pytest.raises(RuntimeError, match="rank 1 asked for sum of \\(400,\\)"):
        run_allreduce_rounds_locally(
            [PowerSGD(1), PowerSGD(1, min_compression_rate=1000.0)],
            [torch.randn(400), torch.randn(400)],
            "w",
        )


def test_topk_is_not_allreduce_compatible() -> None:
    assert not TopK().allreduce_compatible and FP16().allreduce_compatible
