"""FLOP and byte model: the paper's numbers, a hand-computed config, real cache tensors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from thrifty.marconi.model import (
    LayerCost,
    ModelSpec,
    dtype_nbytes,
    kv_bytes_per_token,
    paper_hybrid_7b,
    ssm_state_bytes,
    ssm_state_shapes,
)


def test_paper_7b_matches_the_artifact_numbers():
    spec = paper_hybrid_7b()
    assert spec.num_ssm_layers == 24 and spec.num_attention_layers == 4
    assert spec.layers[0].ssm_state_bytes == 1_116_160  # per SSM layer
    assert spec.checkpoint_bytes == 24 * 1_116_160  # 26.8 MB
    assert spec.kv_bytes_per_token == 4 * 4 * 4096
    d, n = 4096, 128
    f_ssm = 12 * d * d + 16 * d * n + 10 * d
    f_attn = lambda length: 8 * length * d * d + 4 * length * length * d  # noqa: E731
    f_mlp = 16 * d * d
    for length in (1, 100, 5000):
        want = 24 * f_ssm * length + 4 * f_attn(length) + 28 * f_mlp * length
        assert spec.prefill_flops(length) == pytest.approx(want, rel=1e-12)
    # The paper's model efficiency curve (FLOPs per cached byte).
    for length, want in ((100, 3.9e4), (1000, 1.4e5), (10_000, 2.0e5), (30_000, 2.3e5)):
        assert spec.model_efficiency(length) == pytest.approx(want, rel=0.03)
    # A checkpoint every 16 tokens over 10K tokens takes 17.4 GB (the paper's Fig. 4).
    assert (10_000 // 16) * spec.checkpoint_bytes + spec.kv_bytes(10_000) == pytest.approx(
        17.4e9, rel=0.01
    )


def test_flop_efficiency_of_a_node_uses_its_own_edge_and_path_memory():
    spec = ModelSpec(
        "toy",
        (
            LayerCost("attention", kv_bytes_per_token=8, linear_flops=10.0, quadratic_flops=2.0),
            LayerCost("ssm", conv_state_bytes=40, recurrent_state_bytes=60, linear_flops=5.0),
            LayerCost("mlp", linear_flops=3.0),
        ),
    )
    # Edge [10, 30): FLOPs = 18 * 20 + 2 * (30^2 - 10^2); memory = 100 + 8 * 30.
    assert spec.flops_between(10, 30) == 18 * 20 + 2 * (900 - 100)
    assert spec.flop_efficiency(10, 30) == pytest.approx((360 + 1600) / 340)


def test_hand_computed_bamba_like_config():
    config = SimpleNamespace(
        model_type="bamba",
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_expand=2,
        mamba_n_heads=4,
        mamba_d_head=32,
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        dtype="bfloat16",
    )
    # KV: 2 tensors x 2 kv heads x head_dim 16 x 2 bytes.
    assert kv_bytes_per_token(config, "bfloat16") == 128
    # conv: (128 + 2*2*16) x 4; recurrent: 4 heads x 32 x 16.
    assert ssm_state_shapes(config) == ((192, 4), (4, 32, 16))
    assert ssm_state_bytes(config, "bfloat16", "float32") == (192 * 4 * 2, 2048 * 4)
    spec = ModelSpec.from_hf_config(config)
    assert [layer.kind for layer in spec.layers] == ["ssm", "attention", "ssm"]
    assert spec.kv_bytes_per_token == 128
    assert spec.checkpoint_bytes == 2 * (192 * 4 * 2 + 2048 * 4)
    # Attention: q 2*64*64, k and v 2*2*64*32, o 2*64*64; MLP 6*64*128 per layer.
    attn = 2 * 64 * 64 + 4 * 64 * 32 + 2 * 64 * 64
    assert spec.layers[1].linear_flops == attn + 6 * 64 * 128
    assert spec.layers[1].quadratic_flops == 4 * 64


def test_unknown_model_and_dtype_are_refused():
    with pytest.raises(ValueError, match="model_type 'llama'"):
        ModelSpec.from_hf_config(
            SimpleNamespace(model_type="llama", layer_types=["full_attention"])
        )
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_nbytes("float7")
    assert dtype_nbytes("torch.bfloat16") == 2


# --------------------------------------------------------------------------- real tensors


def _tiny_configs():
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    return {
        "bamba": transformers.BambaConfig(
            **common,
            num_hidden_layers=2,
            num_key_value_heads=2,
            attn_layer_indices=[1],
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=8,
            mamba_n_groups=1,
            mamba_chunk_size=8,
        ),
        "jamba": transformers.JambaConfig(
            **common,
            num_hidden_layers=2,
            num_key_value_heads=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=2,
            mamba_d_state=8,
            mamba_dt_rank=4,
        ),
        "zamba2": transformers.Zamba2Config(
            **common,
            num_hidden_layers=2,
            num_key_value_heads=4,
            layers_block_type=["linear_attention", "hybrid"],
            mamba_d_state=8,
            n_mamba_heads=4,
            mamba_ngroups=1,
            chunk_size=8,
        ),
        "nemotron_h": transformers.NemotronHConfig(
            **common,
            num_hidden_layers=3,
            layers_block_type=["linear_attention", "full_attention", "mlp"],
            num_key_value_heads=2,
            head_dim=8,
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=8,
            n_groups=2,
            chunk_size=8,
        ),
        "qwen3_next": transformers.Qwen3NextConfig(
            **common,
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            num_key_value_heads=2,
            head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        ),
    }


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [
        ("bamba", "float32"),
        ("bamba", "bfloat16"),  # the recurrent state stays float32
        ("jamba", "float32"),
        ("zamba2", "float32"),
        ("nemotron_h", "float32"),
        ("qwen3_next", "float32"),
    ],
)
def test_byte_model_equals_real_cache_tensors(arch, dtype):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = _tiny_configs()[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = model.to(getattr(torch, dtype))
    cache = transformers.DynamicCache(config=model.config)
    length = 7
    with torch.no_grad():
        model(torch.randint(0, 64, (1, length)), cache=cache, use_cache=True)
    spec = ModelSpec.from_hf_config(model.config, dtype=dtype)
    assert len(spec.layers) == len(cache.layers)
    kv_total = ssm_total = 0
    for layer_cost, layer in zip(spec.layers, cache.layers, strict=True):
        keys = getattr(layer, "keys", None)
        if layer_cost.has_kv:
            assert keys.nbytes + layer.values.nbytes == length * layer_cost.kv_bytes_per_token
            kv_total += keys.nbytes + layer.values.nbytes
        if layer_cost.has_ssm:
            conv, recurrent = layer.conv_states[0], layer.recurrent_states[0]
            assert conv.nbytes == layer_cost.conv_state_bytes
            assert recurrent.nbytes == layer_cost.recurrent_state_bytes
            ssm_total += conv.nbytes + recurrent.nbytes
        else:
            assert getattr(layer, "conv_states", {}).get(0) is None
    assert kv_total == length * spec.kv_bytes_per_token
    assert ssm_total == spec.checkpoint_bytes
