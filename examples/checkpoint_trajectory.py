"""Analyse saved checkpoints after training: probe each one, write one run, draw the report.

This is what ``layerwatch trajectory`` and ``layerwatch report`` do, from Python, so you can adapt it (pick
checkpoints, build your own probe, post-process the numbers with numpy or pandas)::

    # 1. any Trainer run that saved checkpoints, e.g. the demo (a few minutes on CPU)
    layerwatch demo --out layerwatch-demo
    # 2. probe every checkpoint with the probe the training run used, then draw the pictures
    python examples/checkpoint_trajectory.py layerwatch-demo
    # or with your own prompts, tokenized by the checkpoints' tokenizer
    python examples/checkpoint_trajectory.py layerwatch-demo --texts my_prompts.txt

The run lands in ``<output_dir>/layerwatch-trajectory`` (``--out`` to change it); running the script again only
probes checkpoints that are new. Open ``report.html`` there, or ``tensorboard --logdir`` it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from layerwatch import Probe
from layerwatch.analysis.report import make_report
from layerwatch.analysis.trajectory import discover_checkpoints, load_tokenizer, read_texts, run_trajectory, summary_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="a Trainer output_dir with checkpoint-<step> folders")
    parser.add_argument("--texts", type=Path, help="one prompt per line (default: the training run's probe)")
    parser.add_argument("--out", type=Path, help="run directory (default: <output_dir>/layerwatch-trajectory)")
    parser.add_argument("--metrics", default="standard", help="light, standard or paper")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    checkpoints = discover_checkpoints([args.output_dir])
    print(f"{len(checkpoints)} checkpoints: steps {[c.step for c in checkpoints]}")

    # The probe: the one the training run saved (so the trajectory continues the training-time curves), or one
    # built from your texts with the checkpoints' tokenizer.
    if args.texts is not None:
        tokenizer = load_tokenizer([checkpoints[0].path, args.output_dir])
        probe = Probe.from_texts(read_texts(args.texts), tokenizer, max_length=128, num_prompts=64)
    else:
        probe_path = args.output_dir / "layerwatch" / "probe.safetensors"
        if not probe_path.is_file():
            print(f"no {probe_path}; pass --texts FILE", file=sys.stderr)
            return 2
        probe = Probe.load(probe_path)

    out = args.out or args.output_dir / "layerwatch-trajectory"
    run = run_trajectory(
        checkpoints,
        probe=probe,
        out=out,
        metrics=args.metrics,
        device=args.device,
        on_checkpoint=lambda c, t: print(f"  step {c.step}: load {t['load_s']:.1f} s, probe {t['probe_s']:.1f} s"),
    )
    print(summary_table(run))

    # The numbers are plain numpy arrays: [steps, layers].
    entropy = run.metric("prompt_entropy")
    change = entropy[-1] - entropy[0]
    deepest_valley = int(np.nanargmin(entropy[-1]))
    print(
        f"\nprompt entropy at the last step is lowest at layer {run.layers[deepest_valley]} "
        f"({entropy[-1, deepest_valley]:.3f}); it changed most at layer {run.layers[int(np.nanargmax(np.abs(change)))]}"
    )

    report = make_report(out)
    print(f"report: {report.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
