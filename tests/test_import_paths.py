"""Every import path that the README or the SPEC names keeps working, the old flat paths of 0.1 included."""

import importlib
import sys
import warnings

import pytest

import layerwatch
from layerwatch import _moved

# SPEC §1, §7 and §8: the public functions and constants of layerwatch.metrics.
METRIC_FUNCTIONS = [
    "normalize", "mean_pool", "prompt_entropy", "curvature", "token_metrics", "dataset_entropy", "effective_rank",
    "infonce", "infonce_chance", "lidar", "dime", "bimodality", "probe_accuracy", "best_layer", "linear_cka",
    "massive_activation", "prompt_entropy_without_sinks", "sink_tokens", "check_labels", "set_level_peak_bytes",
]
METRIC_CONSTANTS = ["SINK_NORM_RATIO", "EIGENVALUE_RTOL", "EigenvaluePaths"]

# (module, attribute) pairs the README and the SPEC name.
DOCUMENTED = [
    ("layerwatch", "LayerWatch"), ("layerwatch", "Probe"), ("layerwatch", "ProbeRecord"), ("layerwatch", "read_run"),
    ("layerwatch", "Run"), ("layerwatch", "metrics"), ("layerwatch", "__version__"),
    ("layerwatch.integrations.hf_trainer", "LayerWatchCallback"),
    ("layerwatch.integrations.accelerate_loop", "LayerWatchAccelerate"),
    ("layerwatch.trajectory", "run_trajectory"),
    ("layerwatch.analysis.trajectory", "run_trajectory"),
    ("layerwatch.augment", "augment_batch"),
    ("layerwatch.probe.augment", "augment_batch"),
    ("layerwatch.monitor.cost", "estimate_probe_cost"),
    ("layerwatch.rundir.writers", "Writer"),
    ("layerwatch.rundir.runs", "read_run"),
    ("layerwatch.analysis.summary", "summary_table"),
    ("layerwatch.monitor", "LayerWatch"),
    ("layerwatch.cli", "main"),
]


@pytest.mark.parametrize("name", METRIC_FUNCTIONS + METRIC_CONSTANTS)
def test_metrics_functions(name):
    assert getattr(layerwatch.metrics, name) is getattr(importlib.import_module("layerwatch.metrics"), name)
    if name in METRIC_FUNCTIONS:
        assert callable(getattr(layerwatch.metrics, name))


@pytest.mark.parametrize("module, attribute", DOCUMENTED)
def test_documented_paths(module, attribute):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert getattr(importlib.import_module(module), attribute) is not None


def test_lightning_path():
    pytest.importorskip("lightning")
    from layerwatch.integrations.lightning import LayerWatchCallback

    assert LayerWatchCallback.__name__ == "LayerWatchCallback"


@pytest.mark.parametrize("old, new", sorted(_moved.MOVED.items()))
def test_old_flat_paths_are_the_new_modules(old, new):
    """``import layerwatch.cost`` is ``layerwatch.monitor.cost`` itself (so patching either patches both); paths the
    SPEC names stay silent, the others warn that they moved."""
    sys.modules.pop(old, None)  # only the alias entry: the module stays loaded under its own name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_module = importlib.import_module(old)
    assert old_module is importlib.import_module(new)
    assert old_module.__spec__.name == new  # the module keeps its own identity
    moved_warnings = [w for w in caught if issubclass(w.category, DeprecationWarning) and new in str(w.message)]
    assert bool(moved_warnings) == (old not in _moved.SPEC_PATHS)
