"""Accelerate (MULTI_CPU = DDP over gloo) loop with LayerWatchAccelerate, 2 ranks.

Phase A trains without layerwatch, phase B retrains from the same initial weights and RNG with the watch; losses
must be identical per rank. In phase B a forward hook raises during the step-2 probe on rank 1 only: both ranks
must skip that probe and go on. The step-0 probe is compared (by the test) with a single-process reference.
"""

from __future__ import annotations

import os

import _common as C
import torch

GRAD_ACCUM = 2
STEPS = 4  # optimizer steps; probes (every=2, log-spaced start, at start): 0, 1, 2 (fails on rank 1), 4
FAIL_STEP = 2


def main() -> None:
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import DistributedType

    from layerwatch.integrations.accelerate_loop import LayerWatchAccelerate

    out = C.outdir()
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=GRAD_ACCUM,
        project_dir=out,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo", timeout=C.TIMEOUT)],
    )
    rank = accelerator.process_index
    assert accelerator.num_processes == 2, accelerator.num_processes
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    state = C.initial_state()
    probe = C.make_probe()
    batches = C.train_batches(rank, STEPS * GRAD_ACCUM)
    result: dict = {"rank": rank}

    def phase(with_watch: bool) -> list[float]:
        torch.manual_seed(100 + rank)  # same dropout RNG stream in both phases
        model = C.model_from_state(state)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)
        watch = hook = None
        if with_watch:
            watch = LayerWatchAccelerate(
                accelerator, model, probe, every=2, probe_at_start=True, register_for_checkpointing=False,
                **C.watch_kwargs(),
            )
            result["probe_module"] = type(watch.module).__name__
            hook = C.RaiseOnRank(rank, fail_rank=1)
            handle = accelerator.unwrap_model(model).model.layers[1].register_forward_hook(hook)
            record = watch.step(step=0)  # baseline before the first optimizer step
            result["step0_probed"] = record is not None
            result["sync_after_step0"] = bool(model.require_forward_param_sync)
        calls = []
        losses = []
        for micro, ids in enumerate(batches):
            with accelerator.accumulate(model):
                output = model(input_ids=ids, labels=ids)
                accelerator.backward(output.loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(float(output.loss.detach()))
            if watch is not None:
                hook.armed = accelerator.sync_gradients and watch.optimizer_step + 1 == FAIL_STEP
                before = bool(model.require_forward_param_sync)
                record = watch.step()
                watch.step(step=watch.optimizer_step)  # a repeated call for the same step: ignored
                hook.armed = False
                calls.append(
                    {
                        "micro": micro,
                        "sync_gradients": bool(accelerator.sync_gradients),
                        "optimizer_step": watch.optimizer_step,
                        "probed": record is not None,
                        "sync_before": before,
                        "sync_after": bool(model.require_forward_param_sync),
                    }
                )
        if watch is not None:
            handle.remove()
            watch.close()
            result["calls"] = calls
            result["hook_fired"] = hook.fired
            result["last_probed_step"] = watch.last_probed_step
        return losses

    result["losses_plain"] = phase(False)
    result["losses_watch"] = phase(True)
    result["logdir"] = os.path.join(out, "layerwatch")
    C.finish(result, state)


if __name__ == "__main__":
    C.main_guard(main)
