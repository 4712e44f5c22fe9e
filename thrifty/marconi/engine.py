"""A real serving loop: Marconi's prefix cache over a transformers hybrid causal LM.

The cache's tree and policies are the simulator's (:class:`PrefixCache`); here
the states are tensors. With transformers 5.x a ``DynamicCache`` built from the
model's config holds one layer object per decoder layer: ``DynamicLayer``
(``.keys``/``.values``, shape ``[B, H_kv, T, Dh]``) for attention,
``LinearAttentionLayer`` (``.conv_states[i]``, ``.recurrent_states[i]``) for
Mamba / gated-DeltaNet layers, and a subclass of both for Zamba2's and
FalconH1's hybrid layers.

* :class:`TensorKV` is an edge's KV: per attention layer, the keys and values
  of the edge's tokens (sliced along the sequence dim, cloned so a node owns
  exactly the bytes it is charged for).
* :class:`TensorCheckpoint` is the SSM state after one position: a clone of
  every SSM layer's conv and recurrent state.
* :class:`TensorSource` hands the tree a served request's states.

One request (:meth:`HybridEngine.serve`) calls the cache twice, through one
handle (:class:`~thrifty.marconi.cache.CacheRequest`), and never touches its tree:

1. ``cache.begin`` matches the input (``need_logits=True``: the first output
   token comes from the last input token's logits, so a hit may cover the
   whole input only where the cache stored those logits, with its
   ``store_logits``; otherwise the last input token runs through the model
   again) and plans the checkpoints;
2. on a hit, build a fresh ``DynamicCache`` from the hit's KV segments and
   checkpoint, so the tree's tensors are never written to;
3. prefill only the rest, in pieces that end at every position whose state
   the request must capture inside the input (Marconi: the branch point;
   vLLM+: block boundaries), cloning the SSM state at each piece's end; a hit
   of the whole input prefills nothing and takes the first output token from
   the stored logits (a zero-prefill hit);
4. greedy-decode the output (or feed a given output, to replay a trace), and
   feed the last token once more when a checkpoint after it is wanted; the
   checkpoints at ``request.logits_positions`` keep that position's logits;
5. ``request.finish`` admits input + output with the captured states
   (evicting first) and counts the request.

TTFT is the wall time from the request's arrival at the engine to its first
output token: lookup, restore, prefill and the captures inside it.

Example::

    model = build_model("bamba")
    spec = ModelSpec.from_hf_config(model.config)
    engine = HybridEngine(model, build_cache("marconi", 1 << 20, spec))
    first = engine.serve(prompt, max_new_tokens=8)
    again = engine.serve(prompt + first.output_ids + follow_up, max_new_tokens=8)
    assert again.hit_tokens == len(prompt) + 8
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from thrifty.marconi.cache import CacheRequest, PrefixCache

__all__ = [
    "ARCHITECTURES",
    "HybridEngine",
    "ServeResult",
    "TensorCheckpoint",
    "TensorKV",
    "TensorSource",
    "build_model",
    "hybrid_config",
]

ARCHITECTURES = (
    "bamba",
    "jamba",
    "zamba2",
    "nemotron_h",
    "qwen3_next",
    "granitemoehybrid",
    "falcon_h1",
)


# --------------------------------------------------------------------------- tiny models


def _layer_kinds(num_layers: int, attention_period: int) -> list[bool]:
    """True where a layer is attention: every ``attention_period``-th, from layer 1."""
    return [i % attention_period == 1 % attention_period for i in range(num_layers)]


def hybrid_config(
    arch: str,
    *,
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 3,
    attention_period: int = 4,
    d_state: int = 8,
    num_heads: int = 4,
    mamba_head_dim: int = 16,
    chunk_size: int = 16,
    initializer_range: float = 0.1,
) -> Any:
    """A small random-weight config of a transformers hybrid architecture.

    Layer ``i`` is attention when ``i % attention_period == 1`` (a hybrid
    block for Zamba2; every layer is both for FalconH1), an SSM layer
    otherwise (NemotronH alternates SSM and MLP blocks). SSM layers expand the
    hidden size 2x into heads of ``mamba_head_dim``; attention has
    ``num_heads`` query heads and half as many KV heads.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        vocab_size: token ids must be below this.
        hidden_size: model width (a multiple of ``num_heads`` and of 8).
        num_layers: decoder layers.
        attention_period: one attention layer per this many layers.
        d_state: SSM state size (Mamba ``N``); gated DeltaNet uses it as key head dim.
        num_heads: attention heads.
        mamba_head_dim: SSM head dim (``2 * hidden_size`` must be a multiple).
        chunk_size: the chunked scan's chunk length.
        initializer_range: std of the random weights. transformers' default
            (0.02) with tied embeddings makes most of these tiny models predict
            one token whatever the input, which would make output checks
            vacuous; 0.1 and untied embeddings give input-dependent outputs.
    """
    import transformers  # optional: [marconi]

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    if hidden_size % num_heads or (2 * hidden_size) % mamba_head_dim:
        raise ValueError(
            f"hidden_size {hidden_size} must be a multiple of num_heads {num_heads} and "
            f"2 * hidden_size of mamba_head_dim {mamba_head_dim}"
        )
    attn = _layer_kinds(num_layers, attention_period)
    if not any(attn) or all(attn):
        raise ValueError(
            f"{num_layers} layers with attention_period {attention_period} is not a hybrid: "
            "need at least one attention and one SSM layer"
        )
    kv_heads = max(num_heads // 2, 1)
    head_dim = hidden_size // num_heads
    ssm_heads = 2 * hidden_size // mamba_head_dim
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "tie_word_embeddings": False,
        "initializer_range": initializer_range,
    }
    mamba2 = {
        "mamba_n_heads": ssm_heads,
        "mamba_d_head": mamba_head_dim,
        "mamba_n_groups": 1,
        "mamba_d_state": d_state,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_chunk_size": chunk_size,
    }
    if arch == "bamba":
        return transformers.BambaConfig(
            **common,
            **mamba2,
            num_key_value_heads=kv_heads,
            attn_layer_indices=[i for i, a in enumerate(attn) if a],
        )
    if arch == "granitemoehybrid":
        return transformers.GraniteMoeHybridConfig(
            **common,
            **mamba2,
            num_key_value_heads=kv_heads,
            layer_types=["attention" if a else "mamba" for a in attn],
            num_local_experts=2,
            num_experts_per_tok=1,
            shared_intermediate_size=hidden_size,
        )
    if arch == "falcon_h1":
        return transformers.FalconH1Config(
            **common,
            **mamba2,
            mamba_d_ssm=2 * hidden_size,
            num_key_value_heads=kv_heads,
        )
    if arch == "jamba":
        return transformers.JambaConfig(
            **common,
            num_key_value_heads=kv_heads,
            attn_layer_period=attention_period,
            attn_layer_offset=1 % attention_period,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=2,
            mamba_d_state=d_state,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=max(hidden_size // 16, 1),
        )
    if arch == "zamba2":
        return transformers.Zamba2Config(
            **common,
            num_key_value_heads=num_heads,
            layers_block_type=["hybrid" if a else "linear_attention" for a in attn],
            mamba_d_state=d_state,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_headdim=mamba_head_dim,
            n_mamba_heads=ssm_heads,
            mamba_ngroups=1,
            chunk_size=chunk_size,
        )
    if arch == "nemotron_h":
        kinds, ssm_turn = [], True
        for a in attn:
            if a:
                kinds.append("full_attention")
            else:
                kinds.append("linear_attention" if ssm_turn else "mlp")
                ssm_turn = not ssm_turn
        return transformers.NemotronHConfig(
            **common,
            layers_block_type=kinds,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            mamba_num_heads=ssm_heads,
            mamba_head_dim=mamba_head_dim,
            ssm_state_size=d_state,
            n_groups=1,
            conv_kernel=4,
            chunk_size=chunk_size,
        )
    # qwen3_next: gated DeltaNet layers; MoE MLPs with a shared expert.
    return transformers.Qwen3NextConfig(
        **common,
        layer_types=["full_attention" if a else "linear_attention" for a in attn],
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        linear_num_key_heads=max(ssm_heads // 2, 1),
        linear_num_value_heads=ssm_heads,
        linear_key_head_dim=d_state,
        linear_value_head_dim=mamba_head_dim,
        linear_conv_kernel_dim=4,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=hidden_size,
        shared_expert_intermediate_size=hidden_size,
    )


def build_model(
    arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config: Any
) -> Any:
    """A random-weight hybrid causal LM (no download), in eval mode.

    ``config`` goes to :func:`hybrid_config`; ``seed`` fixes the weights.
    """
    from transformers import AutoModelForCausalLM  # optional: [marconi]

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hybrid_config(arch, **config))
    return model.to(dtype).eval()


# --------------------------------------------------------------------------- tensor states


def _nbytes(tensors: Sequence[torch.Tensor | None]) -> int:
    return sum(t.nbytes for t in tensors if t is not None)


@dataclass(frozen=True, eq=False)
class TensorKV:
    """Keys and values of ``num_tokens`` consecutive tokens, one pair per attention layer."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    num_tokens: int

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)

    def split(self, k: int) -> tuple[TensorKV, TensorKV]:
        if not 0 < k < self.num_tokens:
            raise ValueError(f"split point {k} must lie strictly inside 0..{self.num_tokens}")
        # Clones, so that evicting one half frees its bytes.
        head = TensorKV(
            tuple(t[:, :, :k].clone() for t in self.keys),
            tuple(t[:, :, :k].clone() for t in self.values),
            k,
        )
        tail = TensorKV(
            tuple(t[:, :, k:].clone() for t in self.keys),
            tuple(t[:, :, k:].clone() for t in self.values),
            self.num_tokens - k,
        )
        return head, tail

    def join(self, tail: Any) -> TensorKV:
        if not isinstance(tail, TensorKV) or len(tail.keys) != len(self.keys):
            raise TypeError(f"cannot join {type(tail).__name__} to a TensorKV of the same model")
        return TensorKV(
            tuple(torch.cat(pair, dim=2) for pair in zip(self.keys, tail.keys, strict=True)),
            tuple(torch.cat(pair, dim=2) for pair in zip(self.values, tail.values, strict=True)),
            self.num_tokens + tail.num_tokens,
        )


@dataclass(frozen=True, eq=False)
class TensorCheckpoint:
    """The SSM state after ``position`` tokens: ``(layer, state index, conv, recurrent)``,
    and optionally the logits of token ``position`` (shape ``[vocab]``, as the
    model returned them), which make a zero-prefill hit possible."""

    states: tuple[tuple[int, int, torch.Tensor | None, torch.Tensor | None], ...]
    position: int
    logits: torch.Tensor | None = None

    @property
    def logits_nbytes(self) -> int:
        return 0 if self.logits is None else self.logits.nbytes

    @property
    def nbytes(self) -> int:
        states = sum(_nbytes((conv, rec)) for _, _, conv, rec in self.states)
        return states + self.logits_nbytes


class TensorSource:
    """A served request's states for :meth:`CacheRequest.finish`.

    Args:
        kv_cache: the request's ``DynamicCache`` after decoding (its KV covers
            every token that will be stored).
        kv_layers: indices of the cache layers that hold KV.
        checkpoints: the SSM states captured during the request, by position.
        checkpoint_nbytes: bytes of one checkpoint (the model's SSM state
            size), for a position that captured none.
    """

    def __init__(
        self,
        kv_cache: Any,
        kv_layers: Sequence[int],
        checkpoints: dict[int, TensorCheckpoint],
        checkpoint_nbytes: int,
    ) -> None:
        self._layers = [kv_cache.layers[i] for i in kv_layers]
        self._checkpoints = checkpoints
        self._checkpoint_nbytes = checkpoint_nbytes
        self._kv_per_token = sum(
            (layer.keys.nbytes + layer.values.nbytes) // layer.keys.shape[2]
            for layer in self._layers
        )

    def kv_nbytes(self, num_tokens: int) -> int:
        return num_tokens * self._kv_per_token

    def checkpoint_nbytes(self, position: int) -> int:
        captured = self._checkpoints.get(position)
        return self._checkpoint_nbytes if captured is None else captured.nbytes

    def kv(self, start: int, end: int) -> TensorKV:
        have = self._layers[0].keys.shape[2] if self._layers else end
        if not 0 <= start < end <= have:
            raise ValueError(f"KV of tokens [{start}, {end}) asked, the request holds {have}")
        return TensorKV(
            tuple(layer.keys[:, :, start:end].clone() for layer in self._layers),
            tuple(layer.values[:, :, start:end].clone() for layer in self._layers),
            end - start,
        )

    def checkpoint(self, position: int) -> TensorCheckpoint:
        try:
            return self._checkpoints[position]
        except KeyError:
            raise KeyError(
                f"no SSM state was captured at position {position} "
                f"(captured: {sorted(self._checkpoints)})"
            ) from None


# --------------------------------------------------------------------------- the engine

# transformers' reference Mamba1 scan (Jamba) starts every multi-token input
# from a zero SSM state, even when the cache holds one
# (modeling_jamba.mamba_selective_scan: "Initial hidden state is not supported
# by the kernel path"); only its one-token path continues the cached state. For
# these models the engine feeds the tokens after a restored or captured state
# one at a time.
STEPWISE_CONTINUATION = frozenset({"jamba"})


@dataclass(frozen=True)
class ServeResult:
    """One served request.

    Attributes:
        output_ids: the greedy token after the input and after each fed output token.
        fed_ids: output tokens fed back (= ``output_ids`` unless a forced output was given).
        hit_tokens: input tokens restored from the cache.
        prefill_tokens: input tokens run through the model (0 on a zero-prefill hit).
        prefill_pieces: forward passes the prefill took (more than one when
            checkpoints inside the input were captured; 0 on a zero-prefill hit).
        ttft_s: arrival to first output token (lookup, restore, prefill).
        total_s: arrival to the last output token fed, admission excluded.
        admit_s: time to finish the request in the cache (admission, eviction,
            and the alpha tuner's step if it has one).
        admitted: whether the cache stored the request.
        checkpoints_added: new SSM checkpoints stored.
    """

    output_ids: list[int]
    fed_ids: list[int]
    hit_tokens: int
    prefill_tokens: int
    prefill_pieces: int
    ttft_s: float
    total_s: float
    admit_s: float
    admitted: bool
    checkpoints_added: int


class HybridEngine:
    """Serves requests one at a time through ``model``, reusing prefixes from ``cache``.

    Args:
        model: a transformers 5.x hybrid causal LM (``DynamicCache(config=...)``
            must give attention and linear-attention layers).
        cache: the prefix cache; ``None`` serves without one (the reference).
        device: where to serve (``"cuda"``, ``"cuda:1"``, ``"cpu"``); the model
            is moved there. ``None`` serves where the model's parameters are.
            Cached KV and SSM states live on this device too.
    """

    def __init__(
        self,
        model: Any,
        cache: PrefixCache | None = None,
        *,
        device: str | torch.device | None = None,
    ) -> None:
        from transformers import DynamicCache  # optional: [marconi]
        from transformers.cache_utils import (  # optional: [marconi]
            DynamicLayer,
            LinearAttentionCacheLayerMixin,
        )

        if device is not None:
            model = model.to(torch.device(device))
        self.model = model
        self.cache = cache
        self.device = next(model.parameters()).device
        self._dynamic_cache = DynamicCache
        probe = DynamicCache(config=model.config)
        self.kv_layers: list[int] = []
        self.ssm_layers: list[int] = []
        for i, layer in enumerate(probe.layers):
            if isinstance(layer, DynamicLayer):
                if getattr(layer, "is_sliding", False):
                    raise ValueError(
                        f"layer {i} is a sliding-window {type(layer).__name__}; its KV cannot "
                        "be cut at arbitrary tokens"
                    )
                self.kv_layers.append(i)
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                self.ssm_layers.append(i)
        if not self.kv_layers or not self.ssm_layers:
            raise ValueError(
                f"{type(model).__name__} is not a hybrid: {len(self.kv_layers)} attention and "
                f"{len(self.ssm_layers)} SSM cache layers"
            )
        self._checkpoint_nbytes: int | None = None
        self.stepwise_continuation = model.config.model_type in STEPWISE_CONTINUATION

    # ------------------------------------------------------------------ serving

    @torch.inference_mode()
    def serve(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int | None = None,
        *,
        forced_output: Sequence[int] | None = None,
        repeats: int = 1,
    ) -> ServeResult:
        """Serve one request: hit, prefill the rest, decode, admit.

        Args:
            input_ids: the prompt.
            max_new_tokens: output tokens to greedy-decode, one step each.
            forced_output: instead, feed these output tokens (a trace's
                recorded reply, so that the next turn's input continues what
                was stored). They are fed like a prefill, in pieces that end at
                the checkpoint positions, and ``output_ids`` holds only the
                first (greedy) token.
            repeats: run restore + prefill this many times and report the
                fastest as TTFT (timing on a busy machine); the cache is
                looked up and admitted to once.
        """
        input_ids = [int(t) for t in input_ids]
        forced = None if forced_output is None else [int(t) for t in forced_output]
        n_in = len(input_ids)
        n_out = len(forced) if forced is not None else (max_new_tokens or 0)
        if n_in < 1 or n_out < 1:
            raise ValueError(f"need at least one input and one output token, got {n_in}, {n_out}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        vocab = self.model.config.vocab_size
        top = max(max(input_ids), max(forced or [0]))
        if top >= vocab or min(input_ids) < 0:
            raise ValueError(f"token ids must lie in [0, {vocab}), got up to {top}")
        started = time.perf_counter()
        request: CacheRequest | None = None
        hit = 0
        in_input: tuple[int, ...] = ()
        in_output: set[int] = set()
        with_logits: frozenset[int] = frozenset()
        if self.cache is not None:
            request = self.cache.begin(input_ids, n_out, need_logits=True)
            hit = request.hit_length
            in_input = request.prefill_positions
            in_output = set(request.output_positions)
            with_logits = frozenset(request.logits_positions)
        lookup_s = time.perf_counter() - started

        prefill_s = float("inf")
        pieces = sorted({*in_input, n_in}) if hit < n_in else []
        for _ in range(repeats):
            rep_started = time.perf_counter()
            kv_cache = (
                self._restore(request) if hit else self._dynamic_cache(config=self.model.config)
            )
            captured: dict[int, TensorCheckpoint] = {}
            if hit == n_in:  # zero-prefill hit: the stored logits give the first token
                assert request is not None
                logits = request.hit_checkpoint.logits[None, None]
            pos = hit
            for end in pieces:
                logits = self._forward(input_ids[pos:end], kv_cache)
                pos = end
                if end in in_input:
                    captured[end] = self._capture(kv_cache, end, logits, with_logits)
            outputs = [int(logits[0, -1].argmax())]
            prefill_s = min(prefill_s, time.perf_counter() - rep_started)
        ttft = lookup_s + prefill_s
        decode_started = time.perf_counter()

        if forced is not None:
            fed = forced
            pos = n_in
            for end in sorted({*in_output, n_in + n_out}):
                logits = self._forward(fed[pos - n_in : end - n_in], kv_cache)
                pos = end
                if end in in_output:
                    captured[end] = self._capture(kv_cache, end, logits, with_logits)
        else:
            # Greedy decode; the state after the last token needs one more step.
            fed = []
            for i in range(n_out):
                fed.append(outputs[i])
                last = i == n_out - 1
                if last and n_in + n_out not in in_output:
                    break
                logits = self._forward([outputs[i]], kv_cache)
                if n_in + i + 1 in in_output:
                    end = n_in + i + 1
                    captured[end] = self._capture(kv_cache, end, logits, with_logits)
                if not last:
                    outputs.append(int(logits[0, -1].argmax()))
        total = ttft + time.perf_counter() - decode_started

        admitted, checkpoints_added, admit_s = False, 0, 0.0
        if request is not None:
            admit_started = time.perf_counter()
            source = TensorSource(kv_cache, self.kv_layers, captured, self.checkpoint_nbytes)
            outcome = request.finish(fed, source)
            admit_s = time.perf_counter() - admit_started
            admitted, checkpoints_added = outcome.admitted, outcome.checkpoints_added
        return ServeResult(
            output_ids=outputs,
            fed_ids=list(fed),
            hit_tokens=hit,
            prefill_tokens=n_in - hit,
            prefill_pieces=len(pieces),
            ttft_s=ttft,
            total_s=total,
            admit_s=admit_s,
            admitted=admitted,
            checkpoints_added=checkpoints_added,
        )

    def generate(self, input_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy outputs without touching the cache (the reference)."""
        saved, self.cache = self.cache, None
        try:
            return self.serve(input_ids, max_new_tokens).output_ids
        finally:
            self.cache = saved

    # ------------------------------------------------------------------ states

    @property
    def checkpoint_nbytes(self) -> int:
        """Bytes of one SSM checkpoint of this model (measured once on a real state)."""
        if self._checkpoint_nbytes is None:
            with torch.inference_mode():
                probe = self._dynamic_cache(config=self.model.config)
                self._forward([0], probe)
                self._checkpoint_nbytes = self._capture(probe, 1).nbytes
        return self._checkpoint_nbytes

    def _forward(self, tokens: Sequence[int], kv_cache: Any) -> torch.Tensor:
        """Run ``tokens`` through the model after ``kv_cache``; the last token's logits."""
        tokens = list(tokens)
        if self.stepwise_continuation and len(tokens) > 1 and kv_cache.get_seq_length() > 0:
            pieces = [[t] for t in tokens]
        else:
            pieces = [tokens]
        for piece in pieces:
            ids = torch.tensor([piece], dtype=torch.long, device=self.device)
            # Explicit positions: Bamba's forward (transformers 5.24) numbers
            # the new tokens from 0 when none are given, whatever the cache holds.
            past = kv_cache.get_seq_length()
            positions = torch.arange(past, past + len(piece), device=self.device)[None]
            logits = self.model(
                input_ids=ids,
                position_ids=positions,
                cache=kv_cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits
        return logits

    def _capture(
        self,
        kv_cache: Any,
        position: int,
        logits: torch.Tensor | None = None,
        with_logits: frozenset[int] = frozenset(),
    ) -> TensorCheckpoint:
        """Clone the SSM states after ``position`` tokens; keep the last row of
        ``logits`` beside them when ``position`` is in ``with_logits``."""
        states = []
        for i in self.ssm_layers:
            layer = kv_cache.layers[i]
            for idx in range(layer.number_of_states):
                conv, rec = layer.conv_states[idx], layer.recurrent_states[idx]
                if conv is None and rec is None:
                    continue
                states.append(
                    (
                        i,
                        idx,
                        None if conv is None else conv.clone(),
                        None if rec is None else rec.clone(),
                    )
                )
        kept = None
        if logits is not None and position in with_logits:
            kept = logits[0, -1].clone()
        return TensorCheckpoint(tuple(states), position, kept)

    def _restore(self, request: CacheRequest | None) -> Any:
        """A fresh ``DynamicCache`` holding the hit's KV and SSM state."""
        assert request is not None
        kv_cache = self._dynamic_cache(config=self.model.config)
        segments = request.hit_kv
        for j, i in enumerate(self.kv_layers):
            keys = torch.cat([seg.keys[j] for seg in segments], dim=2)
            values = torch.cat([seg.values[j] for seg in segments], dim=2)
            kv_cache.layers[i].update(keys, values)
        checkpoint = request.hit_checkpoint
        if not isinstance(checkpoint, TensorCheckpoint):
            raise TypeError(f"the hit holds {type(checkpoint).__name__}, not tensors")
        # update_*_state copies into the layer's own buffers: the tree is never aliased.
        for i, idx, conv, rec in checkpoint.states:
            layer = kv_cache.layers[i]
            if conv is not None:
                layer.update_conv_state(conv, state_idx=idx)
            if rec is not None:
                layer.update_recurrent_state(rec, state_idx=idx)
        # transformers >= 5.25 counts a linear layer's tokens in the layer
        # (``cumulative_length_linear``), and update_conv_state above added only
        # the conv window; DynamicCache.get_seq_length reads layer 0, often a
        # linear one, and Qwen3-Next builds its attention mask from it.
        for i in self.ssm_layers:
            length = getattr(kv_cache.layers[i], "cumulative_length_linear", None)
            if isinstance(length, torch.Tensor):
                length.fill_(checkpoint.position)
        return kv_cache
