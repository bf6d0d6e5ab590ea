"""What the ranks of a multi-process run must agree on, and the collectives a probe uses to agree.

A probe is collective: under DDP its all-reduces, under FSDP1/FSDP2/DeepSpeed ZeRO-3 also every parameter all-gather
inside the forward, pair up across ranks only if every rank runs the same calls in the same order. So:

- :func:`agree_before_forward`, before the first forward of every probe, all-gathers a few int64s per rank (an ok
  flag, the prompt count, the token length, the probe's content hash, the layer count, a hash of the settings that
  size the buffers). A rank that refused the probe (its model cannot take it, its blocks were not found, ...) or
  holds a different probe makes every rank raise the same :class:`RankMismatchError`, before any forward: no abort
  in a size-mismatched all-reduce, no hang, never a record that mixes two probes.
- :func:`agree_on_failure`, after the forwards, is one small all-reduce of a failure flag: a rank whose hooks failed
  (layerwatch's own per-layer computation raised; the hooks caught it and let the forward finish) makes every rank
  skip the probe together.
- :func:`is_sharded` tells when a failure *inside the model's forward* cannot be repaired: under a sharded wrapper
  the failing rank left its peers waiting inside a parameter all-gather.

Every rank must call ``step()`` at the same steps (and ``run()`` together). A rank that probes alone waits in the first of
these collectives until the process group's timeout; its error then says so (:func:`collective`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from layerwatch._compat import fsdp2_module_type

__all__ = [
    "ProbeError", "RankMismatchError", "agree_before_forward", "agree_on_failure", "all_ranks_max", "collective",
    "distributed", "fingerprint", "is_sharded",
]

SAME_STEPS_RULE = (
    "every rank must call step() at the same steps (and run() together), with the same model and probe: a probe "
    "is a collective operation (call it outside any `if rank == 0:`)"
)


class ProbeError(RuntimeError):
    """A probe failed (on this rank or on another one)."""


class RankMismatchError(ProbeError):
    """The ranks cannot run this probe together (a rank refused it, or they hold different probes)."""


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (a timeout, a peer gone) into a :class:`ProbeError` that states the rule."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistBackendError is a RuntimeError
        if isinstance(error, ProbeError):
            raise
        rank = distributed()[0]
        raise ProbeError(
            f"layerwatch: the {what} collective failed on rank {rank} ({type(error).__name__}: {error}); "
            f"{SAME_STEPS_RULE}"
        ) from error


def all_ranks_max(value: float) -> float:
    """The largest ``value`` over all ranks (itself outside torch.distributed). A collective: call it on every rank."""
    if distributed()[1] == 1:
        return value
    tensor = torch.tensor([float(value)], device=_collective_device())
    with collective("all-ranks maximum"):
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


def _hash63(text: str) -> int:
    """A non-negative int64 from the first 60 bits of sha256(``text``)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def fingerprint(probe: Any, layers: int | None, settings: Sequence[Any]) -> list[int]:
    """What every rank's probe must share: prompts, tokens, content hash, layers, buffer-sizing settings."""
    return [
        int(probe.num_prompts), int(probe.input_ids.shape[1]), _hash63(probe.content_hash),
        -1 if layers is None else int(layers), _hash63(repr(tuple(settings))),
    ]


_FIELDS = ("prompts", "tokens", "probe content hash", "layers", "settings (metrics, views, batch size)")


def agree_before_forward(values: Sequence[int], refusal: BaseException | None) -> None:
    """All ranks agree to run the probe, or all raise :class:`RankMismatchError` (one all-gather; no-op alone).

    ``values`` is this rank's :func:`fingerprint` (any list of the same length when ``refusal`` is set);
    ``refusal`` the error that made this rank refuse the probe before its first forward.
    """
    world = distributed()[1]
    if world == 1:
        if refusal is not None:
            raise refusal
        return
    mine = torch.tensor([0 if refusal is not None else 1, *values], dtype=torch.int64, device=_collective_device())
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    with collective("first (probe agreement)"):
        torch.distributed.all_gather(gathered, mine)
    rows = [row.cpu().tolist() for row in gathered]
    refused = [r for r, row in enumerate(rows) if row[0] == 0]
    if refused:
        own = f"; here: {type(refusal).__name__}: {refusal}" if refusal is not None else " (the reason is in its log)"
        raise RankMismatchError(
            f"layerwatch: rank(s) {refused} refused the probe before the forward{own}; every rank skips it"
        ) from refusal
    differing = [name for i, name in enumerate(_FIELDS, start=1) if len({row[i] for row in rows}) > 1]
    if differing:
        per_rank = "; ".join(f"rank {r}: {row[1]} prompts x {row[2]} tokens, {row[4]} layers" for r, row in enumerate(rows))
        raise RankMismatchError(
            f"layerwatch: the ranks hold different probes (they differ in {', '.join(differing)}; {per_rank}). "
            "Every rank must build the same Probe (the same texts or ids, in the same order) and the same LayerWatch "
            "settings; this probe is skipped on every rank"
        )


def agree_on_failure(local_error: BaseException | None) -> None:
    """One all-reduce of a failure flag: if any rank failed, every rank raises (this rank's own error, if any)."""
    world = distributed()[1]
    if world > 1:
        flag = torch.tensor([0.0 if local_error is None else 1.0], device=_collective_device())
        with collective("probe failure flag"):
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if local_error is None and flag.item() > 0:
            raise ProbeError("the probe failed on another rank; all ranks skip this probe")
    if local_error is not None:
        raise local_error


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s forward all-gathers parameters across ranks (FSDP1, FSDP2, DeepSpeed ZeRO-3)."""
    if distributed()[1] == 1:
        return False
    fsdp2 = fsdp2_module_type()
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as fsdp1
    except ImportError:  # pragma: no cover
        fsdp1 = None
    for module in model.modules():
        if (fsdp1 is not None and isinstance(module, fsdp1)) or (fsdp2 is not None and isinstance(module, fsdp2)):
            return True
    return any(hasattr(parameter, "ds_status") for parameter in model.parameters())  # ZeRO-3 partitioned
