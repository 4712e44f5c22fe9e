"""Lazarus failure detection under load: side-by-side jobs, nobody killed, count false failures.

    python benchmarks/lazarus_false_failures.py --jobs 2 --workers 5 --seconds 600

Starts ``--jobs`` independent Lazarus jobs (a coordinator process and
``--workers`` worker processes each, every worker a tiny Hugging Face Mixtral
trained with :class:`thrifty.lazarus.Lazarus` and default
:class:`~thrifty.lazarus.LazarusOptions`) on this machine at once, so that
on 2 cores every process is starved most of the time. Nobody is killed: every
reconfiguration a worker records is a false failure. After ``--seconds`` the
script reads each worker's last report, then kills everything, and writes
``results/lazarus_false_failures.json`` with the load average before the start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(report: Path) -> None:
    """One member: train until killed, rewriting its report every 10 committed steps."""
    import torch
    import transformers  # optional: [lazarus]

    from thrifty.lazarus import Lazarus, LazarusOptions

    config = transformers.MixtralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=6,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    mgr = Lazarus(
        model,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        LazarusOptions(slots_per_rank=3),
    )
    started = time.time()
    while True:
        g = torch.Generator().manual_seed(mgr.committed_steps * 1000 + mgr.rank)
        x = torch.randint(0, 512, (2, 32), generator=g)

        def closure(x: torch.Tensor = x) -> torch.Tensor:
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            return loss

        mgr.step(closure)
        if mgr.committed_steps % 10 == 0:
            record = {
                "member": mgr.member_id,
                "steps": mgr.committed_steps,
                "seconds": time.time() - started,
                "members": list(mgr.members),
                "reconfigurations": [r.kind for r in mgr.report.reconfigurations],
            }
            tmp = report.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--worker-report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_report is not None:
        worker(args.worker_report)
        return
    load = os.getloadavg()
    run_dir = args.out / "lazarus_false_failures"
    run_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        for job in range(args.jobs):
            port = _free_port()
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "thrifty.lazarus.coordinator", "--port", str(port)]
                )
            )
            time.sleep(1.0)
            for rank in range(args.workers):
                env = dict(
                    os.environ,
                    RANK=str(rank),
                    WORLD_SIZE=str(args.workers),
                    THRIFTY_LAZARUS_STORE=f"127.0.0.1:{port}",
                    OMP_NUM_THREADS="1",
                )
                report = run_dir / f"job{job}_rank{rank}.json"
                report.unlink(missing_ok=True)
                cmd = [sys.executable, __file__, "--worker-report", str(report)]
                procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.time() + args.seconds
        while time.time() < deadline:
            time.sleep(5.0)
            dead = [p.args for p in procs if p.poll() is not None]
            if dead:
                raise SystemExit(f"a process ended on its own: {dead[0]}")
        reports = []
        for job in range(args.jobs):
            for rank in range(args.workers):
                path = run_dir / f"job{job}_rank{rank}.json"
                reports.append({"job": job, "rank": rank, **json.loads(path.read_text())})
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
    false = sum(len(r["reconfigurations"]) for r in reports)
    result = {
        "load_average_before": load,
        "jobs": args.jobs,
        "workers": args.workers,
        "seconds": args.seconds,
        "false_failures": false,
        "steps": {f"job{r['job']}": r["steps"] for r in reports if r["rank"] == 0},
        "reports": reports,
    }
    path = args.out / "lazarus_false_failures.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"false failures: {false} in {args.seconds:.0f} s ({result['steps']}); wrote {path}")


if __name__ == "__main__":
    main()
