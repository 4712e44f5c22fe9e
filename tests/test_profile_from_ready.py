"""A profile from ready times observed while training: order, real dtypes, unused tensors."""

from __future__ import annotations

import torch

from thrifty.sync import Strategy
from thrifty.sync.profile import profile_from_ready_times, ready_order


def test_profile_keeps_each_tensors_dtype_and_backward_order() -> None:
    params = {
        "a": torch.zeros(10, dtype=torch.float32),
        "b": torch.zeros(20, dtype=torch.float16),
        "unused": torch.zeros(5, dtype=torch.bfloat16),
        "c": torch.zeros(30, dtype=torch.float64),
    }
    ready = {"a": [0.3, 0.31, 0.9], "b": [0.1, 0.12, 0.11], "c": [0.2, 0.2, 0.2], "unused": []}
    profile = profile_from_ready_times(params, ready, [Strategy.make("topk", ratio=0.1)], 4)
    assert profile.names == ["b", "c", "a", "unused"]  # by median ready; never-ready last
    assert [t.dtype for t in profile.tensors] == ["float16", "float64", "float32", "bfloat16"]
    assert [t.numel for t in profile.tensors] == [20, 30, 10, 5]
    assert profile.tensors[0].ready == 0.11 and profile.tensors[2].ready == 0.31
    assert profile.tensors[-1].ready == profile.backward == 0.31  # ready when backward ends
    assert profile.world_size == 4 and list(profile.costs) == [
        Strategy.make("topk", ratio=0.1).cost_key()
    ]
    assert ready_order(ready, list(params)) == profile.names
