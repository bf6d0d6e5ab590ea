"""Collection: what one probe gathers from the layers, how ranks combine it, and the set-level metrics.

For one probe the monitor builds a :class:`Collector` from the selected metrics (their registry ``needs``):

- :meth:`Collector.micro_batches` walks this rank's share of the probe pass by pass (the clean batch, then each
  augmented view) and yields each micro-batch's model inputs, keeping the bookkeeping the hooks need (which global
  rows, which rows only pad this rank's shard so that every rank runs the same number of forwards);
  :func:`forward_all` runs them through the model with the capture hooks, so that a failure in layerwatch's own
  code on one rank never leaves the ranks' collectives unpaired (see there);
- :meth:`Collector.on_layer`, the capture hooks' callback, reduces one layer's ``[b, T, D]`` at once (the tensor is
  not kept) into buffers: per-prompt values of token metrics, pooled rows, view rows, activation-health sums;
- every :class:`Buffer` declares how it reduces across ranks, ``"sum"`` (each rank wrote only its own rows, or
  partial sums) or ``"max"``, as torchmetrics' ``add_state(dist_reduce_fx=...)`` does, and
  :meth:`Collector.reduce_across_ranks` runs one packed all-reduce per kind, after the ranks agree on errors;
- :func:`set_level_metrics` is a pure function of the reduced buffers (:class:`layerwatch.metrics.registry.SetInputs`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from layerwatch import metrics as M
from layerwatch.metrics.names import MAX_ABS
from layerwatch.monitor.capture import CaptureError, ForwardInputs, LayerHooks, explain_forward_error
from layerwatch.monitor.distributed import (
    ProbeError, agree_on_failure, all_ranks_max, collective, distributed, is_sharded,
)
from layerwatch.probe import take_rows
from layerwatch.metrics.registry import HEALTH, POOLED, REGISTRY, VIEWS, SetInputs, TokenInputs, standard_errors

__all__ = [
    "Buffer", "Collector", "ProbeError", "all_ranks_max", "distributed", "forward_all", "passes", "set_level_metrics",
]

logger = logging.getLogger(__name__)

CLEAN = -1  # the pass index of the clean batch; k >= 0 is augmented view k


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
            self.buffers[MAX_ABS] = Buffer((layers,), "max")  # |x| >= 0, so zeros are a neutral start
        if POOLED in needs:
            self.buffers["pooled"] = Buffer((layers, prompts, None), "sum")
        if self.views:
            self.buffers["views"] = Buffer((layers, prompts, self.views, None), "sum")
        self._batch: _Batch | None = None
        self._allocated = False

    # ---------------------------------------------------------------------------------- the forward passes
    def micro_batches(
        self, batch_size: int, device: torch.device, inputs: ForwardInputs
    ) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        """``(args, kwargs)`` of the model call of each micro-batch of this rank's rows, for every pass (the same
        count on every rank)."""
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
                yield inputs(ids, mask)

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
        max_abs = self._tensor(MAX_ABS)
        max_abs[index] = torch.maximum(max_abs[index], kept.abs().max())

    def _tensor(self, name: str) -> torch.Tensor:
        return self.buffers[name].tensor

    # ------------------------------------------------------------------------------------------- the ranks
    def reduce_across_ranks(self, local_error: BaseException | None) -> None:
        """Agree on errors (one small all-reduce of a failure flag: any rank failed, all raise), then one packed
        all-reduce per reduction kind."""
        if local_error is None and not self._allocated:
            local_error = CaptureError("no layer output was captured")
        agree_on_failure(local_error)
        world = distributed()[1]
        if world == 1:
            return
        for kind, op in (("sum", torch.distributed.ReduceOp.SUM), ("max", torch.distributed.ReduceOp.MAX)):
            group = [b for b in self.buffers.values() if b.reduce == kind]
            if not group:
                continue
            packed = torch.cat([b.tensor.flatten() for b in group])
            with collective(f"probe reduction ({kind})"):
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
            max_abs=tensor(MAX_ABS),
            alpha=self.alpha,
            seed=seed,
        )


def forward_all(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    collector: Collector,
    inputs: ForwardInputs,
    *,
    batch_size: int,
    device: torch.device,
    block_output: Any = None,
) -> BaseException | None:
    """Every micro-batch through ``model``, the hooks feeding ``collector``; this rank's first error, if any.

    An error in layerwatch's own hook code is caught in the hook (:class:`LayerHooks`): the forward finishes and
    the remaining micro-batches still run, so that every rank's collectives stay paired. An error raised by the
    model itself ends this rank's forward midway. Unsharded (one process, DDP, ZeRO-1/2) the other micro-batches
    still run and the ranks agree afterwards; under FSDP1/FSDP2/ZeRO-3 the other ranks now wait in a parameter
    all-gather that this rank will never join, which layerwatch cannot repair: it logs that at once, naming the
    rank and the error, forwards nothing more, and skips the agreement (which would pair with a peer's all-gather).
    """
    sharded = is_sharded(model)
    local_error: BaseException | None = None
    with LayerHooks(blocks, collector.on_layer, block_output) as hooks:
        for args, kwargs in collector.micro_batches(batch_size, device, inputs):
            try:
                model(*args, **kwargs)
            except Exception as error:  # the model raised: this rank's forward stopped midway
                hooks.reset()
                local_error = local_error or explain_forward_error(error)
                if sharded:
                    _report_unrepairable(error)
                continue
            try:
                hooks.check_and_reset()
            except Exception as error:  # layerwatch's own failure: the forward finished, keep forwarding
                local_error = local_error or error
    return local_error


class UnpairedCollectivesError(ProbeError):
    """The model's forward raised on this rank under a sharded wrapper: the ranks' all-gathers are unpaired."""


def _report_unrepairable(error: BaseException) -> None:
    rank = distributed()[0]
    message = (
        f"layerwatch: the model's forward raised on rank {rank} during a probe under a sharded wrapper "
        f"(FSDP1/FSDP2/DeepSpeed ZeRO-3): {type(error).__name__}: {error}. The other ranks are waiting in a parameter "
        "all-gather this rank will not join; layerwatch cannot repair the collectives and forwards nothing more. "
        "Expect the other ranks to fail at the process group's timeout"
    )
    logger.error(message)
    raise UnpairedCollectivesError(message) from error


def set_level_metrics(
    names: Sequence[str], inputs: SetInputs
) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """``(metrics, per_prompt)`` of a record from the reduced buffers: per-layer values of each metric in ``names``
    and the per-prompt values of those the registry keeps (``histogram=True``).

    A layer with non-finite activations has no trustworthy metric: when health is collected, every other metric is
    NaN at such layers.

    The standard errors (:func:`layerwatch.metrics.registry.standard_errors`; per-prompt ones from the reduced
    per-prompt buffers, set-level ones by a jackknife over prompts) are computed on the main rank only, after the
    reduction, and left in ``inputs.stderr`` as per-layer lists (NaN at the same broken layers).
    """
    for name in sorted(names, key=list(REGISTRY).index):  # registry order: later metrics may read earlier ones
        inputs.computed[name] = REGISTRY[name].set_value(inputs).double()
    # one-number metrics (best_layer) stay in inputs.computed: the record keeps them apart (record.scalars)
    values = {name: inputs.computed[name] for name in names if not REGISTRY[name].scalar}
    errors = standard_errors(names, inputs, groups=None if distributed()[0] == 0 else 0)  # None: JACKKNIFE_GROUPS
    if inputs.health is not None:
        broken = inputs.health[:, 2] > 0
        for table in (values, errors):
            for name, per_layer in table.items():
                if HEALTH not in REGISTRY[name].needs:
                    table[name] = torch.where(broken.to(per_layer.device), torch.nan, per_layer)
    inputs.stderr = {name: errors[name].cpu().tolist() for name in names if name in errors}
    metrics = {name: values[name].cpu().tolist() for name in names if name in values}
    per_prompt = {name: inputs.per_prompt[name].tolist() for name in names if REGISTRY[name].histogram}
    return metrics, per_prompt
