"""The toy hybrid the Marconi policy tests compute their expected hits by hand with.

10 bytes of KV per token and 1000-byte checkpoints (200 conv + 800 recurrent),
prefill FLOPs = 100 L + L^2: small round numbers, so a test can say exactly
which states fit a budget.
"""

from __future__ import annotations

from thrifty.marconi.cache import PrefixCache
from thrifty.marconi.model import LayerCost, ModelSpec

LAYERS = (
    LayerCost("attention", kv_bytes_per_token=10, linear_flops=60.0, quadratic_flops=1.0),
    LayerCost("ssm", conv_state_bytes=200, recurrent_state_bytes=800, linear_flops=40.0),
)
TOY = ModelSpec("toy", LAYERS)


def ckpt_depths(cache: PrefixCache) -> list[int]:
    """Depths (token counts) of the nodes that hold an SSM checkpoint."""
    return sorted(n.depth for n in cache.tree.nodes() if n.checkpoint is not None)
