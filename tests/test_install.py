"""The checkout imports like the installed package, and the declared dependency floors are the tested ones."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10, the floor requires-python admits
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent


def _requirements() -> dict[str, list[str]]:
    """pyproject's requirement strings: ``{"core": [...], <extra>: [...]}``."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {"core": project["dependencies"], **project["optional-dependencies"]}


def _lower_bound(requirements: list[str], name: str) -> str:
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}\s*>=\s*([\w.]+).*", requirement.strip())
        if match:
            return match.group(1)
    raise AssertionError(f"no {name}>=... among {requirements}")


@pytest.mark.slow  # a subprocess
def test_integrations_import_from_the_repository_root():
    # From the repository root the source folder layerwatch/ shadows any installed copy; the top-level
    # integrations/ folder must still import as layerwatch.integrations, as it does after `pip install .`.
    code = (
        "from layerwatch.integrations.hf_trainer import LayerWatchCallback\n"
        "import layerwatch, layerwatch.integrations as i\n"
        "print(layerwatch.__file__); print(i.__file__); print(LayerWatchCallback.__name__)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    package_file, integrations_file, name = result.stdout.split()
    assert Path(package_file) == REPO / "layerwatch" / "__init__.py"
    assert Path(integrations_file) == REPO / "integrations" / "__init__.py"
    assert name == "LayerWatchCallback"


def test_report_needs_no_extra():
    # `layerwatch report` (and the matplotlib-drawn pictures) work after a plain `pip install .`.
    assert any(re.match(r"matplotlib\s*>=", r) for r in _requirements()["core"])


def test_ci_floor_environment_pins_the_declared_floors():
    # .ci/run tests exactly the lowest torch, transformers and accelerate that pyproject.toml admits.
    pins = dict(
        line.split("==") for line in (REPO / ".ci" / "floor-constraints.txt").read_text().split()
        if "==" in line and not line.startswith("#")
    )
    core = _requirements()["core"]
    for name in ("torch", "transformers", "accelerate"):
        declared = Version(_lower_bound(core, name))
        assert Version(pins[name]) == declared, f"{name}: pyproject's floor {declared} is not what CI tests"


def test_dev_extras_cannot_move_transformers():
    # datasets 5.1+ needs huggingface_hub>=1.31, which transformers 4.x refuses: an open-ended datasets pin made
    # `pip install -e ".[dev]"` upgrade a user's transformers 4.x to 5.x.
    datasets = next(r for r in _requirements()["dev"] if r.startswith("datasets"))
    assert re.search(r"<\s*5\.1\b", datasets), datasets
