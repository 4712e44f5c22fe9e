"""A small GPT-style mixture-of-experts language model, split into dense part and experts.

Lazarus replicates the dense part on every rank and spreads expert replicas
over ranks, so the model keeps the two apart: :class:`MoEGPT` holds everything
dense (embeddings, attention, layer norms, the gates) and calls a function for
each MoE layer's feed-forward, ``moe(layer, h, expert_ids, weights)``, which the
runtime implements with the dispatcher and all-to-all (or, in
:func:`local_moe`, with every expert on this process). Experts are plain dicts
of tensors (``w1, b1, w2, b2``) so they can be sent, copied and compared
without module surgery; :func:`init_expert` derives one expert's initial
weights from ``(seed, layer, expert)`` alone, so every rank that holds a
replica starts from the same weights without talking to anyone.

Text: ShareGPT tokenised with cl100k (:func:`thrifty.data.sharegpt.sharegpt_token_ids`),
remapped by :class:`CompactVocab` to the most frequent ids plus one
out-of-vocabulary id, which keeps the embedding tiny.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.data.sharegpt import sharegpt_token_ids

__all__ = [
    "EXPERT_KEYS",
    "CompactVocab",
    "MoEConfig",
    "MoEGPT",
    "expert_forward",
    "init_expert",
    "local_moe",
    "sharegpt_corpus",
]

EXPERT_KEYS = ("w1", "b1", "w2", "b2")
MoEFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MoEConfig:
    """Model shape. ``vocab`` counts the out-of-vocabulary id 0."""

    vocab: int = 2048
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    seq_len: int = 32
    experts: int = 6
    top_k: int = 2
    expert_hidden: int = 128

    def __post_init__(self) -> None:
        if self.top_k not in (1, 2) or self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k}: expected 1 or 2 and <= experts={self.experts}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")

    @property
    def expert_numel(self) -> int:
        d, h = self.d_model, self.expert_hidden
        return d * h + h + h * d + d


class CompactVocab:
    """cl100k ids -> ``0..size-1``: the ``size - 1`` most frequent ids, everything else 0."""

    def __init__(self, ids: Sequence[int], size: int) -> None:
        if size < 2:
            raise ValueError(f"size={size}: need at least one real id besides OOV")
        frequent = [tok for tok, _ in Counter(ids).most_common(size - 1)]
        self.size = size
        self.table = {tok: i + 1 for i, tok in enumerate(frequent)}

    def encode(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self.table.get(t, 0) for t in ids], dtype=torch.int64)


def sharegpt_corpus(tokens: int = 60_000, vocab: int = 2048) -> torch.Tensor:
    """ShareGPT as a 1-D int64 tensor of compact-vocabulary ids."""
    ids = sharegpt_token_ids(tokens)
    return CompactVocab(ids, vocab).encode(ids)


def init_expert(cfg: MoEConfig, layer: int, expert: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One expert's initial weights, a function of ``(seed, layer, expert)`` only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + expert + 1)
    d, h = cfg.d_model, cfg.expert_hidden
    return {
        "w1": torch.randn(d, h, generator=g) * d**-0.5,
        "b1": torch.zeros(h),
        "w2": torch.randn(h, d, generator=g) * (h**-0.5) / (2 * cfg.layers) ** 0.5,
        "b2": torch.zeros(d),
    }


def expert_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


class _Block(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.gate = nn.Linear(cfg.d_model, cfg.experts, bias=False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MoEGPT(nn.Module):
    """The dense part of a GPT with an MoE feed-forward in every block (top-1 or top-2 gating).

    Top-1 weighs an expert's output by its gate probability (Switch), so the
    gate learns; top-2 renormalises the two probabilities (GShard). The
    forward also returns Switch's load-balancing loss, ``E * sum_e f_e P_e``
    averaged over layers (``f_e`` the share of routed pairs, ``P_e`` the mean
    gate probability of expert ``e``): 1 when uniform, ``E`` when collapsed.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__} {cfg!r}")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor, moe: MoEFn) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[b, t, vocab]`` and the load-balancing loss (a scalar)."""
        b, t = idx.shape
        k, experts = self.cfg.top_k, self.cfg.experts
        x = self.tok(idx) + self.pos(torch.arange(t))
        balance = x.new_zeros(())
        for layer, block in enumerate(self.blocks):
            x = x + block.attention(x)
            h = block.ln2(x).reshape(b * t, -1)
            probs = F.softmax(block.gate(h), dim=-1)
            weights, expert_ids = probs.topk(k, dim=-1)
            if k > 1:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            share = F.one_hot(expert_ids, experts).sum(dim=1).float().mean(dim=0) / k
            balance = balance + experts * (share * probs.mean(dim=0)).sum()
            x = x + moe(layer, h, expert_ids, weights).reshape(b, t, -1)
        return self.ln_f(x) @ self.tok.weight.t(), balance / len(self.blocks)


def local_moe(experts: Sequence[Sequence[dict[str, torch.Tensor]]]) -> MoEFn:
    """The MoE function with every expert here, ``experts[layer][e]``: a one-process reference."""

    def moe(layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(h)
        for slot in range(ids.shape[1]):
            for e, params in enumerate(experts[layer]):
                rows = (ids[:, slot] == e).nonzero().squeeze(1)
                if rows.numel():
                    y = expert_forward(params, h[rows]) * weights[rows, slot, None]
                    out = out.index_add(0, rows, y)
        return out

    return moe
