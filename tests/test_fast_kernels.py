"""The streaming CPU kernels (issue 20, item 1) against plain reference code.

The references below are the compressors' code before the kernels were
rewritten: shifts and sums for bit packing, ``torch.where`` for decompression,
a full ``torch.topk`` for selection, a float64 norm for QSGD. Every fast path
must give the same result bit for bit, except where it documents otherwise
(QSGD's norm, OneBit's means: rounding only; QSGD/TernGrad's random stream:
checked by their contract, not by value).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from thrifty.compressors import get_compressor
from thrifty.compressors.bitpacking import (
    STREAM_CHUNK,
    expand_bits,
    pack_bits,
    pack_nonnegative,
    unpack_bits,
)

# Lengths around the byte and chunk boundaries.
LENGTHS = [0, 1, 7, 8, 9, STREAM_CHUNK - 1, STREAM_CHUNK + 13, 2 * STREAM_CHUNK + 8]


def _reference_pack(bits: Tensor) -> Tensor:
    n = bits.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
    padded[:n] = bits.reshape(-1)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return (padded.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def _reference_unpack(packed: Tensor, n: int) -> Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :n].bool()


def _values(n: int, seed: int) -> Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    if n > 3:
        x[1], x[2] = -0.0, 0.0  # x >= 0 holds for both zeros
    return x


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("n", LENGTHS)
def test_bit_packing_equals_the_reference(n: int) -> None:
    x = _values(n, n)
    packed = pack_bits(x >= 0)
    assert torch.equal(packed, _reference_pack(x >= 0))
    assert torch.equal(pack_nonnegative(x), packed)
    assert torch.equal(unpack_bits(packed, n), _reference_unpack(packed, n))
    batch = torch.stack([packed, ~packed])
    assert torch.equal(unpack_bits(batch, n), _reference_unpack(batch, n))
    low, high = torch.tensor(-0.3125), torch.tensor(1e-40)  # a subnormal survives bit for bit
    want = torch.where(_reference_unpack(packed, n), high, low)
    assert _same_bits(expand_bits(packed, n, low, high), want)


@pytest.mark.parametrize("n", [1, 9, STREAM_CHUNK + 13])
def test_sign_compressors_decompress_as_the_reference(n: int) -> None:
    x = _values(n, 100 + n)
    bits = x >= 0
    signs = bits.to(torch.float32) * 2.0 - 1.0
    (packed,) = get_compressor("signsgd").compress(x)
    assert _same_bits(get_compressor("signsgd").decompress((packed,), n), signs)

    ef = get_compressor("efsignsgd")
    packed, scale = ef.compress(x)
    want_scale = x.abs().sum() / n
    torch.testing.assert_close(scale, want_scale.reshape(1), rtol=1e-5, atol=0.0)
    assert _same_bits(ef.decompress((packed, scale), n), signs * scale)

    onebit = get_compressor("onebit")
    packed, means = onebit.compress(x)
    assert torch.equal(packed, _reference_pack(bits))
    count_pos = bits.sum()
    want = torch.stack(
        [
            torch.where(bits, 0.0, x).sum() / (n - count_pos).clamp(min=1),
            torch.where(bits, x, 0.0).sum() / count_pos.clamp(min=1),
        ]
    )
    torch.testing.assert_close(means, want, rtol=1e-5, atol=1e-7)  # summation order only
    assert _same_bits(onebit.decompress((packed, means), n), torch.where(bits, means[1], means[0]))


def test_signum_updates_its_momentum_in_place_as_the_reference() -> None:
    beta, n = 0.9, STREAM_CHUNK + 13
    signum = get_compressor("signum", momentum=beta)
    momentum = torch.zeros(n)
    for step in range(3):
        x = _values(n, 200 + step)
        momentum = (1.0 - beta) * x if step == 0 else beta * momentum + (1.0 - beta) * x
        saved = signum.export_state("w")
        (packed,) = signum.compress(x, "w")
        assert torch.equal(packed, _reference_pack(momentum >= 0))
        assert _same_bits(signum.momentum_buffer("w"), momentum)
        if saved:  # an exported state is a copy: the in-place step left it alone
            assert not torch.equal(saved["momentum"], signum.momentum_buffer("w"))


def _reference_top_magnitudes(x: Tensor, k: int) -> Tensor:
    return torch.topk(x.abs(), k).values.sort().values


@pytest.mark.parametrize("name", ["topk", "dgc"])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.3])
def test_sampled_selection_is_the_exact_top_k(name: str, ratio: float) -> None:
    n = 3 * STREAM_CHUNK + 5
    x = _values(n, int(ratio * 1000))
    compressor = get_compressor(name, ratio=ratio)
    torch.manual_seed(0)
    values, indices = compressor.compress(x)
    k = compressor.k_for(n)
    assert values.numel() == k and torch.equal(indices, indices.sort().values)
    assert torch.equal(values, x[indices.long()])
    assert torch.equal(values.abs().sort().values, _reference_top_magnitudes(x, k))


def test_topk_falls_back_when_the_sample_aims_too_high() -> None:
    # The stride samples every 100th entry from 50 on: make exactly those large, so
    # the threshold passes 2000 < k = 20000 entries and torch.topk takes over.
    n = 200_000
    x = torch.full((n,), 0.5)
    x[50::100] = 5.0
    x[7::13] = -2.0
    values, _ = get_compressor("topk", ratio=0.1).compress(x)
    assert values.numel() == 20_000
    assert torch.equal(values.abs().sort().values, _reference_top_magnitudes(x, values.numel()))


def _reference_qsgd_norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dtype=torch.float64).to(torch.float32).reshape(1)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-3, 1.0, 1e30])
@pytest.mark.parametrize("levels", [1, 127, 255])
def test_qsgd_rounds_to_a_neighbouring_level(magnitude: float, levels: int) -> None:
    n = STREAM_CHUNK + 13
    x = _values(n, levels) * magnitude
    qsgd = get_compressor("qsgd", levels=levels)
    packed, norm = qsgd.compress(x)
    torch.testing.assert_close(norm, _reference_qsgd_norm(x), rtol=1e-5, atol=0.0)
    out = qsgd.decompress((packed, norm), n)
    scaled = x.abs() / norm * levels
    level = (out.abs() / norm * levels).round()
    assert bool(((level == scaled.floor()) | (level == scaled.floor() + 1)).all())
    assert bool((out * x >= 0).all()), "a sent value has the wrong sign"
    # Decompress is the reference's (code - s) * (norm / s), bit for bit.
    codes = torch.where(x < 0, -level, level).to(torch.int32) + levels
    want = (codes - levels).to(torch.float32) * (norm / levels)
    assert _same_bits(out, want)


@pytest.mark.parametrize("name", ["qsgd", "terngrad"])
def test_stochastic_rounding_is_unbiased_and_seeded(name: str) -> None:
    n, draws = 4096, 200
    x = _values(n, 7)
    compressor = get_compressor(name)
    torch.manual_seed(3)
    first = compressor.compress(x)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, compressor.compress(x), strict=True))
    mean = sum(compressor.decompress(compressor.compress(x), n) for _ in range(draws)) / draws
    scale = float(x.norm()) / 127 if name == "qsgd" else float(x.abs().max())
    # Per element the mean of `draws` draws has standard deviation <= scale / (2 sqrt(draws)).
    assert float((mean - x).abs().max()) <= 6 * scale / (2 * draws**0.5)
    assert abs(float((mean - x).mean())) <= 6 * scale / (2 * (draws * n) ** 0.5)


def test_terngrad_decompresses_as_the_reference() -> None:
    n = STREAM_CHUNK + 13
    x = _values(n, 11)
    terngrad = get_compressor("terngrad")
    packed, scale = terngrad.compress(x)
    codes = (
        _reference_unpack(packed, 2 * n).view(n, 2).to(torch.int32) * torch.tensor([2, 1])
    ).sum(1)
    assert bool((codes <= 2).all())
    ternary = codes - 1
    assert bool(((ternary == 0) | (ternary == torch.sign(x).to(torch.int32))).all())
    assert _same_bits(terngrad.decompress((packed, scale), n), ternary.to(torch.float32) * scale)
