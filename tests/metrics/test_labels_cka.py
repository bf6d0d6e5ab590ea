"""Labelled probes (probe_accuracy, best_layer) and representation movement (cka_to_previous, cka_to_first)
through the monitor: labels on every probe source, saved with the probe; metrics in the record, JSONL, TensorBoard
and read_run; accuracy that rises while a tiny model learns a decodable class; CKA that moves only where weights
move; reference embeddings that survive a resume and refuse another probe."""

from __future__ import annotations

import math

import pytest
import torch
from models import TINY_VOCAB, tiny_config, tiny_model

from layerwatch import LayerWatch, Probe, read_run
from layerwatch.metrics import linear_cka
from layerwatch.monitor.references import References
from helpers import char_tokenizer


def labelled_ids(n=20, length=10, seed=0):
    ids = torch.randint(3, TINY_VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return ids, [i % 2 for i in range(n)]


# ------------------------------------------------------------------------------------------------ probe labels
def test_labels_follow_kept_prompts_and_round_trip(tmp_path):
    tokenizer = char_tokenizer()
    texts = [f"the cat {i} sat" for i in range(6)] + ["a", ""] + [f"a bird {i} sang" for i in range(6)]
    labels = ["pet"] * 6 + ["short", "empty"] + ["bird"] * 6
    probe = Probe.from_texts(texts, tokenizer, labels=labels, num_prompts=None)
    kept = [label for text, label in zip(texts, labels) if len(tokenizer(text)["input_ids"]) >= 3]
    assert probe.labels == kept and probe.num_prompts == len(kept)
    loaded = Probe.load(probe.save(tmp_path / "p.safetensors"))
    assert loaded.labels == kept and loaded.content_hash == probe.content_hash
    assert probe.with_views(3).labels == kept
    unlabelled = Probe.from_texts(texts, tokenizer, num_prompts=None)
    assert unlabelled.labels is None and unlabelled.content_hash != probe.content_hash  # labels define the series
    relabelled = Probe.from_texts(texts, tokenizer, labels=labels[::-1], num_prompts=None)
    assert relabelled.content_hash != probe.content_hash


def test_labels_from_tensors_and_dataset():
    ids, labels = labelled_ids()
    ids[3, 2:] = 0
    probe = Probe.from_tensors(ids, ids != 0, vocab_size=TINY_VOCAB, labels=torch.tensor(labels))
    assert probe.labels == labels[:3] + labels[4:]
    rows = [{"input_ids": row.tolist(), "topic": ("a", "b")[i % 2]} for i, row in enumerate(labelled_ids()[0])]
    from_rows = Probe.from_dataset(rows, vocab_size=TINY_VOCAB, label_column="topic", num_prompts=None)
    by_ids = {tuple(r["input_ids"]): r["topic"] for r in rows}
    got = [by_ids[tuple(row.tolist())] for row in from_rows.input_ids]  # rows are taken in a seeded order
    assert from_rows.labels == got and sorted(set(got)) == ["a", "b"]
    with pytest.raises(ValueError, match="label_column='missing'"):
        Probe.from_dataset(rows, vocab_size=TINY_VOCAB, label_column="missing")


@pytest.mark.parametrize(
    "labels, error, message",
    [
        ([0] * 20, ValueError, "at least two classes"),
        ([0] * 17 + [1] * 3, ValueError, "at least 5 prompts"),
        ([0, 1] * 5, ValueError, "10 entries but there are 20 rows"),
        ([0.5] * 20, TypeError, "labels"),
    ],
)
def test_bad_labels_are_refused_at_construction(labels, error, message):
    ids, _ = labelled_ids()
    with pytest.raises(error, match=message):
        Probe.from_tensors(ids, vocab_size=TINY_VOCAB, labels=labels)


def test_label_metrics_only_with_labels(tmp_path):
    ids, labels = labelled_ids()
    plain = Probe.from_tensors(ids, vocab_size=TINY_VOCAB)
    assert "probe_accuracy" not in LayerWatch(plain, logdir=None, metrics="light").metric_names
    with pytest.raises(ValueError, match="need a probe with labels"):
        LayerWatch(plain, logdir=None, metrics=["probe_accuracy"])
    probe = Probe.from_tensors(ids, vocab_size=TINY_VOCAB, labels=labels)
    with LayerWatch(probe, logdir=tmp_path, metrics="light") as watch:
        record = watch.run(tiny_model("gpt2", layers=2), 5)
    accuracy = record.metrics["probe_accuracy"]
    best = record.scalars["best_layer"]
    assert best == max(range(3), key=lambda layer: (accuracy[layer], -layer))
    run = read_run(tmp_path)
    assert run.scalar("best_layer").tolist() == [best]
    assert run.metric("probe_accuracy")[0].tolist() == pytest.approx(accuracy)
    (tmp_path / "layerwatch.jsonl").unlink()  # the same from the TensorBoard event files
    assert read_run(tmp_path).scalar("best_layer").tolist() == [best]


def test_best_layer_comes_with_probe_accuracy_alone():
    ids, labels = labelled_ids()
    probe = Probe.from_tensors(ids, vocab_size=TINY_VOCAB, labels=labels, views=0)
    watch = LayerWatch(probe, logdir=None, metrics=["probe_accuracy"])
    assert watch.metric_names == ("probe_accuracy", "best_layer")
    record = watch.run(tiny_model("gpt2", layers=2), 1)
    accuracy = record.metrics["probe_accuracy"]
    assert record.scalars["best_layer"] == max(range(3), key=lambda layer: (accuracy[layer], -layer))
    assert "best_layer" not in record.metrics and len(record.stderr["probe_accuracy"]) == 3


# ------------------------------------------------------------------------------------- training: accuracy rises
def order_batch(n, generator):
    """Random tokens with a 3 and a 4 inserted; the class is whether 3 comes first. Every prompt holds the same
    kind of tokens, so the class is invisible to a bag of embeddings (layer 0) and must be learnt."""
    ids = torch.randint(10, TINY_VOCAB, (n, 10), generator=generator)
    pos = torch.stack([torch.randperm(10, generator=generator)[:2] for _ in range(n)])
    ids[torch.arange(n), pos[:, 0]] = 3
    ids[torch.arange(n), pos[:, 1]] = 4
    return ids, (pos[:, 0] < pos[:, 1]).long()


def test_probe_accuracy_rises_while_a_model_learns_a_decodable_class(tmp_path):
    from transformers import GPT2Model

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = GPT2Model(tiny_config("gpt2", layers=2))
    head = torch.nn.Linear(model.config.n_embd, 2)
    ids, classes = order_batch(60, generator)
    probe = Probe.from_tensors(ids, vocab_size=TINY_VOCAB, views=0, labels=classes.tolist())
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
    with LayerWatch(probe, logdir=tmp_path, metrics=["probe_accuracy", "best_layer"]) as watch:
        watch.run(model, 0)
        for step in range(1, 61):
            batch, y = order_batch(32, generator)
            model.train()
            loss = torch.nn.functional.cross_entropy(head(model(input_ids=batch).last_hidden_state.mean(1)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        watch.run(model, 60)
    accuracy = read_run(tmp_path).metric("probe_accuracy")
    assert accuracy[0].max() < 0.75  # before training nothing separates the classes well
    assert accuracy[1, 1:].max() >= 0.85  # after training a block does
    assert accuracy[1, 0] < 0.7  # and the embedding layer (a bag of tokens) still cannot
    assert read_run(tmp_path).scalar("best_layer")[1] in (1, 2)


# ------------------------------------------------------------------------------------- CKA: what moves, resume
def test_cka_moves_only_where_weights_change_and_resume_continues(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("gpt2", layers=3)
    ids, _ = labelled_ids(24, 12)
    probe = Probe.from_tensors(ids, vocab_size=TINY_VOCAB, views=0)
    metrics = ["cka_to_previous", "cka_to_first"]
    with LayerWatch(probe, logdir=tmp_path, metrics=metrics) as watch:
        first = watch.run(model, 1)
        assert first.metrics["cka_to_first"] == pytest.approx([1.0] * 4)  # the first probe is its own reference
        assert all(math.isnan(v) for v in first.metrics["cka_to_previous"])
        with torch.no_grad():  # only the last block (layer 3) changes
            for parameter in model.transformer.h[2].parameters():
                parameter.add_(0.5 * torch.randn_like(parameter))
        second = watch.run(model, 2)
    for name in metrics:
        values = second.metrics[name]
        assert values[:3] == pytest.approx([1.0] * 3, abs=1e-6)  # untouched layers have not moved at all
        assert values[3] < 0.99
    # A resumed run continues the comparison from the files in the run directory.
    with LayerWatch(probe, logdir=tmp_path, metrics=metrics, resume_step=2) as watch:
        third = watch.run(model, 3)
    assert third.metrics["cka_to_previous"] == pytest.approx([1.0] * 4, abs=1e-6)  # same model as step 2
    assert third.metrics["cka_to_first"] == pytest.approx(second.metrics["cka_to_first"], abs=1e-6)


def test_references_of_another_probe_give_nan_with_a_reason(tmp_path):
    pooled = torch.randn(3, 8, 4)
    stored = References("hash-a", tmp_path, resume_step=None, write=True)
    stored.update(pooled, 7)
    same = References("hash-a", tmp_path, resume_step=None, write=False)
    assert torch.equal(same.for_probe(pooled)["previous"], pooled) and not same.take_reasons()
    other = References("hash-b", tmp_path, resume_step=None, write=False)
    refs = other.for_probe(pooled)
    assert refs["previous"] is None
    reasons = other.take_reasons()
    assert any("different probe" in r and "cka_to_previous" in r for r in reasons)
    resumed_earlier = References("hash-a", tmp_path, resume_step=5, write=False)
    assert resumed_earlier.for_probe(pooled)["previous"] is None
    assert "after resume step 5" in " ".join(resumed_earlier.take_reasons())
    assert float(linear_cka(pooled, refs["first"]).min()) == pytest.approx(1.0)  # restarts from this probe


@pytest.mark.slow
def test_report_marks_the_best_layer_and_explains_sinks_and_cka(tmp_path):
    from layerwatch.analysis.report import make_report

    ids, labels = labelled_ids()
    probe = Probe.from_tensors(ids, vocab_size=TINY_VOCAB, views=0, labels=labels)
    model = tiny_model("gpt2", layers=2)
    with LayerWatch(probe, logdir=tmp_path, metrics="light") as watch:
        for step in (1, 2):
            watch.run(model, step)
    run = read_run(tmp_path)
    report = make_report(tmp_path)
    page = report.html.read_text()
    for heading in ("Best layer", "Which layers are changing", "Compression or attention sink?"):
        assert heading in page
    best = [int(b) for b in run.scalar("best_layer")]
    assert "".join(f"<tr><th>{s}</th><td>{b}</td></tr>" for s, b in zip((1, 2), best)) in page
    assert report.images["heatmap_probe_accuracy"].is_file()


@pytest.mark.slow
def test_labeled_probe_example_writes_best_layer(tmp_path):
    from helpers import run_script

    run_script("labeled_probe.py", "--out", str(tmp_path / "out"), "--steps", "8", "--every", "4", cwd=tmp_path)
    run = read_run(tmp_path / "out")
    assert run.steps.tolist() == [0, 1, 2, 4, 8]
    assert set(run.scalar("best_layer")) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    assert run.metric("probe_accuracy").shape == (5, 5)
