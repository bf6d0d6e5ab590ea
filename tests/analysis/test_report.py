"""``layerwatch report``: PNG pictures and a self-contained HTML page from a run directory.

The runs here are written by hand in the JSONL format of the run directory (SPEC §5), so these tests need no model;
tests/test_trajectory.py draws a report of a run written by ``layerwatch trajectory`` end to end.
"""

import argparse
import base64
import json
import math
import re
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from layerwatch.analysis import report  # noqa: E402
from layerwatch.rundir.runs import read_run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = [0, 1, 2, 4, 8, 16, 100, 200, 300]
LAYERS = 7


def _valley(step_index: int, layer: int) -> float:
    # A mid-depth valley that deepens over training, like Pythia's prompt entropy (notes §10.3).
    depth = layer / (LAYERS - 1)
    dip = 0.35 * (step_index / (len(STEPS) - 1)) * math.exp(-(((depth - 0.5) / 0.2) ** 2))
    return 0.9 - dip


def write_run(logdir, *, steps=STEPS, with_per_prompt=True, nan_metric=False, settings=None, shift=None):
    """A run directory in the JSONL format the monitor writes (one record per line).

    ``shift(step, layer)`` is added to prompt_entropy (to make a second run that differs by a known amount).
    """
    logdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, step in enumerate(steps):
        entropy = [_valley(i, layer) + (shift(step, layer) if shift else 0.0) for layer in range(LAYERS)]
        metrics = {
            "prompt_entropy": entropy,
            "dataset_entropy": [0.2 + 0.05 * layer - 0.01 * i for layer in range(LAYERS)],
            "curvature": [1.04 + 0.02 * i * (layer > 0) for layer in range(LAYERS)],
            "effective_rank": [10.0 + layer - 0.3 * i for layer in range(LAYERS)],
            "infonce": [6.0 - 0.3 * layer for layer in range(LAYERS)],
            "rms": [1.0 + 0.1 * layer for layer in range(LAYERS)],
            "max_abs": [5.0 + layer for layer in range(LAYERS)],
            "nonfinite": [0.0] * LAYERS,
        }
        if nan_metric:
            metrics["dime"] = [None] * LAYERS  # JSON null = NaN: never finite, so not drawn
        per_prompt = {}
        if with_per_prompt:
            rows = []
            for layer in range(LAYERS):
                if layer in (2, 3, 4) and i == len(steps) - 1:  # two modes in the middle at the end
                    values = np.concatenate([rng.normal(0.3, 0.03, 20), rng.normal(0.8, 0.03, 20)])
                else:
                    values = rng.normal(entropy[layer], 0.02, 40)
                rows.append([float(v) for v in np.clip(values, 0, 1)])
            rows[0][0] = None  # a prompt too short for the metric
            per_prompt["prompt_entropy"] = rows
        record = {
            "step": step,
            "time": 1.7e9 + i,
            "wall_time_s": 0.5,
            "layers": list(range(LAYERS)),
            "metrics": metrics,
            "per_prompt": per_prompt,
            "alerts": ["prompt_entropy collapsed at layer 3"] if i == len(steps) - 1 else [],
            "settings": settings or {"preset": "standard", "alpha": 1.0},
        }
        lines.append(json.dumps(record))
    (logdir / "layerwatch.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return logdir


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return report.main(parser.parse_args([str(a) for a in argv]))


def test_report_writes_pngs_and_self_contained_html(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", nan_metric=True)
    assert run_cli(run_dir) == 0
    assert "report.html" in capsys.readouterr().out
    images = sorted((run_dir / "report").glob("*.png"))
    names = {p.name for p in images}
    for metric in ("prompt_entropy", "dataset_entropy", "curvature", "effective_rank", "infonce", "rms", "max_abs"):
        assert f"heatmap_{metric}.png" in names
    assert "heatmap_dime.png" not in names  # all NaN
    assert "heatmap_nonfinite.png" not in names  # all zero: nothing to see
    assert {"depth_profiles.png", "trajectories.png", "prompt_entropy_histograms.png"} <= names
    for path in images:
        assert path.read_bytes()[:8] == PNG_MAGIC, path

    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(images)  # every picture inline, nothing referenced by path
    assert all(base64.b64decode(data)[:8] == PNG_MAGIC for data in embedded)
    assert 'src="report/' not in page and "http" not in page.replace("http-equiv", "")
    # the table of numbers: one row per layer, the steps as columns, the first value of layer 0
    assert '<table class="numbers">' in page
    assert "<th>layer \\ step</th>" in page
    assert f"<td>{_valley(0, 0):.4f}</td>" in page
    assert "prompt_entropy collapsed at layer 3" in page  # alerts listed


def test_report_heatmap_axes(tmp_path, monkeypatch):
    """Heatmaps put layers on the vertical axis (0 at the bottom) and the probed steps on the horizontal one."""
    from layerwatch import read_run

    run = read_run(write_run(tmp_path / "run"))
    figure_calls = {}
    original = report._save

    def capture(figure, target, dpi):  # catch the figure on its way to disk
        figure_calls["figure"] = figure
        return original(figure, target, dpi)

    monkeypatch.setattr(report, "_save", capture)
    path = report.plot_heatmap(run, "prompt_entropy", tmp_path / "h.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    axes = figure_calls["figure"].axes[0]
    assert "layer" in axes.get_ylabel()
    assert "step" in axes.get_xlabel()
    assert axes.get_ylim()[0] < axes.get_ylim()[1]  # origin lower: layer 0 at the bottom
    x_labels = [t.get_text() for t in axes.get_xticklabels()]
    assert x_labels[0] == "0" and x_labels[-1] == "300"
    colorbar_axes = figure_calls["figure"].axes[1]
    assert colorbar_axes.get_ylabel() == "prompt_entropy"


def test_report_of_single_step_run_without_per_prompt(tmp_path):
    run_dir = write_run(tmp_path / "run", steps=[50], with_per_prompt=False)
    result = report.make_report(run_dir)
    assert "prompt_entropy_histograms" not in result.images
    assert "no per-prompt prompt entropy" in result.html.read_text(encoding="utf-8")
    assert result.images["depth_profiles"].read_bytes()[:8] == PNG_MAGIC


def test_report_metric_selection_and_out_folder(tmp_path):
    run_dir = write_run(tmp_path / "run")
    out = tmp_path / "elsewhere"
    assert run_cli(run_dir, "--out", out, "--metrics", "prompt_entropy,curvature") == 0
    assert sorted(p.name for p in (out / "report").glob("heatmap_*.png")) == [
        "heatmap_curvature.png",
        "heatmap_prompt_entropy.png",
    ]
    assert (out / "report.html").is_file()
    assert not (run_dir / "report.html").exists()


def test_report_errors(tmp_path, capsys):
    assert run_cli(tmp_path / "missing") == 2
    assert "layerwatch report: error" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(empty) == 2
    assert "no layerwatch run" in capsys.readouterr().err
    run_dir = write_run(tmp_path / "run")
    assert run_cli(run_dir, "--metrics", "nonsense") == 2
    assert "nonsense" in capsys.readouterr().err


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    run_dir = write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert run_cli(run_dir) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_metric_names_from_the_data_never_choose_a_path(tmp_path, capsys):
    """A metric named with ``../`` (or an absolute path) in the JSONL is drawn under a sanitized file name inside
    ``report/``; nothing is written outside the output folder."""
    run_dir = write_run(tmp_path / "nest" / "run")
    records = [json.loads(line) for line in (run_dir / "layerwatch.jsonl").read_text().splitlines()]
    evil = ["../../../escaped", "/tmp/absolute_escape", "..", "heatmap_rms"]
    for record in records:
        for k, name in enumerate(evil):
            record["metrics"][name] = [float(k + layer) for layer in range(LAYERS)]
    (run_dir / "layerwatch.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    before = {p for p in tmp_path.rglob("*")}
    assert run_cli(run_dir) == 0
    written = {p for p in tmp_path.rglob("*")} - before
    image_dir = (run_dir / "report").resolve()
    assert all(p.resolve().is_relative_to(run_dir.resolve()) for p in written), written
    pngs = {p.name for p in written if p.suffix == ".png"}
    assert {"heatmap__escaped.png", "heatmap__tmp_absolute_escape.png", "heatmap.png"} <= pngs
    heatmaps = [p for p in pngs if p.startswith("heatmap")]
    assert len(heatmaps) == len(report.ordered_metrics(read_run(run_dir)))  # one file each, no name reused
    assert not (tmp_path / "escaped.png").exists() and not list(tmp_path.glob("*.png"))
    assert all(p.parent.resolve() == image_dir for p in written if p.suffix == ".png")
    # A link planted inside report/ that points outside is refused, not followed.
    outside = tmp_path / "outside.png"
    (run_dir / "report" / "depth_profiles.png").unlink()
    (run_dir / "report" / "depth_profiles.png").symlink_to(outside)
    assert run_cli(run_dir) == 2
    assert "outside the report folder" in capsys.readouterr().err and not outside.exists()
