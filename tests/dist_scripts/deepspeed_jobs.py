"""Real DeepSpeed on CPU (2 ranks, gloo): the HF Trainer with ``deepspeed=`` (ZeRO-2 or ZeRO-3), or Accelerate with a
``DeepSpeedPlugin`` (ZeRO-3). ``argv[2]`` is the job: ``trainer_zero2``, ``trainer_zero3`` or ``accelerate_zero3``.

Each job trains the same tiny Llama (fp32, dropout on) twice from the same weights and seed, without and with
layerwatch (``every=2``: probes at steps 1, 2 and 4 of 4, gradient accumulation 2), and records per rank:

- every training micro-batch's loss (for bit-identity);
- after each probe, how many parameters stay gathered (ZeRO-3 ``ds_status == AVAILABLE``), and at the end, for
  comparison, how many DeepSpeed's own eval forward leaves (after emptying its cache);
- the final weights, gathered from the ZeRO-3 shards with ``GatheredParameters`` (every parameter at once);
  rank 0 then probes them in one process (``reference``). ``Trainer.save_model``'s own ZeRO-3 consolidation
  (``stage3_gather_16bit_weights_on_model_save``) hung over gloo on this CPU setup, so it is not used.

TensorBoard is off (the JSONL is what the test reads): on a loaded 2-core machine drawing its pictures at close on
rank 0 took longer than the process-group timeout that rank 1 was already waiting in.

Recipe and pitfalls: ../shared/research/deepspeed-cpu.md (shm op build skipped, torch AdamW, the gloo state).
"""

from __future__ import annotations

import importlib
import os
import sys

import _common as C
import torch
import torch.distributed as dist

MAX_STEPS = 4
GRAD_ACCUM = 2
MICRO_BATCH = 2


def ds_config(stage: int) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:  # a tiny model would otherwise keep every parameter gathered (below the persistence threshold)
        zero.update(stage3_param_persistence_threshold=0)
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": GRAD_ACCUM,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
    }


def gathered(model) -> int:
    """Parameters of ``model`` that ZeRO-3 holds gathered right now (0 under ZeRO-2: nothing is partitioned)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE for p in model.parameters())


def own_eval_forward_leaves(engine, module, probe) -> int:
    """How many parameters DeepSpeed's own eval forward (no grad) leaves gathered, from an empty cache."""
    if hasattr(engine, "empty_partition_cache"):
        engine.empty_partition_cache()
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    with torch.no_grad():
        module(input_ids=probe.input_ids[:MICRO_BATCH], use_cache=False)
    for m, training in modes:
        m.training = training
    return gathered(module)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count: int) -> None:
        self.ids = torch.randint(1, C.VOCAB, (count, C.SEQ), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def trainer_job(stage: int, out: str, result: dict) -> dict:
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from layerwatch.integrations.hf_trainer import LayerWatchCallback

    state, probe, dataset = C.initial_state(), C.make_probe(), TokenDataset(64)
    models = {name: C.model_from_state(state) for name in ("plain", "watched")}  # before deepspeed= (zero.Init)

    class RecordingTrainer(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if model.training:
                self.micro_losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    def run(name: str, callbacks: list) -> RecordingTrainer:
        AcceleratorState._reset_state(reset_partial_state=False)  # a second Trainer with a DeepSpeed plugin
        args = TrainingArguments(
            output_dir=os.path.join(out, name), max_steps=MAX_STEPS, per_device_train_batch_size=MICRO_BATCH,
            gradient_accumulation_steps=GRAD_ACCUM, learning_rate=1e-2, logging_steps=1, save_strategy="no",
            report_to="none", deepspeed=ds_config(stage), accelerator_config={"use_configured_state": True},
            ddp_timeout=int(C.TIMEOUT.total_seconds()), dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        trainer = RecordingTrainer(model=models[name], args=args, train_dataset=dataset, callbacks=callbacks)
        trainer.micro_losses = []
        current["trainer"] = trainer
        trainer.train()
        return trainer

    after: list[dict] = []
    current: dict = {}

    class AfterProbe(TrainerCallback):  # runs after layerwatch's callback on the same event
        def on_step_end(self, args, trainer_state, control, **kwargs):
            step = trainer_state.global_step
            if watch_callback.watch is not None and watch_callback.watch.last_probed_step == step:
                after.append({"step": step, "gathered": gathered(kwargs["model"])})
            if step == MAX_STEPS:
                result["eval_forward_leaves"] = own_eval_forward_leaves(current["trainer"].model_wrapped, kwargs["model"], probe)

    plain = run("plain", [])
    result["losses_plain"] = plain.micro_losses
    watch_callback = LayerWatchCallback(every=2, probe=probe, tensorboard=False, **C.watch_kwargs())
    watched = run("watched", [watch_callback, AfterProbe()])
    result.update(losses_watch=watched.micro_losses, after_probe=after, logdir=os.path.join(out, "watched", "layerwatch"))
    result["engine"] = type(watched.model_wrapped).__name__
    final = final_weights(watched.model_wrapped)  # (Trainer.save_model's ZeRO-3 consolidation hangs over gloo here)
    unset_hf_deepspeed_config()  # the reference model must be built whole, not partitioned
    return final


def final_weights(engine) -> dict | None:
    """The whole final weights on rank 0 (``None`` elsewhere); a collective under ZeRO-3."""
    import deepspeed

    engine.empty_partition_cache()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        final = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return final if dist.get_rank() == 0 else None


def accelerate_job(out: str, result: dict) -> dict:
    from accelerate import Accelerator
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    from layerwatch.integrations.accelerate_loop import LayerWatchAccelerate

    rank = dist.get_rank()
    state, probe = C.initial_state(), C.make_probe()
    models = [C.model_from_state(state), C.model_from_state(state)]  # before any DeepSpeedPlugin (zero.Init)
    batches = C.train_batches(rank, MAX_STEPS * GRAD_ACCUM, seed=7)

    def phase(with_watch: bool) -> tuple[list[float], object]:
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(3)), gradient_accumulation_steps=GRAD_ACCUM,
            project_dir=out,
        )
        torch.manual_seed(100 + rank)
        model = models[int(with_watch)]
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        watch = None
        if with_watch:
            watch = LayerWatchAccelerate(
                accelerator, model, probe, every=2, register_for_checkpointing=False, tensorboard=False, **C.watch_kwargs()
            )
            result["probe_module"] = type(watch.module).__name__
        losses, after = [], []
        for ids in batches:
            with accelerator.accumulate(model):
                loss = model(input_ids=ids[:MICRO_BATCH], labels=ids[:MICRO_BATCH]).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(float(loss.detach()))
            if watch is not None and watch.step() is not None:
                after.append({"step": watch.optimizer_step, "gathered": gathered(model.module)})
        if watch is not None:
            watch.close()
            result["after_probe"] = after
            result["eval_forward_leaves"] = own_eval_forward_leaves(model, model.module, probe)
        return losses, model

    result["losses_plain"], _ = phase(False)
    result["losses_watch"], engine = phase(True)
    result["engine"] = type(engine).__name__
    result["logdir"] = os.path.join(out, "layerwatch")
    final = final_weights(engine)
    unset_hf_deepspeed_config()  # the reference model must be built whole, not partitioned
    return final


def main() -> None:
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # skips a 70 s JIT build
    from accelerate import PartialState

    job = sys.argv[2]
    out = C.outdir()
    result: dict = {"job": job}
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo", timeout=C.TIMEOUT)  # Accelerate picks no backend for DeepSpeed on a CPU
    if job.startswith("trainer"):
        final = trainer_job(int(job[-1]), out, result)
    else:
        final = accelerate_job(out, result)
    result["rank"] = dist.get_rank()
    C.finish(result, final)


if __name__ == "__main__":
    C.main_guard(main)
    # The result is written. Leave without the interpreter's teardown: DeepSpeed's C++ threads at exit sometimes
    # abort the process ("terminate called without an active exception", seen once in 2 idle runs of trainer_zero3),
    # after every check has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
