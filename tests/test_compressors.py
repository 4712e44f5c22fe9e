"""Contract tests run against every compressor: sizes, shapes, dtypes, errors, EF."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from thrifty.compressors import Compressor
from thrifty.compressors.low_precision import BF16, FP16, NoCompression
from thrifty.compressors.memory import ResidualMemory
from thrifty.compressors.powersgd import PowerSGD
from thrifty.compressors.quantizers import QSGD, TernGrad
from thrifty.compressors.sign import EFSignSGD, OneBit, SignSGD, Signum
from thrifty.compressors.sparsifiers import DGC, RandomK, TopK

CASES: dict[str, Callable[[], Compressor]] = {
    "none": NoCompression,
    "fp16": FP16,
    "bf16": BF16,
    "topk": lambda: TopK(0.01),
    "randomk": lambda: RandomK(0.01),
    "randomk_scaled": lambda: RandomK(0.05, scale=True),
    "randomk_shared": lambda: RandomK(0.01, shared_seed=7),
    "dgc": lambda: DGC(0.01),
    "dgc_warmup": lambda: DGC(0.01, warmup_steps_per_stage=2),
    "qsgd": QSGD,
    "qsgd_s1": lambda: QSGD(1),
    "qsgd_s3": lambda: QSGD(3),
    "qsgd_s255": lambda: QSGD(255),
    "terngrad": TernGrad,
    "signsgd": SignSGD,
    "efsignsgd": EFSignSGD,
    "signum": Signum,
    "onebit": OneBit,
    "powersgd": PowerSGD,
    "powersgd_r4": lambda: PowerSGD(4),
}

# Bytes on the wire per rank, worked out by hand from each compressor's format.
HAND_BYTES: dict[str, dict[int, int]] = {
    # numel:        0     1     1000
    "none": {0: 0, 1: 4, 1000: 4000},
    "fp16": {0: 0, 1: 2, 1000: 2000},
    "bf16": {0: 0, 1: 2, 1000: 2000},
    "topk": {0: 0, 1: 8, 1000: 80},  # k = 10: 10 fp32 values + 10 int32 indices
    "randomk": {0: 0, 1: 8, 1000: 80},
    "randomk_scaled": {0: 0, 1: 8, 1000: 400},  # k = 50
    "randomk_shared": {0: 0, 1: 4, 1000: 40},  # values only
    "dgc": {0: 0, 1: 8, 1000: 80},
    "dgc_warmup": {0: 0, 1: 8, 1000: 2000},  # stage 0: density 0.25, k = 250
    "qsgd": {0: 4, 1: 5, 1000: 1004},  # 8-bit codes + fp32 norm
    "qsgd_s1": {0: 4, 1: 5, 1000: 254},  # 2-bit codes
    "qsgd_s3": {0: 4, 1: 5, 1000: 379},  # 3-bit codes: ceil(3000 / 8) = 375
    "qsgd_s255": {0: 4, 1: 6, 1000: 1129},  # 9-bit codes: 1125 bytes
    "terngrad": {0: 4, 1: 5, 1000: 254},  # 2-bit codes + fp32 scale
    "signsgd": {0: 0, 1: 1, 1000: 125},
    "efsignsgd": {0: 4, 1: 5, 1000: 129},
    "signum": {0: 0, 1: 1, 1000: 125},
    "onebit": {0: 8, 1: 9, 1000: 133},  # bits + two fp32 means
    "powersgd": {0: 0, 1: 4, 1000: 256},  # 32 x 32 view, rank 1: (32 + 32) fp32
    "powersgd_r4": {0: 0, 1: 4, 1000: 1024},  # rank 4: 4 * 64 fp32
}

VOTE_CASES = {"signsgd", "signum"}
ALL = sorted(CASES)


def _payloads_equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("case", ALL)
@pytest.mark.parametrize("numel", [0, 1, 7, 1000])
def test_payload_matches_spec_and_hand_count(case: str, numel: int) -> None:
    torch.manual_seed(0)
    compressor = CASES[case]()
    payload = compressor.compress(torch.randn(numel), key="w")
    specs = compressor.payload_spec(numel)
    assert len(payload) == len(specs)
    for tensor, spec in zip(payload, specs, strict=True):
        assert tuple(tensor.shape) == spec.shape and tensor.dtype == spec.dtype
    nbytes = sum(t.numel() * t.element_size() for t in payload)
    assert nbytes == compressor.payload_nbytes(numel)
    if numel in HAND_BYTES[case]:
        assert nbytes == HAND_BYTES[case][numel]
    out = compressor.decompress(payload, numel, key="w")
    assert out.shape == (numel,) and out.dtype == torch.float32


@pytest.mark.parametrize("case", ALL)
def test_bits_per_element_matches_large_tensor_bytes(case: str) -> None:
    compressor = CASES[case]()
    numel = 1024 * 1024
    exact = 8 * compressor.payload_nbytes(numel) / numel
    assert exact == pytest.approx(compressor.bits_per_element, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("case", ALL)
def test_single_element_roundtrip(case: str) -> None:
    compressor = CASES[case]()
    x = torch.tensor([-0.75])
    out = compressor.decompress(compressor.compress(x, key="b"), 1, key="b")
    expected = torch.tensor([-1.0]) if case in VOTE_CASES else x
    assert torch.allclose(out, expected, atol=1e-3)


@pytest.mark.parametrize("case", ALL)
def test_empty_tensor(case: str) -> None:
    compressor = CASES[case]()
    payload = compressor.compress(torch.empty(0, 3), key="e")
    assert compressor.decompress(payload, 0, key="e").shape == (0,)
    assert compressor.aggregate([payload, payload], 0, key="e").shape == (0,)


@pytest.mark.parametrize("case", ALL)
def test_non_contiguous_input_gives_the_same_payload(case: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(40, 30).t()
    assert not x.is_contiguous()
    torch.manual_seed(2)
    from_view = CASES[case]().compress(x, key="t")
    torch.manual_seed(2)
    from_copy = CASES[case]().compress(x.contiguous(), key="t")
    assert _payloads_equal(from_view, from_copy)


@pytest.mark.parametrize("case", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_compress_like_float32(case: str, dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    x = torch.randn(300).to(dtype)
    torch.manual_seed(4)
    low = CASES[case]().compress(x, key="h")
    torch.manual_seed(4)
    # float64 -> float16 directly may round differently from float64 -> float32 -> float16.
    if not (dtype == torch.float64 and case in {"fp16", "bf16"}):
        reference = CASES[case]().compress(x.float(), key="h")
        assert _payloads_equal(low, reference)
    assert sum(t.numel() * t.element_size() for t in low) == CASES[case]().payload_nbytes(300)


@pytest.mark.parametrize("case", ALL)
def test_integer_input_raises_type_error(case: str) -> None:
    with pytest.raises(TypeError, match=r"'layer0\.bias'"):
        CASES[case]().compress(torch.arange(10), key="layer0.bias")


@pytest.mark.parametrize("case", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_value_error_naming_the_key(case: str, bad: float) -> None:
    x = torch.randn(50)
    x[7] = bad
    what = "NaN" if bad != bad else "Inf"
    with pytest.raises(ValueError, match=rf"'layer3\.weight' contains .*1 [+-]?{what}"):
        CASES[case]().compress(x, key="layer3.weight")


def test_check_finite_false_passes_values_through() -> None:
    x = torch.tensor([1.0, float("nan"), float("inf")])
    (payload,) = FP16(check_finite=False).compress(x, key="g")
    assert torch.isnan(payload[1]) and torch.isinf(payload[2])


@pytest.mark.parametrize("case", ALL)
def test_compress_leaves_the_input_unchanged(case: str) -> None:
    torch.manual_seed(5)
    x = torch.randn(500)
    before = x.clone()
    payload = CASES[case]().compress(x, key="k")
    for tensor in payload:
        tensor.zero_()  # payloads may be all-reduced in place
    assert torch.equal(x, before)


@pytest.mark.parametrize("case", sorted(set(ALL) - VOTE_CASES))
def test_aggregate_is_the_sum_of_decompressions(case: str) -> None:
    torch.manual_seed(6)
    ranks = [CASES[case]() for _ in range(3)]
    xs = [torch.randn(400) for _ in ranks]
    payloads = [c.compress(x, key="g") for c, x in zip(ranks, xs, strict=True)]
    expected = sum(c.decompress(p, 400, key="g") for c, p in zip(ranks, payloads, strict=True))
    got = ranks[0].aggregate(payloads, 400, key="g")
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("case", sorted(VOTE_CASES))
def test_aggregate_of_vote_compressors_is_scaled_majority(case: str) -> None:
    torch.manual_seed(7)
    ranks = [CASES[case]() for _ in range(3)]
    payloads = [c.compress(torch.randn(400), key="g") for c in ranks]
    signs = sum(ranks[0].decompress(p, 400) for p in payloads)
    assert torch.equal(ranks[0].aggregate(payloads, 400), 3 * torch.sign(signs))


@pytest.mark.parametrize("case", ALL)
def test_residual_memory_accumulates_exactly_what_was_not_sent(case: str) -> None:
    torch.manual_seed(8)
    compressor, memory = CASES[case](), ResidualMemory(beta=1.0, gamma=1.0)
    numel, total_in, total_sent = 300, torch.zeros(300), torch.zeros(300)
    for _ in range(6):
        grad = torch.randn(numel)
        compensated = memory.compensate(grad, "g")
        sent = compressor.decompress(compressor.compress(compensated, "g"), numel, "g")
        memory.update("g", compensated, sent)
        total_in += grad
        total_sent += sent
    residual = memory.residual("g")
    assert residual is not None
    assert torch.allclose(total_sent + residual, total_in, atol=1e-4)


def test_decompress_rejects_a_payload_of_the_wrong_size() -> None:
    compressor = TopK(0.1)
    payload = compressor.compress(torch.randn(100))
    with pytest.raises(ValueError, match="expected shape"):
        compressor.decompress(payload, 200)
    with pytest.raises(ValueError, match="2 payload tensors"):
        FP16().decompress(payload, 100)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: TopK(0.0), "ratio"),
        (lambda: RandomK(1.5), "ratio"),
        (lambda: QSGD(0), "levels"),
        (lambda: Signum(1.0), "momentum"),
        (lambda: PowerSGD(0), "rank"),
        (lambda: DGC(0.01, threshold_margin=-1.0), "threshold_margin"),
    ],
)
def test_bad_configuration_is_refused(factory: Callable[[], Compressor], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()
