"""One-rank faults and mismatched ranks under sharded models (FSDP1, FSDP2, DeepSpeed ZeRO-3), 2 CPU ranks, gloo.

Part 1, per flavour: train 3 steps, probing after each (``every=1``). During the step-2 probe layerwatch's own
per-layer computation raises on rank 1 only, at layer 1 (``Collector.on_layer`` is patched here to raise). Both
ranks must record the failed probe (``error_count``, ``layerwatch/errors``), training must go on, and the step-3
probe must work.

Part 2 (on the FSDP1 model): LayerWatches whose probe differs between the ranks (prompt count; same shape but
other ids; a probe rank 1 refuses before the forward). Each must fail on every rank alike with one
RankMismatchError before any forward (no abort, no hang), and a normal probe must work afterwards.
"""

from __future__ import annotations

import importlib
import os
import time

import _common as C
import fsdp as F
import torch

FAIL_STEP = 2
FAIL_LAYER = 1
STEPS = 3


class InjectedFailure(RuntimeError):
    pass


def patch_on_layer(rank: int) -> dict:
    """Make layerwatch's per-layer reduction raise on rank 1, at layer 1, while ``state["armed"]``."""
    from layerwatch.monitor.collect import Collector

    state = {"armed": False, "fired": 0}
    original = Collector.on_layer

    def on_layer(self, index, hidden):
        if state["armed"] and rank == 1 and index == FAIL_LAYER:
            state["fired"] += 1
            raise InjectedFailure(f"injected failure in layerwatch's hook code on rank {rank}, layer {index}")
        return original(self, index, hidden)

    Collector.on_layer = on_layer
    return state


def deepspeed_engine(model):
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # skip a 70 s JIT build
    config = {
        "train_micro_batch_size_per_gpu": C.TRAIN_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    assert all(p.numel() == 0 for p in engine.module.parameters()), "ZeRO-3 left parameters gathered"
    return engine


def fault_run(flavour: str, rank: int, out: str, injected: dict) -> dict:
    from layerwatch import LayerWatch

    torch.manual_seed(100 + rank)
    model = C.model_from_state(C.initial_state())
    if flavour == "zero3":
        wrapped = deepspeed_engine(model)
        optimizer = None
    else:
        wrapped = F.wrap_fsdp1(model) if flavour == "fsdp1" else F.wrap_fsdp2(model)
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    watch = LayerWatch(
        C.make_probe(), logdir=os.path.join(out, flavour), every=1, metrics="standard",
        batch_size=C.PROBE_BATCH, log_spaced_start=False, tensorboard=flavour == "fsdp1",
    )
    started = time.monotonic()
    info: dict = {"probed": [], "outcomes": [], "losses": []}
    for step, ids in enumerate(C.train_batches(rank, STEPS), start=1):
        loss = wrapped(input_ids=ids, labels=ids).loss
        if optimizer is None:
            wrapped.backward(loss)
            wrapped.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        info["losses"].append(float(loss.detach()))
        injected["armed"] = step == FAIL_STEP
        record = watch.step(wrapped, step)
        injected["armed"] = False
        info["outcomes"].append(str(watch.last_outcome.value))
        if record is not None:
            info["probed"].append(step)
    info["error_count"] = watch.error_count
    watch.close()
    info["seconds"] = time.monotonic() - started
    return info


def mismatch_probes(rank: int) -> dict:
    """Each case: (this rank's probe, this rank's LayerWatch keywords)."""
    base = C.make_probe()
    from layerwatch import Probe

    ids, mask = base.input_ids.clone(), base.attention_mask.clone()
    fewer = Probe.from_tensors(ids[:4], mask[:4], vocab_size=C.VOCAB, views=2, seed=0)
    other_ids = ids.clone()
    other_ids[0, 0] = (int(other_ids[0, 0]) % (C.VOCAB - 1)) + 1
    other = Probe.from_tensors(other_ids, mask, vocab_size=C.VOCAB, views=2, seed=0)
    return {
        "prompt_count": (fewer if rank == 1 else base, {}),
        "same_shape_other_ids": (other if rank == 1 else base, {}),
        "refused_on_one_rank": (base, {"layers": "no.such.blocks"} if rank == 1 else {}),
    }


def mismatch_run(rank: int) -> dict:
    from layerwatch import LayerWatch
    from layerwatch.monitor.distributed import RankMismatchError

    model = F.wrap_fsdp1(C.model_from_state(C.initial_state()))
    results: dict = {}
    for case, (probe, extra) in mismatch_probes(rank).items():
        watch = LayerWatch(probe, logdir=None, every=1, strict=True, batch_size=C.PROBE_BATCH, **extra)
        try:
            watch.run(model, 1)
            results[case] = {"raised": None}
        except RankMismatchError as error:
            results[case] = {"raised": type(error).__name__, "message": str(error)}
        except Exception as error:  # noqa: BLE001 - recorded: the test says which error it was
            results[case] = {"raised": type(error).__name__, "message": str(error)}
    after = LayerWatch(C.make_probe(), logdir=None, every=1, batch_size=C.PROBE_BATCH)
    results["normal_probe_after"] = after.run(model, 2) is not None
    return results


def main() -> None:
    rank, world = C.init_gloo()
    assert world == 2, world
    out = C.outdir()
    injected = patch_on_layer(rank)
    result: dict = {"rank": rank}
    from models import FSDP2_ON_CPU

    flavours = ["fsdp1"] + (["fsdp2"] if FSDP2_ON_CPU else [])
    try:
        import deepspeed  # noqa: F401

        flavours.append("zero3")
    except ImportError:
        pass
    for flavour in flavours:
        result[flavour] = fault_run(flavour, rank, out, injected)
    result["injected_fired"] = injected["fired"]
    result["mismatch"] = mismatch_run(rank)
    C.finish(result)


if __name__ == "__main__":
    C.main_guard(main)
