"""One Lazarus worker: a tiny Hugging Face MoE model on ShareGPT, trained under the manager.

This is the script every worker of ``thrifty lazarus train`` runs (through
:mod:`thrifty.lazarus.launch`), one ``torchrun`` agent per worker or per
node. It is an ordinary user loop around :class:`~thrifty.lazarus.manager.Lazarus`;
nothing in it knows about failures. Started by hand on each node::

    python -m thrifty.lazarus.coordinator --host 10.0.0.1 --port 29600 &   # once
    THRIFTY_LAZARUS_STORE=10.0.0.1:29600 torchrun --standalone --nproc-per-node 2 \\
        --max-restarts 3 -m thrifty.lazarus.train --first-member 2 --world-size 4 \\
        --run-dir /shared/run --steps 200

``--first-member`` is the member id of the node's first local worker
(``LOCAL_RANK`` is added): torchrun's own ``RANK``/``WORLD_SIZE`` describe
only its node under ``--standalone``, while the job's membership is the
coordinator's. When a worker dies its agent starts it again; the new process
finds the job running and joins as a new member (the dead id is marked gone
in the store for good), receiving dense state and expert replicas.

What it writes into ``--run-dir`` (the launcher and tests read it):
``pids/member<id>.json`` once the worker is in the job (its pid, node and
restart count: what a test kills), ``step`` (the committed step, rewritten
by the first member every step) and, at the end, ``reports/member<id>.json``
(its :class:`~thrifty.lazarus.manager.LazarusReport`, losses per step and
final replica placement).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thrifty.data import sharegpt_token_ids
from thrifty.lazarus.coordinator import STORE_ENV, connect_store
from thrifty.lazarus.manager import Lazarus, LazarusError, LazarusOptions

__all__ = ["MODELS", "TrainJob", "build_model", "main", "run_worker"]

log = logging.getLogger(__name__)

MODELS = ("mixtral", "qwen3_moe", "olmoe")


@dataclass(frozen=True)
class TrainJob:
    """What every worker trains; the same on all of them (it travels as command-line flags).

    Args:
        model: the Hugging Face MoE family: ``mixtral``, ``qwen3_moe`` or ``olmoe``.
        steps: committed optimizer steps to train.
        slots: expert replica slots per worker per MoE layer (``members x slots``
            must cover ``experts`` after every failure).
        experts / top_k / layers / hidden: the tiny model's shape.
        fault_tolerance: replicas per expert on distinct workers (Eq. 1's ``f``).
        seq / batch: tokens per sequence, sequences per worker per step.
        lr: AdamW learning rate.
        tokens: ShareGPT tokens read (the vocabulary is cut to the tokens seen).
        reallocate_every / checkpoint_every: as in :class:`LazarusOptions`.
    """

    model: str = "mixtral"
    steps: int = 60
    slots: int = 3
    experts: int = 6
    top_k: int = 2
    layers: int = 2
    hidden: int = 64
    fault_tolerance: int = 2
    seq: int = 64
    batch: int = 4
    lr: float = 1e-3
    tokens: int = 50_000
    reallocate_every: int = 0
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r}: expected one of {', '.join(MODELS)}")
        for name in ("steps", "slots", "experts", "layers", "seq", "batch", "fault_tolerance"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k={self.top_k}: expected 1..experts (experts={self.experts})")
        if self.hidden < 8 or self.hidden % 4:
            raise ValueError(f"hidden={self.hidden}: expected a multiple of 4 heads, >= 8")
        if self.reallocate_every < 0 or self.checkpoint_every < 0:
            raise ValueError(
                f"reallocate_every={self.reallocate_every}, checkpoint_every="
                f"{self.checkpoint_every}: expected >= 0"
            )

    def argv(self) -> list[str]:
        """The worker's flags for these settings (:func:`main` parses them back)."""
        out = []
        for f in dataclasses.fields(self):
            out += [f"--{f.name.replace('_', '-')}", str(getattr(self, f.name))]
        return out


def build_model(job: TrainJob, vocab: int) -> nn.Module:
    """The tiny ``job.model`` causal LM, seeded: every worker builds the same one."""
    import transformers  # optional: [lazarus]

    common: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": job.hidden,
        "num_hidden_layers": job.layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": job.top_k,
        "max_position_embeddings": max(job.seq, 64),
    }
    if job.model == "mixtral":
        config = transformers.MixtralConfig(
            intermediate_size=2 * job.hidden, num_local_experts=job.experts, **common
        )
        cls = transformers.MixtralForCausalLM
    elif job.model == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            intermediate_size=2 * job.hidden,
            moe_intermediate_size=2 * job.hidden,
            num_experts=job.experts,
            norm_topk_prob=True,
            **common,
        )
        cls = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.OlmoeConfig(
            intermediate_size=2 * job.hidden,
            num_experts=job.experts,
            eos_token_id=None,
            pad_token_id=None,
            **common,
        )
        cls = transformers.OlmoeForCausalLM
    torch.manual_seed(0)
    return cls(config)


def _write(path: Path, payload: Any) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    tmp.rename(path)


def run_worker(job: TrainJob, run_dir: Path, member: int, world_size: int, store: str) -> None:
    """The user's loop: batches follow the committed step, the manager does the rest.

    A restarted worker passes the same ``member``; the manager sees the job
    running and makes it a joiner with a new id. A worker that starts after
    the job finished has nothing to do and returns.
    """
    text = torch.tensor(sharegpt_token_ids(job.tokens))
    vocab, tokens = torch.unique(text, return_inverse=True)  # same on every worker
    model = build_model(job, len(vocab))
    options = LazarusOptions(
        slots_per_rank=job.slots,
        fault_tolerance=job.fault_tolerance,
        reallocate_every=job.reallocate_every,
        checkpoint_every=job.checkpoint_every,
        checkpoint_dir=str(run_dir / "checkpoints") if job.checkpoint_every else None,
    )
    lr = job.lr
    status = connect_store(store)
    failed_key = f"{options.namespace}/failed"
    if status.check([failed_key]):  # restarting a worker of a job that cannot go on is futile
        raise LazarusError(f"the job failed earlier: {status.get(failed_key).decode()}")
    try:
        mgr = Lazarus(
            model,
            lambda m: torch.optim.AdamW(m.parameters(), lr=lr),
            options,
            store=store,
            rank=member,
            world_size=world_size,
        )
    except TimeoutError:
        if status.check([f"{options.namespace}/finished"]):
            log.warning("worker (member %d) started after the job finished: nothing to do", member)
            return
        raise
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    me = mgr.member_id
    _write(
        run_dir / "pids" / f"member{me}.json",
        {"pid": os.getpid(), "member": me, "host": socket.gethostname(), "restarts": restarts},
    )
    try:
        losses = _train(job, run_dir, mgr, model, tokens)
    except LazarusError as exc:  # e.g. experts lost every replica and no checkpoint
        status.set(failed_key, f"member {me}: {exc}")
        _write(run_dir / "failed", {"member": me, "error": str(exc)})
        raise
    report = dataclasses.asdict(mgr.report)
    _write(
        run_dir / "reports" / f"member{me}.json",
        {
            "member": me,
            "pid": os.getpid(),
            "restarts": restarts,
            "committed": mgr.committed_steps,
            "losses": {str(s): v for s, v in sorted(losses.items())},
            "replica_experts": [list(e) for e in mgr.replica_experts()],
            "report": report,
        },
    )
    mgr.close()


def _train(
    job: TrainJob, run_dir: Path, mgr: Lazarus, model: nn.Module, tokens: torch.Tensor
) -> dict[int, float]:
    """Train to ``job.steps``; the loss of each committed step (averaged over members)."""
    losses: dict[int, float] = {}
    while mgr.committed_steps < job.steps:
        step = mgr.committed_steps
        g = torch.Generator().manual_seed(step * 1000 + mgr.rank)  # data follows the step
        starts = torch.randint(0, len(tokens) - job.seq, (job.batch,), generator=g).tolist()
        x = torch.stack([tokens[s : s + job.seq] for s in starts])

        def closure(x: torch.Tensor = x) -> torch.Tensor:
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            return loss

        loss = mgr.step(closure)
        losses[mgr.committed_steps] = loss
        if mgr.rank == 0:
            _write(run_dir / "step", mgr.committed_steps)
    return losses


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument(
        "--first-member",
        type=int,
        default=0,
        help="member id of this node's first worker (LOCAL_RANK is added)",
    )
    parser.add_argument("--world-size", type=int, required=True, help="workers at the start")
    parser.add_argument("--store", default=None, help=f"coordinator host:port (${STORE_ENV})")
    for f in dataclasses.fields(TrainJob):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    job = TrainJob(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainJob)})
    store = args.store or os.environ.get(STORE_ENV)
    if not store:
        sys.exit(f"no coordinator: pass --store host:port or set {STORE_ENV}")
    member = args.first_member + int(os.environ.get("LOCAL_RANK", "0"))
    if not 0 <= member < args.world_size:
        sys.exit(f"member {member} (--first-member + LOCAL_RANK): expected < --world-size")
    run_worker(job, args.run_dir, member, args.world_size, store)


if __name__ == "__main__":
    main()
