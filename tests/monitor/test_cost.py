"""The probe cost model (layerwatch.monitor.cost): arithmetic checked by hand, scaling laws, and the warning."""

from __future__ import annotations

import logging

import pytest

from layerwatch.monitor import cost
from layerwatch.monitor.cost import estimate_probe_cost, warn_if_expensive
from layerwatch.metrics import set_level_peak_bytes

GPU_7B = dict(layers=33, width=4096, prompts=64, parameters=7_000_000_000, device="cuda")


def test_estimate_matches_the_formulas_by_hand(monkeypatch):
    monkeypatch.setattr(cost.os, "cpu_count", lambda: 2)
    rates = cost.RATES["cpu"]
    estimate = estimate_probe_cost(layers=3, width=8, tokens=[4, 12], parameters=1000, views=2, batch_size=2)
    forward = 3 * ((2 * 1000 * 4 + 4 * 2 * 16 * 8) + (2 * 1000 * 12 + 4 * 2 * 144 * 8))
    assert estimate.forward_seconds == pytest.approx(forward / (2 * rates.forward_flops))
    gram = 3 * (2 * 16 * 8 + 2 * 12 * 64)  # T <= D: 2 T^2 D; T > D: 2 T D^2 (covariance)
    assert estimate.parts["gram"] == pytest.approx(gram / (2 * rates.gram_flops))

    def eigen(n, count):  # the measured rate grows like n^0.85 (memory-bound LAPACK reduction)
        return count * n**3 / (2 * rates.eigen_units * (n / 128) ** 0.85)

    assert estimate.parts["eigenvalues"] == pytest.approx(eigen(4, 3) + eigen(8, 3))
    # dataset entropy + effective rank (M = 2), DiME (1 + 10 permutations), LiDAR (M·Q = 4)
    assert estimate.parts["set_level"] == pytest.approx(eigen(2, 6) + eigen(2, 33) + eigen(4, 3))
    set_calls = 3 * 5 * rates.set_call_seconds  # layers x the five set-level metrics
    assert estimate.parts["calls"] == pytest.approx(3 * 1 * (1 + 2) * rates.call_seconds + set_calls)  # x batches x passes
    # the jackknife: G = min(8, M) = 2 replicates on M - M // G = 1 prompt each (LiDAR: 1 prompt x 2 views)
    assert estimate.parts["stderr"] == pytest.approx(2 * (eigen(1, 6) + eigen(1, 33) + eigen(2, 3) + set_calls))
    no_errors = estimate_probe_cost(layers=3, width=8, tokens=[4, 12], parameters=1000, views=2, batch_size=2,
                                    stderr_groups=0)
    assert no_errors.parts["stderr"] == 0 and no_errors.metric_seconds < estimate.metric_seconds
    assert estimate.metric_seconds == pytest.approx(sum(estimate.parts.values()))
    assert estimate.set_level_bytes == set_level_peak_bytes(2, ["dataset_entropy", "effective_rank", "infonce", "dime", "lidar"])
    assert estimate.token_bytes == 2 * (12 * 8 * 4 + 2 * 8 * 8 * 4 + 12 * 3 * 8)
    assert estimate.stored_bytes == 3 * 2 * 3 * 8 * 4 + 3 * 2 * 3 * 4
    assert estimate.peak_bytes == estimate.stored_bytes + max(estimate.token_bytes, estimate.set_level_bytes)


def test_cost_grows_as_documented():
    base = dict(layers=13, width=768, prompts=64, views=0, metric_names=())
    short, long = (estimate_probe_cost(tokens=t, **base) for t in (128, 512))
    assert long.parts["gram"] == pytest.approx(16 * short.parts["gram"])  # T <= D: T^2 D
    assert long.parts["eigenvalues"] == pytest.approx(4 ** (3 - 0.85) * short.parts["eigenvalues"])  # min(T, D)^3
    longer = estimate_probe_cost(tokens=4096, **base)
    assert longer.parts["eigenvalues"] == pytest.approx(6 ** (3 - 0.85) * short.parts["eigenvalues"])  # n = D = 768
    deeper = estimate_probe_cost(tokens=128, **{**base, "layers": 26})
    assert deeper.metric_seconds == pytest.approx(2 * short.metric_seconds)
    # long prompts on a wide model: the eigenvalues dominate on a GPU, alpha = 2 drops them
    wide = dict(layers=33, width=4096, prompts=64, views=0, metric_names=(), tokens=2048, device="cuda")
    collision = estimate_probe_cost(alpha=2.0, **wide)
    assert collision.parts["eigenvalues"] == 0.0
    assert collision.metric_seconds < estimate_probe_cost(**wide).metric_seconds / 10


def test_long_prompts_on_a_large_model_warn_once_with_the_knobs(caplog):
    expensive = estimate_probe_cost(tokens=4096, **GPU_7B)
    assert expensive.ratio > cost.WARN_FACTOR and expensive.metric_seconds > cost.WARN_MIN_SECONDS
    with caplog.at_level(logging.WARNING, logger="layerwatch.monitor.cost"):
        assert warn_if_expensive(expensive, device="cuda")
    (record,) = caplog.records
    message = record.getMessage()
    for knob in ("max_length", "num_prompts", 'metrics="light"', "alpha=2"):
        assert knob in message
    caplog.clear()
    cheap = estimate_probe_cost(tokens=128, **GPU_7B)  # the same model with short prompts
    assert cheap.ratio < 1
    with caplog.at_level(logging.WARNING, logger="layerwatch.monitor.cost"):
        assert not warn_if_expensive(cheap, device="cuda")
        assert not warn_if_expensive(estimate_probe_cost(tokens=4096, alpha=2.0, **GPU_7B), device="cuda")
    assert caplog.records == []


def test_monitor_warns_before_its_first_forward_pass(monkeypatch, caplog, tiny_model_factory, tiny_vocab):
    import torch

    import layerwatch

    model = tiny_model_factory("gpt2", layers=3, hidden=32)
    ids = torch.randint(0, tiny_vocab, (6, 20), generator=torch.Generator().manual_seed(0))
    probe = layerwatch.Probe.from_tensors(ids, vocab_size=tiny_vocab, views=2, seed=0)
    warnings_at_forward = []  # warnings logged so far, at each forward pass
    model.register_forward_pre_hook(lambda module, args: warnings_at_forward.append(len(caplog.records)))
    with caplog.at_level(logging.WARNING, logger="layerwatch.monitor.cost"):
        layerwatch.LayerWatch(probe, logdir=None, metrics="standard", batch_size=3).run(model, 1)
        assert warnings_at_forward and set(warnings_at_forward) == {0}  # a cheap probe: silent
        warnings_at_forward.clear()
        monkeypatch.setattr(cost, "WARN_FACTOR", 0.0)  # now every probe counts as far costlier than its forwards
        monkeypatch.setattr(cost, "WARN_MIN_SECONDS", 0.0)
        watch = layerwatch.LayerWatch(probe, logdir=None, metrics="standard", batch_size=3)
        watch.run(model, 1)
        watch.run(model, 2)
    assert len(caplog.records) == 1 and "max_length" in caplog.records[0].getMessage()  # once per model
    assert warnings_at_forward and set(warnings_at_forward) == {1}  # logged before the first forward


@pytest.mark.parametrize("probes", [1, 11, 13, 14])  # 11 and 14: the last drawn at close; 13: on schedule
def test_the_picture_drawings_are_those_a_real_tensorboard_writer_makes(tmp_path, probes):
    """The run model's drawing count = the heatmaps a real TensorBoardWriter stores for that many probes (the
    bounded schedule, plus the last probe's at close), read back from its event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from layerwatch.rundir.files import ALL_LAYERS_RUN
    from layerwatch.rundir.record import ProbeRecord
    from layerwatch.rundir.writers import TensorBoardWriter

    writer = TensorBoardWriter(tmp_path)
    for step in range(1, probes + 1):
        writer.write(ProbeRecord(step=step, time=0.0, wall_time_s=0.1, layers=[0, 1],
                                 metrics={"prompt_entropy": [0.5, 0.4], "curvature": [1.0, 2.0]}))
    writer.close()
    events = EventAccumulator(str(tmp_path / ALL_LAYERS_RUN), size_guidance={"images": 0})
    events.Reload()
    pictures = sum(len(events.Images(tag)) for tag in events.Tags()["images"])
    assert pictures == 2 * 2 * cost.picture_drawings(probes)  # a heatmap and a depth profile per series
    estimate = cost.estimate_run_overhead(
        estimate_probe_cost(layers=2, width=8, tokens=4, prompts=3), probes=probes, layers=2, series=2
    )
    assert estimate.drawings == cost.picture_drawings(probes)
    assert estimate.parts["pictures"] == pytest.approx(pictures * cost.PICTURE_SECONDS)


def test_the_run_overhead_adds_its_parts_by_hand():
    probe = estimate_probe_cost(layers=5, width=16, tokens=8, prompts=4)
    estimate = cost.estimate_run_overhead(probe, probes=20, layers=5, series=3, histograms=1)
    drawings = 10 + sum(cost.picture_due(n) for n in range(11, 21)) + (not cost.picture_due(20))
    assert estimate.drawings == drawings
    assert estimate.parts == pytest.approx({
        "probes": 20 * (probe.forward_seconds + probe.metric_seconds),
        "records": 20 * (2 * cost.RECORD_SECONDS + 5 * (2 * 3 + 1) * cost.VALUE_SECONDS),
        "pictures": drawings * 2 * 3 * cost.PICTURE_SECONDS,
        "start": cost.START_SECONDS,
    })
    assert estimate.slowdown(10.0) == pytest.approx(estimate.seconds / 10.0)
    quiet = cost.estimate_run_overhead(probe, probes=20, layers=5, series=3, tensorboard=False)
    assert quiet.drawings == 0 and quiet.parts["pictures"] == 0
    assert quiet.parts["records"] == pytest.approx(20 * cost.RECORD_SECONDS)  # the JSONL alone
    assert cost.estimate_run_overhead(probe, probes=0, layers=5, series=3).seconds == 0


def test_token_metric_names_add_no_set_level_or_jackknife_cost():
    """check_probe_cost passes every selected metric; the token ones are costed by token_metrics=, not again."""
    set_level = ("dataset_entropy", "dime", "lidar")
    alone = estimate_probe_cost(layers=5, width=16, tokens=8, prompts=12, metric_names=set_level)
    mixed = estimate_probe_cost(layers=5, width=16, tokens=8, prompts=12,
                                metric_names=(*set_level, "prompt_entropy", "curvature", "massive_activation"))
    assert mixed.parts == pytest.approx(alone.parts) and alone.parts["stderr"] > 0
