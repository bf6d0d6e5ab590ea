"""Which layer is best right now? A labelled probe watched while a small model learns a class.

Generates labelled sentences ("the fox chased the mouse" / "the mouse chased the fox": is the chaser a predator?),
where both classes use the same words, so the class lives in the word order and no bag of tokens can decode it.
Trains a tiny byte-level GPT-2 with a classification head on CPU (a few minutes) and probes every layer every
``--every`` steps with a probe that carries the labels::

    python examples/labeled_probe.py --out runs/labeled-probe --steps 300
    tensorboard --logdir runs/labeled-probe      # layerwatch/best_layer; layerwatch/probe_accuracy, a run per layer
    layerwatch report runs/labeled-probe          # the best layer is starred on the probe_accuracy pictures

The embeddings (layer 0, a bag of bytes) stay near chance (0.5) throughout. At initialisation the deepest layer
separates the classes best; as the model learns, the earlier blocks learn it too and ``layerwatch/best_layer``
moves down to the first layer that reaches the top accuracy (the earliest layer wins ties). The layerwatch lines are marked ``# <- layerwatch``.
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import GPT2Config, GPT2Model

import layerwatch

PREDATORS = ("fox", "cat", "hawk", "wolf", "owl", "snake")
PREY = ("mouse", "rabbit", "sparrow", "frog", "vole", "lamb")
VERBS = ("chased", "watched", "followed", "found", "saw", "heard")


def sentences(count: int, seed: int) -> tuple[list[str], list[int]]:
    """``count`` sentences and their labels: 1 when the subject (the chaser) is the predator."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(count):
        predator, prey, verb = rng.choice(PREDATORS), rng.choice(PREY), rng.choice(VERBS)
        label = rng.randrange(2)
        subject, obj = (predator, prey) if label else (prey, predator)
        texts.append(f"the {subject} {verb} the {obj}")
        labels.append(label)
    return texts, labels


def encode(texts: list[str], width: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes (vocabulary 256; 0 pads), right-padded to ``width``."""
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    for row, text in enumerate(texts):
        data = list(text.encode("utf-8"))[:width]
        ids[row, : len(data)] = torch.tensor(data)
    return ids, (ids != 0).long()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/labeled-probe", help="run directory (TensorBoard + layerwatch)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--every", type=int, default=25, help="probe every N optimizer steps")
    args = parser.parse_args()
    torch.manual_seed(0)

    probe_texts, probe_labels = sentences(60, seed=1)
    probe_ids, probe_mask = encode(probe_texts)
    probe = layerwatch.Probe.from_tensors(  # <- layerwatch: a probe with one label per prompt
        probe_ids, probe_mask, vocab_size=256, views=0, labels=probe_labels
    )
    watch = layerwatch.LayerWatch(  # <- layerwatch
        probe, logdir=args.out, every=args.every, metrics=["probe_accuracy", "best_layer", "cka_to_previous",
                                                           "prompt_entropy"],
        probe_at_start=True,
    )

    model = GPT2Model(GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    ))
    head = torch.nn.Linear(64, 2)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    texts, labels = sentences(4000, seed=2)
    ids, mask = encode(texts)
    targets = torch.tensor(labels)
    for step in range(args.steps + 1):
        if step > 0:
            batch = torch.randint(0, len(texts), (32,))
            model.train()
            hidden = model(input_ids=ids[batch], attention_mask=mask[batch]).last_hidden_state
            pooled = (hidden * mask[batch, :, None]).sum(1) / mask[batch].sum(1, keepdim=True)
            loss = torch.nn.functional.cross_entropy(head(pooled), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        record = watch.step(model, step)  # <- layerwatch
        if record is not None:
            accuracy = ", ".join(f"{v:.2f}" for v in record.metrics["probe_accuracy"])
            print(f"step {step:4d}: probe_accuracy per layer [{accuracy}], best layer {record.scalars['best_layer']:.0f}")
    watch.close()  # <- layerwatch
    print(f"\nview it with:\n  tensorboard --logdir {args.out}\n  layerwatch report {args.out}")


if __name__ == "__main__":
    main()
