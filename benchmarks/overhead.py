"""What layerwatch costs a real Trainer run, measured, beside what ``layerwatch.monitor.cost`` predicts (Cockpit-style).

    python benchmarks/overhead.py             # GPT-2-style, 4 layers x 128, batch 8 x 64; 12 cells, ~6 min on 2 cores
    python benchmarks/overhead.py --quick     # every in {1, 10} and fewer steps: a smoke run (~1 min)
    python benchmarks/overhead.py --png FILE  # also draw the table as a picture (the README shows it)

For each preset (light, standard, paper) and each ``every`` (1, 10, 50, 200) it trains the same model twice from the
same seed with the real ``transformers.Trainer``, without and with ``LayerWatchCallback(every=..., metrics=preset)``
(``log_spaced_start=False``, so probes fall at multiples of ``every`` plus the final step), and prints:

- measured slowdown: (wall time with layerwatch) / (wall time without) - 1, the training loop only (``trainer.train()``);
- predicted slowdown: the cost model's seconds for the run (``layerwatch.monitor.cost.estimate_run_overhead``: the
  probes' forwards and metrics, writing their records, drawing the TensorBoard pictures, and the start) / the
  measured wall time of the same steps without layerwatch (a user knows their step time; the cost model is about
  what layerwatch adds);
- their ratio (the target: within 30% in every cell on an idle machine).

For each ``every``, the run without layerwatch and the three presets' runs alternate, ``--repeats`` rounds of them,
and each figure is the median of its runs, so that a machine that slows down or speeds up moves both sides alike.
The probe count is read from the run (the final probe included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

PRESETS = ("light", "standard", "paper")
EVERY = (1, 10, 50, 200)
PROBES_PER_CELL = 3  # steps = every x PROBES_PER_CELL (at least MIN_STEPS)
MIN_STEPS = 30


def _shapes(args: argparse.Namespace) -> dict:
    return dict(layers=args.layers, width=args.width, seq=args.seq, batch=args.batch, vocab=512, prompts=args.prompts)


def _model(shape: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=shape["vocab"], n_positions=shape["seq"], n_embd=shape["width"],
                        n_layer=shape["layers"], n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, rows: int, shape: dict) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, shape["vocab"], (rows, shape["seq"]), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _probe(shape: dict):
    import layerwatch

    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, shape["vocab"], (shape["prompts"], shape["seq"] // 2), generator=generator)
    return layerwatch.Probe.from_tensors(ids, vocab_size=shape["vocab"])  # views insert tokens: fits seq


def train_seconds(shape: dict, steps: int, preset: str | None, every: int, out: str) -> tuple[float, int, float]:
    """Wall time of ``trainer.train()``, the number of probes it made and their own seconds (forwards and metrics,
    ``read_run(...).scalar("probe_seconds")``; 0 without layerwatch)."""
    from transformers import Trainer, TrainingArguments

    import layerwatch
    from layerwatch.integrations.hf_trainer import LayerWatchCallback

    arguments = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=shape["batch"], learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True, use_cpu=True, seed=0,
        dataloader_num_workers=0,
    )
    callbacks = []
    if preset is not None:
        callbacks.append(LayerWatchCallback(probe=_probe(shape), every=every, metrics=preset, log_spaced_start=False,
                                            logdir=os.path.join(out, "layerwatch")))
    trainer = Trainer(model=_model(shape), args=arguments, train_dataset=RandomTokens(steps * shape["batch"], shape),
                      callbacks=callbacks)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    if preset is None:
        return seconds, 0, 0.0
    run = layerwatch.read_run(os.path.join(out, "layerwatch"))
    return seconds, len(run.steps), float(run.scalar("probe_seconds").sum())


def predicted_overhead(shape: dict, preset: str, probes: int, threads: int):
    """The cost model's seconds for the cell: ``estimate_run_overhead`` (probes, records, pictures, start)."""
    from layerwatch.metrics import registry
    from layerwatch.monitor import cost

    _, metric_names, lidar_views = registry.resolve_metrics(preset)
    set_level = [name for name in metric_names if registry.REGISTRY[name].needs != (registry.TOKENS,)]
    layers = shape["layers"] + 1
    probe = cost.estimate_probe_cost(
        layers=layers, width=shape["width"], tokens=shape["seq"] // 2, prompts=shape["prompts"],
        parameters=sum(p.numel() for p in _model(shape).parameters()), views=lidar_views or 0,
        metric_names=set_level, cores=threads,
    )
    scalars = set(registry.scalar_metrics())
    return cost.estimate_run_overhead(
        probe, probes=probes, layers=layers, series=sum(name not in scalars for name in metric_names),
        histograms=len(set(metric_names) & set(registry.histogram_metrics())),
    )


def measure(shape: dict, presets, everys, repeats: int, min_steps: int = MIN_STEPS, per_cell: int = PROBES_PER_CELL) -> list[dict]:
    """Per ``every``: ``repeats`` rounds of one run without layerwatch and one per preset, interleaved, so that a
    machine that slows down or speeds up during the benchmark moves both sides alike; medians per cell."""
    rows = []
    for every in everys:
        steps = max(min_steps, every * per_cell)
        runs: dict[str | None, list[tuple[float, int, float]]] = {None: [], **{preset: [] for preset in presets}}
        for _ in range(repeats):
            for preset in runs:
                with tempfile.TemporaryDirectory() as out:
                    runs[preset].append(train_seconds(shape, steps, preset, every, out))
        base = statistics.median(seconds for seconds, _, _ in runs[None])
        for preset in presets:
            seconds = statistics.median(r[0] for r in runs[preset])
            probe_seconds = statistics.median(r[2] for r in runs[preset])
            rows.append(dict(preset=preset, every=every, steps=steps, probes=runs[preset][0][1], base=base,
                             seconds=seconds, probe_seconds=probe_seconds))
            print(_row(predict(shape, rows[-1], torch.get_num_threads())), flush=True)
    return rows


def predict(shape: dict, row: dict, threads: int) -> dict:
    """The measured cell with the cost model's prediction beside it (recomputed from the measurement alone)."""
    estimate = predicted_overhead(shape, row["preset"], row["probes"], threads)
    measured = row["seconds"] / row["base"] - 1
    predicted = estimate.slowdown(row["base"])
    return dict(row, measured=measured, predicted=predicted, parts=estimate.parts,
                ratio=predicted / measured if measured > 0 else float("nan"))


HEADER = (f"{'preset':>9} {'every':>6} {'steps':>6} {'probes':>6} {'base s':>8} {'with s':>8} {'measured':>9} "
          f"{'predicted':>10} {'pred/meas':>9} | {'extra s':>8} {'probes s':>8} | model s: {'probes':>7} {'records':>7} "
          f"{'pictures':>8} {'start':>6}")


def _row(r: dict) -> str:
    """One cell; after the bar, the measured extra seconds and the probes' own (their records' probe_seconds),
    then the cost model's parts."""
    parts = r["parts"]
    return (f"{r['preset']:>9} {r['every']:>6} {r['steps']:>6} {r['probes']:>6} {r['base']:>8.2f} {r['seconds']:>8.2f} "
            f"{r['measured']:>9.1%} {r['predicted']:>10.1%} {r['ratio']:>9.2f} | {r['seconds'] - r['base']:>8.2f} "
            f"{r['probe_seconds']:>8.2f} |          {parts['probes']:>7.2f} {parts['records']:>7.2f} "
            f"{parts['pictures']:>8.2f} {parts['start']:>6.2f}")


def draw(rows: list[dict], shape: dict, threads: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = sorted({r["preset"] for r in rows}, key=PRESETS.index)
    everys = sorted({r["every"] for r in rows})
    cell = {(r["preset"], r["every"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(everys), 1.2 + 0.75 * len(presets)))
    ax.axis("off")
    text = [[f"{cell[p, e]['measured']:.1%}\n(model {cell[p, e]['predicted']:.1%})" for e in everys] for p in presets]
    table = ax.table(cellText=text, rowLabels=presets, colLabels=[f"every={e}" for e in everys], loc="center",
                     cellLoc="center")
    table.scale(1, 2.4)
    table.set_fontsize(11)
    ax.set_title(f"layerwatch's slowdown of a Trainer run on CPU ({threads} threads): measured (cost model)\n"
                 f"GPT-2 {shape['layers']} layers x {shape['width']}, batch {shape['batch']} x {shape['seq']}, "
                 f"probe {shape['prompts']} prompts x {shape['seq'] // 2}", fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every in {1, 10}, one repeat, 6 or 20 steps: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (median); default 3, 1 with --quick")
    parser.add_argument("--every", default=None, help="comma-separated intervals instead of 1,10,50,200 (1,10 with --quick)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--png", default=None, help="also draw the table as a PNG picture")
    parser.add_argument("--save", default=None, help="write the measurements (shape and cells) to this JSON file")
    parser.add_argument("--replay", default=None,
                        help="no training: print (and draw) a --save file's measurements beside the current cost model")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    repeats = args.repeats or (1 if args.quick else 3)
    everys = tuple(int(e) for e in args.every.split(",")) if args.every else (1, 10) if args.quick else EVERY
    shape, threads = _shapes(args), torch.get_num_threads()
    if args.replay:
        with open(args.replay) as handle:
            saved = json.load(handle)
        shape, threads, repeats = saved["shape"], saved["threads"], saved["repeats"]
    print(f"Trainer on CPU, {threads} threads, torch {torch.__version__}; model GPT-2 {shape['layers']} "
          f"layers x {shape['width']}, batch {shape['batch']} x {shape['seq']} tokens; probe {shape['prompts']} prompts "
          f"x {shape['seq'] // 2} tokens; medians of {repeats} interleaved run(s)")
    print(HEADER)
    if args.replay:
        measured = saved["cells"]
        for cell in measured:
            print(_row(predict(shape, cell, threads)))
    else:
        measured = measure(shape, PRESETS, everys, repeats, *((6, 2) if args.quick else ()))
    if args.save:
        with open(args.save, "w") as handle:
            json.dump(dict(shape=shape, threads=threads, repeats=repeats, cells=measured), handle, indent=1)
    rows = [predict(shape, cell, threads) for cell in measured]
    off = [r for r in rows if not (0.7 <= r["ratio"] <= 1.3)]
    print(f"cost model within 30% of the measurement in {len(rows) - len(off)} of {len(rows)} cells")
    if args.png:
        draw(rows, shape, threads, args.png)
        print(f"picture: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
