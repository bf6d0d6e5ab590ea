"""Shared helpers of the torchrun worker scripts (2 CPU ranks, gloo).

Each worker script is launched by tests/test_distributed.py as
``python -m torch.distributed.run --nproc_per_node 2 --master_port P tests/dist_scripts/<x>.py OUTDIR`` and writes
``OUTDIR/result_rank<R>.json``; the test asserts on those files and on the run directories in OUTDIR.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for `models`
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(1, REPO)  # the repository, when layerwatch is not installed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)

TIMEOUT = timedelta(seconds=int(os.environ.get("LAYERWATCH_DIST_TIMEOUT", "60")))
VOCAB = 128
PROBE_PROMPTS = 5  # odd on purpose: 2 ranks get 3 + 3 rows, one of them a masked padding row
PROBE_BATCH = 2  # probe micro-batch: 2 forwards per rank, the last one partly padding
SEQ = 12
TRAIN_BATCH = 4


def init_gloo() -> tuple[int, int]:
    """Initialise the default process group (gloo, short timeout so that a hang fails fast)."""
    dist.init_process_group("gloo", timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def outdir() -> str:
    path = sys.argv[1]
    os.makedirs(path, exist_ok=True)
    return path


def tiny_llama(seed: int = 0, dropout: float = 0.1):
    """Tiny random-init Llama (hidden 32, 2 layers, vocab 128) with attention dropout, in train mode."""
    from models import tiny_model

    model = tiny_model("llama", seed=seed, dropout=dropout, layers=2, hidden=32)
    return model.train()


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tiny_llama(seed).state_dict().items()}


def model_from_state(state: dict[str, torch.Tensor], dropout: float = 0.1):
    model = tiny_llama(seed=123, dropout=dropout)
    model.load_state_dict(state)
    return model.train()


def make_probe():
    """A fixed probe: PROBE_PROMPTS prompts of different lengths (right padding), 2 views."""
    from helpers import random_probe  # tests/helpers.py (imports layerwatch: only when called)

    lengths = [SEQ, SEQ - 2, SEQ - 5, SEQ, SEQ - 3][:PROBE_PROMPTS]
    return random_probe(PROBE_PROMPTS, SEQ, views=2, seed=1234, probe_seed=0, lengths=lengths, vocab=VOCAB)


def train_batches(rank: int, count: int, seed: int = 7) -> list[torch.Tensor]:
    """Deterministic per-rank training batches of token ids ``[TRAIN_BATCH, SEQ]``."""
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return [torch.randint(1, VOCAB, (TRAIN_BATCH, SEQ), generator=generator) for _ in range(count)]


def watch_kwargs() -> dict:
    """LayerWatch settings shared by the distributed run and its single-process reference."""
    return dict(metrics="standard", batch_size=PROBE_BATCH, log_spaced_start=True)


def reference_metrics(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Single-process probe of an unwrapped model with ``state`` (call after destroying the process group)."""
    from layerwatch import LayerWatch

    assert not (dist.is_available() and dist.is_initialized()), "reference must run without torch.distributed"
    model = model_from_state(state)
    watch = LayerWatch(make_probe(), logdir=None, every=1, **watch_kwargs())  # writes nothing
    try:
        record = watch.run(model, 0)
    finally:
        watch.close()
    assert record is not None, "the single-process reference probe failed"
    assert model.training, "the probe left the model in eval mode"
    return {name: [float(v) for v in values] for name, values in record.metrics.items()}


def finish(result: dict, state: dict[str, torch.Tensor] | None = None) -> None:
    """Tear down torch.distributed, compute the reference on rank 0, write ``result_rank<R>.json``."""
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and state is not None:
        result["reference"] = reference_metrics(state)
    write_result(result, rank)


def write_result(result: dict, rank: int) -> None:
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    with open(os.path.join(outdir(), f"result_rank{rank}.json"), "w") as handle:
        json.dump(clean(result), handle, indent=1)


def main_guard(fn) -> None:
    """Run ``fn()``; on an exception write it to ``error_rank<R>.txt`` (the test prints it) and exit 1."""
    try:
        fn()
    except BaseException:
        rank = os.environ.get("RANK", "?")
        with open(os.path.join(outdir(), f"error_rank{rank}.txt"), "w") as handle:
            handle.write(traceback.format_exc())
        raise


class RaiseOnRank:
    """A forward hook that raises inside probe forwards (eval mode) on one rank, at chosen steps only."""

    def __init__(self, rank: int, fail_rank: int = 1) -> None:
        self.rank = rank
        self.fail_rank = fail_rank
        self.armed = False
        self.fired = 0

    def __call__(self, module, args, output):
        if self.armed and self.rank == self.fail_rank and not module.training:
            self.fired += 1
            raise RuntimeError(f"injected probe failure on rank {self.rank}")
        return None
