"""What a probe costs a training run: time and peak memory, on CPU.

    python benchmarks/probe_overhead.py            # GPT-2-style, 6 layers, d=512, probe 64 x 128, "standard"
    python benchmarks/probe_overhead.py --quick    # smaller model, for a smoke run

Prints one table:
- one training step (batch 8 x 128, forward + backward + AdamW);
- one probe ("standard" preset: the clean batch and 2 augmented views, 64 prompts x 128 tokens);
- the same micro-batches through the model with no hooks and no metrics ("bare forwards"), and the probe as a
  multiple of them (target: metrics add at most 50%, i.e. <= 1.5x);
- peak extra memory above a bare forward of the same micro-batches, for layerwatch's hooks and for a capture with
  ``output_hidden_states=True``, in MiB and in units of one layer's activations of one micro-batch (target for
  layerwatch: at most two layers' activations plus the pooled states).

Each memory figure is measured in a fresh subprocess as the rise of the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs) over its resident set before the measured call, which is the first large call of
that process (memory freed by an earlier call would be reused unseen), with glibc's mmap threshold fixed so that
the peak follows the live tensors. Times are medians of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from timing import median_seconds  # benchmarks/timing.py

MIB = 2**20


def build(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    import layerwatch

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=8192, n_positions=256, n_embd=args.hidden, n_layer=args.layers, n_head=8,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.prompts, args.tokens), generator=generator)
    probe = layerwatch.Probe.from_tensors(ids, vocab_size=config.vocab_size, views=2, seed=0)
    return model, probe


def probe_batches(probe, batch_size):
    for ids, mask in [(probe.input_ids, probe.attention_mask)] + list(probe.views[:2]):
        for start in range(0, ids.shape[0], batch_size):
            yield ids[start : start + batch_size], mask[start : start + batch_size]


def bare_forwards(model, probe, batch_size, hidden_states=False):
    keep = []
    with torch.no_grad():
        for ids, mask in probe_batches(probe, batch_size):
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1,
                        output_hidden_states=hidden_states)
            if hidden_states:  # what a hidden-states capture holds: every layer of the micro-batch at once
                keep.append(torch.stack(out.hidden_states).mean(2))
            del out


def read_status(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(args):
    """One measurement in this fresh process: peak RSS rise of one call."""
    import layerwatch

    model, probe = build(args)
    model.eval()
    watch = layerwatch.LayerWatch(probe, logdir=None, metrics="standard", batch_size=args.batch_size, strict=True)
    calls = {
        "bare": lambda: bare_forwards(model, probe, args.batch_size),
        "hidden_states": lambda: bare_forwards(model, probe, args.batch_size, hidden_states=True),
        "layerwatch": lambda: watch.run(model, 1),
    }
    call = calls[args.measure]
    with torch.no_grad():  # lazy initialisation only; a full warm-up would leave its freed memory in the heap
        model(input_ids=probe.input_ids[:1, :8], use_cache=False)
    before = read_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak (VmHWM) to the current RSS
    call()
    print(json.dumps({"extra": read_status("VmHWM") - before}))


def measure_memory(args, what):
    command = [sys.executable, __file__, "--measure", what] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in ("layers", "hidden", "prompts", "tokens", "batch_size")
    ]
    # glibc raises its mmap threshold as large blocks are freed, after which they are recycled inside the heap:
    # the peak RSS then depends on the allocation history (runs differed by +-80 MiB). A fixed threshold gives every
    # tensor over 64 KiB its own mapping, returned on free, so the peak RSS follows the live tensors (runs agree
    # to 0.1 MiB).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = []
    for _ in range(args.memory_repeats):
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        results.append(json.loads(out)["extra"])
    return statistics.median(results)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer repeats")
    parser.add_argument("--measure", choices=["bare", "hidden_states", "layerwatch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return memory_child(args)
    if args.quick:
        args.layers, args.hidden, args.repeats, args.memory_repeats = 2, 128, 3, 1

    import layerwatch

    model, probe = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_ids = torch.randint(0, model.config.vocab_size, (8, args.tokens), generator=torch.Generator().manual_seed(1))

    def train_step():
        model.train()
        loss = model(train_ids, labels=train_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    watch = layerwatch.LayerWatch(probe, logdir=None, metrics="standard", batch_size=args.batch_size, strict=True)
    model.eval()
    train_step()  # warm up
    watch.run(model, 0)
    step_time = median_seconds(train_step, args.repeats)
    model.eval()
    bare_time = median_seconds(lambda: bare_forwards(model, probe, args.batch_size), args.repeats)
    probe_time = median_seconds(lambda: watch.run(model, 1), args.repeats)

    layer_bytes = args.batch_size * args.tokens * args.hidden * 4
    pooled_bytes = (args.layers + 1) * args.prompts * 3 * args.hidden * 4
    memory = {what: measure_memory(args, what) for what in ("bare", "hidden_states", "layerwatch")}
    extra_layerwatch = max(memory["layerwatch"] - memory["bare"], 0)
    extra_hidden = max(memory["hidden_states"] - memory["bare"], 0)

    print(f"model: GPT-2 style, {args.layers} layers, d={args.hidden}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; probe {args.prompts} x {args.tokens}, "
          f"'standard' preset (clean + 2 views), micro-batch {args.batch_size}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats}")
    print()
    print("| quantity | value |")
    print("|---|---|")
    print(f"| one training step (8 x {args.tokens}) | {step_time * 1000:.0f} ms |")
    print(f"| one probe, standard preset | {probe_time * 1000:.0f} ms |")
    print(f"| bare forwards of the same micro-batches | {bare_time * 1000:.0f} ms |")
    print(f"| probe / bare forwards (target <= 1.5) | {probe_time / bare_time:.2f}x |")
    print(f"| probe / training step | {probe_time / step_time:.1f}x |")
    print(f"| one layer's activations (micro-batch) | {layer_bytes / MIB:.1f} MiB |")
    print(f"| pooled states [L+1, M, 3, D] | {pooled_bytes / MIB:.1f} MiB |")
    print(f"| peak memory rise of the bare forwards alone | {memory['bare'] / MIB:.1f} MiB |")
    print(f"| peak extra memory, layerwatch hooks | {extra_layerwatch / MIB:.1f} MiB = {extra_layerwatch / layer_bytes:.1f} layers |")
    print(f"| peak extra memory, output_hidden_states=True | {extra_hidden / MIB:.1f} MiB = {extra_hidden / layer_bytes:.1f} layers |")
    budget = 2 * layer_bytes + pooled_bytes
    print(f"| layerwatch within 2 layers + pooled ({budget / MIB:.1f} MiB) | {'yes' if extra_layerwatch <= budget else 'NO'} |")


if __name__ == "__main__":
    main()
