"""One short run on a lent GPU: does every CUDA path work, and how fast is it?

Prepared for a machine with one NVIDIA GPU (H100/H200 class), to finish in
under 8 minutes. Each step runs on its own; a step that fails is recorded with
its error and the next one still runs, so one broken path does not hide the
others. Steps:

1. ``kernels``: every compressor's compress + decompress GB/s at 1M, 16M and
   64M float32 elements on the GPU, beside a device-to-device copy
   (``torch.clone``) timed in the same run.
2. ``sync_nccl``: ``GradientSync`` on NCCL at world size 1 (the GPT benchmark
   model on the GPU), fp32 / Top-k / PowerSGD, seconds per iteration.
3. ``sync_gloo_cuda``: the same on gloo with CUDA tensors at world size 2 (two
   ranks sharing the GPU), plus the DDP compression hook.
4. ``marconi``: a random-weight hybrid at the Marconi paper's 7B shape (Bamba:
   24 Mamba2 + 4 attention layers, d = 4096, bf16) serving multi-turn ShareGPT
   requests with and without the prefix cache: TTFT P50/P95, hit tokens, and
   whether the first output token matched the uncached run.

Usage::

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --smoke         # tiny sizes on CPU (tests use this)

Writes ``results/gpu_check.json`` (``$OUT/gpu_check.json`` too when ``OUT`` is
set, as on the lent machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from thrifty.bench.launch import run_ranks
from thrifty.bench.results import machine_info, write_json

MB = 1 << 20


def _step(name: str, fn: Callable[[], Any], report: dict[str, Any]) -> None:
    """Run one step; record its result or its error, and how long it took."""
    started = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        report[name] = {"ok": True, "result": fn()}
    except Exception as exc:  # a failed step must not hide the next ones
        report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        report[name]["traceback"] = traceback.format_exc()[-4000:]
        print(report[name]["traceback"], file=sys.stderr, flush=True)
    report[name]["seconds"] = round(time.perf_counter() - started, 2)
    print(f"   {name}: ok={report[name]['ok']} in {report[name]['seconds']} s", flush=True)


# --------------------------------------------------------------------------- 1. kernels


def kernels(device: str, smoke: bool) -> dict[str, Any]:
    from thrifty.bench.kernels import run_kernel_benchmark

    sizes = (4096,) if smoke else (1 << 20, 16 << 20, 64 << 20)
    payload = run_kernel_benchmark(sizes, None, 5, None, device, budget_s=0.5, plot=False)
    return {
        "device": payload["device"],
        "clone": payload["clone"],
        "rows": [
            {k: r[k] for k in ("compressor", "numel", "GB_per_s", "vs_clone") if k in r}
            for r in payload["rows"]
        ],
    }


# --------------------------------------------------------------------------- 2-3. GradientSync


def _sync_rank(device_kind: str, model_name: str, iters: int) -> dict[str, Any]:
    """One rank: GradientSync per compressor (and the DDP hook), seconds per iteration."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from thrifty.bench.models import build_model
    from thrifty.bench.training import BATCH, training_loss
    from thrifty.sync import GradientSync
    from thrifty.sync.ddp_hook import CompressionHookState, compression_hook

    rank = dist.get_rank()
    device = torch.device(
        f"cuda:{rank % torch.cuda.device_count()}" if device_kind == "cuda" else "cpu"
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    batch_options = dict(BATCH[model_name])
    out: dict[str, Any] = {"backend": dist.get_backend(), "device": str(device)}
    configs: list[tuple[str, str | None, dict[str, Any], bool]] = [
        ("fp32", None, {}, False),
        ("topk 1%", "topk", {"ratio": 0.01}, False),
        ("powersgd r4", "powersgd", {"rank": 4}, False),
        ("DDP + thrifty hook topk", "topk", {"ratio": 0.01}, True),
    ]
    for label, compressor, options, hook in configs:
        torch.manual_seed(0)
        model = build_model(model_name).to(device)
        x, y = model.example_batch(**batch_options, generator=torch.Generator().manual_seed(rank))
        batch = (x.to(device), y.to(device))
        if hook:
            wrapped = DDP(model, device_ids=[device] if device.type == "cuda" else None)
            wrapped.register_comm_hook(
                CompressionHookState(compressor, **options), compression_hook
            )
        else:
            wrapped = model
            GradientSync(model, compressor, **options)
        opt = torch.optim.SGD(wrapped.parameters(), lr=1e-3)

        def step(wrapped: Any = wrapped, opt: Any = opt, batch: Any = batch) -> None:
            opt.zero_grad(set_to_none=True)
            training_loss(model_name, wrapped, batch).backward()
            opt.step()

        try:
            for _ in range(2):
                step()
            times = []
            for _ in range(iters):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            out[label] = {"median_s": statistics.median(times), "min_s": min(times)}
        except Exception as exc:  # record it, try the next configuration
            out[label] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return out


def sync(backend: str, world_size: int, device_kind: str, smoke: bool) -> list[dict[str, Any]]:
    model_name = "digits" if smoke else "gpt"
    return run_ranks(
        _sync_rank,
        world_size,
        device_kind,
        model_name,
        2 if smoke else 10,
        backend=backend,
        timeout=300,
    )


# --------------------------------------------------------------------------- 4. Marconi


def marconi(device_kind: str, smoke: bool) -> dict[str, Any]:
    import transformers

    from thrifty.marconi import ModelSpec, build_cache
    from thrifty.marconi.engine import HybridEngine, hybrid_config
    from thrifty.marconi.sharegpt import sharegpt_trace

    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if device_kind == "cuda" else "cpu")
    if smoke:
        shape = {"vocab_size": 512, "hidden_size": 32, "num_layers": 4, "attention_period": 4}
        dtype, sessions, max_input = torch.float32, 1, 512
    else:  # the paper's 7B hybrid: 24 Mamba2 + 4 attention layers, d = 4096
        shape = {
            "vocab_size": 100_352,  # cl100k ids fit
            "hidden_size": 4096,
            "num_layers": 28,
            "attention_period": 7,
            "num_heads": 32,
            "mamba_head_dim": 64,
            "d_state": 128,
            "chunk_size": 256,
            "initializer_range": 0.02,
        }
        dtype, sessions, max_input = torch.bfloat16, 4, 4096
    config = hybrid_config("bamba", **shape)
    built = time.perf_counter()
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    build_s = time.perf_counter() - built
    params = sum(p.numel() for p in model.parameters())
    trace = sharegpt_trace(num_sessions=sessions, min_turns=3, max_input_tokens=max_input)
    vocab = shape["vocab_size"]
    requests = [
        ([t % vocab for t in r.input_tokens], [t % vocab for t in r.output_tokens][:8])
        for r in trace.requests
    ]
    requests = requests[: 3 if smoke else 24]
    spec = ModelSpec.from_hf_config(model.config)
    engines = {
        "none": HybridEngine(model),
        "marconi": HybridEngine(model, build_cache("marconi", 40 << 30, spec)),
    }
    engines["none"].serve(requests[0][0][:64], forced_output=[1])  # warm-up: kernels, allocator
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    first: list[int] = []
    for i, (inp, out) in enumerate(requests):
        for name, engine in engines.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            r = engine.serve(inp, forced_output=out)
            if name == "none":
                first.append(r.output_ids[0])
            rows[name].append(
                {
                    "input_tokens": len(inp),
                    "hit_tokens": r.hit_tokens,
                    "ttft_ms": 1e3 * r.ttft_s,
                    "same_first_token": r.output_ids[0] == first[i],
                }
            )

    def summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
        ttft = sorted(r["ttft_ms"] for r in recs)
        return {
            "requests": len(recs),
            "ttft_p50_ms": statistics.median(ttft),
            "ttft_p95_ms": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
            "ttft_mean_ms": statistics.fmean(ttft),
            "hit_tokens": sum(r["hit_tokens"] for r in recs),
            "input_tokens": sum(r["input_tokens"] for r in recs),
            "first_token_mismatches": sum(not r["same_first_token"] for r in recs),
        }

    return {
        "model": {"arch": "bamba", **shape, "dtype": str(dtype), "parameters": params},
        "build_s": build_s,
        "paper_p95_ttft_ms": 617,
        "summary": {name: summary(recs) for name, recs in rows.items()},
        "requests": rows,
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (no GPU needed)")
    parser.add_argument("--steps", default="kernels,sync_nccl,sync_gloo_cuda,marconi")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device here: run on the GPU machine, or pass --smoke", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    steps: dict[str, Callable[[], Any]] = {
        "kernels": lambda: kernels(device, args.smoke),
        # NCCL needs a GPU; the smoke run takes the same path on gloo.
        "sync_nccl": lambda: sync("gloo" if args.smoke else "nccl", 1, device, args.smoke),
        "sync_gloo_cuda": lambda: sync("gloo", 2, device, args.smoke),
        "marconi": lambda: marconi(device, args.smoke),
    }
    chosen = [s for s in args.steps.split(",") if s]
    unknown = [s for s in chosen if s not in steps]
    if unknown:
        parser.error(f"unknown steps {unknown}; expected some of {list(steps)}")
    report: dict[str, Any] = {
        "smoke": args.smoke,
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "load_average_before": os.getloadavg(),
        "machine": machine_info(),
    }
    started = time.perf_counter()
    for name in chosen:
        _step(name, steps[name], report)
    report["total_s"] = round(time.perf_counter() - started, 1)
    path = write_json("gpu_check", report)
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / "gpu_check.json")
    print(f"wrote {path} in {report['total_s']} s")
    return 0 if all(report[name]["ok"] for name in chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
