"""What the TensorBoard pictures cost, and how much of it the training loop still waits for.

    python benchmarks/picture_cost.py                 # 13 layers, the demo's 16 metrics, 20 probes of history
    python benchmarks/picture_cost.py --layers 33 --history 100

Prints one table: the time to draw one heatmap and one depth profile (matplotlib, Agg), the drawing per probe (two
pictures per metric), and the time ``TensorBoardWriter.write`` keeps the training thread, with the pictures drawn on
the writer's background thread as layerwatch does (median over the probes) and drawn inline for comparison (what
layerwatch did before). Records are synthetic (random values); drawing time does not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from timing import median_seconds  # benchmarks/timing.py


def records(layers: int, metrics: list[str], count: int, seed: int = 0):
    from layerwatch.rundir.record import ProbeRecord

    rng = np.random.default_rng(seed)
    return [
        ProbeRecord(step=25 * (i + 1), time=0.0, wall_time_s=1.0, layers=list(range(layers)),
                    metrics={name: rng.random(layers).tolist() for name in metrics})
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--preset", default="standard", help="light, standard or paper")
    parser.add_argument("--history", type=int, default=20, help="probes written (the heatmaps grow with them)")
    args = parser.parse_args()

    from layerwatch.rundir import images

    from layerwatch.metrics import registry
    from layerwatch.rundir.writers import TensorBoardWriter

    # the per-layer metrics a run of that preset records without labels (the demo's 16 for "standard")
    metrics = [m for m in registry.preset(args.preset) if not registry.spec(m).scalar and "labels" not in registry.spec(m).needs]
    batch = records(args.layers, metrics, args.history)
    matrix = np.array([r.metrics[metrics[0]] for r in batch]).T
    steps = [r.step for r in batch]
    images.heatmap(matrix, steps, batch[0].layers, metric=metrics[0])  # warm-up: fonts, caches

    heatmap = median_seconds(lambda: images.heatmap(matrix, steps, batch[0].layers, metric=metrics[0]), 5)
    profile = median_seconds(
        lambda: images.depth_profile(matrix[:, -1], batch[0].layers, metric=metrics[0], step=steps[-1]), 5
    )

    def write_times(inline: bool) -> tuple[float, float]:
        """Median seconds per write() on the training thread, and the seconds close() then waited."""
        with tempfile.TemporaryDirectory() as logdir:
            writer = TensorBoardWriter(logdir)
            times = []
            for record in batch:
                start = time.perf_counter()
                writer.write(record)
                if inline:
                    writer._pictures.wait()  # as if drawn inside write()
                times.append(time.perf_counter() - start)
                # training between probes: long enough for the background thread to draw a probe's pictures
                time.sleep(0.05 if inline else 1.5 * len(metrics) * (heatmap + profile))
            start = time.perf_counter()
            writer.close()
            return statistics.median(times), time.perf_counter() - start

    inline, _ = write_times(inline=True)
    background, drain = write_times(inline=False)
    print(f"{args.layers} layers, {len(metrics)} metrics ({args.preset}), {args.history} probes of history")
    print()
    print("| quantity | value |")
    print("|---|---|")
    print(f"| one heatmap ({args.history} steps) | {heatmap * 1000:.0f} ms |")
    print(f"| one depth profile | {profile * 1000:.0f} ms |")
    print(f"| pictures per probe (2 per metric) | {2 * len(metrics)} = {len(metrics) * (heatmap + profile):.2f} s |")
    print(f"| write() on the training thread, pictures drawn inline (before) | {inline * 1000:.0f} ms |")
    print(f"| write() on the training thread, pictures on the background thread | {background * 1000:.0f} ms |")
    print(f"| training-thread time saved per probe | {(inline - background) * 1000:.0f} ms ({inline / background:.0f}x less) |")
    print(f"| close() waiting for the last pictures | {drain * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
