"""LayerWatchCallback with the real transformers Trainer, tiny GPT-2 models and real TensorBoard event files."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
import transformers
from helpers import tiny_trainer
from models import TINY_VOCAB, tiny_model
from transformers import TrainerCallback, TrainerControl, TrainerState

import layerwatch
from layerwatch.cli.demo import training_arguments
from layerwatch.integrations.hf_trainer import LayerWatchCallback

pytestmark = pytest.mark.slow  # real Trainer runs

SEQ = 16
TAG = "layerwatch/prompt_entropy"  # in the TensorBoard run of each layer, layer_NN/


class CountingDataset:
    """Rows of token ids; counts ``__getitem__`` calls (the probe must never read the training data loader)."""

    def __init__(self, rows: int, low: int, high: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(low, high, (rows, SEQ), generator=generator)
        self.reads = 0

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict:
        self.reads += 1
        return {"input_ids": self.ids[index], "labels": self.ids[index].clone()}


def eval_dataset():
    """A ``datasets.Dataset`` whose ids (>= 64) tell probes built from it apart from the training rows (< 64)."""
    import datasets

    ids = torch.randint(64, TINY_VOCAB, (24, SEQ), generator=torch.Generator().manual_seed(1)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def make_trainer(out, callbacks=(), *, steps=6, train=None, eval_data=None, model=None, **options):
    settings = dict(
        max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3,
        logging_steps=1, save_steps=3, save_strategy="steps", seed=0, disable_tqdm=True,
    )
    settings.update(options)
    return tiny_trainer(
        out, callbacks,
        model=model if model is not None else tiny_model("gpt2", seed=0, dropout=0.1).train(),
        train_dataset=train if train is not None else CountingDataset(64, 0, 64, seed=0),
        eval_dataset=eval_data,
        **settings,
    )


def scalar_steps(logdir, layer=1, tag=TAG):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir / f"layer_{layer:02d}"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)], accumulator.Tags()["scalars"]


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6-step run (GA=2, dropout 0.1) without and with the callback (probe every 2 steps)."""
    root = tmp_path_factory.mktemp("trainer")
    baseline_train = CountingDataset(64, 0, 64, seed=0)
    baseline = make_trainer(root / "baseline", train=baseline_train, eval_data=eval_dataset())
    baseline.train()
    watched_train = CountingDataset(64, 0, 64, seed=0)
    watched = make_trainer(
        root / "watched", [LayerWatchCallback(every=2, num_prompts=8, batch_size=4)],
        train=watched_train, eval_data=eval_dataset(),
    )
    watched.train()
    return {
        "root": root, "baseline": baseline, "watched": watched,
        "baseline_reads": baseline_train.reads, "watched_reads": watched_train.reads,
    }


def test_training_trajectory_is_bit_identical(runs):
    expected = losses(runs["baseline"])
    assert len(expected) == 6
    assert losses(runs["watched"]) == expected  # exact float equality, not approx
    assert runs["watched_reads"] == runs["baseline_reads"]  # the probe read no training row


def test_tensorboard_and_jsonl_series(runs):
    logdir = runs["root"] / "watched" / "layerwatch"
    assert (logdir / "probe.safetensors").is_file()
    run = layerwatch.read_run(logdir)
    assert run.steps.tolist() == [1, 2, 4, 6]  # log-spaced start, every 2, last step
    assert run.layers == [0, 1, 2]
    for name in ("prompt_entropy", "dataset_entropy", "curvature", "effective_rank", "infonce", "dime", "lidar"):
        assert name in run.metrics
        assert np.isfinite(run.metric(name)).all(), name
    steps, tags = scalar_steps(logdir)
    assert steps == [1, 2, 4, 6]
    for layer in (0, 1, 2):
        assert TAG in scalar_steps(logdir, layer)[1]
    # The probe came from the evaluation dataset (ids >= 64), not from the training rows.
    probe = layerwatch.Probe.load(logdir / "probe.safetensors")
    assert probe.num_prompts == 8
    assert int(probe.input_ids[probe.attention_mask.bool()].min()) >= 64


def test_resume_from_checkpoint_continues_the_series(runs, tmp_path, trainer_can_resume):
    out = tmp_path / "resumed"
    shutil.copytree(runs["root"] / "watched", out)
    before = layerwatch.read_run(out / "layerwatch")
    trainer = make_trainer(out, [LayerWatchCallback(every=2, num_prompts=8, batch_size=4)], eval_data=eval_dataset())
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    run = layerwatch.read_run(out / "layerwatch")
    assert run.steps.tolist() == [1, 2, 4, 6]  # 4 and 6 re-probed once each, no duplicates
    np.testing.assert_array_equal(run.metric("prompt_entropy")[:2], before.metric("prompt_entropy")[:2])
    hashes = {record.settings["probe_hash"] for record in run.records}
    assert len(hashes) == 1  # the resumed part used the saved probe
    steps, _ = scalar_steps(out / "layerwatch")
    assert steps == [1, 2, 4, 6]


def test_fresh_run_in_same_folder_starts_a_new_series_and_keeps_the_old_one(tmp_path):
    callback = LayerWatchCallback(every=2, num_prompts=4, metrics="light")
    for _ in range(2):
        make_trainer(tmp_path, [callback], steps=2, save_strategy="no").train()
    assert layerwatch.read_run(tmp_path / "layerwatch").steps.tolist() == [1, 2]
    assert scalar_steps(tmp_path / "layerwatch")[0] == [1, 2]
    kept = list(tmp_path.glob("layerwatch.previous-*"))  # the finished first run, moved aside, not deleted
    assert len(kept) == 1 and layerwatch.read_run(kept[0]).steps.tolist() == [1, 2]


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_final_probe_when_last_step_was_not_probed(tmp_path):
    # max_steps=5 with every=4: steps 1, 2, 4 are scheduled; 5 is the last step and is probed too.
    make_trainer(tmp_path / "a", [LayerWatchCallback(every=4, num_prompts=4, metrics="light")], steps=5,
                 save_strategy="no").train()
    assert layerwatch.read_run(tmp_path / "a" / "layerwatch").steps.tolist() == [1, 2, 4, 5]
    # Training stopped early at step 3 by another callback: the probe at on_train_end records step 3.
    callbacks = [LayerWatchCallback(every=4, num_prompts=4, metrics="light"), StopAt(3)]
    trainer = make_trainer(tmp_path / "b", callbacks, steps=8, save_strategy="no")
    trainer.train()
    assert trainer.state.global_step == 3
    assert layerwatch.read_run(tmp_path / "b" / "layerwatch").steps.tolist() == [1, 2, 3]


def test_stop_on_collapse(tmp_path):
    # A threshold above any normalized entropy puts every probe at the floor: the second probe raises the alert.
    callback = LayerWatchCallback(
        every=2, num_prompts=4, metrics="light", collapse_threshold=2.0, stop_on_collapse=True
    )
    trainer = make_trainer(tmp_path, [callback], steps=6, save_strategy="no")
    trainer.train()
    assert trainer.state.global_step == 2
    run = layerwatch.read_run(tmp_path / "layerwatch")
    assert run.steps.tolist() == [1, 2]
    assert not run.records[0].alerts
    assert any(alert.startswith("collapse") for alert in run.records[1].alerts)


def word_tokenizer():
    """A tiny word-level tokenizer (fits the tiny models' 128-token vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a cat dog sat on mat ran far and saw bird tree sky blue red big small".split()
    vocab = {"<pad>": 0, "<unk>": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


TEXTS = [
    "the cat sat on the mat and saw a bird",
    "a big dog ran far and the sky was blue",
    "the small bird sat on a red tree",
    "a cat and a dog saw the big blue sky",
]


class NoIteration(torch.utils.data.DataLoader):
    def __iter__(self):
        raise AssertionError("the callback iterated the training data loader")


def begin(callback, tmp_path, *, train=None, eval_loader=None, tokenizer=None, global_step=0, model=None):
    """Run the callback's on_train_begin as the Trainer would (without training)."""
    args = training_arguments(str(tmp_path))
    state = TrainerState()
    state.global_step = global_step
    state.max_steps = 10
    model = model if model is not None else tiny_model("gpt2")
    train_loader = NoIteration(train if train is not None else CountingDataset(8, 0, 64, seed=0))
    callback.on_train_begin(
        args, state, TrainerControl(), model=model, processing_class=tokenizer, train_dataloader=train_loader,
        eval_dataloader=eval_loader,
    )
    probe = callback.watch.probe
    callback.on_train_end(args, state, TrainerControl(), model=model)
    return probe


def test_probe_argument_forms(tmp_path):
    tokenizer = word_tokenizer()
    from_texts = begin(LayerWatchCallback(probe=TEXTS), tmp_path / "texts", tokenizer=tokenizer)
    assert from_texts.num_prompts == len(TEXTS)
    assert from_texts.input_ids[0, :3].tolist() == tokenizer("the cat sat")["input_ids"]

    saved = tmp_path / "texts" / "layerwatch" / "probe.safetensors"
    assert saved.is_file()
    from_path = begin(LayerWatchCallback(probe=str(saved)), tmp_path / "path")
    assert from_path.content_hash == from_texts.content_hash

    probe = layerwatch.Probe.from_tensors(torch.randint(0, TINY_VOCAB, (4, 12)), vocab_size=TINY_VOCAB)
    assert begin(LayerWatchCallback(probe=probe), tmp_path / "object").content_hash == probe.content_hash

    with pytest.raises(ValueError, match="tokenizer"):
        begin(LayerWatchCallback(probe=TEXTS), tmp_path / "no-tokenizer")


def test_probe_from_datasets_without_iterating_the_train_loader(tmp_path):
    # No eval data loader and no Trainer on the stack: the training dataset, read by indexing only.
    train = CountingDataset(8, 0, 64, seed=0)
    probe = begin(LayerWatchCallback(num_prompts=4), tmp_path / "train", train=train)
    assert probe.num_prompts == 4 and int(probe.input_ids.max()) < 64
    # An evaluation data loader, when the Trainer has one, wins over the training data.
    eval_loader = torch.utils.data.DataLoader(CountingDataset(8, 64, TINY_VOCAB, seed=1))
    probe = begin(LayerWatchCallback(num_prompts=4), tmp_path / "eval", eval_loader=eval_loader)
    assert int(probe.input_ids[probe.attention_mask.bool()].min()) >= 64
    # A text dataset goes through the Trainer's processing_class.
    import datasets

    texts = datasets.Dataset.from_dict({"text": TEXTS})
    probe = begin(LayerWatchCallback(probe=texts, num_prompts=4), tmp_path / "text", tokenizer=word_tokenizer())
    assert probe.num_prompts == 4


def test_label_column_and_the_start_up_line(tmp_path, caplog):
    import datasets

    ids = torch.randint(64, TINY_VOCAB, (12, SEQ), generator=torch.Generator().manual_seed(2)).tolist()
    labels = ["pos" if i % 2 else "neg" for i in range(12)]
    data = datasets.Dataset.from_dict({"input_ids": ids, "label": labels})
    callback = LayerWatchCallback(every=3, probe=data, label_column="label", metrics=["prompt_entropy", "probe_accuracy"])
    with caplog.at_level(logging.INFO, logger="layerwatch"):
        probe = begin(callback, tmp_path)
    assert probe.num_prompts == 12  # all 12 rows: fewer than num_prompts=64
    by_row = {tuple(row): label for row, label in zip(ids, labels)}
    assert probe.labels == [by_row[tuple(row[mask.bool()].tolist())] for row, mask in zip(probe.input_ids, probe.attention_mask)]
    lines = [r.getMessage() for r in caplog.records if "tensorboard --logdir" in r.getMessage()]
    assert len(lines) == 1, caplog.text  # one start-up line: where it writes, how to view it, why the probe is small
    logdir = str(tmp_path / "layerwatch")
    assert f"writing to {logdir}" in lines[0] and lines[0].endswith(f"tensorboard --logdir {logdir}")
    assert "12 prompts" in lines[0] and "has 12 rows" in lines[0] and "num_prompts=64" in lines[0]


def test_max_length_is_capped_to_fit_the_models_positions(tmp_path, caplog):
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=TINY_VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    )
    train = CountingDataset(8, 0, 64, seed=0)  # rows of 16 tokens; views would need up to 21 positions
    with caplog.at_level(logging.WARNING):
        probe = begin(LayerWatchCallback(num_prompts=4, max_length=16), tmp_path, train=train, model=model)
    assert probe.max_length() <= 16
    assert "lowered" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # metrics="light" feeds no views: the prompts keep their 16 tokens
        probe = begin(LayerWatchCallback(num_prompts=4, max_length=16, metrics="light"), tmp_path / "light",
                      train=train, model=model)
    assert int(probe.attention_mask.sum(1).max()) == 16 and "lowered" not in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"every": 0}, "every"),
        ({"every": 2.5}, "every"),
        ({"every": True}, "every"),
        ({"metrics": "fancy"}, "metrics"),
        ({"metrics": ["prompt_entropy", "nope"]}, "metrics"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_prompts": -1}, "num_prompts"),
        ({"max_length": 0}, "max_length"),
        ({"max_overhead": 2.0}, "max_overhead"),
        ({"alpha": 0}, "alpha"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        LayerWatchCallback(**kwargs)


def test_unknown_options_and_probe_types_raise_type_error():
    with pytest.raises(TypeError, match="evry"):
        LayerWatchCallback(evry=3)
    with pytest.raises(TypeError, match="resume_step"):
        LayerWatchCallback(resume_step=3)
    with pytest.raises(TypeError, match="probe"):
        LayerWatchCallback(probe=42)
    with pytest.raises(TypeError, match="texts"):
        LayerWatchCallback(probe=[1, 2, 3])
    with pytest.raises(TypeError, match="mapping"):
        LayerWatchCallback(probe={"input_ids": [[1, 2, 3]]})


def test_find_dataset_reads_the_calling_trainer(tmp_path):
    """The events carry no datasets: find_dataset reads the calling Trainer's (the first evaluation set of a dict)."""
    from layerwatch.integrations.hf_trainer import find_dataset

    assert find_dataset({}) == (None, "the training dataset")  # no Trainer on the stack, no loaders
    train, valid = CountingDataset(8, 0, 64, seed=0), eval_dataset()
    found = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            found["eval"] = find_dataset(kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    make_trainer(tmp_path / "eval", [Spy()], steps=1, train=train, eval_data={"valid": valid}).train()
    assert found["eval"] == (valid, "the evaluation dataset 'valid'")
    make_trainer(tmp_path / "train", [Spy()], steps=1, train=train).train()
    assert found["eval"][0] is train and found["eval"][1] == "the training dataset"
