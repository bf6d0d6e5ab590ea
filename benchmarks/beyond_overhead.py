"""What the SPEC §7 metrics add to one probe's time, on CPU.

    python benchmarks/beyond_overhead.py            # GPT-2-style, 6 layers, d=512, probe 64 x 128
    python benchmarks/beyond_overhead.py --quick    # smaller, for a smoke run
    python benchmarks/beyond_overhead.py --presets light,standard

Times one probe (``LayerWatch.run``, no logdir) of a preset ("light" by default: the cheapest probe, so the largest
relative cost) without the new metrics, and with each group added: the sink pair (``massive_activation`` +
``prompt_entropy_without_sinks``), the CKA pair (``cka_to_previous`` + ``cka_to_first``) and ``probe_accuracy`` +
``best_layer`` (2 classes). The variants are probed in turn, repeat after repeat, so a busy machine slows them alike.
Prints the medians and the increase over the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

GROUPS = {
    "sinks": ("massive_activation", "prompt_entropy_without_sinks"),
    "cka": ("cka_to_previous", "cka_to_first"),
    "labels": ("probe_accuracy", "best_layer"),
}


def build(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    import layerwatch

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=8192, n_positions=256, n_embd=args.hidden, n_layer=args.layers, n_head=8, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (args.prompts, args.tokens), generator=torch.Generator().manual_seed(0))
    probe = layerwatch.Probe.from_tensors(ids, vocab_size=config.vocab_size, views=2, seed=0)
    labels = [i % 2 for i in range(args.prompts)]
    labelled = layerwatch.Probe.from_tensors(ids, vocab_size=config.vocab_size, views=2, seed=0, labels=labels)
    return model, probe, labelled


def make_watch(probe, metrics):
    from layerwatch import LayerWatch

    return LayerWatch(probe, logdir=None, metrics=list(metrics), batch_size=16)


def timed(watch, model, step):
    started = time.perf_counter()
    watch.run(model, step)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--presets", default="light", help="comma-separated presets to measure (default light)")
    args = parser.parse_args()
    args.layers, args.hidden, args.prompts, args.tokens = (2, 64, 16, 32) if args.quick else (6, 512, 64, 128)
    from layerwatch import registry

    torch.set_num_threads(1)
    model, probe, labelled = build(args)
    new = {name for group in GROUPS.values() for name in group}
    print(f"model: GPT-2-style, {args.layers} layers, d={args.hidden}; probe {args.prompts} x {args.tokens}; "
          f"1 thread; median of {args.repeats}, the baseline and each variant probed in turn")
    print(f"{'preset':<9} {'added':<8} {'probe s':>8} {'added s':>8} {'added %':>8}")
    for preset in args.presets.split(","):
        base = [m for m in registry.preset(preset) if m not in new]
        watches = {"-": make_watch(probe, base)}
        for group, names in GROUPS.items():
            watches[group] = make_watch(labelled if group == "labels" else probe, base + list(names))
        times = {group: [] for group in watches}
        for step in range(args.repeats + 1):  # step 0 warms up (and gives CKA its first reference)
            for group, watch in watches.items():
                seconds = timed(watch, model, step)
                if step:
                    times[group].append(seconds)
        base_s = statistics.median(times["-"])
        print(f"{preset:<9} {'-':<8} {base_s:8.3f}")
        for group in GROUPS:
            with_s = statistics.median(times[group])
            print(f"{preset:<9} {group:<8} {with_s:8.3f} {with_s - base_s:8.3f} {100 * (with_s - base_s) / base_s:7.1f}%")


if __name__ == "__main__":
    main()
