"""The metric registry: adding a metric is one ``register(MetricSpec(...))`` plus its function, nothing else.

The throwaway metrics below are registered inside the test and unregistered afterwards; they reach the record, the
JSONL file, TensorBoard (read back from the event files), ``read_run``, the alerts, the summary table and the report
without any other edit.
"""

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import layerwatch
from layerwatch.metrics import registry
from layerwatch.monitor.capture import find_blocks
from layerwatch.monitor import METRIC_PRESETS, LayerWatch
from layerwatch.metrics.registry import HEALTH, POOLED, TOKENS, VIEWS, MetricSpec
from layerwatch.analysis.summary import summary_table
from helpers import random_probe
from models import block_hidden, tiny_model


def _probe(prompts=9, length=14):
    return random_probe(prompts, length, views=0, seed=3, probe_seed=0, min_length=5)


# The two functions a contributor would add to layerwatch/metrics.py.
def token_count(hidden, mask):
    """[b] number of real tokens of each prompt."""
    return mask.sum(-1).to(torch.float32)


def pooled_norm(pooled):
    """[...] mean L2 norm of the mean-pooled prompt rows."""
    return torch.linalg.vector_norm(pooled.double(), dim=-1).mean(-1)


@pytest.fixture
def throwaway_metrics():
    specs = [
        MetricSpec(
            "test_token_count", "real tokens per prompt (a throwaway test metric)", needs=(TOKENS,),
            per_prompt=lambda layer: token_count(layer.hidden, layer.mask), histogram=True, collapse_watched=True,
            summary=True,
        ),
        MetricSpec(
            "test_pooled_norm", "mean norm of the pooled rows (a throwaway test metric)", needs=(POOLED,),
            compute=lambda inputs: pooled_norm(inputs.pooled), compressed_when="lower",
        ),
    ]
    for spec in specs:
        registry.register(spec)
    try:
        yield [spec.name for spec in specs]
    finally:
        for spec in specs:
            registry.unregister(spec.name)


def _reference_pooled_norm(model, probe):
    """Each prompt alone (no padding), hidden states from output_hidden_states and a hook on the last block."""
    last_block = find_blocks(model)[-1]
    norms = []
    for ids, mask in zip(probe.input_ids, probe.attention_mask.bool()):
        captured = {}
        handle = last_block.register_forward_hook(lambda m, a, out: captured.update(h=block_hidden(out)))
        with torch.no_grad():
            out = model(ids[mask][None], output_hidden_states=True)
        handle.remove()
        states = torch.stack(list(out.hidden_states[:-1]) + [captured["h"]])[:, 0].double()  # [L+1, N, D]
        norms.append(states.mean(1).norm(dim=-1))
    return torch.stack(norms, 1).mean(1).numpy()


def test_a_registered_metric_reaches_record_jsonl_tensorboard_read_run_alerts_and_report(throwaway_metrics, tmp_path):
    torch.manual_seed(0)
    model = tiny_model("gpt2", layers=2)
    probe = _probe()
    counts = probe.attention_mask.sum(1).double().numpy()
    with LayerWatch(
        probe, logdir=tmp_path, every=1, metrics=throwaway_metrics, batch_size=4, collapse_threshold=1000.0,
        collapse_probes=1,
    ) as watch:
        records = [watch.run(model, step) for step in (1, 2)]
    assert all(record is not None for record in records)
    layers = len(find_blocks(model)) + 1
    expected_norm = _reference_pooled_norm(model, probe)

    # the record
    record = records[-1]
    assert list(record.metrics) == throwaway_metrics
    np.testing.assert_allclose(record.metrics["test_token_count"], [counts.mean()] * layers, rtol=1e-12)
    np.testing.assert_allclose(record.metrics["test_pooled_norm"], expected_norm, rtol=1e-4)
    np.testing.assert_array_equal(record.per_prompt["test_token_count"], np.tile(counts, (layers, 1)))
    assert "test_pooled_norm" not in record.per_prompt  # histogram=False
    assert any(alert.startswith("collapse: test_token_count at layer 0") for alert in records[0].alerts)

    # JSONL
    lines = [json.loads(line) for line in (tmp_path / "layerwatch.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert list(lines[-1]["metrics"]) == throwaway_metrics
    assert lines[-1]["settings"]["metrics"] == throwaway_metrics
    np.testing.assert_allclose(lines[-1]["metrics"]["test_pooled_norm"], expected_norm, rtol=1e-4)

    # TensorBoard, read back from the event files
    events = EventAccumulator(str(tmp_path / "all_layers"), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for layer in range(layers):
        layer_events = EventAccumulator(str(tmp_path / f"layer_{layer:02d}"), size_guidance={"scalars": 0})
        layer_events.Reload()
        values = [e.value for e in layer_events.Scalars("layerwatch/test_pooled_norm")]
        np.testing.assert_allclose(values, [expected_norm[layer]] * 2, rtol=1e-4)
        assert "layerwatch/test_token_count_per_prompt" in layer_events.Tags()["histograms"]
        assert "layerwatch/test_pooled_norm_per_prompt" not in layer_events.Tags()["histograms"]
    assert {"layerwatch/heatmap/test_pooled_norm", "layerwatch/depth_profile/test_token_count"} <= set(tags["images"])
    assert any("collapse: test_token_count" in str(e.tensor_proto.string_val) for e in events.Tensors("layerwatch/alerts/text_summary"))

    # read_run and the summary table
    run = layerwatch.read_run(tmp_path)
    assert run.metrics == throwaway_metrics
    np.testing.assert_allclose(run.metric("test_pooled_norm")[-1], expected_norm, rtol=1e-4)
    table = summary_table(run)
    assert "test_token_count" in table and "test_pooled_norm" not in table  # summary=True / False

    # the report: a heatmap per metric and the description from the registry
    pytest.importorskip("matplotlib")
    from layerwatch.analysis.report import make_report

    report = make_report(tmp_path)
    assert report.images["heatmap_test_pooled_norm"].is_file()
    page = report.html.read_text()
    assert "mean norm of the pooled rows (a throwaway test metric)" in page


def test_unregister_leaves_the_built_in_registry_as_it_was(throwaway_metrics):
    assert registry.all_metrics()[-2:] == tuple(throwaway_metrics)
    assert registry.preset("standard") == METRIC_PRESETS["standard"]  # presets list only the metrics that opt in
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.spec("test_pooled_norm"))


def test_presets_and_flags_derive_from_the_declarations():
    light = ("prompt_entropy", "prompt_entropy_bimodality", "dataset_entropy", "curvature", "effective_rank")
    beyond = ("massive_activation", "prompt_entropy_without_sinks", "probe_accuracy", "best_layer")
    beyond += ("cka_to_previous", "cka_to_first")  # probe_accuracy and best_layer run only on labelled probes
    assert METRIC_PRESETS["light"] == light + beyond + ("rms", "max_abs", "nonfinite")
    views = ("infonce", "infonce_chance", "dime", "lidar")
    assert METRIC_PRESETS["standard"] == METRIC_PRESETS["light"] + views + ("intrinsic_dimension",)
    assert METRIC_PRESETS["paper"] == METRIC_PRESETS["standard"]
    assert registry.histogram_metrics() == ("prompt_entropy", "curvature")
    assert registry.collapse_metrics() == ("dataset_entropy", "effective_rank")
    assert registry.metrics_needing(HEALTH) == ("rms", "max_abs", "nonfinite")
    assert registry.metrics_needing(VIEWS) == ("infonce", "infonce_chance", "dime", "lidar")
    assert registry.resolve_metrics("paper") == ("paper", METRIC_PRESETS["paper"], 16)
    assert registry.resolve_metrics(["health", "lidar", "rms"]) == ("custom", ("rms", "max_abs", "nonfinite", "lidar"), 2)
    assert registry.resolve_metrics(["curvature_abs"]) == ("custom", ("curvature_abs",), 0)
    assert registry.resolve_metrics("dime") == ("custom", ("dime",), 2)  # one name, given as a string
    # best_layer comes with probe_accuracy (issue 21.4), once
    assert registry.resolve_metrics(["probe_accuracy"]) == ("custom", ("probe_accuracy", "best_layer"), 0)
    assert registry.resolve_metrics(["best_layer", "probe_accuracy"])[1] == ("best_layer", "probe_accuracy")
    stderr = tuple(name for name in registry.all_metrics() if registry.spec(name).stderr)
    assert "best_layer" not in stderr and not set(stderr) & set(registry.metrics_needing(HEALTH))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(needs=("labels!",), compute=lambda s: s), "needs="),
        (dict(needs=(POOLED,)), "compute="),
        (dict(needs=(POOLED,), per_prompt=lambda layer: layer.mask), "per_prompt function needs"),
        (dict(needs=(POOLED,), compute=lambda s: s, compressed_when="up"), "compressed_when"),
        (dict(needs=(POOLED,), compute=lambda s: s, presets=("huge",)), "presets="),
    ],
)
def test_bad_declarations_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetricSpec("bad", "a bad declaration", **kwargs)


def test_unknown_metric_names_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="metrics= contains unknown metric 'entropy'"):
        registry.resolve_metrics(["entropy"])
    with pytest.raises(ValueError, match="metrics='huge' is not a preset"):
        registry.resolve_metrics("huge")
