"""How the metrics' cost per probe grows with prompt length, layer count, prompt count and width, on this CPU.

    python benchmarks/probe_cost.py            # the README's cost table (about a minute on 2 idle cores)
    python benchmarks/probe_cost.py --quick    # two small rows, for a smoke run

Each row is one probe's metrics, computed the way the monitor computes them (``standard`` preset): per layer and
micro-batch of 16 prompts, ``token_metrics`` on the clean states and ``mean_pool`` of 2 augmented views; then the
set-level step (dataset entropy, effective rank, InfoNCE, DiME, LiDAR, bimodality). The forward passes are not
included (``benchmarks/probe_overhead.py`` measures a whole probe). Hidden states are synthetic float32 (low-rank
structure plus noise, every prompt full length). Each row runs in a fresh process with one torch thread: the time
is the CPU time of that process (median of ``--repeats``), which a busy shared machine inflates far less than wall
time; on ``n`` idle cores the metrics spread their Gram blocks and eigenvalues and take up to ``n`` times less
wall time. The memory is the rise of the peak resident set over the inputs (VmHWM reset through
/proc/self/clear_refs, glibc's mmap threshold fixed so that the peak follows the live tensors). The "estimate"
column is :func:`layerwatch.monitor.cost.estimate_probe_cost` for the same shape on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

MIB = 2**20
BASE = dict(tokens=128, layers=7, prompts=32, width=512, alpha=1.0)
ROWS = [
    {},
    dict(tokens=512),
    dict(tokens=2048),
    dict(tokens=2048, alpha=2.0),
    dict(layers=13),
    dict(prompts=128),
    dict(width=1024),
]
QUICK_ROWS = [dict(tokens=64, layers=3, prompts=8, width=64), dict(tokens=128, layers=3, prompts=8, width=64)]
SET_METRICS = ("dataset_entropy", "effective_rank", "infonce", "dime", "lidar")
BATCH = 16


def read_status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(shape: dict, repeats: int) -> dict:
    """Time and peak memory of one probe's metrics for ``shape``, in this fresh process."""
    from layerwatch import metrics

    torch.set_num_threads(1)
    t, layers, m, d, alpha = shape["tokens"], shape["layers"], shape["prompts"], shape["width"], shape["alpha"]
    b = min(BATCH, m)
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(32, d, generator=gen)
    hidden = torch.randn(b, t, 32, generator=gen) @ basis + 0.3 * torch.randn(b, t, d, generator=gen)
    mask = torch.ones(b, t, dtype=torch.bool)
    pooled = torch.randn(layers, m, d, generator=gen)
    views = pooled.unsqueeze(-2) + 0.3 * torch.randn(layers, m, 2, d, generator=gen)

    def probe_metrics():
        entropies = []
        for _ in range(layers):
            for _ in range(0, m, b):  # one micro-batch: the clean states, then each view's pooling
                entropies.append(metrics.token_metrics(hidden, mask, alpha=alpha)["prompt_entropy"])
                for _ in range(2):
                    metrics.mean_pool(hidden, mask)
        metrics.bimodality(torch.cat(entropies))
        metrics.dataset_entropy(pooled, alpha=alpha)
        metrics.effective_rank(pooled)
        metrics.infonce(views[..., 0, :], views[..., 1, :])
        metrics.dime(views[..., 0, :], views[..., 1, :], alpha=alpha)
        metrics.lidar(views, alpha=alpha)

    probe_metrics()  # warm-up (thread pool, first-call costs); its large blocks went back to the OS on free
    before = read_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak (VmHWM) to the current RSS
    start = time.process_time()
    probe_metrics()
    times = [time.process_time() - start]
    peak = read_status("VmHWM") - before
    for _ in range(repeats - 1):
        start = time.process_time()
        probe_metrics()
        times.append(time.process_time() - start)
    return {"seconds": statistics.median(times), "peak": peak}


def measure(shape: dict, repeats: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, __file__, "--child", json.dumps(shape), "--repeats", str(repeats)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="two small rows")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.repeats)))
        return 0
    from layerwatch.monitor.cost import estimate_probe_cost

    rows = QUICK_ROWS if args.quick else ROWS
    print(f"metrics of one probe, 'standard' preset, float32 states, micro-batches of {BATCH}; torch {torch.__version__}, "
          f"CPU time of 1 thread, load average {os.getloadavg()[0]:.1f}")
    print()
    print("| prompt length T | layers | prompts M | width D | alpha | CPU time | estimate | peak extra memory |")
    print("|---|---|---|---|---|---|---|---|")
    for change in rows:
        shape = {**BASE, **change}
        result = measure(shape, args.repeats)
        estimate = estimate_probe_cost(
            layers=shape["layers"], width=shape["width"], tokens=shape["tokens"], prompts=shape["prompts"],
            views=2, metric_names=SET_METRICS, alpha=shape["alpha"], batch_size=BATCH, device="cpu", cores=1,
        )
        cells = [shape["tokens"], shape["layers"], shape["prompts"], shape["width"], f"{shape['alpha']:g}"]
        cells = [f"**{c}**" if key in change else str(c) for c, key in zip(cells, ("tokens", "layers", "prompts", "width", "alpha"))]
        cells += [f"{result['seconds']:.2f} s", f"{estimate.metric_seconds:.2f} s"]
        cells += [f"{result['peak'] / MIB:.0f} MiB"]
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
