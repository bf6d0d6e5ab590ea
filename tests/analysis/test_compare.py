"""``layerwatch report RUN_A RUN_B``: one self-contained HTML page comparing runs (SPEC §7).

The runs are written by hand in the run directory's JSONL format (tests/test_report.py's ``write_run``), the second
one differing from the first by a known amount, so the page's numbers can be checked exactly.
"""

import base64
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from tests.analysis.test_report import PNG_MAGIC, STEPS, run_cli, write_run  # noqa: E402

from layerwatch import read_run  # noqa: E402

from layerwatch.analysis import compare
from layerwatch.analysis.report import ReportError  # noqa: E402

SAME = {"preset": "standard", "alpha": 1.0, "probe_hash": "a" * 64}
OTHER = {"preset": "standard", "alpha": 1.0, "probe_hash": "b" * 64}


def _shift(step, layer):
    return 0.01 * layer + step / 10000.0  # run B - run A, known per step and layer


def _two_runs(tmp_path, *, b_settings=SAME, b_steps=STEPS):
    a = write_run(tmp_path / "lr-1e-3", settings=SAME)
    b = write_run(tmp_path / "lr-3e-4", settings=b_settings, shift=_shift, steps=b_steps)
    return a, b


def test_comparison_page_is_self_contained_and_has_the_differences(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    out = tmp_path / "cmp"
    assert run_cli(a, b, "--out", out, "--metrics", "prompt_entropy,curvature") == 0
    page = (out / compare.COMPARISON_NAME).read_text(encoding="utf-8")
    assert "lr-1e-3" in page and "lr-3e-4" in page and "wrote" in capsys.readouterr().out
    # per metric: side-by-side heatmaps, overlaid profiles, difference curves, all embedded as PNG data URIs
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 2 * 3
    assert all(base64.b64decode(data)[:8] == PNG_MAGIC for data in embedded)
    assert not re.search(r'(src|href)="(?!data:|#)', page) and 'class="warning"' not in page  # nothing external
    # the table at the last common step: B - A = _shift(300, layer) for prompt_entropy
    for layer in (0, 3, 6):
        assert f"<td>{_shift(STEPS[-1], layer):.4f}</td>" in page


def test_comparison_figures_share_the_colour_scale_and_plot_exact_differences(tmp_path):
    a, b = _two_runs(tmp_path, b_steps=STEPS[::2])  # B probed every other step
    runs, labels = [read_run(a), read_run(b)], ["A", "B"]
    figure = compare.heatmaps_figure(runs, labels, "prompt_entropy")
    limits = {tuple(np.round(axes.images[0].get_clim(), 12)) for axes in figure.axes if axes.images}
    both = np.concatenate([runs[0].metric("prompt_entropy").ravel(), runs[1].metric("prompt_entropy").ravel()])
    assert limits == {(round(both.min(), 12), round(both.max(), 12))}  # one scale for both heatmaps
    steps = compare.common_steps(runs)
    assert steps == STEPS[::2]
    figure = compare.differences_figure(runs, labels, "prompt_entropy", steps, runs[0].layers)
    lines = figure.axes[0].get_lines()
    rows_a = [STEPS.index(s) for s in steps]
    expected = runs[1].metric("prompt_entropy") - runs[0].metric("prompt_entropy")[rows_a]
    for layer in range(len(runs[0].layers)):  # one line per layer: B - A at the common steps
        np.testing.assert_array_equal(lines[layer].get_xdata(), steps)
        np.testing.assert_allclose(lines[layer].get_ydata(), expected[:, layer], atol=1e-12)


def test_runs_with_different_probes_are_refused_or_flagged(tmp_path, capsys):
    a, b = _two_runs(tmp_path, b_settings=OTHER)
    out = tmp_path / "cmp.html"
    with pytest.raises(ReportError, match="different probes"):
        compare.make_comparison([a, b], out=out)
    assert run_cli(a, b, "--out", out) == 2
    assert "different probes" in capsys.readouterr().err and not out.exists()
    assert run_cli(a, b, "--out", out, "--allow-different-probes", "--metrics", "curvature") == 0
    page = out.read_text(encoding="utf-8")
    assert '<p class="warning">DIFFERENT PROBES' in page and "aaaaaaaaaaaa" in page and "bbbbbbbbbbbb" in page


def test_comparison_flags_settings_and_needs_two_runs(tmp_path):
    a, b = _two_runs(tmp_path, b_settings={**SAME, "alpha": 2.0})
    result = compare.make_comparison([a, b], out=tmp_path, metrics=["curvature"])
    assert result.html == tmp_path / compare.COMPARISON_NAME
    assert any("Different alpha" in w for w in result.warnings)
    with pytest.raises(ReportError, match="at least two"):
        compare.make_comparison([a], out=tmp_path)
    assert compare.run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run"]) == ["x/run", "y/run"]
