"""The flat module paths of layerwatch 0.1 (``layerwatch.trajectory``, ``layerwatch.augment``, ...), kept importable.

The package is now split into sub-packages; an old path loads the module at its new home and hands that very module
out under the old name (one module object, so patching either name patches both). Paths the SPEC names stay silent;
the others warn once that they moved.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "layerwatch.augment": "layerwatch.probe.augment",
    "layerwatch.probe_sources": "layerwatch.probe.sources",
    "layerwatch.registry": "layerwatch.metrics.registry",
    "layerwatch.model_facts": "layerwatch.monitor.model_facts",
    "layerwatch.capture": "layerwatch.monitor.capture",
    "layerwatch.collect": "layerwatch.monitor.collect",
    "layerwatch.schedule": "layerwatch.monitor.schedule",
    "layerwatch.alerts": "layerwatch.monitor.alerts",
    "layerwatch.references": "layerwatch.monitor.references",
    "layerwatch.cost": "layerwatch.monitor.cost",
    "layerwatch.session": "layerwatch.monitor.session",
    "layerwatch.record": "layerwatch.rundir.record",
    "layerwatch.sinks": "layerwatch.rundir.writers",
    "layerwatch.trackers": "layerwatch.rundir.trackers",
    "layerwatch.runs": "layerwatch.rundir.runs",
    "layerwatch.images": "layerwatch.rundir.images",
    "layerwatch.trajectory": "layerwatch.analysis.trajectory",
    "layerwatch.revisions": "layerwatch.analysis.revisions",
    "layerwatch.report": "layerwatch.analysis.report",
    "layerwatch.compare": "layerwatch.analysis.compare",
    "layerwatch.demo": "layerwatch.cli.demo",
}
# Named by the SPEC (§2, §6): these old paths are part of the contract and do not warn.
SPEC_PATHS = {"layerwatch.augment", "layerwatch.trajectory", "layerwatch.report", "layerwatch.demo"}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):  # noqa: ANN001 - importlib's protocol
        module = importlib.import_module(self.target)
        self._home_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:  # noqa: ANN001
        module.__spec__ = self._home_spec  # importlib set the alias's spec on the shared module: restore its own


class MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname not in MOVED:
            return None
        if fullname not in SPEC_PATHS:
            warnings.warn(f"{fullname} moved to {MOVED[fullname]}; import it from there", DeprecationWarning, 2)
        return importlib.util.spec_from_loader(fullname, _Alias(MOVED[fullname]))


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
