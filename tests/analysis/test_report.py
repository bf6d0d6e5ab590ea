"""``layerwatch report``: PNG pictures and a self-contained HTML page from a run directory.

The runs here are written by hand in the JSONL format of the run directory (SPEC §5), so these tests need no model;
tests/test_trajectory.py draws a report of a run written by ``layerwatch trajectory`` end to end.
"""

import base64
import json
import re
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from layerwatch.analysis import html, report  # noqa: E402
from layerwatch.rundir.runs import read_run  # noqa: E402
from helpers import LAYERS, PNG_MAGIC, STEPS, write_run  # noqa: E402
from helpers import run_report_cli as run_cli, valley as _valley  # noqa: E402


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
    assert {"overview.png", "depth_profiles.png", "trajectories.png", "prompt_entropy_histograms.png"} <= names
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
    assert _valley(0, 0) == 0.9 and "<td>0.900</td>" in page  # 3 significant digits
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
    # A link planted inside report/ that points outside is replaced by the picture, never followed.
    outside = tmp_path / "outside.png"
    (run_dir / "report" / "depth_profiles.png").unlink()
    (run_dir / "report" / "depth_profiles.png").symlink_to(outside)
    assert run_cli(run_dir) == 0
    assert not outside.exists()
    picture = run_dir / "report" / "depth_profiles.png"
    assert not picture.is_symlink() and picture.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------------ links (issue 18)


def test_a_planted_report_html_link_is_replaced_not_followed(tmp_path):
    """``report.html`` planted as a link to a file outside the run: the report replaces the link by its own page and
    leaves the outside file as it was."""
    run_dir = write_run(tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    (run_dir / "report.html").symlink_to(victim)
    dangling = tmp_path / "nowhere.html"
    assert run_cli(run_dir) == 0
    assert victim.read_text(encoding="utf-8") == "precious"
    page = run_dir / "report.html"
    assert not page.is_symlink() and page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    # a dangling link (it would create a file outside) is replaced too
    page.unlink()
    page.symlink_to(dangling)
    assert run_cli(run_dir) == 0
    assert not dangling.exists() and not page.is_symlink()


def test_a_planted_report_folder_link_is_refused_with_a_clear_message(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (run_dir / "report").symlink_to(outside, target_is_directory=True)
    assert run_cli(run_dir) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and "rm " in err and len(err.strip().splitlines()) == 1
    assert list(outside.iterdir()) == [] and not (run_dir / "report.html").exists()


# ------------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    ("value", "scale", "expected"),
    [
        (1.0, None, "1.00"), (0.9, None, "0.900"), (0.012345, None, "0.0123"), (12.345, None, "12.3"),
        (1234.5, None, "1234"), (-2.38e-07, None, "-2.38e-07"), (-2.38e-07, 1.0, "0"), (2.5e-05, 1e-04, "2.50e-05"),
        (0.0, None, "0"), (-0.0, None, "0"), (-0.00049, 10.0, "0"), (float("nan"), None, html.DASH),
        (float("inf"), None, html.DASH), (3.2e7, None, "3.20e+07"),
    ],
)
def test_fmt_uses_significant_digits_and_never_prints_minus_zero(value, scale, expected):
    assert html.fmt(value, scale=scale) == expected


def test_fmt_never_gives_minus_zero_over_many_values():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 1e-6, 500), -10.0 ** rng.uniform(-9, 7, 500), [-0.0, -1e-300]])
    for value in values:
        for scale in (None, 1.0, 1e-3):
            text = html.fmt(value, scale=scale)
            mantissa = text.split("e")[0]
            assert not (mantissa.startswith("-") and set(mantissa[1:]) <= set("0.")), (value, scale, text)
            if scale is None and value != 0:  # 3 significant digits, then read back within rounding
                assert abs(float(text) - value) <= 0.006 * abs(value), (value, text)


def test_a_table_does_not_mix_a_rounding_residue_with_ordinary_values(tmp_path):
    run_dir = write_run(tmp_path / "run", extra=lambda i: {"cka_to_first": [1.0 - 2.38e-07 * (i == 0)] + [0.8] * 6})
    result = report.make_report(run_dir, metrics=["cka_to_first"])
    page = result.html.read_text(encoding="utf-8")
    table = page[page.index('<table class="numbers"><thead><tr><th>layer'):]
    assert "e-0" not in table and "-0.000" not in table and "1.0000" not in table
    assert "<td>1.00</td>" in table and "<td>0.800</td>" in table and "<td>0</td>" in table  # last - first


# ------------------------------------------------------------------------------------------------ the first screen


def test_the_page_opens_on_the_overview_alerts_and_best_layer(tmp_path):
    """Small multiples of every metric (each with its own colour bar) come first, beside the alerts and the best
    layer; the page-width heatmaps follow."""
    best = [1, 1, 2, 2, 2, 3, 3, 3, 3]
    run_dir = write_run(tmp_path / "run", extra=lambda i: {"probe_accuracy": [0.5 + 0.05 * k for k in range(LAYERS)]})
    records = [json.loads(line) for line in (run_dir / "layerwatch.jsonl").read_text().splitlines()]
    for record, layer in zip(records, best):
        record["scalars"] = {"best_layer": layer}
    (run_dir / "layerwatch.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    run = read_run(run_dir)
    metrics = report.ordered_metrics(run)
    figures = {}
    original = report._save

    def capture(figure, target, dpi):
        figures[target.name] = (figure, dpi)
        return original(figure, target, dpi)

    import unittest.mock

    with unittest.mock.patch.object(report, "_save", capture):
        result = report.make_report(run_dir)
    overview, dpi = figures["overview.png"]
    heatmap_axes = [a for a in overview.axes if a.images and a.get_title()]
    assert [a.get_title() for a in heatmap_axes] == metrics  # one small heatmap per metric
    assert len(overview.axes) - len([a for a in overview.axes if not a.axison]) == 2 * len(metrics)  # + colour bars
    width, height = overview.get_size_inches() * dpi
    assert width <= 1200 and height <= 800  # fits beside the side column on a 1600 x 1000 screen
    page = result.html.read_text(encoding="utf-8")
    top = page[page.index('<div class="top">'):page.index('<h2 id="heatmaps">')]
    assert 'alt="every metric as a small layer x step heatmap"' in top
    assert "Alerts (1)" in top and "collapsed at layer 3" in top
    assert "<b>layer 3</b> at step 300" in top and "layer 1 at steps 0\u20131" in top
    assert page.index("overview") < page.index('id="metric-prompt_entropy"')
    assert "<nav>" in top and '<a href="#metric-rms">rms</a> <a' in top  # links with spaces: the line wraps


# ------------------------------------------------------------------------------------------------ error bars


def _se(step, layer):
    return 0.01 + 0.002 * layer


def test_depth_profiles_and_trajectories_draw_two_standard_error_bands(tmp_path, monkeypatch):
    run = read_run(write_run(tmp_path / "run", stderr=_se))
    figures = {}
    monkeypatch.setattr(report, "_save", lambda figure, target, dpi: figures.setdefault(target.name, figure))
    report.plot_depth_profiles(run, ["prompt_entropy", "curvature"], tmp_path / "p.png")
    report.plot_trajectories(run, ["prompt_entropy", "curvature"], tmp_path / "t.png")
    entropy = run.metric("prompt_entropy")
    se = np.array([[_se(s, layer) for layer in range(LAYERS)] for s in STEPS])
    profile = figures["p.png"].axes[0]
    assert "2 se" in profile.get_title() and "standard errors" in figures["p.png"].get_suptitle()
    bands = profile.collections
    assert len(bands) == 3  # one per drawn step (first, middle, last)
    last = bands[-1].get_paths()[0].vertices  # the band at the last step: value +- 2 se per layer
    for layer in range(LAYERS):
        ys = last[np.isclose(last[:, 0], layer), 1]
        np.testing.assert_allclose(
            [ys.min(), ys.max()], [entropy[-1, layer] - 2 * se[-1, layer], entropy[-1, layer] + 2 * se[-1, layer]]
        )
    assert not figures["p.png"].axes[1].collections  # curvature has no standard errors: no band
    trajectories = figures["t.png"].axes[0]
    assert len(trajectories.collections) == LAYERS  # one band per layer
    band = trajectories.collections[3].get_paths()[0].vertices
    np.testing.assert_allclose(band[:, 1].max(), (entropy[:, 3] + 2 * se[:, 3]).max())


def test_without_standard_errors_the_page_says_so(tmp_path):
    page = report.make_report(write_run(tmp_path / "run")).html.read_text(encoding="utf-8")
    assert "recorded no standard errors" in page
    page = report.make_report(write_run(tmp_path / "se", stderr=_se)).html.read_text(encoding="utf-8")
    assert "\u00b12 standard errors" in page


def test_report_metrics_flag_takes_a_preset_and_rejects_empty(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    assert run_cli(run_dir, "--metrics", "light") == 0
    drawn = sorted(p.name for p in (run_dir / "report").glob("heatmap_*.png"))
    assert "heatmap_prompt_entropy.png" in drawn and "heatmap_infonce.png" not in drawn  # light has no views
    assert run_cli(run_dir, "--metrics", ",") == 2
    err = capsys.readouterr().err
    assert "--metrics" in err and len(err.strip().splitlines()) == 1

# Checkpoints, subprocesses and full HTML reports: out of the quick loop (`-m "not slow"`).
pytestmark = pytest.mark.slow
