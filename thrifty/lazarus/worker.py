"""``torchrun`` entry point of a Lazarus job: ``python -m thrifty.lazarus.worker SPEC_JSON``.

Run through :func:`thrifty.bench.cluster.run_torchrun`. The spec holds the
:class:`~thrifty.lazarus.runtime.LazarusConfig` fields and the path of a saved
token corpus. Under ``torchrun --max-restarts`` a restarted attempt
(``TORCHELASTIC_RESTART_COUNT`` > 0) resumes from the newest checkpoint and
kills no one: this is the checkpoint-restart baseline that ``thrifty lazarus
bench`` measures Lazarus against.
"""

from __future__ import annotations

import time

# After the interpreter and the package imports (``thrifty.lazarus`` imports torch), before
# this module's own: a restart's start-up before this point is counted as relaunch time.
STARTED = time.time()

import os  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from thrifty.bench.cluster import cluster_worker_main  # noqa: E402
from thrifty.lazarus.runtime import LazarusConfig, train_rank  # noqa: E402


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank: train (or resume), return the JSON-able result with its timestamps."""
    fields = dict(spec["config"])
    fields["kill_ranks"] = tuple(fields["kill_ranks"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt:
        fields.update(kill_ranks=(), resume=True)
    cfg = LazarusConfig(**fields)
    corpus = torch.load(spec["corpus"])
    result = train_rank(corpus, cfg, namespace=f"lazarus-attempt{attempt}")
    result.pop("held", None)
    return {**result, "attempt": attempt, "process_started": STARTED}


if __name__ == "__main__":
    cluster_worker_main(run)
