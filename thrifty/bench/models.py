"""Small real models for the gradient-compression tests and benchmarks.

Compression results only mean something on gradients with a real shape mix:
many small BatchNorm and bias tensors next to a few large conv or embedding
matrices. So the benchmarks train these three plain nets, each readable top to
bottom in the nanoGPT manner, on data that is random or ships inside a package:

- ``ResNetCNN``: a ResNet-18-style CNN for 32x32 images, ~9.8M parameters.
- ``GPT``: a nanoGPT-like decoder-only transformer, ~19.2M parameters.
- ``DigitsCNN``: a tiny CNN for scikit-learn's 8x8 digits, ~38K parameters; it
  trains to >= 95% test accuracy in seconds, so tests can check that a
  compressor still lets a model learn.

Every model has ``example_batch`` returning random inputs and targets of the
right shape and dtype, because benchmarks time iterations and the data content
does not matter there. ``build_model(name)`` picks one by name for the CLI.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GPT",
    "MODEL_NAMES",
    "DigitsCNN",
    "ResNetCNN",
    "build_model",
    "count_parameters",
    "load_digits_split",
    "train_digits_shard",
    "training_loss",
]


# ---------------------------------------------------------------------------
# ResNet-style CNN (CIFAR-sized inputs)
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            # The shortcut must match the main path's shape to be added to it.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """ResNet-18 layout for 32x32 inputs: 3x3 stem, four stages of two basic blocks.

    Stage widths are ``width, 2*width, 4*width, 8*width``; the parameter count
    grows with ``width**2``. The default ``width=60`` gives ~9.8M parameters
    (the classic ``width=64`` gives 11.2M), a realistic mix of large conv
    kernels and many small BatchNorm tensors for gradient compression.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 60,
        in_channels: int = 3,
        blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        if width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"width, num_classes and in_channels must be >= 1, got "
                f"{width=}, {num_classes=}, {in_channels=}"
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = 32

        # CIFAR-style stem: a 3x3 conv and no max-pool, since 32x32 is already small.
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages = []
        channels = width
        for i, num_blocks in enumerate(blocks_per_stage):
            out_channels = width * 2**i
            stride = 1 if i == 0 else 2  # each later stage halves the resolution
            blocks = []
            for j in range(num_blocks):
                blocks.append(BasicBlock(channels, out_channels, stride if j == 0 else 1))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, num_classes)``."""
        x = self.stages(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)

    def example_batch(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random images ``(B, C, 32, 32)`` and labels ``(B,)`` for timing iterations."""
        x = torch.randn(
            batch_size, self.in_channels, self.image_size, self.image_size, generator=generator
        )
        y = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return x.to(device), y.to(device)


# ---------------------------------------------------------------------------
# GPT-style decoder-only transformer (nanoGPT-like)
# ---------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the past."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, n_embd = x.shape
        q, k, v = self.qkv(x).split(n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (
            t.view(batch, seq_len, self.n_head, n_embd // self.n_head).transpose(1, 2)
            for t in (q, k, v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(batch, seq_len, n_embd)
        return self.proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward: expand 4x, GELU, project back."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only language model: token + position embeddings, pre-LN blocks, tied LM head.

    The default config (vocab 8192, 9 layers, 6 heads, width 384, context 256)
    has ~19.2M parameters, a quarter of them in the embedding: the large,
    sparsely-updated gradient that compressors must handle well. The LM head
    shares the token-embedding matrix, as in GPT-2.
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        n_layer: int = 9,
        n_head: int = 6,
        n_embd: int = 384,
        block_size: int = 256,
    ) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd must be divisible by n_head, got {n_embd=} and {n_head=}")
        if min(vocab_size, n_layer, n_head, n_embd, block_size) < 1:
            raise ValueError(
                f"all sizes must be >= 1, got {vocab_size=}, {n_layer=}, {n_head=}, "
                f"{n_embd=}, {block_size=}"
            )
        self.vocab_size = vocab_size
        self.block_size = block_size

        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying

        # GPT-2 init: N(0, 0.02), with residual projections scaled down by
        # sqrt(2 * n_layer) so the residual stream does not grow with depth.
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return logits ``(B, T, vocab_size)`` and mean cross-entropy (None if no targets)."""
        seq_len = idx.shape[1]
        if seq_len > self.block_size:
            raise ValueError(
                f"sequence length {seq_len} exceeds block_size {self.block_size}; "
                "crop the input or build the model with a larger block_size"
            )
        pos = torch.arange(seq_len, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def example_batch(
        self,
        batch_size: int,
        seq_len: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random token ids ``(B, T)`` and next-token targets ``(B, T)``; T defaults to block_size.

        Targets are the inputs shifted by one, as in real LM training.
        """
        seq_len = self.block_size if seq_len is None else seq_len
        if not 1 <= seq_len <= self.block_size:
            raise ValueError(f"seq_len must be in [1, {self.block_size}], got {seq_len}")
        tokens = torch.randint(0, self.vocab_size, (batch_size, seq_len + 1), generator=generator)
        idx, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        return idx.to(device), targets.to(device)


# ---------------------------------------------------------------------------
# Tiny CNN for scikit-learn's 8x8 digits
# ---------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """Two 3x3 convs, one 2x2 max-pool and two linear layers for 8x8 digits (~38K parameters).

    Small enough that a test can train it to >= 95% accuracy in a few seconds,
    so a compressor's effect on learning is checked, not only on bytes.
    """

    def __init__(self, num_classes: int = 10, channels: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc1 = nn.Linear(2 * channels * 4 * 4, hidden)  # 8x8 pooled to 4x4
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits ``(B, num_classes)`` for images ``(B, 1, 8, 8)``."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)

    def example_batch(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random images in [0, 1] ``(B, 1, 8, 8)`` and labels ``(B,)``."""
        x = torch.rand(batch_size, 1, 8, 8, generator=generator)
        y = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return x.to(device), y.to(device)


def load_digits_split(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)`` from scikit-learn's digits (1797 images).

    Images are float32 ``(N, 1, 8, 8)`` scaled from 0..16 to [0, 1]; labels are
    int64. The split is a seeded permutation, so the same seed gives the same
    disjoint split on every machine. The data ships inside scikit-learn (no
    download).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "load_digits_split needs scikit-learn; install it with "
            "`pip install 'thrifty[dev]'` or `pip install scikit-learn`"
        ) from exc

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    num_test = round(len(y) * test_fraction)
    test_idx, train_idx = order[:num_test], order[num_test:]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# ---------------------------------------------------------------------------
# Lookup by name
# ---------------------------------------------------------------------------

_MODELS: dict[str, type[nn.Module]] = {"cnn": ResNetCNN, "gpt": GPT, "digits": DigitsCNN}
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def train_digits_shard(
    model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, batch_size: int = 64
) -> float:
    """Train on this rank's shard of the digits (rank::world) and return test accuracy.

    Batches are drawn with a per-rank generator, as each rank of a
    data-parallel job sees different data; works single-process too.
    """
    rank, n = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    x_train, y_train, x_test, y_test = load_digits_split()
    x_train, y_train = x_train[rank::n], y_train[rank::n]
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (batch_size,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a model by its short name (``"cnn"``, ``"gpt"``, ``"digits"``), passing kwargs on."""
    try:
        model_cls = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {list(MODEL_NAMES)}") from None
    return model_cls(**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; shared (tied) tensors count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def training_loss(
    model_name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The loss of one of this module's models (by :data:`MODEL_NAMES` name) on ``batch``."""
    x, y = batch
    if model_name == "gpt":
        return model(x, y)[1]
    return F.cross_entropy(model(x), y)
