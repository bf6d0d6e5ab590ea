"""layerwatch: watch every layer's representations evolve while a language model trains.

Quick start (plain PyTorch loop)::

    import layerwatch
    probe = layerwatch.Probe.from_texts(texts, tokenizer)
    watch = layerwatch.LayerWatch(probe, logdir="runs/layerwatch", every=100)
    for step, batch in enumerate(loader, start=1):
        ...  # forward, backward, optimizer step
        watch.step(model, step)
    watch.close()

Then ``tensorboard --logdir runs/layerwatch``. See the README for the Trainer and Accelerate integrations.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from layerwatch._version import __version__

# In a source checkout the top-level integrations/ folder sits beside this package; an install maps it in as
# layerwatch.integrations (pyproject.toml's package-dir). Map it here too, so that code run from the repository
# root imports exactly like the installed package.
_source_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "integrations")) and os.path.isfile(
    os.path.join(_source_root, "integrations", "__init__.py")
):
    __path__.append(_source_root)

from layerwatch import _moved

_moved.install()

__all__ = ["LayerWatch", "Probe", "ProbeRecord", "read_run", "Run", "metrics", "__version__"]

# Public names are imported lazily so that `import layerwatch` stays cheap (the CLI starts fast) and
# `layerwatch.metrics` can be used without pulling in transformers or tensorboard.
_LAZY = {
    "LayerWatch": "layerwatch.monitor",
    "ProbeRecord": "layerwatch.monitor",
    "Probe": "layerwatch.probe",
    "read_run": "layerwatch.rundir.runs",
    "Run": "layerwatch.rundir.runs",
}

if TYPE_CHECKING:  # pragma: no cover
    from layerwatch.monitor import LayerWatch, ProbeRecord
    from layerwatch.probe import Probe
    from layerwatch.rundir.runs import Run, read_run


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "metrics":
        import importlib

        return importlib.import_module("layerwatch.metrics")
    raise AttributeError(f"module 'layerwatch' has no attribute {name!r}")
