"""The ``layerwatch`` command imports only the subcommand it runs."""

import json
import subprocess
import sys

import pytest

SUBCOMMAND_MODULES = ("layerwatch.cli.demo", "layerwatch.cli.trajectory", "layerwatch.cli.report")

_PROBE = """
import json, sys
from layerwatch.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m in {modules!r})))
"""


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize(
    ("argv", "imported"),
    [
        (["--help"], []),
        (["-v", "report", "--help"], ["layerwatch.cli.report"]),
        (["trajectory", "--help"], ["layerwatch.cli.trajectory"]),
    ],
)
def test_only_the_subcommand_being_run_is_imported(argv, imported):
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(modules=set(SUBCOMMAND_MODULES)), *argv],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == imported
    assert "usage: layerwatch" in done.stdout
