"""Collection: what one probe gathers from the layers, how ranks combine it, and the set-level metrics.

For one probe the monitor builds a :class:`Collector` from the selected metrics (their registry ``needs``):

- :meth:`Collector.micro_batches` walks this rank's share of the probe pass by pass (the clean batch, then each
  augmented view) and yields each micro-batch's model inputs, keeping the bookkeeping the hooks need (which global
  rows, which rows only pad this rank's shard so that every rank runs the same number of forwards);
- :meth:`Collector.on_layer`, the capture hooks' callback, reduces one layer's ``[b, T, D]`` at once (the tensor is
  not kept) into buffers: per-prompt values of token metrics, pooled rows, view rows, activation-health sums;
- every :class:`Buffer` declares how it reduces across ranks, ``"sum"`` (each rank wrote only its own rows, or
  partial sums) or ``"max"``, as torchmetrics' ``add_state(dist_reduce_fx=...)`` does, and
  :meth:`Collector.reduce_across_ranks` runs one packed all-reduce per kind, after the ranks agree on errors;
- :func:`set_level_metrics` is a pure function of the reduced buffers (:class:`layerwatch.metrics.registry.SetInputs`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from layerwatch import metrics as M
from layerwatch.monitor.capture import CaptureError
from layerwatch.probe import take_rows
from layerwatch.metrics.registry import HEALTH, POOLED, REGISTRY, VIEWS, SetInputs, TokenInputs

__all__ = ["Buffer", "Collector", "ProbeError", "all_ranks_max", "distributed", "passes", "set_level_metrics"]

CLEAN = -1  # the pass index of the clean batch; k >= 0 is augmented view k


class ProbeError(RuntimeError):
    """A probe failed (on this rank or on another one)."""


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_max(value: float) -> float:
    """The largest ``value`` over all ranks (itself outside torch.distributed). A collective: call it on every rank."""
    if distributed()[1] == 1:
        return value
    tensor = torch.tensor([float(value)], device=_collective_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


def passes(names: Sequence[str], probe: Any, views: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(pass index, input_ids, attention_mask)`` of each forward pass the metrics ``names`` need."""
    needs = {need for name in names for need in REGISTRY[name].needs}
    result = []
    if needs - {VIEWS}:
        result.append((CLEAN, probe.input_ids, probe.attention_mask))
    if VIEWS in needs:
        result.extend((k, *probe.views[k]) for k in range(views))
    return result


@dataclass
class Buffer:
    """One accumulator of a probe and how ranks combine it (``"sum"`` or ``"max"``); allocated at the first layer.

    ``shape`` may end in ``None``: the hidden width, known once the first layer arrives.
    """

    shape: tuple[int | None, ...]
    reduce: Literal["sum", "max"]
    tensor: torch.Tensor | None = None

    def allocate(self, width: int, device: torch.device) -> None:
        shape = tuple(width if size is None else size for size in self.shape)
        self.tensor = torch.zeros(shape, dtype=torch.float32, device=device)


@dataclass
class _Batch:
    """What the hooks need to know about the micro-batch being forwarded."""

    pass_index: int  # CLEAN or augmented view k
    rows: torch.Tensor  # global prompt indices of the real rows
    real: torch.Tensor  # [b] bool: False for rows that only pad this rank's shard
    mask: torch.Tensor  # [b, T] bool


class Collector:
    """The buffers of one probe, filled layer by layer by the hooks; see the module docstring.

    Args:
        names: the selected metrics (registry names).
        probe: the :class:`layerwatch.Probe`.
        layers: layer outputs per forward (blocks + 1 for the embedding output).
        views: augmented views to run when a selected metric needs views.
        alpha: the Rényi order the token metrics use.
    """

    def __init__(self, names: Sequence[str], probe: Any, *, layers: int, views: int, alpha: float) -> None:
        self.names, self.probe, self.alpha = tuple(names), probe, alpha
        specs = [REGISTRY[name] for name in self.names]
        needs = {need for spec in specs for need in spec.needs}
        self.views = views if VIEWS in needs else 0
        token_names = [s.name for s in specs if s.per_prompt is not None] + [u for s in specs for u in s.uses]
        self.token_names = tuple(dict.fromkeys(token_names))  # one per-prompt buffer per token metric
        prompts = probe.num_prompts
        self.buffers: dict[str, Buffer] = {f"per_prompt/{name}": Buffer((layers, prompts), "sum") for name in self.token_names}
        if HEALTH in needs:
            self.buffers["health"] = Buffer((layers, 3), "sum")  # sum of squares, finite count, non-finite count
            self.buffers["max_abs"] = Buffer((layers,), "max")  # |x| >= 0, so zeros are a neutral start
        if POOLED in needs:
            self.buffers["pooled"] = Buffer((layers, prompts, None), "sum")
        if self.views:
            self.buffers["views"] = Buffer((layers, prompts, self.views, None), "sum")
        self._batch: _Batch | None = None
        self._allocated = False

    # ---------------------------------------------------------------------------------- the forward passes
    def micro_batches(
        self, batch_size: int, device: torch.device, options: dict[str, Any], pass_mask: bool
    ) -> Iterator[dict[str, Any]]:
        """Model inputs of each micro-batch of this rank's rows, for every pass (the same count on every rank)."""
        rank, world = distributed()
        prompts = self.probe.num_prompts
        per_rank = math.ceil(prompts / world)
        rows = list(range(rank, prompts, world))
        real = [True] * len(rows) + [False] * (per_rank - len(rows))
        rows += [0] * (per_rank - len(rows))  # padding rows keep the collectives paired; their values are dropped
        for pass_index, all_ids, all_mask in passes(self.names, self.probe, self.views):
            for start in range(0, per_rank, batch_size):
                chunk = torch.tensor(rows[start : start + batch_size])
                chunk_real = torch.tensor(real[start : start + batch_size])
                ids, mask = take_rows(all_ids, all_mask, chunk)  # right-aligned already: positions start at 0
                ids, mask = ids.to(device), mask.bool().to(device)
                self._batch = _Batch(pass_index, chunk[chunk_real].to(device), chunk_real.to(device), mask)
                inputs = {"input_ids": ids, **options}
                if pass_mask:
                    inputs["attention_mask"] = mask.long()
                yield inputs

    def on_layer(self, index: int, hidden: torch.Tensor) -> None:
        """Reduce layer ``index``'s ``[b, T, D]`` output of the current micro-batch into the buffers."""
        if not self._allocated:
            for buffer in self.buffers.values():
                buffer.allocate(hidden.shape[-1], hidden.device)
            self._allocated = True
        batch = self._batch
        real_hidden, mask = hidden[batch.real], batch.mask[batch.real]
        if real_hidden.shape[0] == 0:
            return
        if batch.pass_index != CLEAN:
            self._tensor("views")[index, batch.rows, batch.pass_index] = M.mean_pool(real_hidden, mask).float()
            return
        layer = TokenInputs(real_hidden, mask, self.alpha)
        for name in self.token_names:
            self._tensor(f"per_prompt/{name}")[index, batch.rows] = REGISTRY[name].per_prompt(layer).float()
        if "pooled" in self.buffers:
            self._tensor("pooled")[index, batch.rows] = layer.pooled().float()
        if "health" in self.buffers:
            self._add_health(index, real_hidden[mask].float())

    def _add_health(self, index: int, tokens: torch.Tensor) -> None:
        finite = torch.isfinite(tokens)
        kept = torch.where(finite, tokens, torch.zeros((), device=tokens.device))
        health = self._tensor("health")[index]
        health[0] += kept.pow(2).sum()
        health[1] += finite.sum()
        health[2] += (~finite).sum()
        max_abs = self._tensor("max_abs")
        max_abs[index] = torch.maximum(max_abs[index], kept.abs().max())

    def _tensor(self, name: str) -> torch.Tensor:
        return self.buffers[name].tensor

    # ------------------------------------------------------------------------------------------- the ranks
    def reduce_across_ranks(self, local_error: BaseException | None) -> None:
        """Agree on errors (any rank failed: all raise), then one packed all-reduce per reduction kind."""
        world = distributed()[1]
        if world > 1 and all_ranks_max(1.0 if local_error is not None else 0.0) > 0 and local_error is None:
            raise ProbeError("the probe failed on another rank; all ranks skip this probe")
        if local_error is not None:
            raise local_error
        if not self._allocated:
            raise CaptureError("no layer output was captured")
        if world == 1:
            return
        for kind, op in (("sum", torch.distributed.ReduceOp.SUM), ("max", torch.distributed.ReduceOp.MAX)):
            group = [b for b in self.buffers.values() if b.reduce == kind]
            if not group:
                continue
            packed = torch.cat([b.tensor.flatten() for b in group])
            torch.distributed.all_reduce(packed, op=op)
            offset = 0
            for buffer in group:
                buffer.tensor = packed[offset : offset + buffer.tensor.numel()].view_as(buffer.tensor)
                offset += buffer.tensor.numel()

    def set_inputs(self, seed: int) -> SetInputs:
        """The reduced buffers as the set-level metrics see them."""
        tensor = lambda name: self.buffers[name].tensor if name in self.buffers else None  # noqa: E731
        return SetInputs(
            per_prompt={name: tensor(f"per_prompt/{name}") for name in self.token_names},
            pooled=tensor("pooled"),
            views=tensor("views"),
            health=tensor("health"),
            max_abs=tensor("max_abs"),
            alpha=self.alpha,
            seed=seed,
        )


def set_level_metrics(
    names: Sequence[str], inputs: SetInputs
) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """``(metrics, per_prompt)`` of a record from the reduced buffers: per-layer values of each metric in ``names``
    and the per-prompt values of those the registry keeps (``histogram=True``).

    A layer with non-finite activations has no trustworthy metric: when health is collected, every other metric is
    NaN at such layers.
    """
    for name in sorted(names, key=list(REGISTRY).index):  # registry order: later metrics may read earlier ones
        inputs.computed[name] = REGISTRY[name].set_value(inputs).double()
    # one-number metrics (best_layer) stay in inputs.computed: the record keeps them apart (record.scalars)
    values = {name: inputs.computed[name] for name in names if not REGISTRY[name].scalar}
    if inputs.health is not None:
        broken = inputs.health[:, 2] > 0
        for name, per_layer in values.items():
            if HEALTH not in REGISTRY[name].needs:
                values[name] = torch.where(broken.to(per_layer.device), torch.nan, per_layer)
    metrics = {name: values[name].cpu().tolist() for name in names if name in values}
    per_prompt = {name: inputs.per_prompt[name].tolist() for name in names if REGISTRY[name].histogram}
    return metrics, per_prompt
