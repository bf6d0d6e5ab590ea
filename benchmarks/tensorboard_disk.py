"""How much disk a run's TensorBoard files take per probe: pictures at every probe (the old way) against the bounded
picture schedule of ``layerwatch.rundir.pictures`` (the default now).

    python benchmarks/tensorboard_disk.py                  # 200 probes of a tiny 6-block GPT-2, "standard" preset
    python benchmarks/tensorboard_disk.py --probes 2000 --every-probes 100

A real ``LayerWatch`` probes a small randomly initialised GPT-2 (weights nudged between probes so that every probe's
values differ, as in training) into a fresh run directory per schedule, then prints, per schedule: the TensorBoard
bytes per probe (pictures, histograms and scalars), the JSONL bytes per probe, the number of heatmap drawings, and
checks that the JSONL and the per-layer scalars still hold every probe. The old schedule draws 32 pictures at every
probe (minutes per 100 probes on a small CPU), so it runs ``--every-probes`` probes (default 50); its bytes per probe
hardly change with the run's length (the pictures have a fixed size), while the new schedule's fall as the run grows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

MIB = 1 << 20


def folder_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def one_run(logdir: Path, schedule: str, probes: int, layers: int, preset: str) -> dict:
    import transformers

    import layerwatch
    from layerwatch.monitor import LayerWatch
    from layerwatch.rundir import pictures

    config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=layers, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(1, 512, (16, 16), generator=torch.Generator().manual_seed(0))
    probe = layerwatch.Probe.from_tensors(ids, vocab_size=512)
    pictures.PICTURE_SCHEDULE = schedule
    start = time.perf_counter()
    watch = LayerWatch(probe, logdir=logdir, metrics=preset, every=1, log_spaced_start=False)
    for step in range(1, probes + 1):
        with torch.no_grad():
            for parameter in model.parameters():  # a small random walk: every probe's values differ
                parameter.add_(torch.randn_like(parameter), alpha=1e-3)
        watch.run(model, step)
    watch.close()
    seconds = time.perf_counter() - start
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = layerwatch.read_run(logdir)
    layer = EventAccumulator(str(logdir / "layer_00"), size_guidance={"scalars": 0})
    layer.Reload()
    overview = EventAccumulator(str(logdir / "all_layers"), size_guidance={"images": 0})
    overview.Reload()
    tag = next(t for t in overview.Tags()["images"] if t.startswith("layerwatch/heatmap/"))
    return {
        "tensorboard": folder_bytes(logdir, "events.out.tfevents.*"),
        "jsonl": folder_bytes(logdir, "layerwatch.jsonl"),
        "drawings": len(overview.Images(tag)),
        "jsonl_steps": len(run.steps),
        "scalar_steps": len(layer.Scalars(f"layerwatch/{run.metrics[0]}")),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks (layers recorded = blocks + 1)")
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--every-probes", type=int, default=50, help="probes of the old every-probe schedule")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for schedule, probes in (("every", args.every_probes), ("spaced", args.every_probes), ("spaced", args.probes)):
            if probes <= 0 or (schedule, probes) in [(s, r["probes"]) for s, r in rows]:
                continue
            result = one_run(Path(folder) / f"{schedule}-{probes}", schedule, probes, args.layers, args.preset)
            rows.append((schedule, dict(result, probes=probes)))
            print(f"  ({schedule}, {probes} probes: {result['seconds']:.0f} s)", flush=True)
    print(f"{args.layers + 1} layers, preset {args.preset!r}")
    print(f"{'pictures':>10} {'probes':>7} {'TensorBoard MiB':>16} {'MiB/probe':>10} {'JSONL MiB/probe':>16} "
          f"{'drawings':>9} {'JSONL steps':>12} {'scalar steps':>13}")
    for schedule, r in rows:
        n = r["probes"]
        print(f"{schedule:>10} {n:7d} {r['tensorboard'] / MIB:16.2f} {r['tensorboard'] / MIB / n:10.4f} "
              f"{r['jsonl'] / MIB / n:16.4f} {r['drawings']:9d} {r['jsonl_steps']:12d} {r['scalar_steps']:13d}")


if __name__ == "__main__":
    main()
