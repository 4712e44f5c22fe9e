"""Real sparse gradients for Zen's analysis and benchmark (the paper's §2.1, on this machine).

Four workloads, each a model plus the data it trains on:

* ``lstm``: an LSTM language model whose input embedding is an
  ``nn.Embedding(100277, 64, sparse=True)`` over the full cl100k vocabulary,
  trained on ShareGPT conversations tokenised with cl100k
  (:mod:`thrifty.data.sharegpt`). Token ids are renumbered by frequency
  (id 0 is the most frequent token; ids never seen in the sample follow in id
  order), as vocabularies built from a corpus are, which is also what
  ``nn.AdaptiveLogSoftmaxWithLoss`` needs for its output layer. The
  embedding's gradient has one row per distinct input token of the batch;
* ``deepfm``: a DeepFM click model over 26 categorical fields whose values are
  drawn from a Zipf law (generated, seeded; ids within a field by frequency,
  as a vocabulary built by counting would number them), labels from a hidden
  logistic teacher. Its shared ``nn.Embedding(sparse=True)`` gradient has one
  row per distinct (field, value) of the batch;
* ``gpt_dgc``: a GPT-style transformer (the benchmark gives the one of
  :mod:`thrifty.bench.models` as ``gpt_model``, in a smaller configuration:
  4 layers of width 256, about 5.3M parameters) on the same ShareGPT tokens
  (frequency ids above 8190 folded into one out-of-vocabulary id), its flat
  gradient sparsified by DGC at 1% with DGC's momentum correction
  (:class:`thrifty.compressors.memory.DGCMemory`);
* ``transformer``: the input embedding of a Hugging Face ``LlamaForCausalLM``
  (:data:`TRANSFORMER_CONFIG`: 2 layers of width 64, randomly initialised,
  nothing downloaded) over the full cl100k vocabulary, untied from its output
  layer, on the same ShareGPT tokens with their raw cl100k ids: the tokenizer's
  id order, not frequency order, so the same rows as ``lstm`` but a different
  skew over the id space. Its (dense) gradient is non-zero exactly in the rows
  of the batch's distinct input tokens. It is not in :data:`WORKLOADS` (the
  default of ``thrifty zen analyze`` and ``bench``): its 100k-way softmax at
  every position costs about 2.5 ms per token on one thread, and would more
  than double the default analysis (about 37 s more than the other three's
  28 s, measured); :data:`DENSITY_SOURCES` lists it.

:func:`simulate_index_sets` trains a workload for a few steps as ``n``
data-parallel workers in one process (each worker its own shard of the data,
the model stepped with the average gradient) and returns every worker's set of
non-zero rows per step: the input of :func:`thrifty.zen.measure_sparsity`.
:func:`index_sets_at_density` gives each worker the rows of a real gradient at
a chosen density (the embedding workloads: the shortest batch of the worker's
shard whose distinct rows reach it; ``gpt_dgc``: top-k of the first step's
gradient, which is what DGC sends on its first step; ``transformer``: like
the embedding workloads, with a real backward through the Llama checking the
rows, see there) and ``uniform`` random rows as the adversarial case, for the
benchmark.

Library code: it imports no benchmark module, so the GPT model comes from the
caller (``gpt_model``); :mod:`thrifty.zen.benchmark` passes the harness's.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thrifty.compressors import get_compressor
from thrifty.compressors.memory import DGCMemory
from thrifty.compressors.sparsifiers import sample_indices
from thrifty.data import sharegpt_token_ids

__all__ = [
    "CL100K_VOCAB",
    "DEEPFM_FIELDS",
    "DENSITY_SOURCES",
    "TRANSFORMER_CONFIG",
    "WORKLOADS",
    "DeepFM",
    "FrequencyVocabulary",
    "GPTBuilder",
    "LSTMLanguageModel",
    "Workload",
    "ZipfFeatures",
    "index_sets_at_density",
    "make_workload",
    "sharegpt_tokens",
    "simulate_index_sets",
]

log = logging.getLogger(__name__)

CL100K_VOCAB = 100_277
"""Rows of an embedding over every cl100k id (100,256 BPE tokens and the special ids)."""

DEEPFM_FIELDS: tuple[int, ...] = (60_000,) * 3 + (10_000,) * 6 + (2_000,) * 8 + (200,) * 9
"""Values per categorical field: 26 fields like Criteo's, 257,800 embedding rows in all."""


# --------------------------------------------------------------------------- text


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "thrifty" / "zen"


@functools.cache
def sharegpt_tokens(max_tokens: int = 2_000_000, cache: bool = True) -> Tensor:
    """The first ``max_tokens`` cl100k tokens of the ShareGPT messages, in file order.

    :func:`thrifty.data.sharegpt_token_ids` as an int64 tensor, cached on disk
    (``~/.cache/thrifty/zen``; tokenising 2M tokens takes about 10 s here)
    and in memory.
    """
    path = _cache_dir() / f"sharegpt_cl100k_{max_tokens}.pt"
    if cache and path.exists():
        return torch.load(path)
    tokens = torch.tensor(sharegpt_token_ids(max_tokens), dtype=torch.int64)
    if tokens.numel() < max_tokens:
        log.warning("ShareGPT gave %d tokens, fewer than the %d asked", tokens.numel(), max_tokens)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(tokens, tmp)
        tmp.replace(path)
    return tokens


@dataclass(frozen=True)
class FrequencyVocabulary:
    """Token ids renumbered by frequency: ``rank[id]`` is 0 for the most frequent token.

    Every id below ``size`` keeps a row (ids never seen come after the seen
    ones, in id order), so the vocabulary stays the tokenizer's full size.
    """

    rank: Tensor

    @classmethod
    def fit(cls, tokens: Tensor, size: int = CL100K_VOCAB) -> FrequencyVocabulary:
        counts = torch.bincount(tokens, minlength=size)[:size]
        # Stable sort on -count: ties (and unseen ids) keep id order.
        order = torch.sort(-counts, stable=True).indices
        rank = torch.empty(size, dtype=torch.int64)
        rank[order] = torch.arange(size)
        return cls(rank)

    @property
    def size(self) -> int:
        return self.rank.numel()

    def encode(self, tokens: Tensor, max_id: int | None = None) -> Tensor:
        """Frequency ids; with ``max_id``, rarer tokens share the id ``max_id`` (OOV)."""
        ids = self.rank[tokens]
        return ids.clamp_(max=max_id) if max_id is not None else ids


def _shard(tokens: Tensor, worker: int, workers: int) -> Tensor:
    """Worker ``worker``'s contiguous share of the stream (different conversations)."""
    size = tokens.numel() // workers
    return tokens[worker * size : (worker + 1) * size]


def _text_batch(shard: Tensor, step: int, batch: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Batch ``step`` of next-token pairs from a shard (wrapping around at its end)."""
    span = batch * (seq_len + 1)
    start = (step * span) % max(1, shard.numel() - span)
    window = shard[start : start + span].view(batch, seq_len + 1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


# --------------------------------------------------------------------------- models


class LSTMLanguageModel(nn.Module):
    """Sparse input embedding, one LSTM layer, adaptive softmax (or a plain one) on top.

    Args:
        vocab_size: embedding rows (the full cl100k vocabulary by default).
        embed_dim: embedding width.
        hidden_dim: LSTM width.
        cutoffs: ``nn.AdaptiveLogSoftmaxWithLoss`` cutoffs (ids must be
            frequency-ordered), or None for a full softmax (small vocabularies).
    """

    def __init__(
        self,
        vocab_size: int = CL100K_VOCAB,
        embed_dim: int = 64,
        hidden_dim: int = 128,
        cutoffs: Sequence[int] | None = (2_000, 10_000),
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_dim, sparse=True)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.head: nn.Module
        if cutoffs:
            self.head = nn.AdaptiveLogSoftmaxWithLoss(hidden_dim, vocab_size, list(cutoffs), 4.0)
        else:
            self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy of ``tokens`` ``[B, T]`` against ``targets``."""
        hidden, _ = self.lstm(self.embedding(tokens))
        flat = hidden.reshape(-1, hidden.shape[-1])
        if isinstance(self.head, nn.AdaptiveLogSoftmaxWithLoss):
            return self.head(flat, targets.reshape(-1)).loss
        return F.cross_entropy(self.head(flat), targets.reshape(-1))


class DeepFM(nn.Module):
    """DeepFM (Guo et al., IJCAI'17): first-order terms, a factorisation machine and an MLP.

    All three share one embedding table that holds every field's values (field
    ``f`` starts at ``offsets[f]``), so the model has one large sparse
    embedding gradient, as in the paper.
    """

    def __init__(
        self,
        field_sizes: Sequence[int] = DEEPFM_FIELDS,
        embed_dim: int = 16,
        hidden: Sequence[int] = (128, 64),
    ) -> None:
        super().__init__()
        sizes = torch.tensor(list(field_sizes), dtype=torch.int64)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        rows = int(sizes.sum())
        self.embedding = nn.Embedding(rows, embed_dim, sparse=True)
        self.first_order = nn.Embedding(rows, 1, sparse=True)
        nn.init.normal_(self.embedding.weight, std=0.01)
        nn.init.zeros_(self.first_order.weight)
        self.bias = nn.Parameter(torch.zeros(1))
        layers: list[nn.Module] = []
        width = len(field_sizes) * embed_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def rows(self, values: Tensor) -> Tensor:
        """Embedding rows of per-field value ids ``[B, F]``."""
        return values + self.offsets

    def forward(self, values: Tensor) -> Tensor:
        """Click logits ``[B]`` for per-field value ids ``[B, F]``."""
        rows = self.rows(values)
        emb = self.embedding(rows)  # [B, F, k]
        fm = 0.5 * (emb.sum(1) ** 2 - (emb**2).sum(1)).sum(1)
        deep = self.mlp(emb.flatten(1)).squeeze(1)
        return self.bias + self.first_order(rows).sum((1, 2)) + fm + deep


class ZipfFeatures:
    """Seeded categorical samples: field ``f`` takes value ``r`` with probability ``~ (r+1)^-s``.

    Labels come from a hidden logistic teacher (a random weight per value), so
    the model has something real to fit.
    """

    def __init__(
        self, field_sizes: Sequence[int] = DEEPFM_FIELDS, exponent: float = 1.1, seed: int = 0
    ) -> None:
        self.field_sizes = tuple(field_sizes)
        self.probs = [
            (torch.arange(1, n + 1, dtype=torch.float64) ** -exponent).float() for n in field_sizes
        ]
        gen = torch.Generator().manual_seed(seed)
        self.teacher = torch.randn(sum(field_sizes), generator=gen) * 0.5
        sizes = torch.tensor(self.field_sizes)
        self.offsets = torch.cumsum(sizes, 0) - sizes

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Value ids ``[batch, F]`` and click labels ``[batch]`` (0./1.)."""
        values = torch.stack(
            [
                torch.multinomial(p, batch, replacement=True, generator=generator)
                for p in self.probs
            ],
            dim=1,
        )
        logit = self.teacher[values + self.offsets].sum(1) / math.sqrt(len(self.field_sizes))
        labels = torch.bernoulli(torch.sigmoid(logit), generator=generator)
        return values, labels


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """A model, the data of each simulated worker, and where its sparse gradient is.

    ``loss(worker, workers, step)`` is that worker's loss on its batch of the
    step; ``sparse_rows(worker)`` reads the non-zero rows of the sparse
    gradient after backward (``worker`` keys DGC's per-worker state).
    """

    name: str
    description: str
    model: nn.Module
    num_rows: int
    row_numel: int
    loss: Callable[[int, int, int], Tensor]
    sparse_rows: Callable[[int], Tensor]
    lr: float = 0.1
    state: dict[str, Any] = field(default_factory=dict)


def _embedding_rows(weight: nn.Parameter) -> Tensor:
    grad = weight.grad
    if grad is None:
        return torch.zeros(0, dtype=torch.int64)
    return torch.unique(grad.coalesce().indices()[0])


def _lstm_workload(batch: int, seq_len: int, seed: int, max_tokens: int) -> Workload:
    tokens = sharegpt_tokens(max_tokens)
    vocab = FrequencyVocabulary.fit(tokens)
    ranked = vocab.encode(tokens)
    torch.manual_seed(seed)
    model = LSTMLanguageModel(vocab.size)

    def loss(worker: int, workers: int, step: int) -> Tensor:
        x, y = _text_batch(_shard(ranked, worker, workers), step, batch, seq_len)
        return model(x, y)

    return Workload(
        "lstm",
        f"LSTM LM, nn.Embedding({vocab.size}, 64, sparse=True), ShareGPT cl100k, "
        f"batch {batch}x{seq_len} tokens per worker",
        model=model,
        num_rows=vocab.size,
        row_numel=64,
        loss=loss,
        sparse_rows=lambda w: _embedding_rows(model.embedding.weight),
        lr=0.5,
        state={"ranked": ranked},
    )


def _deepfm_workload(batch: int, seed: int) -> Workload:
    torch.manual_seed(seed)
    model = DeepFM()
    data = ZipfFeatures(seed=seed)

    def loss(worker: int, workers: int, step: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + worker)
        values, labels = data.sample(batch, gen)
        return F.binary_cross_entropy_with_logits(model(values), labels)

    rows = sum(DEEPFM_FIELDS)
    return Workload(
        "deepfm",
        f"DeepFM, 26 Zipf(1.1) fields, nn.Embedding({rows}, 16, sparse=True), "
        f"batch {batch} per worker",
        model=model,
        num_rows=rows,
        row_numel=16,
        loss=loss,
        sparse_rows=lambda w: _embedding_rows(model.embedding.weight),
        lr=0.05,
        state={"data": data},
    )


UNIFORM_ROWS = 4 << 20
"""Elements of the vector that ``uniform`` index sets live in."""

GPT_CONFIG = {"vocab_size": 8192, "n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 128}
"""The GPT-style model's size here: about 5.3M parameters (the default is 19M)."""

GPTBuilder = Callable[..., nn.Module]
"""``gpt_model(**GPT_CONFIG)``: a GPT-style model whose ``model(x, y)[1]`` is the loss."""


def _gpt_workload(
    batch: int,
    seq_len: int,
    seed: int,
    max_tokens: int,
    ratio: float,
    config: dict[str, int],
    gpt_model: GPTBuilder,
) -> Workload:
    tokens = sharegpt_tokens(max_tokens)
    vocab = config["vocab_size"]
    ranked = FrequencyVocabulary.fit(tokens).encode(tokens, max_id=vocab - 1)
    torch.manual_seed(seed)
    model = gpt_model(**config)
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    compressor = get_compressor("dgc", ratio=ratio)
    memory = DGCMemory(momentum=0.9)

    def loss(worker: int, workers: int, step: int) -> Tensor:
        x, y = _text_batch(_shard(ranked, worker, workers), step, batch, seq_len)
        return model(x, y)[1]

    def sparse_rows(worker: int) -> Tensor:
        """DGC's selection on this worker's flat gradient; its gradient becomes what DGC sent."""
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        compensated = memory.compensate(flat, worker)
        payload = compressor.compress(compensated, worker)
        sent = compressor.decompress(payload, numel, worker)
        memory.update(worker, compensated, sent)
        offset = 0
        for p in params:  # the simulated step averages what the workers sent
            p.grad.copy_(sent[offset : offset + p.numel()].view_as(p))  # type: ignore[union-attr]
            offset += p.numel()
        return torch.sort(payload[1].to(torch.int64)).values

    return Workload(
        "gpt_dgc",
        f"GPT-style ({numel / 1e6:.1f}M parameters), ShareGPT tokens, DGC top-{ratio:.0%} "
        f"with momentum correction, batch {batch}x{seq_len} per worker",
        model=model,
        num_rows=numel,
        row_numel=1,
        loss=loss,
        sparse_rows=sparse_rows,
        lr=0.05,
        state={"ranked": ranked},
    )


TRANSFORMER_CONFIG: dict[str, Any] = {
    "vocab_size": CL100K_VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "use_cache": False,
}
"""``LlamaConfig`` of the ``transformer`` source: 12.9M parameters, 12.8M in its two embeddings.

Untied: with a tied output layer every row of the embedding would get a
gradient from the softmax, and the gradient would be dense.
"""

TRANSFORMER_SEQ_LEN = 64
"""Tokens per sequence when :func:`index_sets_at_density` runs the Llama over a prefix."""

TRANSFORMER_BATCH = 64
"""Sequences per forward and backward there (4,096 tokens); longer prefixes accumulate."""

TRANSFORMER_BACKWARD_WORKERS = 8
"""Workers whose ``transformer`` rows :func:`index_sets_at_density` reads from a real backward.

The others' rows are the distinct tokens of their prefix, computed directly:
the first workers' backward checks that the two are the same rows.
"""


def _transformer_model(seed: int) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of :data:`TRANSFORMER_CONFIG`."""
    # Imported here: transformers takes about 5 s to import, and only this source needs it.
    from transformers import LlamaConfig, LlamaForCausalLM  # optional: [marconi]

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TRANSFORMER_CONFIG))


def _dense_embedding_rows(weight: nn.Parameter) -> Tensor:
    """Sorted rows of a dense embedding gradient that hold a non-zero value."""
    grad = weight.grad
    if grad is None:
        return torch.zeros(0, dtype=torch.int64)
    return grad.abs().sum(1).nonzero().squeeze(1)


def _transformer_workload(batch: int, seq_len: int, seed: int, max_tokens: int) -> Workload:
    tokens = sharegpt_tokens(max_tokens)
    model = _transformer_model(seed)
    embedding = model.get_input_embeddings().weight

    def loss(worker: int, workers: int, step: int) -> Tensor:
        x, y = _text_batch(_shard(tokens, worker, workers), step, batch, seq_len)
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return Workload(
        "transformer",
        f"LlamaForCausalLM (transformers, 2 layers of width 64, untied), nn.Embedding"
        f"({CL100K_VOCAB}, 64) over raw cl100k ids, ShareGPT, batch {batch}x{seq_len} "
        "tokens per worker",
        model=model,
        num_rows=CL100K_VOCAB,
        row_numel=TRANSFORMER_CONFIG["hidden_size"],
        loss=loss,
        sparse_rows=lambda w: _dense_embedding_rows(embedding),
        lr=0.05,
        state={"tokens": tokens},
    )


WORKLOADS = ("lstm", "deepfm", "gpt_dgc")
"""The workloads of ``thrifty zen analyze`` and ``bench`` by default (``transformer`` is slower)."""

DENSITY_SOURCES = (*WORKLOADS, "transformer", "uniform")
"""Every name :func:`index_sets_at_density` takes."""


def make_workload(
    name: str,
    *,
    batch: int | None = None,
    seq_len: int = 32,
    seed: int = 0,
    max_tokens: int = 2_000_000,
    dgc_ratio: float = 0.01,
    gpt_config: dict[str, int] | None = None,
    gpt_model: GPTBuilder | None = None,
) -> Workload:
    """One of :data:`WORKLOADS` or ``transformer``; default batches: 32 sequences (LSTM),
    8 (GPT, transformer), 1024 samples (DeepFM).

    ``gpt_dgc`` needs ``gpt_model`` (see :data:`GPTBuilder`), called with
    :data:`GPT_CONFIG` updated by ``gpt_config``. ``transformer`` trains on
    the full next-token loss (every position through the 100k-way softmax).
    """
    if name == "lstm":
        return _lstm_workload(batch or 32, seq_len, seed, max_tokens)
    if name == "deepfm":
        return _deepfm_workload(batch or 1024, seed)
    if name == "gpt_dgc":
        if gpt_model is None:
            raise ValueError(
                "the gpt_dgc workload needs gpt_model, a builder of a GPT-style model "
                "(thrifty.zen.benchmark passes thrifty.bench.models' GPT)"
            )
        config = {**GPT_CONFIG, **(gpt_config or {})}
        return _gpt_workload(batch or 8, seq_len, seed, max_tokens, dgc_ratio, config, gpt_model)
    if name == "transformer":
        return _transformer_workload(batch or 8, seq_len, seed, max_tokens)
    raise ValueError(f"unknown workload {name!r}; expected one of {(*WORKLOADS, 'transformer')}")


def simulate_index_sets(workload: Workload, workers: int, steps: int) -> list[list[Tensor]]:
    """Train ``steps`` data-parallel steps of ``workers`` workers in this process.

    Every worker computes its gradient on its own batch; the model then takes
    one SGD step with the mean gradient (sparse gradients summed sparse).
    Returns, per step, every worker's sorted unique non-zero rows.
    """
    params = [p for p in workload.model.parameters() if p.requires_grad]
    out = []
    for step in range(steps):
        sums: list[Tensor | None] = [None] * len(params)
        rows = []
        for worker in range(workers):
            for p in params:
                p.grad = None
            workload.loss(worker, workers, step).backward()
            rows.append(workload.sparse_rows(worker))
            for i, p in enumerate(params):
                if p.grad is not None:
                    g = sums[i]
                    sums[i] = p.grad.clone() if g is None else g + p.grad
        with torch.no_grad():
            for p, g in zip(params, sums, strict=True):
                if g is not None:
                    p.add_(g.coalesce() if g.is_sparse else g, alpha=-workload.lr / workers)
        out.append(rows)
        for p in params:
            p.grad = None
    return out


# --------------------------------------------------------------------------- fixed densities


def _first_positions(stream: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """The distinct values of ``stream`` in order of first appearance, and those positions."""
    positions = torch.arange(stream.numel())
    first = torch.full((size,), stream.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, stream, positions, reduce="amin")
    seen = (first < stream.numel()).nonzero().squeeze(1)
    at, order = torch.sort(first[seen])
    return seen[order], at


def _first_distinct(stream: Tensor, count: int, size: int) -> Tensor:
    """The first ``count`` distinct values of ``stream`` (fewer if it has fewer), sorted."""
    values, _ = _first_positions(stream, size)
    return torch.sort(values[:count]).values


def _distinct_prefix_length(stream: Tensor, count: int, size: int) -> int:
    """Length of the shortest prefix of ``stream`` with ``count`` distinct values (or all of it)."""
    _, at = _first_positions(stream, size)
    if count <= 0:
        return 0
    return int(at[count - 1]) + 1 if count <= at.numel() else stream.numel()


def index_sets_at_density(
    name: str,
    workers: int,
    density: float,
    seed: int = 0,
    max_tokens: int = 2_000_000,
    **gpt_options: Any,
) -> tuple[list[Tensor], int, int]:
    """Every worker's non-zero rows at ``density``: ``(index sets, num_rows, row_numel)``.

    ``lstm``: the distinct tokens of the shortest prefix of the worker's
    ShareGPT shard that has ``density * V`` of them (the embedding-gradient
    rows of that batch); ``deepfm``: likewise over the worker's Zipf samples;
    ``transformer``: likewise with raw cl100k ids, the first
    :data:`TRANSFORMER_BACKWARD_WORKERS` workers' rows read from the Llama's
    embedding gradient (see :func:`_transformer_index_sets`); ``gpt_dgc``: the
    top ``density`` of the worker's first-step GPT gradient (DGC's first
    selection); ``uniform``: uniformly random rows of a 4M-element vector (the
    adversarial case, no overlap beyond chance, no skew). ``gpt_options``
    (``gpt_model``, needed; ``batch``, ``seq_len``, ``gpt_config``) go to
    :func:`make_workload`.
    """
    if name == "lstm":
        tokens = sharegpt_tokens(max_tokens)
        vocab = FrequencyVocabulary.fit(tokens)
        ranked = vocab.encode(tokens)
        count = round(density * vocab.size)
        shards = [_shard(ranked, w, workers) for w in range(workers)]
        sets = [_first_distinct(shard, count, vocab.size) for shard in shards]
        return _checked(sets, count, name), vocab.size, 64
    if name == "deepfm":
        rows = sum(DEEPFM_FIELDS)
        count = round(density * rows)
        data = ZipfFeatures(seed=seed)
        sets = []
        for w in range(workers):
            gen = torch.Generator().manual_seed(seed * 7919 + w)
            seen: list[Tensor] = []
            distinct = 0
            for _ in range(200):
                values, _ = data.sample(2048, gen)
                seen.append((values + data.offsets).reshape(-1))
                distinct = torch.unique(torch.cat(seen)).numel()
                if distinct >= count:
                    break
            sets.append(_first_distinct(torch.cat(seen), count, rows))
        return _checked(sets, count, name), rows, 16
    if name == "transformer":
        sets = _transformer_index_sets(workers, density, seed, max_tokens)
        return sets, CL100K_VOCAB, TRANSFORMER_CONFIG["hidden_size"]
    if name == "gpt_dgc":
        sets, numel = _gpt_dgc_index_sets(workers, density, seed, max_tokens, gpt_options)
        return sets, numel, 1
    if name == "uniform":
        rows = UNIFORM_ROWS
        count = round(density * rows)
        sets = []
        for w in range(workers):
            gen = torch.Generator().manual_seed(seed * 7919 + 31 * w + 1)
            sets.append(sample_indices(rows, count, gen, "cpu"))
        return sets, rows, 1
    raise ValueError(f"unknown workload {name!r}; expected one of {DENSITY_SOURCES}")


def _transformer_index_sets(
    workers: int, density: float, seed: int, max_tokens: int
) -> list[Tensor]:
    """Rows of the Llama's embedding gradient over each worker's shortest prefix at ``density``.

    1. Each worker's prefix is the shortest of its shard of the raw-id ShareGPT
       stream with ``round(density * V)`` distinct tokens; its rows are those
       tokens (:func:`_first_distinct`).
    2. For the first :data:`TRANSFORMER_BACKWARD_WORKERS` workers the Llama
       runs forward and backward over the prefix
       (:func:`_transformer_prefix_rows`), and the non-zero rows of its input
       embedding's gradient must be exactly those rows, or this raises.
       Checking every worker took 155 s instead of 8 s at 256 workers and
       density 0.01 on one thread here, for rows that step 1 already gives.
    """
    tokens = sharegpt_tokens(max_tokens)
    count = round(density * CL100K_VOCAB)
    checked = min(workers, TRANSFORMER_BACKWARD_WORKERS)
    model = _transformer_model(seed) if checked else None
    sets = []
    for w in range(workers):
        shard = _shard(tokens, w, workers)
        rows = _first_distinct(shard, count, CL100K_VOCAB)
        if model is not None and w < checked:
            length = _distinct_prefix_length(shard, count, CL100K_VOCAB)
            from_gradient = _transformer_prefix_rows(model, shard, length)
            if not torch.equal(from_gradient, rows):
                raise RuntimeError(
                    f"transformer worker {w}: the embedding gradient has {from_gradient.numel()} "
                    f"non-zero rows over a {length}-token prefix, expected its {rows.numel()} "
                    "distinct tokens"
                )
        sets.append(rows)
    return _checked(sets, count, "transformer")


def _transformer_prefix_rows(model: nn.Module, shard: Tensor, length: int) -> Tensor:
    """Non-zero rows of ``model``'s input-embedding gradient after backward over ``shard[:length]``.

    The prefix is cut into sequences of :data:`TRANSFORMER_SEQ_LEN` tokens (the
    last one shorter). Each sequence's loss is the next-token prediction at its
    final position (the target: the token after it in the shard, wrapping at
    the shard's end); the losses are summed, :data:`TRANSFORMER_BATCH`
    sequences per backward, gradients accumulated. Only the last position goes
    through the 100k-way softmax (at every position it was 60x slower here):
    every earlier position reaches it through causal attention, so the rows
    with a non-zero gradient are the same. Only the input embedding's
    gradient is computed.
    """
    embedding = model.get_input_embeddings().weight
    for p in model.parameters():
        p.requires_grad_(p is embedding)
    embedding.grad = None
    seq = TRANSFORMER_SEQ_LEN
    full = length // seq
    ends = torch.arange(1, full + 1) * seq
    pieces: list[tuple[Tensor, Tensor]] = [
        (shard[: full * seq].view(full, seq), shard[ends % shard.numel()])
    ]
    if length > full * seq:
        tail = shard[full * seq : length].view(1, -1)
        pieces.append((tail, shard[length % shard.numel()].view(1)))
    for inputs, targets in pieces:
        for start in range(0, inputs.shape[0], TRANSFORMER_BATCH):
            batch = slice(start, start + TRANSFORMER_BATCH)
            logits = model(input_ids=inputs[batch], logits_to_keep=1).logits[:, -1]
            F.cross_entropy(logits, targets[batch], reduction="sum").backward()
    return _dense_embedding_rows(embedding)


GPT_CACHED_WORKERS = 16
"""Up to this many workers, ``gpt_dgc``'s first-step gradients are kept for every density.

Beyond, each worker's gradient lives only until its top-k set is taken: 256
workers' float32 |gradient| of 5.3M entries would be 5.4 GB.
"""

_GPT_GRADIENTS: dict[str, list[Tensor]] = {}


def _gpt_dgc_index_sets(
    workers: int, density: float, seed: int, max_tokens: int, options: dict[str, Any]
) -> tuple[list[Tensor], int]:
    """The top ``density`` of each worker's first-step |gradient|, and the gradient's length."""
    magnitudes: Iterable[Tensor]
    if workers <= GPT_CACHED_WORKERS:
        magnitudes = _gpt_first_gradients(workers, seed, max_tokens, options)
    else:
        magnitudes = _gpt_first_step_magnitudes(workers, seed, max_tokens, options)
    block, numel = None, 0
    for w, m in enumerate(magnitudes):
        numel = m.numel()
        count = max(1, round(density * numel))
        if block is None:
            # One block for every set: small tensors kept between the workers' large
            # transient gradients fragment glibc's heap (peak RSS 3.1 GB at 256 workers,
            # 0.66 GB with the block).
            block = torch.empty(workers, count, dtype=torch.int64)
        block[w] = torch.sort(torch.topk(m, count, sorted=False).indices).values
    if block is None:
        return [], numel
    return [row.clone() for row in block], numel  # each its own storage, as other sources


def _gpt_first_gradients(
    workers: int, seed: int, max_tokens: int, options: dict[str, Any]
) -> list[Tensor]:
    """|gradient| of every worker's first GPT step; kept, so all densities share one pass."""
    key = repr((workers, seed, max_tokens, sorted(options.items())))
    if key not in _GPT_GRADIENTS:
        out = list(_gpt_first_step_magnitudes(workers, seed, max_tokens, options))
        _GPT_GRADIENTS.clear()  # one model's worth at a time
        _GPT_GRADIENTS[key] = out
    return _GPT_GRADIENTS[key]


def _gpt_first_step_magnitudes(
    workers: int, seed: int, max_tokens: int, options: dict[str, Any]
) -> Iterator[Tensor]:
    """|gradient| of each worker's first GPT step, one worker at a time."""
    workload = make_workload("gpt_dgc", seed=seed, max_tokens=max_tokens, **options)
    params = [p for p in workload.model.parameters() if p.requires_grad]
    for w in range(workers):
        for p in params:
            p.grad = None
        workload.loss(w, workers, 0).backward()
        yield torch.cat([p.grad.reshape(-1) for p in params]).abs()  # type: ignore[union-attr]


def _checked(sets: list[Tensor], count: int, name: str) -> list[Tensor]:
    short = [i for i, s in enumerate(sets) if s.numel() < count]
    if short:
        log.warning(
            "%s: workers %s have fewer than %d distinct rows in their data", name, short, count
        )
    return sets
