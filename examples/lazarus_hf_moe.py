"""A user's own training loop on a tiny HF Mixtral with Lazarus: kill a worker, training goes on.

    python -m thrifty.lazarus.coordinator --host 127.0.0.1 --port 29600 &
    export THRIFTY_LAZARUS_STORE=127.0.0.1:29600
    torchrun --nproc-per-node 4 examples/lazarus_hf_moe.py

One torchrun stops all its workers when one of them dies (its own policy),
so to watch Lazarus survive a ``kill -9``, start the workers separately
(one torchrun per node does the same across machines; the manager reads only
RANK and WORLD_SIZE, never torchrun's store)::

    for r in 0 1 2 3; do RANK=$r WORLD_SIZE=4 python examples/lazarus_hf_moe.py & done
    kill -9 <a worker's pid>   # the others recover in well under a second

The text is ShareGPT (``thrifty.data``, cl100k tokens; the vocabulary is cut
to the tokens of the slice used). ``--steps N`` (200), ``--slots C`` (3).
"""

from __future__ import annotations

import argparse
import logging

import torch
import transformers  # optional: [lazarus]

from thrifty.data import sharegpt_token_ids
from thrifty.lazarus.manager import Lazarus, LazarusOptions

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--slots", type=int, default=3)
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

text = torch.tensor(sharegpt_token_ids(100_000))
vocab, tokens = torch.unique(text, return_inverse=True)  # same on every worker
config = transformers.MixtralConfig(
    vocab_size=len(vocab),
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
    LazarusOptions(slots_per_rank=args.slots, fault_tolerance=2),
)
seq, batch = 64, 4
while mgr.committed_steps < args.steps:
    g = torch.Generator().manual_seed(
        mgr.committed_steps * 1000 + mgr.rank
    )  # data follows the step
    starts = torch.randint(0, len(tokens) - seq, (batch,), generator=g).tolist()
    x = torch.stack([tokens[s : s + seq] for s in starts])

    def closure(x: torch.Tensor = x) -> torch.Tensor:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    loss = mgr.step(closure)
    if mgr.rank == 0 and mgr.committed_steps % 10 == 0:
        print(f"step {mgr.committed_steps} loss {loss:.3f} members {list(mgr.members)}", flush=True)
for r in mgr.report.reconfigurations:
    print(f"member {mgr.member_id}: {r.kind} lost {r.lost_members} in {r.total_s:.3f}s", flush=True)
mgr.close()
