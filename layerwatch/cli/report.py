"""``layerwatch report RUN_DIR [RUN_DIR ...]``: the front end that decides what to draw.

One run directory gives its report (:func:`layerwatch.analysis.report.make_report`: PNG pictures and
``report.html``); two or more give one page comparing them (:func:`layerwatch.analysis.compare.make_comparison`).
``--metrics`` is parsed by the shared flag parser (:mod:`layerwatch.cli.options`): a preset, one metric name or a
comma list; names an older run recorded are accepted too. Every mistake exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from layerwatch.analysis import compare, report
from layerwatch.analysis.html import ReportError
from layerwatch.cli import options

PROG = "layerwatch report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``layerwatch report`` arguments to ``parser``."""
    parser.description = (
        "Draw a run as PNG pictures (an overview of every metric, heatmaps, depth profiles, histograms) and one HTML "
        "page; with several run directories, write one HTML page comparing them (the first is the reference)."
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="+",
        help="a layerwatch run directory (holding layerwatch.jsonl); give two or more to compare runs",
    )
    options.add_common_flags(
        parser,
        out_help="where report.html and report/ go (default: RUN_DIR); when comparing, the HTML file or its folder "
        "(default: ./layerwatch-comparison.html)",
        metrics_default=None,
        metrics_help="the metrics to draw: a preset, one metric name, or a comma list (default: all the run has)",
    )
    parser.add_argument(
        "--allow-different-probes", action="store_true",
        help="compare runs probed with different prompts anyway (flagged in red; refused by default)",
    )
    parser.add_argument("--dpi", type=int, default=110, help="image resolution (default 110)")


def _metrics(value: str | None) -> str | list[str] | None:
    return None if value is None else options.parse_metrics(value, known_only=False)


@options.front_end(PROG)
def main(args: argparse.Namespace) -> int:
    """Run ``layerwatch report``; returns the exit code (0 ok, 2 user error)."""
    metrics = _metrics(args.metrics)
    if args.dpi <= 0:
        raise options.FlagError("--dpi", f"must be a positive number of dots per inch, not {args.dpi}; try 110")
    try:
        if len(args.run_dir) > 1:
            comparison = compare.make_comparison(
                args.run_dir, out=args.out, metrics=metrics, dpi=args.dpi,
                allow_different_probes=args.allow_different_probes,
            )
            print(compare.describe(comparison))
            return 0
        result = report.make_report(args.run_dir[0], out=args.out, metrics=metrics, dpi=args.dpi)
    except ReportError as error:
        return options.exit_code(PROG, error)
    print(f"wrote {result.html} and {len(result.images)} picture(s) in {result.html.parent / report.IMAGE_DIR}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(options.run_alone(PROG, add_arguments, main))
