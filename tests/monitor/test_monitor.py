"""The monitor end to end on tiny real models: capture, metrics, writers, schedule, failures, isolation."""

import json
import logging
import math
import random

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import layerwatch
from layerwatch import metrics as M
from layerwatch.monitor.capture import CaptureError, find_blocks
from layerwatch.monitor import LayerWatch
from layerwatch.monitor.schedule import ProbeSchedule
from helpers import random_probe
from models import KINDS, TINY_VOCAB, block_hidden, tiny_model, with_block_hidden


def make_probe(prompts=12, length=20, views=2, seed=0, left_pad=False):
    """Prompts of random lengths (6..length, the first one full), padded on the right or the left."""
    return random_probe(prompts, length, views, seed, left_pad=left_pad, min_length=6, first_full=True)


def event_accumulator(logdir):
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("kind", KINDS)
def test_every_architecture_gives_all_layers_of_finite_metrics(kind, tmp_path):
    model = tiny_model(kind)
    watch = LayerWatch(make_probe(prompts=8, length=16), logdir=tmp_path, metrics="standard", batch_size=4)
    record = watch.run(model, step=1)
    watch.close()
    assert record is not None, "probe failed"
    expected_layers = len(find_blocks(model)) + 1
    assert record.layers == list(range(expected_layers))
    assert set(watch.metric_names) == set(layerwatch.monitor.METRIC_PRESETS["standard"]) - {"probe_accuracy", "best_layer"}
    for name in watch.metric_names:  # (the probe has no labels)
        if name == "cka_to_previous":
            assert np.isnan(record.metrics[name]).all()  # the first probe has no previous one
            continue
        values = np.asarray(record.metrics[name])
        assert values.shape == (expected_layers,), name
        assert np.isfinite(values).all(), (name, values)
    assert all(0 <= v <= 1 + 1e-6 for v in record.metrics["prompt_entropy"])
    assert record.metrics["nonfinite"] == [0.0] * expected_layers


def test_metrics_equal_a_direct_computation_on_the_hidden_states(tmp_path):
    """Capture + reduction against an independent path: output_hidden_states and the metric functions."""
    torch.manual_seed(0)
    model = tiny_model("llama", layers=3)
    probe = make_probe(prompts=10, length=18, left_pad=True)
    watch = LayerWatch(probe, logdir=None, metrics="standard", batch_size=3)
    record = watch.run(model, step=0)
    assert record is not None
    # Reference: each prompt alone (no padding at all), hidden states 0..L-1 from the model's own output; the last
    # block's output (before the final norm) from a hook.
    last_block = find_blocks(model)[-1]
    ids, mask = probe.input_ids, probe.attention_mask.bool()
    per_prompt_entropy, pooled = [], []
    for i in range(ids.shape[0]):
        tokens = ids[i][mask[i]][None]
        captured = {}
        handle = last_block.register_forward_hook(lambda m, a, out: captured.update(h=block_hidden(out)))
        with torch.no_grad():
            out = model(tokens, output_hidden_states=True)
        handle.remove()
        states = torch.stack(list(out.hidden_states[:-1]) + [captured["h"]])[:, 0]  # [L+1, N, D]
        per_prompt_entropy.append(M.prompt_entropy(states.double()[:, None], None)[:, 0])
        pooled.append(states.double().mean(1))
    entropy = torch.stack(per_prompt_entropy, 1)
    pooled = torch.stack(pooled, 1)
    np.testing.assert_allclose(record.per_prompt["prompt_entropy"], entropy.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(record.metrics["prompt_entropy"], entropy.mean(1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(record.metrics["dataset_entropy"], M.dataset_entropy(pooled).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_tensorboard_and_jsonl_are_written_and_read_back(tmp_path):
    model = tiny_model("gpt2")
    watch = LayerWatch(make_probe(), logdir=tmp_path, every=2, metrics="standard", batch_size=8)
    for step in range(1, 7):
        watch.step(model, step)
    watch.close()
    probed = [1, 2, 4, 6]  # log-spaced 1, 2 then every 2
    run = layerwatch.read_run(tmp_path)
    assert run.steps.tolist() == probed
    assert run.layers == [0, 1, 2]
    assert run.metric("prompt_entropy").shape == (4, 3)
    assert (tmp_path / "probe.safetensors").exists()
    lines = (tmp_path / "layerwatch.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert {"step", "time", "layers", "metrics", "wall_time_s", "settings"} <= set(first)
    assert first["settings"]["preset"] == "standard" and first["wall_time_s"] > 0

    # One TensorBoard run per layer (layer_NN/), one tag per metric: every layer is its own coloured line.
    assert sorted(p.name for p in tmp_path.glob("layer_*") if p.is_dir()) == ["layer_00", "layer_01", "layer_02"]
    for layer in range(3):
        layer_events = event_accumulator(tmp_path / f"layer_{layer:02d}")
        scalar_tags = layer_events.Tags()["scalars"]
        assert sorted(t for t in scalar_tags if t.startswith("layerwatch/")) == sorted(f"layerwatch/{n}" for n in run.metrics)
        # beside them, each metric's standard error in a section of its own (rms & co. have none)
        assert "layerwatch_stderr/prompt_entropy" in scalar_tags and "layerwatch_stderr/rms" not in scalar_tags
        for name in run.metrics:
            points = layer_events.Scalars(f"layerwatch/{name}")
            assert [e.step for e in points] == probed
            np.testing.assert_allclose([e.value for e in points], run.metric(name)[:, layer], rtol=1e-6)
        assert {"layerwatch/prompt_entropy_per_prompt", "layerwatch/curvature_per_prompt"} <= set(
            layer_events.Tags()["histograms"]
        )
    accumulator = event_accumulator(tmp_path / "all_layers")  # run-level scalars, pictures, alerts, layout
    tags = accumulator.Tags()
    assert sorted(tags["scalars"]) == ["layerwatch/errors", "layerwatch/probe_seconds"]
    assert [(e.step, e.value) for e in accumulator.Scalars("layerwatch/errors")] == [(s, 0.0) for s in probed]
    alerts = accumulator.Tensors("layerwatch/alerts/text_summary")
    # the alerts text is rewritten at every probe, and says which step it checked
    assert [e.step for e in alerts] == probed
    assert f"No alerts (checked at step {probed[-1]})".encode() in alerts[-1].tensor_proto.string_val[0]
    assert "layerwatch/heatmap/prompt_entropy" in tags["images"]
    assert "layerwatch/depth_profile/curvature" in tags["images"]
    heatmaps = accumulator.Images("layerwatch/heatmap/prompt_entropy")
    assert len(heatmaps) == 4 and [h.step for h in heatmaps] == probed  # redrawn with each new step
    assert all(h.width >= 800 and h.height >= 430 for h in heatmaps)  # a labelled chart, readable without zooming
    assert "custom_scalars__config__" in tags["tensors"]
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(accumulator.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["prompt_entropy"] == ["^layerwatch/prompt_entropy$"]  # a regex over the layer runs' tags
    assert set(charts) == set(run.metrics)


@pytest.mark.slow
def test_read_run_survives_a_truncated_last_line(tmp_path):
    model = tiny_model("gpt2")
    with LayerWatch(make_probe(), logdir=tmp_path, metrics="light") as watch:
        watch.run(model, 1)
        watch.run(model, 2)
    path = tmp_path / "layerwatch.jsonl"
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:57])  # a crash in the middle of writing a third record
    run = layerwatch.read_run(tmp_path)
    assert run.steps.tolist() == [1, 2]
    frame = run.to_pandas()
    assert set(frame.columns) == {"step", "layer", "metric", "value"}
    assert len(frame) == 2 * 3 * len(run.metrics)
    # Reopening the run for appending drops the partial line instead of gluing a record onto it.
    with LayerWatch(make_probe(), logdir=tmp_path, metrics="light") as watch:
        watch.run(model, 3)
    assert layerwatch.read_run(tmp_path).steps.tolist() == [1, 2, 3]


def test_read_run_reads_a_tensorboard_only_run(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in (10, 20):
        for layer in range(3):
            writer.add_scalar(f"layerwatch/prompt_entropy/layer_{layer:02d}", step + layer, step)
    writer.add_scalar("train/loss", 1.0, 10)
    writer.close()
    run = layerwatch.read_run(tmp_path)
    assert run.steps.tolist() == [10, 20] and run.layers == [0, 1, 2] and run.metrics == ["prompt_entropy"]
    np.testing.assert_array_equal(run.metric("prompt_entropy"), [[10, 11, 12], [20, 21, 22]])


def test_read_run_reads_the_per_layer_tensorboard_layout_without_jsonl(tmp_path):
    model = tiny_model("gpt2")
    with LayerWatch(make_probe(), logdir=tmp_path, metrics="light") as watch:
        watch.run(model, 1)
        watch.run(model, 5)
    from_jsonl = layerwatch.read_run(tmp_path)
    (tmp_path / "layerwatch.jsonl").unlink()
    from_events = layerwatch.read_run(tmp_path)
    assert from_events.steps.tolist() == [1, 5] and from_events.layers == from_jsonl.layers
    assert sorted(from_events.metrics) == sorted(from_jsonl.metrics)  # errors and probe_seconds are not metrics
    for name in from_jsonl.metrics:
        np.testing.assert_allclose(from_events.metric(name), from_jsonl.metric(name), rtol=1e-6, equal_nan=True)


@pytest.mark.slow
def test_resume_drops_records_after_the_checkpoint(tmp_path):
    model = tiny_model("gpt2")
    with LayerWatch(make_probe(), logdir=tmp_path, every=1, metrics="light") as watch:
        for step in range(1, 6):
            watch.step(model, step)
    with LayerWatch(make_probe(), logdir=tmp_path, every=1, metrics="light", resume_step=3) as watch:
        assert not watch.should_probe(3) and watch.should_probe(4)
        for step in range(4, 7):
            watch.step(model, step)
    run = layerwatch.read_run(tmp_path)
    assert run.steps.tolist() == [1, 2, 3, 4, 5, 6]
    steps = [json.loads(line)["step"] for line in (tmp_path / "layerwatch.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_schedule_is_log_spaced_then_every_n_and_idempotent():
    schedule = ProbeSchedule(every=10)
    assert [s for s in range(0, 41) if schedule.is_scheduled(s)] == [1, 2, 4, 8, 10, 20, 30, 40]
    assert [s for s in range(0, 21) if ProbeSchedule(every=10, log_spaced_start=False, at_start=True).is_scheduled(s)] == [0, 10, 20]
    schedule.mark_probed(10)
    assert not schedule.is_due(10) and schedule.is_due(20)
    schedule.min_gap = 25
    assert [s for s in range(11, 61) if schedule.is_due(s)] == [40, 50, 60]


def test_max_overhead_stretches_the_interval(tmp_path):
    import time

    model = tiny_model("gpt2")
    watch = LayerWatch(make_probe(), logdir=None, every=1, log_spaced_start=False, metrics="light", max_overhead=0.01)
    probed = []
    for step in range(1, 30):
        time.sleep(0.001)  # "training" is far cheaper than a probe
        if watch.step(model, step) is not None:
            probed.append(step)
    assert probed[0] == 1 and len(probed) < 10
    assert watch.schedule.min_gap > 1


def test_construction_errors_name_the_argument(tmp_path):
    probe = make_probe()
    with pytest.raises(ValueError, match="every"):
        LayerWatch(probe, logdir=tmp_path, every=0)
    with pytest.raises(ValueError, match="metrics="):
        LayerWatch(probe, logdir=tmp_path, metrics=["prompt_entropy", "entropy_of_vibes"])
    with pytest.raises(ValueError, match="metrics="):
        LayerWatch(probe, logdir=tmp_path, metrics="heavy")
    with pytest.raises(ValueError, match="max_overhead"):
        LayerWatch(probe, logdir=tmp_path, max_overhead=3)
    with pytest.raises(TypeError, match="probe"):
        LayerWatch(probe.input_ids, logdir=tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="logdir="):
        LayerWatch(probe, logdir=blocker / "run")


def test_one_live_writer_per_directory(tmp_path):
    first = LayerWatch(make_probe(), logdir=tmp_path)
    with pytest.raises(ValueError, match="live"):
        LayerWatch(make_probe(), logdir=tmp_path)
    first.close()
    LayerWatch(make_probe(), logdir=tmp_path).close()


def test_probe_the_model_cannot_take_is_refused_before_any_forward(tmp_path):
    model = tiny_model("gpt2")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    big_ids = torch.full((4, 8), 500)
    probe = layerwatch.Probe.from_tensors(big_ids, vocab_size=1000, views=0)
    with pytest.raises(ValueError, match="vocabulary has 128"):
        LayerWatch(probe, logdir=None, metrics="light", strict=True).run(model, 1)
    assert calls == []


def _positions_32_model():
    import transformers

    config = transformers.GPT2Config(vocab_size=TINY_VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("metrics, fits", [("standard", 24), ("light", 32)])
def test_a_probe_longer_than_the_positions_is_fitted_before_the_first_forward(tmp_path, caplog, metrics, fits):
    """128-token prompts make 167-token views; a 32-position model takes prompts of 24 (views of 31), or of 32 when
    no metric feeds views: the probe is cut to that, said once with the max_length that fits, and saved so."""
    model = _positions_32_model()
    long_probe = make_probe(prompts=8, length=128)
    assert long_probe.max_length() == 167
    lengths_at_forward = []
    model.register_forward_pre_hook(lambda module, args, kwargs: lengths_at_forward.append(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1]), with_kwargs=True)
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        watch = LayerWatch(long_probe, logdir=tmp_path, metrics=metrics, every=1, strict=True)
        first, second = watch.run(model, 1), watch.run(model, 2)
        watch.close()
    fitted = [r.getMessage() for r in caplog.records if "max_length=" in r.getMessage()]
    assert len(fitted) == 1 and f"max_length={fits}" in fitted[0] and "32 positions" in fitted[0], fitted
    assert first is not None and second is not None and max(lengths_at_forward) <= 32
    assert int(watch.probe.attention_mask.sum(1).max()) == fits and len(watch.probe.views) == len(long_probe.views)
    assert torch.equal(watch.probe.input_ids, long_probe.input_ids[:, :fits])  # cut, not rebuilt
    saved = layerwatch.Probe.load(tmp_path)
    assert saved.content_hash == watch.probe.content_hash == first.settings["probe_hash"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="layerwatch"):  # with the model at construction: fitted there
        early = LayerWatch(long_probe, logdir=None, metrics=metrics, model=model)
    assert early.probe.content_hash == saved.content_hash and "max_length=" in caplog.text


def test_a_model_too_short_for_any_probe_is_refused_naming_the_way_out():
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=TINY_VOCAB, n_positions=3, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="metrics='light'"):
        LayerWatch(make_probe(), logdir=None, metrics="standard", strict=True).run(model, 1)


def test_a_run_whose_every_probe_failed_says_so_at_close_and_in_read_run(tmp_path, caplog):
    model = tiny_model("gpt2")

    def explode(*args):
        raise RuntimeError("simulated kernel failure")

    find_blocks(model)[0].register_forward_hook(explode)
    watch = LayerWatch(make_probe(), logdir=tmp_path, every=1, metrics="light")
    assert watch.step(model, 1) is None and watch.step(model, 2) is None
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        watch.close()
        watch.close()
    (closing,) = [r.getMessage() for r in caplog.records if "every probe" in r.getMessage()]
    assert "2 probes" in closing and "RuntimeError: simulated kernel failure" in closing and str(tmp_path) in closing
    with pytest.raises(FileNotFoundError, match="every probe of that run failed"):
        layerwatch.read_run(tmp_path)


def test_a_non_finite_first_probe_does_not_poison_cka_to_first(tmp_path):
    """The first probe's embeddings are NaN from block 1 on: cka_to_first is NaN there (with a "cka" alert), the next
    finite probe becomes those layers' reference (1.0), later probes compare with it, and a resume keeps it."""
    model = tiny_model("gpt2", layers=3)
    block = find_blocks(model)[1]
    broken = {"on": True}
    block.register_forward_hook(
        lambda m, a, out: with_block_hidden(out, block_hidden(out) * float("nan")) if broken["on"] else None
    )
    metrics = ["cka_to_first", "cka_to_previous", "nonfinite"]
    with LayerWatch(make_probe(views=0), logdir=tmp_path, metrics=metrics, strict=True) as watch:
        bad = watch.run(model, 1)
        broken["on"] = False
        good = watch.run(model, 2)
        with torch.no_grad():
            for parameter in model.transformer.h[2].parameters():
                parameter.add_(0.5 * torch.randn_like(parameter))
        moved = watch.run(model, 3)
    assert bad.metrics["cka_to_first"][:2] == pytest.approx([1.0, 1.0]) and all(math.isnan(v) for v in bad.metrics["cka_to_first"][2:])
    deferred = [a for a in bad.alerts if a.kind == "cka"]
    assert {a.layer for a in deferred} == {2, 3} and all(a.metric == "cka_to_first" for a in deferred)
    assert good.metrics["cka_to_first"] == pytest.approx([1.0] * 4, abs=1e-6)  # layers 2, 3: their first finite probe
    assert moved.metrics["cka_to_first"][:3] == pytest.approx([1.0] * 3, abs=1e-6) and moved.metrics["cka_to_first"][3] < 0.99
    with LayerWatch(make_probe(views=0), logdir=tmp_path, metrics=metrics, resume_step=3, strict=True) as resumed:
        again = resumed.run(model, 4)
    assert again.metrics["cka_to_first"] == pytest.approx(moved.metrics["cka_to_first"], abs=1e-6)


def test_a_failing_probe_warns_once_counts_and_training_goes_on(tmp_path, caplog):
    model = tiny_model("gpt2")
    block = find_blocks(model)[1]

    def explode(*args):
        raise RuntimeError("simulated out of memory")

    handle = block.register_forward_hook(explode)
    watch = LayerWatch(make_probe(), logdir=tmp_path, every=1, metrics="light")
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        assert watch.run(model, 1) is None
        assert watch.run(model, 2) is None
    assert watch.error_count == 2
    assert sum("simulated out of memory" in r.getMessage() for r in caplog.records) == 1
    handle.remove()
    assert watch.run(model, 3) is not None
    watch.close()
    accumulator = event_accumulator(tmp_path / "all_layers")
    assert [(e.step, e.value) for e in accumulator.Scalars("layerwatch/errors")] == [(1, 1), (2, 2), (3, 2)]
    assert layerwatch.read_run(tmp_path).steps.tolist() == [3]
    strict = LayerWatch(make_probe(), logdir=None, metrics="light", strict=True)
    block.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="simulated"):
        strict.run(model, 1)


def test_non_finite_activations_give_nan_metrics_and_an_alert(tmp_path, caplog):
    model = tiny_model("llama", layers=3)
    block = find_blocks(model)[1]
    block.register_forward_hook(
        lambda m, a, out: with_block_hidden(out, block_hidden(out).index_fill(1, torch.tensor([2]), float("nan")))
    )
    watch = LayerWatch(make_probe(), logdir=None, metrics="standard")
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        record = watch.run(model, 5)
    assert record is not None
    assert record.metrics["nonfinite"][0] == 0 and record.metrics["nonfinite"][1] == 0
    assert record.metrics["nonfinite"][2] > 0
    assert math.isfinite(record.metrics["prompt_entropy"][1])
    for layer in (2, 3):
        assert math.isnan(record.metrics["prompt_entropy"][layer]) and math.isnan(record.metrics["lidar"][layer])
    assert any(a.startswith("nonfinite: layer 2") for a in record.alerts)
    assert any("nonfinite" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_collapse_alerts_fire_once_per_condition(tmp_path):
    model = tiny_model("gpt2")
    watch = LayerWatch(make_probe(), logdir=tmp_path, metrics="light", collapse_threshold=2.0)
    first, second, third = (watch.run(model, step) for step in (1, 2, 3))
    watch.close()
    assert not [a for a in first.alerts if a.startswith("collapse")]  # one probe at the floor is not a collapse
    collapse = [a for a in second.alerts if a.startswith("collapse")]
    assert len(collapse) == 3  # dataset entropy under the (impossible) floor 2.0 at two probes, three layers
    assert all("2 consecutive probes (steps 1 to 2)" in a for a in collapse)
    assert not [a for a in third.alerts if a.startswith("collapse")]
    alerts = event_accumulator(tmp_path / "all_layers").Tensors("layerwatch/alerts/text_summary")
    texts = [e.tensor_proto.string_val[0].decode() for e in alerts]  # one text per probe
    assert texts[0].startswith("No alerts (checked at step 1)") and texts[1] == "\n\n".join(collapse)
    assert texts[2].startswith("No new alerts (checked at step 3); 3 earlier alert(s)")


def test_layers_override_and_a_model_without_blocks():
    model = tiny_model("gpt2")
    assert find_blocks(model, "transformer.h") == list(model.transformer.h)
    with pytest.raises(ValueError, match="layers="):
        find_blocks(model, "transformer.nothing_here")
    with pytest.raises(ValueError, match="layers="):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_a_block_called_twice_is_a_clear_error():
    model = tiny_model("gpt2")
    first, second = model.transformer.h
    original = second.forward

    def calls_first_block_again(hidden_states, *args, **kwargs):
        hidden_states = block_hidden(first(hidden_states))  # block 0 runs twice per forward
        return original(hidden_states, *args, **kwargs)

    second.forward = calls_first_block_again
    watch = LayerWatch(make_probe(), logdir=None, metrics="light", strict=True)
    with pytest.raises(CaptureError, match="fired"):
        watch.run(model, 1)


def test_compiled_model_is_probed_eagerly():
    model = tiny_model("gpt2")
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(torch.randint(0, TINY_VOCAB, (2, 8)))  # compile before the hooks exist
    reference = LayerWatch(make_probe(), logdir=None, metrics="light").run(model, 1)
    record = LayerWatch(make_probe(), logdir=None, metrics="light", strict=True).run(compiled, 1)
    np.testing.assert_allclose(record.metrics["prompt_entropy"], reference.metrics["prompt_entropy"], rtol=1e-5)


def test_probe_leaves_rng_flags_and_config_untouched():
    model = tiny_model("gpt2", dropout=0.1)
    model.train()
    model.transformer.h[0].eval()  # a submodule the user froze in eval mode
    flags = {name: m.training for name, m in model.named_modules()}
    config = model.config.to_dict()
    torch.manual_seed(123)
    random.seed(7)
    np.random.seed(7)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    record = LayerWatch(make_probe(), logdir=None, metrics="paper", strict=True).run(model, 1)
    assert record is not None and record.settings["views"] == 16
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states[2]))
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert model.config.to_dict() == config
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _train(with_watch, tmp_path):
    torch.manual_seed(0)
    model = tiny_model("gpt2", dropout=0.1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, TINY_VOCAB, (20, 4, 16), generator=torch.Generator().manual_seed(1))
    watch = LayerWatch(make_probe(), logdir=tmp_path, every=2, metrics="standard") if with_watch else None
    losses = []
    for step in range(1, 21):
        loss = model(data[step - 1], labels=data[step - 1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if watch is not None:
            watch.step(model, step)
    if watch is not None:
        watch.close()
        assert layerwatch.read_run(tmp_path).steps.tolist() == [1, 2] + list(range(4, 21, 2))
    return losses


@pytest.mark.slow
def test_training_losses_are_bit_identical_with_and_without_probes(tmp_path):
    assert _train(False, tmp_path / "a") == _train(True, tmp_path / "b")
