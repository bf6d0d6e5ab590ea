"""LayerWatch's grouped options, the settings a record carries, continued runs, typed alerts, the step rule."""

import inspect
import json
import logging
import warnings

import pytest
import torch

import layerwatch
from layerwatch import metrics as M
from layerwatch.metrics import names
from layerwatch.monitor import LayerWatch, check_options
from layerwatch.monitor.alerts import AlertTracker
from layerwatch.monitor.options import (
    AlertRules,
    LayerWatchOptions,
    Measurement,
    Outputs,
    Schedule,
    check_keywords,
)
from layerwatch.rundir.record import Alert, ProbeRecord
from layerwatch.rundir.writers import Writer
from models import TINY_VOCAB, tiny_model


def small_probe(prompts=6, length=12, views=2, seed=0):
    ids = torch.randint(1, TINY_VOCAB, (prompts, length), generator=torch.Generator().manual_seed(seed))
    return layerwatch.Probe.from_tensors(ids, vocab_size=TINY_VOCAB, views=views, seed=seed)


class ListWriter(Writer):
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


# ------------------------------------------------------------------------------------------------ the groups


def test_flat_keywords_and_whole_groups_give_the_same_options():
    probe = small_probe()
    flat = LayerWatch(probe, logdir=None, every=7, max_overhead=0.1, alpha=2, collapse_probes=3, tensorboard=False)
    grouped = LayerWatch(
        probe, logdir=None, schedule=Schedule(every=7, max_overhead=0.1), measurement=Measurement(alpha=2.0),
        alerts=AlertRules(collapse_probes=3), outputs=Outputs(tensorboard=False),
    )
    assert flat.options == grouped.options
    assert flat.options.schedule.every == 7 and flat.schedule.every == 7 and flat.schedule.max_overhead == 0.1
    assert flat.alpha == 2.0 and isinstance(flat.alpha, float) and flat.alerts.collapse_probes == 3
    assert LayerWatch(probe, logdir=None, options=flat.options).options == flat.options
    signature = inspect.signature(LayerWatch).parameters  # every keyword is visible to help() and inspect
    assert {"every", "metrics", "alpha", "writers", "collapse_threshold", "schedule"} <= set(signature)
    assert signature["every"].default == 100 and signature["alpha"].default == 1.0


def test_each_group_refuses_its_bad_values_and_unknown_names_are_listed():
    probe = small_probe()
    for keywords, match in [
        (dict(every=0), "every must be a positive integer"),
        (dict(max_overhead=1.5), "max_overhead must be a fraction"),
        (dict(alpha=-1), "alpha must be a positive number"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(collapse_probes=0), "collapse_probes must be a positive integer"),
        (dict(memory_budget=0), "memory_budget must be a positive number"),
        (dict(metrics="heavy"), "metrics="),
    ]:
        with pytest.raises(ValueError, match=match):
            LayerWatch(probe, logdir=None, **keywords)
        with pytest.raises(ValueError, match=f"LayerWatchCallback: {match}"):
            check_keywords(keywords, owner="LayerWatchCallback")
    with pytest.raises(TypeError, match=r"unknown LayerWatch option\(s\) evry.*'every'"):
        LayerWatch(probe, logdir=None, evry=5)
    with pytest.raises(TypeError, match="not both"):
        LayerWatch(probe, logdir=None, schedule=Schedule(every=5), every=5)
    with pytest.raises(TypeError, match="logdir is set by X"):
        check_keywords({"logdir": "x"}, owner="X", reserved=("logdir",))
    with pytest.raises(TypeError, match="writers= holds"):
        Outputs(writers=[object()])
    assert check_keywords({"every": 5, "alpha": 2.0}) == {"every": 5, "alpha": 2.0}
    check_options(alpha=2.0, batch_size=4, collapse_probes=1, every=3, max_overhead=0.5, metrics="light")  # the old API
    with pytest.raises(ValueError, match="alpha"):
        check_options(alpha=0)


def test_sinks_is_renamed_writers_with_a_deprecation_warning():
    writer = ListWriter()
    with pytest.warns(DeprecationWarning, match="writers="):
        watch = LayerWatch(small_probe(), logdir=None, sinks=[writer])
    assert watch.options.outputs.writers == (writer,)
    with pytest.warns(DeprecationWarning, match="writers="):
        assert check_keywords({"sinks": [writer]}) == {"writers": [writer]}
    with pytest.warns(DeprecationWarning, match="writer_error_count"):
        assert watch.sink_error_count == watch.writer_error_count == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerWatch(small_probe(), logdir=None, writers=[writer])  # the new name: no warning


# ---------------------------------------------------------------------------------- the recorded settings


def test_settings_are_the_values_the_probe_used():
    model = tiny_model("gpt2")
    writer = ListWriter()
    watch = LayerWatch(small_probe(), logdir=None, alpha=2, seed=3, batch_size=4, writers=[writer])
    record = watch.run(model, 1)
    assert record is not None and writer.records == [record]
    settings = record.settings
    assert settings["alpha"] == 2.0 and settings["seed"] == 3 and settings["batch_size"] == 4
    assert settings["views"] == 2 and settings["preset"] == "standard" and settings["world_size"] == 1
    signature = inspect.signature  # the parameters the metric functions run with, read from them
    assert settings["infonce_temperature"] == signature(M.infonce).parameters["temperature"].default
    assert settings["lidar_delta"] == signature(M.lidar).parameters["delta"].default
    assert settings["dime_permutations"] == signature(M.dime).parameters["n_permutations"].default
    assert settings["block_paths"] == ["transformer.h.0", "transformer.h.1"]
    assert settings["probe_hash"] == watch.probe.content_hash
    chosen = LayerWatch(small_probe(), logdir=None, metrics="light", layers=[model.transformer.h[1]]).run(model, 1)
    assert chosen.settings["block_paths"] == ["transformer.h.1"] and chosen.layers == [0, 1]


def _one_run(logdir, model, **options):
    with LayerWatch(small_probe(), logdir=logdir, every=1, metrics="light", tensorboard=False, **options) as watch:
        for step in (1, 2):
            assert watch.step(model, step) is not None
    return watch


def test_a_resume_or_continuation_that_changes_alpha_is_refused_naming_it(tmp_path):
    model = tiny_model("gpt2")
    _one_run(tmp_path, model)
    before = (tmp_path / "layerwatch.jsonl").read_bytes()
    for resume_step in (2, 1, None):  # a resume from a checkpoint, or a run appending to the series
        with pytest.raises(ValueError, match=r"recorded with alpha=1\.0, but this run has alpha=2\.0.*alpha="):
            LayerWatch(small_probe(), logdir=tmp_path, metrics="light", alpha=2.0, resume_step=resume_step)
    assert (tmp_path / "layerwatch.jsonl").read_bytes() == before  # refused before anything was touched
    with LayerWatch(small_probe(), logdir=tmp_path, every=1, metrics="light", resume_step=2, tensorboard=False) as same:
        assert same.step(model, 3) is not None  # the same settings continue
    fresh = LayerWatch(small_probe(), logdir=tmp_path, metrics="light", alpha=2.0, resume_step=-1)  # a new series
    fresh.close()
    assert list(tmp_path.parent.glob(f"{tmp_path.name}.previous-*"))  # the old one was kept aside, not mixed


def test_a_resume_with_another_layer_selection_is_refused_naming_it(tmp_path, caplog):
    model = tiny_model("gpt2", layers=3)
    _one_run(tmp_path, model)
    other = [model.transformer.h[0], model.transformer.h[2]]
    with pytest.raises(ValueError, match=r"block_paths=.*transformer\.h\.1.*layers="):
        LayerWatch(small_probe(), logdir=tmp_path, metrics="light", layers=other, resume_step=2, model=model)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    strict = LayerWatch(small_probe(), logdir=tmp_path, metrics="light", layers=other, resume_step=2, strict=True)
    with pytest.raises(ValueError, match="block_paths"):
        strict.run(model, 3)
    strict.close()
    watch = LayerWatch(small_probe(), logdir=tmp_path, metrics="light", layers=other, resume_step=2)
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        assert watch.run(model, 3) is None  # training goes on; the warning names the setting
    assert calls == [] and any("block_paths" in r.getMessage() for r in caplog.records)
    watch.close()
    same = LayerWatch(small_probe(), logdir=tmp_path, metrics="light", layers="transformer.h", resume_step=2)
    assert same.run(model, 3) is not None  # the same blocks, named another way
    same.close()


# ------------------------------------------------------------------------------------------- typed alerts


def test_alerts_are_typed_values_that_read_back_and_stay_strings():
    tracker = AlertTracker.from_rules(AlertRules(collapse_threshold=0.5, collapse_probes=2))
    low = {names.DATASET_ENTROPY: [0.9, 0.1], names.NONFINITE: [0.0, 3.0], names.PROMPT_ENTROPY_BIMODALITY: [0.9, 0.1]}
    first = tracker.check(4, [0, 1], low)
    assert [(a.kind, a.metric, a.layer, a.step) for a in first] == [
        ("nonfinite", names.NONFINITE, 1, 4), ("bimodal", names.PROMPT_ENTROPY_BIMODALITY, 0, 4),
    ]
    healthy = {names.DATASET_ENTROPY: [0.9, 0.1]}
    tracker.check(5, [0, 1], healthy)
    (collapse,) = tracker.check(6, [0, 1], healthy)
    assert (collapse.kind, collapse.metric, collapse.layer, collapse.step) == ("collapse", names.DATASET_ENTROPY, 1, 6)
    assert collapse == collapse.message and collapse.startswith("collapse: dataset_entropy at layer 1")
    record = ProbeRecord(step=6, time=0.0, wall_time_s=0.0, layers=[0, 1], metrics={}, alerts=[*first, collapse])
    line = record.to_json()
    assert json.loads(line)["alerts"] == [a.message for a in record.alerts]  # what older readers read
    assert ProbeRecord.from_json(line).alerts == record.alerts
    assert [a.kind for a in ProbeRecord.from_json(line).alerts] == ["nonfinite", "bimodal", "collapse"]
    old = json.loads(line)
    del old["alert_details"]  # a record written before alerts were typed
    assert [a.kind for a in ProbeRecord.from_json(json.dumps(old)).alerts] == ["nonfinite", "bimodal", "collapse"]
    with pytest.raises(ValueError, match="kind"):
        Alert("bad", None, None, 1, "?")


# ---------------------------------------------------------------------------------------------- the steps


def test_same_step_repeats_are_quiet_and_a_restarting_counter_is_warned_once(caplog):
    watch = LayerWatch(small_probe(), logdir=None, every=10_000, log_spaced_start=False)
    model = torch.nn.Identity()  # never probed: nothing is due
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        for step in (1, 1, 1, 2, 2, 2, 3, 3):  # gradient accumulation: step() on every micro-batch
            watch.step(model, step)
        assert not caplog.records
        for step in (1, 2, 0, 1):  # a counter that restarts each epoch
            watch.step(model, step)
    assert len(caplog.records) == 1 and "steps must increase" in caplog.records[0].getMessage()


def test_logdir_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    watch = LayerWatch(small_probe(), logdir="~/runs/x", tensorboard=False)
    watch.close()
    assert watch.logdir == tmp_path / "home" / "runs" / "x"
    assert (tmp_path / "home" / "runs" / "x" / "probe.safetensors").is_file() and not (tmp_path / "~").exists()


def test_options_are_frozen_and_flat_lists_every_keyword():
    options = LayerWatchOptions.from_keywords(layers=["a"], metrics=["dime"])
    assert options.probing.layers == ("a",) and options.measurement.metrics == ("dime",)
    with pytest.raises(Exception):
        options.schedule.every = 3
    assert set(options.flat()) == set(inspect.signature(LayerWatch).parameters) - {
        "probe", "logdir", "resume_step", "model", "options", "schedule", "measurement", "probing", "alerts", "outputs",
    }
