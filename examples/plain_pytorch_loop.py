"""A plain PyTorch training loop watched by layerwatch: one line in the loop.

    python examples/plain_pytorch_loop.py --out runs/plain --steps 60
    tensorboard --logdir runs/plain

The model is a tiny GPT-2 built from a config and trained on a synthetic "language" (a noisy periodic sequence),
so the script needs no download and finishes in a few minutes on a CPU.
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import layerwatch


def synthetic_batches(steps, batch_size, length, vocab, seed=0):
    """Token sequences that follow a simple rule (next = previous + stride, with noise): learnable structure."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch_size, 1), generator=generator)
        stride = torch.randint(1, 4, (batch_size, 1), generator=generator)
        ids = (start + stride * torch.arange(length)) % vocab
        noise = torch.rand(ids.shape, generator=generator) < 0.1
        yield torch.where(noise, torch.randint(0, vocab, ids.shape, generator=generator), ids)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/plain_pytorch_loop")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    vocab = 256
    config = GPT2Config(  # special-token ids inside the vocabulary (GPT-2's default, 50256, is not)
        vocab_size=vocab, n_positions=128, n_embd=64, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # the class name maps to no loss in transformers 5, which would warn
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # The probe: a fixed batch of held-out sequences, with augmented views generated once from the seed.
    probe_ids = next(synthetic_batches(1, 32, 64, vocab, seed=1234))
    probe = layerwatch.Probe.from_tensors(probe_ids, vocab_size=vocab, views=2, seed=0)
    watch = layerwatch.LayerWatch(probe, logdir=args.out, every=args.every, metrics="standard")

    for step, batch in enumerate(synthetic_batches(args.steps, 16, 64, vocab), start=1):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        watch.step(model, step)  # <- the one line: probes at steps 1, 2, 4, 8, 16, then every `every` steps
        if step % 10 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    watch.close()

    run = layerwatch.read_run(args.out)
    print(f"probed steps {run.steps.tolist()}; prompt entropy per layer at the last probe:")
    print("  " + "  ".join(f"{v:.3f}" for v in run.metric("prompt_entropy")[-1]))
    print(f"view it with: tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
