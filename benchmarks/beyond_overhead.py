"""What the SPEC §7 metrics add to one probe's time, on CPU.

    python benchmarks/beyond_overhead.py            # GPT-2-style, 6 layers, d=512, probe 64 x 128
    python benchmarks/beyond_overhead.py --quick    # smaller, for a smoke run

Times one probe (``LayerWatch.run``, no logdir) of the "light" and "standard" presets without the new metrics,
then with each group added: the sink pair (``massive_activation`` + ``prompt_entropy_without_sinks``), the CKA
pair (``cka_to_previous`` + ``cka_to_first``) and ``probe_accuracy`` + ``best_layer`` (2 classes). Prints the
median of --repeats and the increase over the baseline of the same preset. Groups not registered yet are skipped.
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
    config = GPT2Config(vocab_size=8192, n_positions=256, n_embd=args.hidden, n_layer=args.layers, n_head=8)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (args.prompts, args.tokens), generator=torch.Generator().manual_seed(0))
    probe = layerwatch.Probe.from_tensors(ids, vocab_size=config.vocab_size, views=2, seed=0)
    labels = [i % 2 for i in range(args.prompts)]
    try:
        labelled = layerwatch.Probe.from_tensors(ids, vocab_size=config.vocab_size, views=2, seed=0, labels=labels)
    except TypeError:  # labels not supported yet
        labelled = None
    return model, probe, labelled


def time_probe(model, probe, metrics, repeats):
    from layerwatch import LayerWatch

    watch = LayerWatch(probe, logdir=None, metrics=list(metrics), batch_size=16)
    watch.run(model, 0)  # warm-up (and the first probe: CKA needs a previous one)
    times = []
    for step in range(1, repeats + 1):
        started = time.perf_counter()
        watch.run(model, step)
        times.append(time.perf_counter() - started)
    watch.close()
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.layers, args.hidden, args.prompts, args.tokens = (2, 64, 16, 32) if args.quick else (6, 512, 64, 128)
    from layerwatch import registry

    torch.set_num_threads(1)
    model, probe, labelled = build(args)
    new = {name for group in GROUPS.values() for name in group}
    print(f"model: GPT-2-style, {args.layers} layers, d={args.hidden}; probe {args.prompts} x {args.tokens}; "
          f"1 thread; median of {args.repeats}")
    print(f"{'preset':<9} {'added':<8} {'probe s':>8} {'added s':>8} {'added %':>8}")
    for preset in ("light", "standard"):
        base = [m for m in registry.preset(preset) if m not in new]
        base_s = time_probe(model, probe, base, args.repeats)
        print(f"{preset:<9} {'-':<8} {base_s:8.3f}")
        for group, names in GROUPS.items():
            if not all(name in registry.REGISTRY for name in names):
                print(f"{preset:<9} {group:<8} (not registered)")
                continue
            use = labelled if group == "labels" else probe
            if use is None:
                print(f"{preset:<9} {group:<8} (probe labels not supported)")
                continue
            with_s = time_probe(model, use, base + list(names), args.repeats)
            print(f"{preset:<9} {group:<8} {with_s:8.3f} {with_s - base_s:8.3f} {100 * (with_s - base_s) / base_s:7.1f}%")


if __name__ == "__main__":
    main()
