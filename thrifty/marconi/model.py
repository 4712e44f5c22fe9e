"""FLOP and byte model of a hybrid (attention + SSM) LLM, per layer.

Marconi's eviction weighs how many prefill FLOPs a cached prefix saves against
the bytes it occupies, and the cache budget is in bytes. Both come from here.

Every layer's prefill cost over ``L`` tokens is modelled as
``linear_flops * L + quadratic_flops * L**2``: projections, MLPs and SSM scans
are linear in ``L``, attention scores are quadratic. Summing over layers keeps
that form, so the FLOPs that a cached prefix ``[0, L)`` saves are just
``F(L) = lin * L + quad * L**2``, and the FLOPs of the tokens between two
positions are ``F(end) - F(start)`` (the edge's tokens attend to everything
before them). Following Marconi we count attention without the causal halving.

The byte sizes are exact, because a real engine must fit its budget:

* attention KV per token and layer: ``2 * num_key_value_heads * head_dim * dtype``
  (keys and values of ``DynamicLayer``, shape ``[B, H_kv, T, Dh]``);
* an SSM layer's checkpoint: its conv state ``[conv_dim, conv_kernel]`` plus its
  recurrent state (Mamba2: ``[heads, head_dim, d_state]``; Mamba1:
  ``[d_inner, d_state]``; gated DeltaNet: ``[v_heads, k_head_dim, v_head_dim]``),
  as ``LinearAttentionLayer`` holds them.

transformers' reference kernels keep the recurrent state in float32 even when
the model runs in bfloat16 (measured on Bamba, Jamba, Zamba2, NemotronH and
Qwen3-Next with transformers 5.24), hence a separate ``recurrent_dtype``.

FLOP counts are estimates (they only rank nodes and report savings); byte sizes
are what the budget is checked against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from thrifty.marconi.states import SizedSource

__all__ = [
    "LayerCost",
    "ModelSpec",
    "attention_kv_shape",
    "dtype_nbytes",
    "kv_bytes_per_token",
    "paper_hybrid_7b",
    "ssm_state_bytes",
    "ssm_state_shapes",
]

_DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

LAYER_KINDS = ("attention", "ssm", "hybrid", "mlp")


def dtype_nbytes(dtype: Any) -> int:
    """Bytes per element of a dtype given as a name or a ``torch.dtype``."""
    name = str(dtype).removeprefix("torch.")
    try:
        return _DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}"
        ) from None


@dataclass(frozen=True)
class LayerCost:
    """One layer's cached bytes and prefill FLOPs.

    Args:
        kind: ``"attention"``, ``"ssm"``, ``"hybrid"`` (both, as Zamba2's shared
            blocks) or ``"mlp"`` (no cached state).
        kv_bytes_per_token: keys + values of one token in this layer.
        conv_state_bytes: this layer's conv state (SSM layers).
        recurrent_state_bytes: this layer's recurrent/SSM state (SSM layers).
        linear_flops: prefill FLOPs per token.
        quadratic_flops: coefficient of ``L**2`` in the prefill FLOPs (attention).
    """

    kind: str
    kv_bytes_per_token: int = 0
    conv_state_bytes: int = 0
    recurrent_state_bytes: int = 0
    linear_flops: float = 0.0
    quadratic_flops: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"layer kind {self.kind!r} is not one of {LAYER_KINDS}")

    @property
    def ssm_state_bytes(self) -> int:
        return self.conv_state_bytes + self.recurrent_state_bytes

    @property
    def has_kv(self) -> bool:
        return self.kind in ("attention", "hybrid")

    @property
    def has_ssm(self) -> bool:
        return self.kind in ("ssm", "hybrid")


@dataclass(frozen=True)
class ModelSpec:
    """A model as the cache sees it: per-layer bytes and FLOPs, plus totals.

    ``logits_bytes`` is one position's logits (``vocab_size`` values in the
    model's dtype): what a zero-prefill hit stores beside a checkpoint (see
    :class:`~thrifty.marconi.cache.PrefixCache`'s ``store_logits``); 0 when the
    vocabulary is unknown.
    """

    name: str
    layers: tuple[LayerCost, ...]
    logits_bytes: int = 0
    kv_bytes_per_token: int = field(init=False)
    checkpoint_bytes: int = field(init=False)
    linear_flops: float = field(init=False)
    quadratic_flops: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"model {self.name!r} has no layers")
        if self.logits_bytes < 0:
            raise ValueError(f"logits_bytes must be >= 0, got {self.logits_bytes}")
        set_ = object.__setattr__
        set_(self, "kv_bytes_per_token", sum(layer.kv_bytes_per_token for layer in self.layers))
        set_(self, "checkpoint_bytes", sum(layer.ssm_state_bytes for layer in self.layers))
        set_(self, "linear_flops", math.fsum(layer.linear_flops for layer in self.layers))
        set_(self, "quadratic_flops", math.fsum(layer.quadratic_flops for layer in self.layers))

    @property
    def num_attention_layers(self) -> int:
        return sum(layer.has_kv for layer in self.layers)

    @property
    def num_ssm_layers(self) -> int:
        return sum(layer.has_ssm for layer in self.layers)

    def kv_bytes(self, num_tokens: int) -> int:
        """KV bytes of ``num_tokens`` tokens over all attention layers."""
        return self.kv_bytes_per_token * num_tokens

    def prefill_flops(self, num_tokens: int) -> float:
        """FLOPs to prefill ``num_tokens`` tokens from scratch (= saved by a hit of that length)."""
        return self.linear_flops * num_tokens + self.quadratic_flops * num_tokens * num_tokens

    def flops_between(self, start: int, end: int) -> float:
        """FLOPs of tokens ``start .. end-1`` given the KV of everything before ``start``."""
        return self.prefill_flops(end) - self.prefill_flops(start)

    def flop_efficiency(self, start: int, end: int) -> float:
        """Marconi's FLOP efficiency of a node whose edge spans ``[start, end)``.

        FLOPs the node's checkpoint saves beyond its parent's (the edge's tokens),
        over the memory needed to use it: one checkpoint plus the path's KV
        (``end`` tokens), as Marconi defines it. The artifact subtracted
        ``F_attn(Lp)`` from the MLP term; here every layer uses its own cost.
        """
        memory = self.checkpoint_bytes + self.kv_bytes_per_token * end
        return self.flops_between(start, end) / memory if memory else 0.0

    def model_efficiency(self, num_tokens: int) -> float:
        """FLOPs saved per cached byte for one sequence of ``num_tokens`` (the paper's Fig. 3)."""
        return self.prefill_flops(num_tokens) / (
            self.checkpoint_bytes + self.kv_bytes_per_token * num_tokens
        )

    def source(self) -> SizedSource:
        """A size-only state source for the simulator."""
        return SizedSource(self.kv_bytes_per_token, self.checkpoint_bytes, self.logits_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_layers": len(self.layers),
            "num_attention_layers": self.num_attention_layers,
            "num_ssm_layers": self.num_ssm_layers,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "checkpoint_bytes": self.checkpoint_bytes,
            "logits_bytes": self.logits_bytes,
            "linear_flops": self.linear_flops,
            "quadratic_flops": self.quadratic_flops,
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_hf_config(
        cls,
        config: Any,
        *,
        dtype: Any = None,
        recurrent_dtype: Any = "float32",
        name: str | None = None,
    ) -> ModelSpec:
        """Per-layer costs of a transformers hybrid config.

        Supported ``model_type``: bamba, granitemoehybrid, falcon_h1, nemotron_h,
        zamba2 (Mamba2 layers), jamba (Mamba1 layers) and qwen3_next (gated
        DeltaNet layers); ``config.layer_types`` says which layer is which.

        Args:
            config: a transformers ``PretrainedConfig`` (or any object with the
                same attributes).
            dtype: dtype of KV and conv states; default ``config.dtype`` or float32.
            recurrent_dtype: dtype of the recurrent states (float32 in
                transformers' reference kernels, whatever the model dtype).
            name: label; default ``config.model_type``.
        """
        model_type = _model_type(config)
        dtype = dtype if dtype is not None else (getattr(config, "dtype", None) or "float32")
        layer_types = list(getattr(config, "layer_types", None) or [])
        if not layer_types:
            raise ValueError(f"{model_type} config has no layer_types; cannot tell the layer kinds")
        layers = []
        for idx, layer_type in enumerate(layer_types):
            kind = _kind_of(layer_type, model_type)
            kv = kv_bytes_per_token(config, dtype) if kind in ("attention", "hybrid") else 0
            conv = recurrent = 0
            if kind in ("ssm", "hybrid"):
                conv, recurrent = ssm_state_bytes(config, dtype, recurrent_dtype)
            linear = _mlp_flops(config, model_type, idx, layer_type)
            quadratic = 0.0
            if kind in ("attention", "hybrid"):
                attn_linear, quadratic = _attention_flops(config, model_type)
                linear += attn_linear
            if kind in ("ssm", "hybrid"):
                linear += _ssm_flops(config, model_type)
            layers.append(LayerCost(kind, kv, conv, recurrent, linear, quadratic))
        logits = (getattr(config, "vocab_size", None) or 0) * dtype_nbytes(dtype)
        return cls(name or model_type, tuple(layers), logits)


def paper_hybrid_7b() -> ModelSpec:
    """The paper's 7B Attention-Mamba2 hybrid (NVIDIA, arXiv 2406.07887), fp16.

    24 SSM, 4 attention and 28 MLP layers, D=4096, N=128, with the artifact's
    formulas (utils.py): F_attn = 8LD^2 + 4L^2D, F_mlp = 16LD^2,
    F_ssm = 12LD^2 + 16LDN + 10LD; KV = 4D bytes per token and layer; an SSM
    layer's state = 2DN + 2*4*(2D + 2N) bytes (recurrent + conv, fp16, expand 2,
    conv kernel 4): 1,116,160 B, 26.8 MB per checkpoint. One position's
    logits: a 256,000-token vocabulary (the Nemotron-4 SentencePiece tokenizer
    the paper's 8B models share) in fp16, 512 KB.
    """
    d, n, kernel, expand, fp16 = 4096, 128, 4, 2, 2
    ssm = LayerCost(
        "ssm",
        conv_state_bytes=fp16 * kernel * (expand * d + 2 * n),
        recurrent_state_bytes=fp16 * d * n,
        linear_flops=12 * d * d + 16 * d * n + 10 * d,
    )
    attention = LayerCost(
        "attention", kv_bytes_per_token=2 * fp16 * d, linear_flops=8 * d * d, quadratic_flops=4 * d
    )
    mlp = LayerCost("mlp", linear_flops=16 * d * d)
    layers = (ssm,) * 24 + (attention,) * 4 + (mlp,) * 28
    return ModelSpec("paper-hybrid-7b", layers, logits_bytes=256_000 * fp16)


# --------------------------------------------------------------------------- shapes and bytes


def _model_type(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in _SSM_FAMILY:
        raise ValueError(
            f"model_type {model_type!r} is not supported; expected one of {sorted(_SSM_FAMILY)}"
        )
    return model_type


_SSM_FAMILY = {
    "bamba": "mamba2",
    "granitemoehybrid": "mamba2",
    "falcon_h1": "mamba2",
    "nemotron_h": "mamba2",
    "zamba2": "mamba2",
    "jamba": "mamba1",
    "qwen3_next": "gated_deltanet",
}


def _kind_of(layer_type: str, model_type: str) -> str:
    if layer_type == "full_attention":
        return "attention"
    if layer_type in ("linear_attention", "mamba", "conv"):
        return "ssm"
    if layer_type == "hybrid":
        return "hybrid"
    if layer_type in ("mlp", "moe"):
        return "mlp"
    raise ValueError(f"{model_type}: layer type {layer_type!r} has no cost model")


def attention_kv_shape(config: Any) -> tuple[int, int]:
    """``(num_key_value_heads, head_dim)`` of one token's keys (values alike)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def kv_bytes_per_token(config: Any, dtype: Any = "float32") -> int:
    """Keys + values bytes of one token in one attention layer."""
    kv_heads, head_dim = attention_kv_shape(config)
    return 2 * kv_heads * head_dim * dtype_nbytes(dtype)


def _mamba2_dims(config: Any, model_type: str) -> dict[str, int]:
    d = config.hidden_size
    if model_type == "nemotron_h":
        heads, head_dim = config.mamba_num_heads, config.mamba_head_dim
        return {
            "d_inner": heads * head_dim,
            "heads": heads,
            "head_dim": head_dim,
            "groups": config.n_groups,
            "d_state": config.ssm_state_size,
            "kernel": config.conv_kernel,
        }
    if model_type == "zamba2":
        return {
            "d_inner": int(config.mamba_expand * d),
            "heads": config.n_mamba_heads,
            "head_dim": config.mamba_headdim,
            "groups": config.mamba_ngroups,
            "d_state": config.mamba_d_state,
            "kernel": config.mamba_d_conv,
        }
    d_ssm = getattr(config, "mamba_d_ssm", None)
    return {
        "d_inner": d_ssm if d_ssm is not None else int(config.mamba_expand * d),
        "heads": config.mamba_n_heads,
        "head_dim": config.mamba_d_head,
        "groups": config.mamba_n_groups,
        "d_state": config.mamba_d_state,
        "kernel": config.mamba_d_conv,
    }


def ssm_state_shapes(config: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes (without the batch dim) of one SSM layer's conv and recurrent state."""
    model_type = _model_type(config)
    family = _SSM_FAMILY[model_type]
    if family == "mamba2":
        m = _mamba2_dims(config, model_type)
        conv_dim = m["d_inner"] + 2 * m["groups"] * m["d_state"]
        return (conv_dim, m["kernel"]), (m["heads"], m["head_dim"], m["d_state"])
    if family == "mamba1":
        d_inner = int(config.mamba_expand * config.hidden_size)
        return (d_inner, config.mamba_d_conv), (d_inner, config.mamba_d_state)
    key_dim = config.linear_num_key_heads * config.linear_key_head_dim
    value_dim = config.linear_num_value_heads * config.linear_value_head_dim
    return (2 * key_dim + value_dim, config.linear_conv_kernel_dim), (
        config.linear_num_value_heads,
        config.linear_key_head_dim,
        config.linear_value_head_dim,
    )


def ssm_state_bytes(
    config: Any, dtype: Any = "float32", recurrent_dtype: Any = "float32"
) -> tuple[int, int]:
    """``(conv_bytes, recurrent_bytes)`` of one SSM layer's checkpoint."""
    conv_shape, recurrent_shape = ssm_state_shapes(config)
    return (
        math.prod(conv_shape) * dtype_nbytes(dtype),
        math.prod(recurrent_shape) * dtype_nbytes(recurrent_dtype),
    )


# --------------------------------------------------------------------------- FLOP estimates


def _attention_flops(config: Any, model_type: str) -> tuple[float, float]:
    """(per-token linear FLOPs, L^2 coefficient) of one attention layer."""
    heads = config.num_attention_heads
    kv_heads, head_dim = attention_kv_shape(config)
    d = config.hidden_size
    # Zamba2's shared block attends over [hidden, original embeddings] (2D wide).
    d_in = 2 * d if model_type == "zamba2" else d
    linear = 2 * d_in * heads * head_dim + 4 * d_in * kv_heads * head_dim + 2 * heads * head_dim * d
    return float(linear), float(4 * heads * head_dim)


def _ssm_flops(config: Any, model_type: str) -> float:
    """Per-token prefill FLOPs of one SSM layer (projections, conv, scan)."""
    d = config.hidden_size
    family = _SSM_FAMILY[model_type]
    (conv_dim, kernel), recurrent = ssm_state_shapes(config)
    if family == "mamba2":
        m = _mamba2_dims(config, model_type)
        d_inner, n = m["d_inner"], m["d_state"]
        in_proj = 2 * d * (2 * d_inner + 2 * m["groups"] * n + m["heads"])
        return float(
            in_proj + 2 * conv_dim * kernel + 8 * d_inner * n + 2 * d_inner * d + 5 * d_inner
        )
    if family == "mamba1":
        d_inner, n = recurrent
        rank = config.mamba_dt_rank if isinstance(config.mamba_dt_rank, int) else math.ceil(d / 16)
        proj = 2 * d * 2 * d_inner + 2 * d_inner * (rank + 2 * n) + 2 * rank * d_inner
        return float(proj + 2 * conv_dim * kernel + 8 * d_inner * n + 2 * d_inner * d + 5 * d_inner)
    v_heads, dk, dv = recurrent
    value_dim = v_heads * dv
    key_dim = config.linear_num_key_heads * dk
    proj = 2 * d * (2 * key_dim + 2 * value_dim) + 2 * d * 2 * v_heads + 2 * value_dim * d
    return float(proj + 2 * conv_dim * kernel + 8 * v_heads * dk * dv)


def _mlp_flops(config: Any, model_type: str, idx: int, layer_type: str) -> float:
    """Per-token FLOPs of the MLP/MoE that belongs to layer ``idx`` (0 if none)."""
    d = config.hidden_size
    if model_type == "nemotron_h":
        # Blocks hold one mixer each; relu^2 MLPs are ungated (two matmuls).
        if layer_type == "mlp":
            return float(4 * d * config.intermediate_size)
        if layer_type == "moe":
            routed = config.num_experts_per_tok * config.moe_intermediate_size
            shared = config.n_shared_experts * config.moe_shared_expert_intermediate_size
            return float(4 * d * (routed + shared))
        return 0.0
    if model_type == "zamba2":
        # Only the shared transformer blocks (hybrid layers) have an MLP.
        return float(6 * d * config.intermediate_size) if layer_type == "hybrid" else 0.0
    if model_type == "qwen3_next":
        if idx in (getattr(config, "mlp_only_layers", None) or []):
            return float(6 * d * config.intermediate_size)
        routed = config.num_experts_per_tok * config.moe_intermediate_size
        return float(6 * d * (routed + config.shared_expert_intermediate_size))
    if model_type == "jamba":
        is_moe = config.num_experts > 1 and (
            idx % config.expert_layer_period == config.expert_layer_offset
        )
        active = config.num_experts_per_tok if is_moe else 1
        return float(6 * d * config.intermediate_size * active)
    if model_type == "granitemoehybrid":
        routed = config.num_experts_per_tok * config.intermediate_size
        return float(6 * d * (routed + (getattr(config, "shared_intermediate_size", 0) or 0)))
    return float(6 * d * config.intermediate_size)
