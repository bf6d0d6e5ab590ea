"""What the standard errors cost: one whole probe with and without them, per preset, on this CPU.

    python benchmarks/stderr_cost.py            # the README's table (a few minutes on 2 idle cores)
    python benchmarks/stderr_cost.py --quick    # a small model, one repeat, for a smoke run

Each row is ``LayerWatch.run`` (forward passes, token metrics, set-level metrics, the record; ``logdir=None``, so no
writer) of a random-init GPT-2-style model on a labelled probe of random tokens, once with the standard errors
(``layerwatch.metrics.uncertainty.JACKKNIFE_GROUPS = 8``: per-prompt ones plus an 8-group jackknife of every
set-level metric) and once without the jackknife (``JACKKNIFE_GROUPS = 0``; the per-prompt standard errors, a few
microseconds, stay). Times are the CPU time of the process with one torch thread (median of ``--repeats``), which a
busy shared machine inflates far less than wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from layerwatch import LayerWatch, Probe
from layerwatch.metrics import uncertainty

DEFAULT_GROUPS = uncertainty.JACKKNIFE_GROUPS  # 8


def build(layers: int, hidden: int, prompts: int, tokens: int, seed: int = 0):
    config = transformers.GPT2Config(vocab_size=512, n_positions=2 * tokens + 32, n_embd=hidden, n_layer=layers,
                                     n_head=max(1, hidden // 64), bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(3, 512, (prompts, tokens), generator=torch.Generator().manual_seed(seed))
    probe = Probe.from_tensors(ids, vocab_size=512, views=16, labels=[i % 4 for i in range(prompts)])
    return model, probe


def probe_seconds(model, probe, preset: str, groups: int, repeats: int) -> float:
    uncertainty.JACKKNIFE_GROUPS = groups
    watch = LayerWatch(probe, logdir=None, metrics=preset, batch_size=16)
    watch.run(model, 0)  # warm-up
    times = []
    for step in range(1, repeats + 1):
        start = time.process_time()
        watch.run(model, step)
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, one repeat (a smoke run)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.prompts, args.tokens, args.repeats = 2, 64, 24, 16, 1
    torch.set_num_threads(1)
    model, probe = build(args.layers, args.hidden, args.prompts, args.tokens)
    print(f"GPT-2-style model, {args.layers} layers x {args.hidden}, {args.prompts} prompts x {args.tokens} tokens, "
          f"labelled (4 classes); CPU seconds per probe, one thread, median of {args.repeats}\n")
    print("| preset | without stderr | with stderr | ratio | stderr share of the probe |")
    print("|---|---|---|---|---|")
    for preset in ("light", "standard", "paper"):
        without = probe_seconds(model, probe, preset, 0, args.repeats)
        with_errors = probe_seconds(model, probe, preset, DEFAULT_GROUPS, args.repeats)
        share = (with_errors - without) / with_errors
        print(f"| {preset} | {without:.3f} s | {with_errors:.3f} s | {with_errors / without:.2f} | {share:.0%} |")
    uncertainty.JACKKNIFE_GROUPS = DEFAULT_GROUPS


if __name__ == "__main__":
    main()
