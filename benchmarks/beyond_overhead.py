"""What the SPEC §7 metrics add to one probe's time, on CPU.

    python benchmarks/beyond_overhead.py            # GPT-2-style, 6 layers, d=512, probe 64 x 128
    python benchmarks/beyond_overhead.py --quick    # smaller, for a smoke run
    python benchmarks/beyond_overhead.py --presets light,standard

Times one probe (``LayerWatch.run``, no logdir) of a preset ("light" by default: the cheapest probe, so the largest
relative cost) without the new metrics, and with each group added: the sink pair (``massive_activation`` +
``prompt_entropy_without_sinks``), the CKA pair (``cka_to_previous`` + ``cka_to_first``) and ``probe_accuracy`` +
``best_layer`` (2 classes). The variants are probed in turn, repeat after repeat, so a busy machine slows them alike.
Prints the medians and the increase over the baseline; then, because a shared machine's noise can exceed the small
differences, the added computation timed alone (the hooks' per-layer work and the set-level step, with the same
shapes) as a share of the baseline probe ("token_metrics" is the existing per-layer work, for scale).
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
    from layerwatch.metrics import registry

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
        if preset == "light":
            print_components(args, base_s)


def component_seconds(args, repeats=20):
    """The added computation alone, per probe: what the hooks and the set-level step do for each group."""
    from layerwatch import metrics as M
    from layerwatch.monitor.references import References

    layers, prompts, tokens, width = args.layers + 1, args.prompts, args.tokens, args.hidden
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, tokens, width, generator=generator)  # one layer of one micro-batch of 16 prompts
    mask = torch.ones(16, tokens, dtype=torch.bool)
    entropy = M.prompt_entropy(hidden, mask)
    pooled = torch.randn(layers, prompts, width, generator=generator)
    previous = torch.randn(layers, prompts, width, generator=generator)
    labels = [i % 2 for i in range(prompts)]
    references = References("bench", None, resume_step=None, write=False)
    batches = layers * -(-prompts // 16)  # (layer, micro-batch) pairs the hooks see per probe

    def per_probe(fn, times):
        fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return times * (time.perf_counter() - started) / repeats

    def sinks():
        M.massive_activation(hidden, mask)
        M.prompt_entropy_without_sinks(hidden, mask, entropy=entropy)

    def cka():
        refs = references.for_probe(pooled)
        M.linear_cka(pooled, previous)
        M.linear_cka(pooled, refs["first"])
        references.update(pooled, 1)

    def accuracy():
        M.best_layer(M.probe_accuracy(pooled.double(), labels))

    return {
        "sinks": per_probe(sinks, batches),
        "cka": per_probe(cka, 1),
        "labels": per_probe(accuracy, 1),
        "token_metrics": per_probe(lambda: M.token_metrics(hidden, mask), batches),
    }


def print_components(args, base_s):
    parts = component_seconds(args)
    print(f"\nthe added computation alone (per probe, {args.layers + 1} layers x {-(-args.prompts // 16)} micro-batches), "
          f"as a share of the baseline light probe ({base_s:.3f} s):")
    print(f"{'added':<14} {'seconds':>8} {'% of probe':>10}")
    for name, seconds in parts.items():
        print(f"{name:<14} {seconds:8.4f} {100 * seconds / base_s:9.2f}%")


if __name__ == "__main__":
    main()
