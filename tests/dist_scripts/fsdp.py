"""FSDP1 and FSDP2 on CPU (gloo), 2 ranks, plain training loops with LayerWatch.

For each flavour: phase A trains without layerwatch, phase B retrains from the same initial weights and RNG with
a probe at step 0 (before training) and on schedule; losses must be identical per rank. The object to call is chosen
by ``resolve_probe_module`` (given an accelerator-like stub that says "FSDP"), as the Accelerate integration does:
Accelerate only enables FSDP on accelerators, so a real ``Accelerator`` cannot be used on CPU.
"""

from __future__ import annotations

import os
from functools import partial
from types import SimpleNamespace

import _common as C
import torch
import torch.distributed as dist

STEPS = 3  # probes (every=2, log-spaced start, at start): 0, 1, 2


def fake_accelerator(fsdp2: bool):
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=fsdp2, parallelism_config=None)


def wrap_fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )


def wrap_fsdp2(model):
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.4 and 2.5
        from torch.distributed._composable.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def all_dtensor(model) -> bool:
    from torch.distributed.tensor import DTensor

    return all(isinstance(p, DTensor) for p in model.parameters())


def main() -> None:
    from layerwatch import LayerWatch
    from layerwatch.integrations.accelerate_loop import resolve_probe_module

    rank, world = C.init_gloo()
    assert world == 2, world
    out = C.outdir()
    state = C.initial_state()
    probe = C.make_probe()
    batches = C.train_batches(rank, STEPS)
    result: dict = {"rank": rank}

    def phase(flavour: str, with_watch: bool) -> list[float]:
        torch.manual_seed(100 + rank)
        model = C.model_from_state(state)
        wrapped = wrap_fsdp1(model) if flavour == "fsdp1" else wrap_fsdp2(model)
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
        info: dict = {}
        watch = None
        if with_watch:
            target = resolve_probe_module(fake_accelerator(flavour == "fsdp2"), wrapped)
            info["probe_module_is_wrapped"] = target is wrapped
            if flavour == "fsdp1":
                try:  # the unwrapped inner module would see flat shards: the resolver must refuse it
                    resolve_probe_module(fake_accelerator(False), wrapped.module)
                    info["rejects_inner_module"] = False
                except ValueError:
                    info["rejects_inner_module"] = True
            watch = LayerWatch(
                probe, logdir=os.path.join(out, flavour), every=2, probe_at_start=True, **C.watch_kwargs()
            )
            record = watch.step(target, 0)
            info["probed"] = [0] if record is not None else []
            if flavour == "fsdp2":
                info["dtensor_after_probe"] = [all_dtensor(wrapped)]
            info["training_after_probe"] = [wrapped.training]
        losses = []
        for step, ids in enumerate(batches, start=1):
            output = wrapped(input_ids=ids, labels=ids)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(output.loss.detach()))
            if watch is not None:
                record = watch.step(target, step)
                if record is not None:
                    info["probed"].append(step)
                    if flavour == "fsdp2":
                        info["dtensor_after_probe"].append(all_dtensor(wrapped))
                    info["training_after_probe"].append(wrapped.training)
        if watch is not None:
            watch.close()
            result[flavour] = info
        return losses

    from models import FSDP2_ON_CPU

    for flavour in ("fsdp1", "fsdp2") if FSDP2_ON_CPU else ("fsdp1",):
        result[f"{flavour}_losses_plain"] = phase(flavour, False)
        result[f"{flavour}_losses_watch"] = phase(flavour, True)
    C.finish(result, state)


if __name__ == "__main__":
    C.main_guard(main)
