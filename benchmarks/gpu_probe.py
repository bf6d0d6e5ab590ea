"""What a probe costs on a GPU: forward passes, metrics, eigenvalue path, peak extra memory, overhead at every=200.

    python benchmarks/gpu_probe.py                    # on a CUDA machine: GPT-2 small and a ~1.1B Llama, bfloat16
    python benchmarks/gpu_probe.py --models gpt2-small --prompts 64 --tokens 512
    python benchmarks/gpu_probe.py --smoke            # tiny models on the CPU: exercises this script (a test runs it)

Models have random weights, built from configs (no download): ``gpt2-small`` (12 layers, d=768, 124M parameters)
and ``llama-1b`` (TinyLlama-shaped: 22 layers, d=2048, grouped-query attention, 1.1B parameters), in bfloat16.
For each, with the ``standard`` preset (the clean batch and 2 augmented views, ``--prompts`` x ``--tokens``,
micro-batches of ``--batch-size``), one table row holds medians of ``--repeats``:

- forward: the probe's micro-batches through the model, without layerwatch (synchronized);
- probe: ``LayerWatch.run`` (forwards, hooks, metrics, set-level step; no sinks);
- metrics: probe - forward, and its share of the forward passes (target on an H100/H200: <= 20%);
- eigenvalue paths: what :class:`layerwatch.metrics.EigenvaluePaths` chose for each Gram size (n: path);
- peak extra memory: the probe's peak allocated GPU memory above that of the bare forwards;
- train step: forward + backward + AdamW on a batch of ``--train-batch`` x ``--tokens`` (bfloat16 weights);
- overhead at every=200: probe / (200 x train step).

Without CUDA (and without ``--smoke``) it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

from timing import median_seconds  # benchmarks/timing.py

MIB = 2**20


def build_model(name: str, smoke: bool):
    """A random-weight causal LM of the named shape (tiny versions with ``smoke``)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = 512 if smoke else None
    if name == "gpt2-small":
        size = dict(n_embd=64, n_layer=2, n_head=4) if smoke else dict(n_embd=768, n_layer=12, n_head=12)
        vocab = vocab or 50257
        config = GPT2Config(vocab_size=vocab, n_positions=2048, bos_token_id=vocab - 1, eos_token_id=vocab - 1, **size)
        return GPT2LMHeadModel(config)
    if name == "llama-1b":
        size = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32)
        if smoke:
            size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        heads = size["num_attention_heads"]
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab or 32000, num_key_value_heads=max(heads // 8, 1),
                                            max_position_embeddings=4096, **size))
    raise ValueError(f"unknown model {name!r}; choose gpt2-small or llama-1b")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(call, device: torch.device) -> int:
    """Peak allocated memory during ``call`` above what was allocated before it (0 off CUDA)."""
    if device.type != "cuda":
        call()
        return 0
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(name: str, args, device: torch.device) -> dict:
    import layerwatch
    from layerwatch.metrics import base as metrics_base
    from layerwatch.monitor.model_facts import model_facts

    model = build_model(name, args.smoke).to(device=device, dtype=torch.bfloat16)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.prompts, args.tokens), generator=generator)
    probe = layerwatch.Probe.from_tensors(ids, vocab_size=vocab, views=2, seed=0)
    watch = layerwatch.LayerWatch(probe, logdir=None, metrics="standard", batch_size=args.batch_size, strict=True)

    forward_options = model_facts(model).forward_options  # use_cache=False, (num_)logits_to_keep=1: as the probe runs

    def bare_forwards():
        with torch.no_grad():
            for batch_ids, batch_mask in [(probe.input_ids, probe.attention_mask)] + list(probe.views[:2]):
                for start in range(0, batch_ids.shape[0], args.batch_size):
                    chunk = slice(start, start + args.batch_size)
                    model(input_ids=batch_ids[chunk].to(device), attention_mask=batch_mask[chunk].to(device),
                          **forward_options)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    train_ids = torch.randint(0, vocab, (args.train_batch, args.tokens), generator=generator).to(device)

    def train_step():
        model.train()
        model(train_ids, labels=train_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

    train_step()  # warm-up: kernels, optimizer state
    model.eval()
    watch.run(model, 0)  # warm-up: solver handles, the eigenvalue path measurements
    step = median_seconds(train_step, args.repeats, lambda: synchronize(device))
    optimizer.state.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    forward = median_seconds(bare_forwards, args.repeats, lambda: synchronize(device))
    probe_time = median_seconds(lambda: watch.run(model, 1), args.repeats, lambda: synchronize(device))
    extra = max(peak_bytes(lambda: watch.run(model, 2), device) - peak_bytes(bare_forwards, device), 0)
    paths = sorted((n, path) for (n, _, where), path in metrics_base._EIGENVALUE_PATHS.choices.items() if where != "cpu")
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "forward": forward,
        "probe": probe_time,
        "metrics": probe_time - forward,
        "paths": ", ".join(f"{n}: {path}" for n, path in paths) or "cpu (all on the CPU)",
        "extra": extra,
        "step": step,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-small,llama-1b")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, 1 repeat: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts, args.tokens, args.batch_size, args.train_batch, args.repeats = 6, 40, 3, 2, 1
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("gpu_probe: no CUDA device here; run it on a CUDA machine (or --smoke for a tiny CPU run of the script)")
        return 0
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    print(f"device: {what}; torch {torch.__version__}; probe {args.prompts} x {args.tokens}, 'standard' preset "
          f"(clean + 2 views), micro-batch {args.batch_size}, bfloat16; medians of {args.repeats}")
    rows = [measure(name.strip(), args, device) for name in args.models.split(",") if name.strip()]
    print()
    print("| model | params | forward | probe | metrics | metrics / forward | eigenvalue paths (n: path) "
          f"| peak extra memory | train step | overhead at every={args.every} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        share = row["metrics"] / row["forward"]
        overhead = row["probe"] / (args.every * row["step"])
        print(f"| {row['model']} | {row['params'] / 1e6:.0f}M | {1e3 * row['forward']:.0f} ms | {1e3 * row['probe']:.0f} ms "
              f"| {1e3 * row['metrics']:.0f} ms | {100 * share:.0f}% | {row['paths']} | {row['extra'] / MIB:.0f} MiB "
              f"| {1e3 * row['step']:.0f} ms | {100 * overhead:.2f}% |")
    if device.type == "cuda":
        met = all(row["metrics"] <= 0.2 * row["forward"] for row in rows)
        print(f"\ntarget: metrics <= 20% of the probe's forward passes: {'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
