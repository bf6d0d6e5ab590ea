"""Hugging Face Trainer under DDP (CPU, gloo), 2 ranks, with LayerWatchCallback.

Trainer A runs without the callback, trainer B with it, both from the same initial weights and seed; their logged
losses must be identical. The callback probes steps 1, 2 and 4 (every=2, log-spaced start, the last step); the
step-4 record is compared (by the test) with a single-process reference on the final weights, which DDP keeps
identical on every rank. A second callback, placed after layerwatch's, records DDP's ``require_forward_param_sync``
right after each probe.
"""

from __future__ import annotations

import os

import _common as C
import torch
import torch.distributed as dist

MAX_STEPS = 4


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, C.VOCAB, (count, C.SEQ), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main() -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from layerwatch.integrations.hf_trainer import LayerWatchCallback

    out = C.outdir()
    state = C.initial_state()
    probe = C.make_probe()
    dataset = TokenDataset(64)
    result: dict = {}

    def arguments(name: str) -> TrainingArguments:
        return TrainingArguments(
            output_dir=os.path.join(out, name),
            max_steps=MAX_STEPS,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            ddp_backend="gloo",
            ddp_timeout=int(C.TIMEOUT.total_seconds()),
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )

    class RecordingTrainer(Trainer):
        """Keeps this rank's exact loss of every training micro-batch (the logged ones are rank means)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.micro_losses: list[float] = []

        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if model.training:
                value = loss[0] if isinstance(loss, tuple) else loss
                self.micro_losses.append(float(value.detach()))
            return loss

    def losses(trainer: RecordingTrainer) -> dict[str, list[float]]:
        logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return {"logged": logged, "micro": trainer.micro_losses}

    plain = RecordingTrainer(model=C.model_from_state(state), args=arguments("plain"), train_dataset=dataset)
    plain.train()
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    assert isinstance(plain.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(plain.model_wrapped)
    result["rank"] = rank
    result["losses_plain"] = losses(plain)

    observed: list[dict] = []

    class AfterProbe(TrainerCallback):
        def on_step_end(self, args, trainer_state, control, **kwargs):
            observed.append(
                {
                    "step": trainer_state.global_step,
                    "probed": watch_callback.watch is not None
                    and watch_callback.watch.last_probed_step == trainer_state.global_step,
                    "require_forward_param_sync": bool(watched.model_wrapped.require_forward_param_sync),
                    "model_training": bool(kwargs["model"].training),
                }
            )

    watch_callback = LayerWatchCallback(every=2, probe=probe, **C.watch_kwargs())
    watched = RecordingTrainer(
        model=C.model_from_state(state),
        args=arguments("watched"),
        train_dataset=dataset,
        callbacks=[watch_callback, AfterProbe()],
    )
    watched.train()
    result["losses_watch"] = losses(watched)
    result["after_probe"] = observed
    result["logdir"] = os.path.join(out, "watched", "layerwatch")
    final_state = {k: v.detach().clone() for k, v in watched.model.state_dict().items()}
    C.finish(result, final_state if rank == 0 else None)


if __name__ == "__main__":
    C.main_guard(main)
