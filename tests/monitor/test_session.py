"""The integration policy both adapters share (layerwatch.monitor.session), tested once here."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import transformers
from models import TINY_VOCAB, tiny_model

import layerwatch
from layerwatch.monitor import session
from layerwatch.probe.augment import max_view_length


def tensor_probe(rows=4, length=12, vocab=TINY_VOCAB):
    return layerwatch.Probe.from_tensors(torch.randint(1, vocab, (rows, length)), vocab_size=vocab, views=0)


def test_resume_point_fresh_restored_and_continued():
    assert session.resume_point(None) == -1  # fresh: an older run's records in the folder are replaced
    assert session.resume_point(None, first_step=0) == session.resume_point(None, first_step=1) == -1
    assert session.resume_point(None, first_step=7) == 6  # an explicit counter continuing a series
    assert session.resume_point(5) == 5 and session.resume_point(5, first_step=9) == 5  # a restore wins
    assert session.resume_point(0) == 0


def test_final_probe_due():
    assert session.final_probe_due(None, 10)
    assert session.final_probe_due(8, 10)
    assert not session.final_probe_due(10, 10)
    assert not session.final_probe_due(None, 0)  # nothing trained
    assert not session.final_probe_due(None, 5, start_step=5)  # resumed at the last step: nothing new


def test_default_logdir():
    assert session.default_logdir("out") == os.path.join("out", "layerwatch")
    assert session.default_logdir(None) == os.path.join("runs", "layerwatch")


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"every": 0}, ValueError, "Owner: every"),
        ({"metrics": "fancy"}, ValueError, "metrics"),
        ({"alpha": -1}, ValueError, "alpha"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"max_overhead": 1.5}, ValueError, "max_overhead"),
        ({"collapse_probes": 0}, ValueError, "collapse_probes"),
        ({"evry": 3}, TypeError, "Owner: unknown LayerWatch option.*evry"),
        ({"probe": 3}, TypeError, "unknown LayerWatch option.*probe"),
        ({"logdir": "x"}, TypeError, "logdir is set by Owner itself"),
    ],
)
def test_check_watch_options(options, error, match):
    with pytest.raises(error, match=match):
        session.check_watch_options(options, owner="Owner", reserved=("logdir",))
    session.check_watch_options({"every": 3, "metrics": "light", "alpha": 2.0, "seed": 1}, owner="Owner")


def test_as_probe_and_probe_sources(tmp_path):
    probe = tensor_probe()
    assert session.as_probe(probe) is probe
    path = probe.save(tmp_path / "p.safetensors")
    assert session.as_probe(str(path)).content_hash == probe.content_hash
    with pytest.raises(TypeError, match="layerwatch.Probe"):
        session.as_probe(["text"])
    for good in (None, probe, str(path), path, ["a text"]):
        session.check_probe_source(good, owner="Owner")
    for bad, match in ((42, "Owner: probe="), ([1, 2], "list of texts"), ({"input_ids": []}, "mapping")):
        with pytest.raises(TypeError, match=match):
            session.check_probe_source(bad, owner="Owner")


def test_resolve_probe_from_a_tokenized_dataset_takes_the_model_vocabulary(tmp_path):
    model = tiny_model("gpt2")
    rows = [{"input_ids": list(range(1 + i, 13 + i))} for i in range(6)]
    probe = session.resolve_probe(rows, owner="Owner", model=model, num_prompts=4, seed=0)
    assert probe.num_prompts == 4 and probe.vocab_size == TINY_VOCAB
    with pytest.raises(ValueError, match="needs a tokenizer"):
        session.resolve_probe(["some text here"], owner="Owner", model=model)
    with pytest.raises(ValueError, match="found no dataset"):
        session.resolve_probe(None, owner="Owner", model=model, find_dataset=lambda: (None, "nothing"))


def test_resume_reuses_the_saved_probe_and_reports_a_different_one(tmp_path, caplog):
    saved = tensor_probe().save(tmp_path / "probe.safetensors")
    found = []
    reused = session.resolve_probe(
        None, owner="Owner", saved=saved, resuming=True, find_dataset=lambda: found.append(1) or (None, "")
    )
    assert reused.content_hash == layerwatch.Probe.load(saved).content_hash and not found
    other = tensor_probe(rows=5)
    with caplog.at_level(logging.WARNING):
        assert session.resolve_probe(other, owner="Owner", saved=saved, resuming=True) is other
    assert "differs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        session.resolve_probe(other, owner="Owner", saved=saved, resuming=False)
    assert "differs" not in caplog.text


@pytest.mark.parametrize("positions", [8, 16, 40, 200])
def test_fitting_max_length_is_the_longest_prompt_whose_views_fit(positions, caplog):
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=TINY_VOCAB, n_positions=positions, n_embd=16, n_layer=1, n_head=2)
    )
    brute = max(n for n in range(1, positions + 1) if max_view_length(n) <= positions)  # independent search
    assert session.fitting_max_length(model, None) == min(brute, session.DEFAULT_MAX_LENGTH)
    with caplog.at_level(logging.WARNING):
        assert session.fitting_max_length(model, positions) == brute
    assert ("lowered" in caplog.text) == (brute < positions)
    assert session.fitting_max_length(model, positions, uses_views=False) == positions  # "light": no views
    assert session.fitting_max_length(None, 50) == 50


@pytest.mark.slow  # a subprocess
def test_the_start_up_line_shows_in_a_script_that_never_configured_logging():
    import subprocess
    import sys

    code = "from layerwatch.monitor import session; session.announce('layerwatch: hello')"
    quiet = "import logging; logging.getLogger('layerwatch').setLevel(logging.WARNING); " + code
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    silenced = subprocess.run([sys.executable, "-c", quiet], capture_output=True, text=True, timeout=120)
    assert shown.returncode == silenced.returncode == 0, shown.stderr + silenced.stderr
    assert shown.stderr.strip().splitlines()[-1] == "layerwatch: hello"  # Python alone would drop an INFO line
    assert "hello" not in silenced.stderr  # a layerwatch logger set above INFO silences it


def test_start_watch_notes_a_small_dataset_and_takes_labels(tmp_path, caplog):
    model = tiny_model("gpt2")
    rows = [{"input_ids": list(range(1 + i, 13 + i)), "label": i % 2} for i in range(10)]
    options = session.adapter_options(
        "Owner", 2, probe=rows, label_column="label", watch={"metrics": ["prompt_entropy", "probe_accuracy"]}
    )
    assert options.views == 0 and options.every == 2 and "every" not in options.watch
    with caplog.at_level(logging.INFO, logger="layerwatch"):
        watch = session.start_watch(options, model=model, base_dir=tmp_path, start_step=0, is_main=True)
    watch.close()
    assert watch.probe.num_prompts == 10 and sorted(watch.probe.labels) == [0] * 5 + [1] * 5
    logdir = os.path.join(str(tmp_path), "layerwatch")
    assert os.path.isfile(os.path.join(logdir, "probe.safetensors"))
    [line] = [r.getMessage() for r in caplog.records if "tensorboard --logdir" in r.getMessage()]
    assert line == (
        "layerwatch: probing 10 prompts (the dataset passed as probe= has 10 rows; num_prompts=64) every 2 steps; "
        f"writing to {logdir}; view it with: tensorboard --logdir {logdir}"
    )
    with pytest.raises(TypeError, match="Owner: label_column must be a column name"):
        session.adapter_options("Owner", 2, label_column=3)


def test_scalars_writer_and_collapse_alerts():
    from layerwatch.rundir.record import ProbeRecord

    sent = []
    writer = session.ScalarsWriter(lambda values, step: sent.append((step, values)))
    record = ProbeRecord(step=3, time=0.0, wall_time_s=0.5, layers=[0, 1], metrics={"rms": [1.0, 2.0]},
                         alerts=["collapse: dataset_entropy at layer 1 has stayed at or below its floor"])
    writer.write(record)
    writer.write_errors(4, 2)
    assert sent == [
        (3, {"layerwatch/rms/layer_00": 1.0, "layerwatch/rms/layer_01": 2.0, "layerwatch/probe_seconds": 0.5}),
        (4, {"layerwatch/errors": 2.0}),
    ]
    assert session.collapse_raised(record)
    assert not session.collapse_raised(None)
    assert not session.collapse_raised(ProbeRecord(step=1, time=0.0, wall_time_s=0.0, layers=[0], metrics={},
                                                   alerts=["nonfinite: rms at layer 0"]))
