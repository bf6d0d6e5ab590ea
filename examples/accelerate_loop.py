"""A complete Hugging Face Accelerate training loop with layerwatch: one line in the loop.

Trains a tiny byte-level Llama on the Shakespeare text that ships with layerwatch, on CPU, in a few minutes, and
probes every layer every ``--every`` optimizer steps::

    python examples/accelerate_loop.py --out runs/accelerate-example --steps 100
    tensorboard --logdir runs/accelerate-example          # train/loss, flat layerwatch/<metric>/layer_NN, and
                                                          # layerwatch's own run in runs/accelerate-example/layerwatch

Multi-process works unchanged: every process calls ``watch.step()``, only the main process writes::

    torchrun --nproc_per_node 2 examples/accelerate_loop.py --steps 20        # 2 CPU processes (DDP over gloo)
    accelerate launch --num_processes 2 examples/accelerate_loop.py          # 2 GPUs

The layerwatch lines are marked ``# <- layerwatch``.
"""

from __future__ import annotations

import argparse
from importlib import resources

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import layerwatch
from layerwatch.integrations.accelerate_loop import LayerWatchAccelerate

BLOCK = 64  # tokens (bytes) per training sequence


def byte_ids(text: str) -> list[int]:
    """A tokenizer-free encoding: UTF-8 bytes (vocabulary 256, id 0 is never used by text and pads)."""
    return list(text.encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accelerate-example", help="project dir (TensorBoard + layerwatch)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--every", type=int, default=20, help="probe every N optimizer steps")
    parser.add_argument("--grad-accum", type=int, default=2)
    args = parser.parse_args()

    # cpu=True also makes torchrun'ed CPU processes one DDP job (without it Accelerate only goes multi-process on GPUs).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), gradient_accumulation_steps=args.grad_accum,
        log_with="tensorboard", project_dir=args.out,
    )
    accelerator.init_trackers("train")  # layerwatch logs through the same trackers as the loss
    torch.manual_seed(0)

    text = (resources.files("layerwatch.data") / "tinyshakespeare.txt").read_text(encoding="utf-8")
    train_text, held_out = text[: -20_000], text[-20_000:]
    data = torch.tensor(byte_ids(train_text[:400_000]))
    samples = data[: len(data) // BLOCK * BLOCK].view(-1, BLOCK)
    loader = torch.utils.data.DataLoader(samples, batch_size=16, shuffle=True, drop_last=True)

    # The probe: 32 held-out lines, built once before training, identical on every process.   # <- layerwatch
    lines = [line for line in held_out.splitlines() if len(line) > 20][:32]
    ids = torch.zeros(len(lines), BLOCK, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, line in enumerate(lines):
        encoded = byte_ids(line)[:BLOCK]
        ids[row, : len(encoded)] = torch.tensor(encoded)
        mask[row, : len(encoded)] = 1
    probe = layerwatch.Probe.from_tensors(ids, mask, vocab_size=256, views=2, seed=0)  # <- layerwatch

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=BLOCK * 2, attention_dropout=0.1,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # layerwatch's own TensorBoard run (per-layer runs, heatmaps, histograms, alerts) goes to <out>/layerwatch
    # beside the tracker's flat charts; tensorboard=False leaves it out.
    watch = LayerWatchAccelerate(accelerator, model, probe, every=args.every, batch_size=16)  # <- layerwatch

    completed = 0
    model.train()
    while completed < args.steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed += 1
                accelerator.log({"train/loss": loss.item()}, step=completed)
            watch.step()  # <- layerwatch: every process, every iteration; counts optimizer steps
            if completed >= args.steps:
                break

    watch.finish()  # <- layerwatch: probes the last step if it was not on the schedule, then closes
    accelerator.end_training()
    if accelerator.is_main_process:
        run = layerwatch.read_run(watch.logdir)
        entropy = [round(float(value), 3) for value in run.metric("prompt_entropy")[-1]]
        print(f"probed steps {run.steps.tolist()}; final prompt entropy per layer: {entropy}")
        print(f"tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
