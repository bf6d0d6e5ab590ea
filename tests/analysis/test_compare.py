"""``layerwatch report RUN_A RUN_B``: one self-contained HTML page comparing runs (SPEC §7).

The runs are written by hand in the run directory's JSONL format (tests/test_report.py's ``write_run``), the second
one differing from the first by a known amount, so the page's numbers can be checked exactly.
"""

import base64
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from helpers import PNG_MAGIC, STEPS, write_run  # noqa: E402
from helpers import run_report_cli as run_cli  # noqa: E402

from layerwatch import read_run  # noqa: E402

from layerwatch.analysis import compare, html  # noqa: E402
from layerwatch.analysis.html import ReportError  # noqa: E402

SAME = {"preset": "standard", "alpha": 1.0, "probe_hash": "a" * 64}
OTHER = {"preset": "standard", "alpha": 1.0, "probe_hash": "b" * 64}


def _shift(step, layer):
    return 0.01 * layer + step / 10000.0  # run B - run A, known per step and layer


def _two_runs(tmp_path, *, b_settings=SAME, b_steps=STEPS, stderr=None, extra=None):
    a = write_run(tmp_path / "lr-1e-3", settings=SAME, stderr=stderr, extra=extra)
    b = write_run(tmp_path / "lr-3e-4", settings=b_settings, shift=_shift, steps=b_steps, stderr=stderr, extra=extra)
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
    # the table at the last common step: B - A = _shift(300, layer) for prompt_entropy, at 3 significant digits
    for layer, expected in ((0, "0.0300"), (3, "0.0600"), (6, "0.0900")):
        assert round(_shift(STEPS[-1], layer), 6) == float(expected)
        assert f"<td>{expected}</td>" in page
    assert "no standard errors" in page  # these runs carry none, and the page says so


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


def test_the_page_fits_the_window_and_shows_the_settings_side_by_side(tmp_path):
    a, b = _two_runs(tmp_path, b_settings={**SAME, "alpha": 2.0, "views": 4})
    page = compare.make_comparison([a, b], out=tmp_path / "c.html", metrics=["curvature", "rms"]).html.read_text()
    navigation = page[page.index("<nav>"):page.index("</nav>")]
    assert '<a href="#curvature">curvature</a> <a href="#rms">' in navigation  # spaces: the links wrap
    assert "flex-wrap: wrap" in page and "max-width: 100%" in page
    settings = page[page.index('id="settings"'):]
    rows = re.findall(r'<tr( class="differs")?><th>(\w+)</th><td>([^<]*)</td><td>([^<]*)</td></tr>', settings)
    by_key = {key: (bool(differs), va, vb) for differs, key, va, vb in rows}
    assert by_key["alpha"] == (True, "1.00", "2.00") and by_key["views"] == (True, html.DASH, "4")
    assert by_key["preset"] == (False, "standard", "standard")
    assert [key for differs, key, *_ in rows][:2] == ["alpha", "views"]  # the differences come first
    assert "2 setting(s) differ" in settings


def test_an_empty_panel_says_why(tmp_path):
    """cka_to_previous has no value at a run's first probe: the panel of that step names the run and the reason."""
    def cka(i):
        return {"cka_to_previous": [None if i == 0 else 0.9 + 0.01 * k for k in range(7)]}

    a, b = _two_runs(tmp_path, extra=cka)
    runs = [read_run(a), read_run(b)]
    figure = compare.profiles_figure(runs, ["A", "B"], "cka_to_previous", [0, 300])
    first, last = figure.axes[0], figure.axes[1]
    note = " ".join(t.get_text() for t in first.texts)
    assert "A: no value at step 0" in note and "B:" in note and "nothing earlier to compare with" in note
    assert not first.get_lines() and len(last.get_lines()) == 2 and not last.texts


def _se(step, layer):
    return 0.004 + 0.001 * layer  # the same in both runs


def test_differences_beyond_the_combined_uncertainty_are_marked(tmp_path):
    a, b = _two_runs(tmp_path, stderr=_se)
    runs = [read_run(a), read_run(b)]
    steps, layers = compare.common_steps(runs), runs[0].layers
    result = compare.difference(runs[1], runs[0], "prompt_entropy", steps, layers)
    se = np.array([[_se(s, layer) for layer in layers] for s in steps])
    delta = np.array([[_shift(s, layer) for layer in layers] for s in steps])
    threshold = 2 * np.sqrt(se**2 + se**2)
    np.testing.assert_allclose(result.delta, delta, atol=1e-12)
    np.testing.assert_allclose(result.threshold, threshold)
    np.testing.assert_array_equal(result.marked, np.abs(delta) > threshold)
    assert result.marked.any() and not result.marked.all()  # the test separates both cases
    # the figure marks exactly those points; the table's cells at the last step too; the page says how
    figure = compare.differences_figure(runs, ["A", "B"], "prompt_entropy", steps, layers)
    dots = [line for line in figure.axes[0].get_lines() if line.get_marker() == "o"]
    marked_points = sorted((float(x), round(float(y), 9)) for d in dots for x, y in zip(d.get_xdata(), d.get_ydata()))
    expected = sorted((float(steps[i]), round(float(delta[i, j]), 9)) for i, j in zip(*np.nonzero(result.marked)))
    assert marked_points == expected
    out = tmp_path / "c.html"
    page = compare.make_comparison([a, b], out=out, metrics=["prompt_entropy", "curvature"]).html.read_text()
    section = page[page.index('<h3>prompt_entropy at step 300'):]
    section = section[:section.index("</table>")]
    assert section.count('class="significant"') == int(result.marked[-1].sum())
    assert "2\u00b7\u221a(se_a\u00b2 + se_b\u00b2)" in page
    summary = page[page.index('id="differences"'):page.index('<h2 id="prompt_entropy"')]
    assert f"{int(result.marked[-1].sum())} of {len(layers)} layers" in summary and "no standard errors" in summary


def test_a_planted_comparison_link_is_replaced_not_followed(tmp_path):
    a, b = _two_runs(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "cmp.html"
    out.symlink_to(victim)
    compare.make_comparison([a, b], out=out, metrics=["rms"])
    assert victim.read_text() == "precious" and not out.is_symlink() and out.read_text().startswith("<!DOCTYPE")

# Checkpoints, subprocesses and full HTML reports: out of the quick loop (`-m "not slow"`).
pytestmark = pytest.mark.slow
