"""Error feedback (memories), the registry, and bit packing."""

from __future__ import annotations

import pytest
import torch

from thrifty.compressors import available_compressors, default_memory, get_compressor
from thrifty.compressors.bitpacking import (
    pack_bits,
    pack_codes,
    packed_nbytes,
    unpack_bits,
    unpack_codes,
)
from thrifty.compressors.memory import DGCMemory, NoMemory, ResidualMemory
from thrifty.compressors.registry import COMPRESSORS
from thrifty.compressors.sparsifiers import TopK


def test_residual_memory_decays_and_weights_by_hand() -> None:
    memory = ResidualMemory(beta=0.5, gamma=2.0)
    compensated = memory.compensate(torch.tensor([1.0, 2.0]), "w")
    assert compensated.tolist() == [2.0, 4.0]
    memory.update("w", compensated, torch.tensor([0.0, 2.0]))
    residual = memory.residual("w")
    assert residual is not None and residual.tolist() == [2.0, 2.0]
    assert memory.compensate(torch.tensor([1.0, 1.0]), "w").tolist() == [3.0, 3.0]


def test_residual_memory_keys_are_independent_and_sizes_checked() -> None:
    memory = ResidualMemory()
    memory.update("a", torch.ones(3), torch.zeros(3))
    assert memory.compensate(torch.ones(2, 2), "b").tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="'a' changed size from 3 to 4"):
        memory.compensate(torch.ones(4), "a")
    memory.reset("a")
    assert memory.residual("a") is None


def test_memory_compensate_returns_a_fresh_flat_float32_tensor() -> None:
    grad = torch.ones(2, 3, dtype=torch.bfloat16)
    for memory in (ResidualMemory(), DGCMemory()):
        out = memory.compensate(grad, "g")
        assert out.shape == (6,) and out.dtype == torch.float32
        out.zero_()
        assert torch.equal(grad, torch.ones(2, 3, dtype=torch.bfloat16))
    flat = NoMemory().compensate(grad, "g")
    assert flat.shape == (6,) and flat.data_ptr() != grad.data_ptr()


def test_dgc_memory_masks_the_momentum_of_sent_elements() -> None:
    memory, compressor = DGCMemory(momentum=0.9), TopK(0.25)
    g1 = torch.tensor([5.0, 0.1, -4.0, 0.2, 0.3, -0.1, 0.05, 0.4])
    v1 = memory.compensate(g1, "w")
    assert torch.equal(v1, g1)  # u = g, v = u on the first step
    sent = compressor.decompress(compressor.compress(v1, "w"), 8)
    memory.update("w", v1, sent)
    was_sent = torch.tensor([True, False, True, False, False, False, False, False])
    momentum, velocity = memory.momentum_buffer("w"), memory.velocity("w")
    assert momentum is not None and velocity is not None
    assert torch.all(momentum[was_sent] == 0) and torch.all(velocity[was_sent] == 0)
    assert torch.equal(momentum[~was_sent], g1[~was_sent])
    assert torch.equal(velocity[~was_sent], g1[~was_sent])
    g2 = torch.ones(8)
    v2 = memory.compensate(g2, "w")
    expected_u = 0.9 * torch.where(was_sent, 0.0, g1) + g2
    assert torch.allclose(v2, torch.where(was_sent, 0.0, g1) + expected_u)


def test_dgc_memory_nesterov_by_hand() -> None:
    memory = DGCMemory(momentum=0.5, nesterov=True)
    v = memory.compensate(torch.tensor([2.0]), "w")  # u = 0.5 * (0 + 2) = 1; v = 0 + 1 + 2
    assert v.tolist() == [3.0]
    memory.update("w", v, torch.tensor([0.0]))
    assert memory.compensate(torch.tensor([2.0]), "w").tolist() == [3.0 + 1.5 + 2.0]


def test_dgc_memory_clips_the_local_gradient() -> None:
    memory = DGCMemory(momentum=0.0, gradient_clipping=1.0)
    out = memory.compensate(torch.tensor([6.0, 8.0]), "w")  # norm 10
    assert torch.allclose(out, torch.tensor([0.6, 0.8]))
    small = DGCMemory(momentum=0.0, gradient_clipping=100.0).compensate(torch.ones(2), "w")
    assert small.tolist() == [1.0, 1.0]


def test_dgc_memory_with_a_quantizer_keeps_the_residual() -> None:
    memory, compressor = DGCMemory(momentum=0.0), get_compressor("onebit")
    grad = torch.tensor([1.0, 3.0, -2.0])
    v = memory.compensate(grad, "w")
    sent = compressor.decompress(compressor.compress(v), 3)  # [2, 2, -2]
    memory.update("w", v, sent)
    velocity = memory.velocity("w")
    assert velocity is not None and velocity.tolist() == [-1.0, 1.0, 0.0]


def test_registry_lists_and_builds_every_compressor() -> None:
    families = [
        ["none", "fp16", "bf16"],
        ["topk", "randomk", "dgc"],
        ["qsgd", "terngrad"],
        ["signsgd", "efsignsgd", "signum", "onebit"],
        ["powersgd"],
    ]
    assert available_compressors() == sorted(name for family in families for name in family)
    for name in available_compressors():
        compressor = get_compressor(name)
        assert compressor.name == name and isinstance(compressor, COMPRESSORS[name])
    topk = get_compressor("topk", ratio=0.1)
    assert isinstance(topk, TopK) and topk.ratio == 0.1
    with pytest.raises(ValueError, match=r"unknown compressor 'zip'.*topk"):
        get_compressor("zip")


def test_default_memory_follows_cupcake() -> None:
    for name in ("none", "fp16", "bf16", "signsgd", "signum", "terngrad"):
        assert isinstance(default_memory(name), NoMemory)
    for name in ("efsignsgd", "qsgd", "onebit"):
        memory = default_memory(name)
        assert isinstance(memory, ResidualMemory) and memory.beta == 0.9
    powersgd = default_memory("powersgd")
    assert isinstance(powersgd, ResidualMemory) and powersgd.beta == 1.0
    momenta = {}
    for name in ("dgc", "topk", "randomk"):
        memory = default_memory(name)
        assert isinstance(memory, DGCMemory)
        momenta[name] = memory.momentum
    assert momenta == {"dgc": 0.9, "topk": 0.0, "randomk": 0.0}
    with pytest.raises(ValueError, match="unknown compressor"):
        default_memory("zip")


def test_pack_bits_by_hand() -> None:
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0x81, 0x80]
    assert torch.equal(unpack_bits(packed, 9), bits)
    assert pack_codes(torch.tensor([3, 0, 1, 2, 2]), 2).tolist() == [0b11000110, 0b10000000]
    assert pack_codes(torch.tensor([5, 1]), 3).tolist() == [0b10100100]


@pytest.mark.parametrize("bits_per_code", range(1, 17))
@pytest.mark.parametrize("n", [0, 1, 7, 13, 100])
def test_codes_round_trip(bits_per_code: int, n: int) -> None:
    generator = torch.Generator().manual_seed(bits_per_code * 1000 + n)
    codes = torch.randint(0, 2**bits_per_code, (n,), generator=generator)
    packed = pack_codes(codes, bits_per_code)
    assert packed.shape == (packed_nbytes(n, bits_per_code),) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, n, bits_per_code), codes.to(torch.int32))
    # Several ranks' payloads unpack in one batched call.
    batch = torch.stack([packed, packed])
    assert torch.equal(unpack_codes(batch, n, bits_per_code)[1], codes.to(torch.int32))


def test_code_width_is_checked() -> None:
    with pytest.raises(ValueError, match="bits_per_code"):
        pack_codes(torch.zeros(3, dtype=torch.int32), 17)
