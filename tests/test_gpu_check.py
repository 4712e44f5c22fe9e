"""The prepared GPU check runs end to end (tiny sizes on CPU), and the CUDA paths where a GPU is.

``benchmarks/gpu_check.py`` is run on a lent GPU only now and then; its
``--smoke`` mode takes every step's code path on CPU so that it does not rot
in between. The CUDA tests run the compressors and GradientSync on CUDA
tensors when this machine has a GPU, and skip with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thrifty.bench import run_ranks
from thrifty.compressors import available_compressors, get_compressor

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = "no CUDA device on this machine (benchmarks/gpu_check.py runs these paths on a lent GPU)"


def test_gpu_check_smoke_runs_every_step(tmp_path: Path) -> None:
    env = {**os.environ, "THRIFTY_RESULTS": str(tmp_path)}
    env.pop("OUT", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for step in ("kernels", "sync_nccl", "sync_gloo_cuda", "marconi"):
        assert report[step]["ok"], report[step]
    assert {r["compressor"] for r in report["kernels"]["result"]["rows"]} == set(
        available_compressors()
    )
    ranks = report["sync_gloo_cuda"]["result"]
    assert len(ranks) == 2 and all(r["topk 1%"]["median_s"] > 0 for r in ranks)
    summary = report["marconi"]["result"]["summary"]
    assert summary["none"]["hit_tokens"] == 0 and summary["marconi"]["first_token_mismatches"] == 0


def test_gpu_check_without_a_gpu_says_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "no CUDA device" in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("name", available_compressors())
def test_compressor_round_trip_on_cuda(name: str) -> None:
    x = torch.randn(4096, device="cuda")
    compressor = get_compressor(name)
    payload = compressor.compress(x, key="w")
    assert all(t.device.type == "cuda" for t in payload)
    out = compressor.aggregate([payload], x.numel(), key="w")
    assert out.device.type == "cuda" and out.shape == x.shape and torch.isfinite(out).all()


def _cuda_sync_rank() -> float:
    """Rank r trains on (r + 1) * base; the synced grad must be the mean over ranks."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from thrifty.sync import GradientSync

    torch.manual_seed(0)
    base = torch.randn(16, 32, device="cuda")
    target = torch.zeros(16, 8, device="cuda")
    model = nn.Linear(32, 8).cuda()
    local = nn.Linear(32, 8).cuda()
    local.load_state_dict(model.state_dict())
    GradientSync(model)
    F.mse_loss(model(base * (dist.get_rank() + 1)), target).backward()
    world = dist.get_world_size()
    for r in range(world):  # the same mean, computed here without communication
        F.mse_loss(local(base * (r + 1)), target).div(world).backward()
    return float((model.weight.grad - local.weight.grad).abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_gradient_sync_on_cuda_tensors_matches_the_mean() -> None:
    assert max(run_ranks(_cuda_sync_rank, 2)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_marconi_engine_on_cuda_matches_no_cache() -> None:
    pytest.importorskip("transformers")
    from thrifty.marconi import ModelSpec, build_cache
    from thrifty.marconi.engine import HybridEngine, build_model

    model = build_model("bamba", vocab_size=64)
    spec = ModelSpec.from_hf_config(model.config)
    reference = HybridEngine(model, device="cuda")
    cached = HybridEngine(model, build_cache("marconi", 10**8, spec), device="cuda")
    ids = [i % 64 for i in range(40)]
    for _ in range(2):  # the second turn = first input + its output + a new message
        want = reference.serve(ids, max_new_tokens=4)
        got = cached.serve(ids, max_new_tokens=4)
        assert got.output_ids == want.output_ids
        ids = [*ids, *want.fed_ids, 5, 6, 7]
    assert cached.device.type == "cuda" and got.hit_tokens > 0
