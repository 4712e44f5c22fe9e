"""thrifty: LLM training and serving that spend less network, recomputation and lost work."""

from __future__ import annotations

__version__ = "0.1.0"
