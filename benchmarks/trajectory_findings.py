"""Measure the papers' qualitative findings (research notes §10.3, §10.4, §10.7) with layerwatch on small models.

Prints tables; nothing is asserted (tests/test_findings.py holds the fast checks). Sections:

1. ``flat``: how flat prompt entropy is across depth in randomly initialised models (Pythia-410m at step 1: about
   0.89 at every layer), for a GPT-2-small-shaped model with fewer layers, a Pythia-70m-shaped GPT-NeoX and the
   tiny test models, on Shakespeare prompts (the demo's corpus and BPE tokenizer, no download).
2. ``sweeps``: prompt entropy per layer when a fraction of each prompt's tokens is replaced by uniform random ids
   (Pythia: rises at every layer) or by repeats of one of its tokens (Pythia: falls at every layer), for tiny
   Pythia-like models trained for a fixed number of steps on (a) repetitive text and (b) a small word grammar.
3. ``demo``: with ``--demo DIR`` (the output of ``layerwatch demo``), runs ``layerwatch trajectory`` over its
   checkpoints with the training run's probe, prints which layers changed most, and runs the two sweeps on the
   last checkpoint with the probe's Shakespeare prompts.

Usage::

    python benchmarks/trajectory_findings.py                        # sections 1 and 2 (a few minutes on 2 cores)
    layerwatch demo --out /tmp/lw-demo && python benchmarks/trajectory_findings.py --demo /tmp/lw-demo --only demo
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from layerwatch import LayerWatch, Probe

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def layer_values(model, probe, metrics=("prompt_entropy",)):
    watch = LayerWatch(probe, logdir=None, metrics=list(metrics), strict=True, collapse_threshold=0.0)
    try:
        record = watch.run(model, 0)
    finally:
        watch.close()
    return record


def row(values):
    return " ".join(f"{v:6.3f}" for v in values)


# --------------------------------------------------------------------------------------------------- 1. flatness


def shakespeare_probe(num_prompts=32, max_length=128):
    from layerwatch.cli.demo import load_corpus, train_tokenizer

    text = load_corpus()
    tokenizer = train_tokenizer(text, 2048)
    paragraphs = [p.replace("\n", " ") for p in text.split("\n\n") if len(p) > 400]
    probe = Probe.from_texts(paragraphs, tokenizer, max_length=max_length, num_prompts=num_prompts, views=0)
    return probe, len(tokenizer)


def flatness(args):
    import transformers

    probe, vocab = shakespeare_probe()
    print(f"## 1. Random-init prompt entropy across depth ({probe.num_prompts} Shakespeare prompts of up to 128 BPE "
          f"tokens, vocabulary {vocab}; layer 0 = embeddings)\n")
    shapes = {
        "GPT-2-small shape, 6 layers (768 wide, 12 heads)": transformers.GPT2Config(
            vocab_size=vocab, n_positions=256, n_embd=768, n_layer=6, n_head=12, bos_token_id=0, eos_token_id=0),
        "GPT-2-small shape, 12 layers (768 wide, 12 heads)": transformers.GPT2Config(
            vocab_size=vocab, n_positions=256, n_embd=768, n_layer=12, n_head=12, bos_token_id=0, eos_token_id=0),
        "Pythia-70m shape (GPT-NeoX, 6 x 512, 8 heads)": transformers.GPTNeoXConfig(
            vocab_size=vocab, hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
            max_position_embeddings=256),
        "tiny GPT-2 (3 x 64)": transformers.GPT2Config(
            vocab_size=vocab, n_positions=256, n_embd=64, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0),
        "tiny GPT-NeoX (3 x 64)": transformers.GPTNeoXConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256),
    }
    print("| model | seed | prompt entropy per layer | max - min | dataset entropy per layer "
          "| curvature (first, last) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, config in shapes.items():
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
            record = layer_values(model, probe, ("prompt_entropy", "dataset_entropy", "curvature"))
            entropy = record.metrics["prompt_entropy"]
            curvature = record.metrics["curvature"]
            print(f"| {name} | {seed} | {row(entropy)} | {max(entropy) - min(entropy):.3f} | "
                  f"{row(record.metrics['dataset_entropy'])} | {curvature[0]:.3f}, {curvature[-1]:.3f} |", flush=True)
            del model
    print()


# ----------------------------------------------------------------------------------------------------- 2. sweeps

WORDS = (["<bos>", "<pad>", ".", "and"] + ["the", "a", "every", "some", "my", "your"]
         + ["red", "big", "small", "old", "new", "green", "happy", "sad", "quiet", "loud"]
         + ["cat", "dog", "bird", "man", "woman", "child", "tree", "house", "car", "river", "hill", "book"]
         + ["sees", "likes", "finds", "chases", "holds", "wants", "reads", "builds"]
         + ["on", "in", "near", "under", "over", "by"])
VOCAB, LENGTH = 64, 48


def grammar_batch(batch, generator):
    ids = {w: i for i, w in enumerate(WORDS)}
    groups = [WORDS[4:10], WORDS[10:20], WORDS[20:32], WORDS[32:40], WORDS[40:46]]

    def pick(group):
        return ids[group[int(torch.randint(len(group), (1,), generator=generator))]]

    def maybe(p):
        return float(torch.rand(1, generator=generator)) < p

    rows = []
    for _ in range(batch):
        seq = [0]
        while len(seq) < LENGTH:
            det, adj, noun, verb, prep = groups
            seq += [pick(det)] + ([pick(adj)] if maybe(0.5) else []) + [pick(noun), pick(verb), pick(det)]
            seq += ([pick(adj)] if maybe(0.5) else []) + [pick(noun)]
            seq += ([pick(prep), pick(det), pick(noun)] if maybe(0.4) else []) + [ids["."]]
        rows.append(seq[:LENGTH])
    return torch.tensor(rows)


def repetitive_batch(batch, generator):
    rows = []
    for _ in range(batch):
        period = int(torch.randint(3, 9, (1,), generator=generator))
        pattern = torch.randint(4, VOCAB, (period,), generator=generator).tolist()
        rows.append([0] + (pattern * (LENGTH // period + 1))[: LENGTH - 1])
    return torch.tensor(rows)


def sweep(model, clean, vocab, *, kind, seed=123, low=4):
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(clean.shape, generator=generator)
    uniform[:, 0] = 2.0  # never replace the first token
    if kind == "random":
        replacement = torch.randint(low, vocab, clean.shape, generator=generator)
    else:
        pick = torch.randint(1, clean.shape[1], (clean.shape[0],), generator=generator)
        replacement = clean[torch.arange(clean.shape[0]), pick][:, None].expand_as(clean)
    fractions = FRACTIONS if kind == "random" else tuple(f * 0.9 for f in FRACTIONS)
    table = []
    for fraction in fractions:
        ids = torch.where(uniform < fraction, replacement, clean)
        probe = Probe.from_tensors(ids, vocab_size=vocab, views=0)
        table.append((fraction, layer_values(model, probe).metrics["prompt_entropy"]))
    values = torch.tensor([v for _, v in table])
    direction = (values[1:] - values[:-1]) > 0 if kind == "random" else (values[1:] - values[:-1]) < 0
    monotone = [bool(direction[:, layer].all()) for layer in range(values.shape[1])]
    return table, monotone


def print_sweep(title, table, monotone, kind):
    print(f"{title}: {'random ids' if kind == 'random' else 'repeats of one token'}")
    for fraction, values in table:
        print(f"  fraction {fraction:4.2f}: {row(values)}")
    expected = "rises" if kind == "random" else "falls"
    layers = [i for i, ok in enumerate(monotone) if ok]
    print(f"  {expected} monotonically at layers {layers} of {len(monotone)}\n", flush=True)


def train_tiny(batch_fn, steps, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = transformers.GPTNeoXForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed + 1)
    started = time.perf_counter()
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        batch = batch_fn(32, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item(), time.perf_counter() - started


def sweeps(args):
    print(f"## 2. Sweeps on tiny Pythia-like models (GPT-NeoX 4 x 64, vocabulary {VOCAB}, prompts of {LENGTH} tokens; "
          f"{args.steps} training steps of 32 sequences, AdamW 3e-3)\n")
    for name, batch_fn in (("repetitive text", repetitive_batch), ("word grammar", grammar_batch)):
        untrained, _, _ = train_tiny(batch_fn, 0)
        model, loss, seconds = train_tiny(batch_fn, args.steps)
        clean = batch_fn(32, torch.Generator().manual_seed(99))
        trained_label = f"{name}, trained (loss {loss:.2f}, {seconds:.0f} s)"
        for label, m in ((f"{name}, random init", untrained), (trained_label, model)):
            for kind in ("random", "repeat"):
                table, monotone = sweep(m, clean, VOCAB, kind=kind)
                print_sweep(label, table, monotone, kind)


# ------------------------------------------------------------------------------------------------------- 3. demo


def demo(args):
    import transformers

    from layerwatch.analysis.trajectory import discover_checkpoints, run_trajectory, summary_table

    root = Path(args.demo)
    probe = Probe.load(root / "layerwatch" / "probe.safetensors")
    out = Path(args.out) if args.out else root / "layerwatch-trajectory"
    print(f"## 3. `layerwatch trajectory {root}` (probe: the training run's, {probe.num_prompts} prompts)\n")
    started = time.perf_counter()
    run = run_trajectory([root], probe=probe, out=out, metrics="standard")
    print(f"({len(run.steps)} checkpoints, {time.perf_counter() - started:.0f} s)\n")
    print(summary_table(run))
    print()
    last = discover_checkpoints([root])[-1]
    model = transformers.AutoModelForCausalLM.from_pretrained(last.path, use_safetensors=True).eval()
    clean = probe.input_ids.clone()
    mask = probe.attention_mask.bool()
    lengths = mask.sum(1)
    keep = lengths == lengths.max()  # full-length prompts only, so replacements never touch padding
    clean = clean[keep]
    vocab = model.get_input_embeddings().weight.shape[0]
    for kind in ("random", "repeat"):
        table, monotone = sweep(model, clean, vocab, kind=kind, low=1)
        print_sweep(f"demo {last.name} ({int(keep.sum())} full-length prompts)", table, monotone, kind)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["flat", "sweeps", "demo"], action="append")
    parser.add_argument("--seeds", type=int, default=2, help="random inits per model shape in section 1")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the tiny models in section 2")
    parser.add_argument("--demo", help="output folder of `layerwatch demo` for section 3")
    parser.add_argument("--out", help="run directory of section 3 (default: <demo>/layerwatch-trajectory)")
    args = parser.parse_args()
    sections = args.only or (["flat", "sweeps"] + (["demo"] if args.demo else []))
    torch.set_grad_enabled(True)
    if "flat" in sections:
        flatness(args)
    if "sweeps" in sections:
        sweeps(args)
    if "demo" in sections:
        if not args.demo:
            print("--only demo needs --demo DIR (run `layerwatch demo --out DIR` first)", file=sys.stderr)
            return 2
        demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
