"""Data substrate: real text for the systems (ShareGPT + the cl100k tokenizer)."""

from __future__ import annotations

from thrifty.data.sharegpt import (
    ShareGPTReader,
    cl100k_tokenizer,
    sharegpt_path,
    sharegpt_token_ids,
)

__all__ = ["ShareGPTReader", "cl100k_tokenizer", "sharegpt_path", "sharegpt_token_ids"]
