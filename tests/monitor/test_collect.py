"""Collection: buffers declared from the registry, the set-level step as a pure function, and step()'s outcome."""

import math

import numpy as np
import pytest
import torch

import layerwatch
from layerwatch import metrics as M
from layerwatch.monitor.capture import find_blocks
from layerwatch.monitor.collect import CLEAN, Collector, passes, set_level_metrics
from layerwatch.monitor import LayerWatch, ProbeOutcome
from layerwatch.metrics.registry import SetInputs
from models import TINY_VOCAB, tiny_model


def _probe(prompts=8, length=12, views=2):
    ids = torch.randint(1, TINY_VOCAB, (prompts, length), generator=torch.Generator().manual_seed(1))
    return layerwatch.Probe.from_tensors(ids, vocab_size=TINY_VOCAB, views=views, seed=1)


def test_buffers_and_passes_follow_what_the_selected_metrics_need():
    probe = _probe()
    light = Collector(["prompt_entropy_bimodality", "rms"], probe, layers=3, views=2, alpha=1.0)
    assert light.token_names == ("prompt_entropy",)  # bimodality uses prompt entropy's per-prompt values
    assert {name: (b.shape, b.reduce) for name, b in light.buffers.items()} == {
        "per_prompt/prompt_entropy": ((3, 8), "sum"),
        "health": ((3, 3), "sum"),
        "max_abs": ((3,), "max"),
    }
    assert [p[0] for p in passes(light.names, probe, light.views)] == [CLEAN]
    views_only = Collector(["lidar"], probe, layers=3, views=2, alpha=1.0)
    assert {name: b.shape for name, b in views_only.buffers.items()} == {"views": (3, 8, 2, None)}
    assert [p[0] for p in passes(views_only.names, probe, views_only.views)] == [0, 1]


def test_set_level_metrics_is_a_function_of_the_buffers_alone():
    generator = torch.Generator().manual_seed(0)
    layers, prompts, width = 3, 10, 6
    entropy = torch.rand(layers, prompts, generator=generator)
    pooled = torch.randn(layers, prompts, width, generator=generator)
    health = torch.tensor([[8.0, 2.0, 0.0], [18.0, 2.0, 0.0], [2.0, 1.0, 1.0]])  # layer 2 saw a NaN
    inputs = SetInputs(
        per_prompt={"prompt_entropy": entropy}, pooled=pooled, views=None, health=health,
        max_abs=torch.tensor([1.0, 2.0, 3.0]), alpha=1.0, seed=0,
    )
    names = ["prompt_entropy", "dataset_entropy", "rms", "max_abs", "nonfinite"]
    metrics, per_prompt = set_level_metrics(names, inputs)
    assert list(metrics) == names and list(per_prompt) == ["prompt_entropy"]
    np.testing.assert_allclose(metrics["prompt_entropy"][:2], entropy.double().mean(1)[:2].numpy(), rtol=1e-12)
    np.testing.assert_allclose(metrics["dataset_entropy"][:2], M.dataset_entropy(pooled)[:2].double().numpy(), rtol=1e-6)
    assert math.isnan(metrics["prompt_entropy"][2]) and math.isnan(metrics["dataset_entropy"][2])
    np.testing.assert_allclose(metrics["rms"], [2.0, 3.0, math.sqrt(2.0)], rtol=1e-15)  # sqrt(squares / finite)
    assert metrics["nonfinite"] == [0.0, 0.0, 1.0] and metrics["max_abs"] == [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(per_prompt["prompt_entropy"], entropy.numpy())


def test_step_tells_not_due_from_failed():
    model = tiny_model("gpt2")
    watch = LayerWatch(_probe(), logdir=None, every=4, metrics="light", log_spaced_start=False)
    assert watch.last_outcome is None
    assert watch.step(model, 1) is None and watch.last_outcome == ProbeOutcome.NOT_DUE == "not due"
    assert watch.step(model, 4) is not None and watch.last_outcome is ProbeOutcome.PROBED
    handle = find_blocks(model)[0].register_forward_hook(lambda *args: 1 / 0)
    assert watch.step(model, 8) is None and watch.last_outcome is ProbeOutcome.FAILED
    handle.remove()
    assert watch.step(model, 9) is None and watch.last_outcome is ProbeOutcome.NOT_DUE
    assert watch.run(model, 10) is not None and watch.last_outcome is ProbeOutcome.PROBED
    strict = LayerWatch(_probe(), logdir=None, metrics="light", strict=True)
    find_blocks(model)[0].register_forward_hook(lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        strict.run(model, 1)
    assert strict.last_outcome is ProbeOutcome.FAILED
