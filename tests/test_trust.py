"""Trustworthy runs (issue 13): nothing lost, nothing wrong, training never harmed. One test (or more) per class."""

import logging

import pytest
import torch
import transformers

import layerwatch
from layerwatch.monitor import LayerWatch
from models import TINY_VOCAB, tiny_config, tiny_model


def make_probe(prompts=8, length=16, views=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_VOCAB, (prompts, length), generator=generator)
    return layerwatch.Probe.from_tensors(ids, vocab_size=TINY_VOCAB, views=views, seed=seed)


# ------------------------------------------------------------------------------------------ steps that go backwards


def test_a_per_epoch_counter_warns_once_and_says_what_step_must_be(caplog):
    """A batch index that restarts every epoch: epochs 2 and 3 are never probed, and the user is told, once."""
    model = tiny_model("gpt2")
    watch = LayerWatch(make_probe(), logdir=None, every=4, metrics="light")
    probed = []
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        for _epoch in range(3):
            for batch_index in range(1, 9):
                if watch.step(model, batch_index) is not None:
                    probed.append(batch_index)
    watch.close()
    assert probed == [1, 2, 4, 8]  # only the first epoch: later steps are not after the last probed one
    warnings = [r.getMessage() for r in caplog.records if "steps must increase" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "step 1 after step 8" in warnings[0] and "global_step" in warnings[0]


def test_a_repeated_step_warns_and_increasing_steps_do_not(caplog):
    model = tiny_model("gpt2")
    watch = LayerWatch(make_probe(), logdir=None, every=4, metrics="light")
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        for step in range(1, 10):
            watch.step(model, step)
        assert not [r for r in caplog.records if "steps must increase" in r.getMessage()]
        watch.step(model, 9)  # called twice for one optimizer step (e.g. per micro-batch)
    watch.close()
    assert [r for r in caplog.records if "step 9 after step 9" in r.getMessage()]


# ------------------------------------------------------------------------------------- metrics="light" needs no views


def test_light_preset_is_not_refused_for_views_longer_than_the_model_positions(tmp_path):
    """Prompts of exactly the model's 32 positions: the views (longer by their insertions) do not fit, which only
    matters to presets that feed them."""
    config = tiny_config("gpt2")
    config.n_positions = 32
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    probe = make_probe(prompts=6, length=32, views=2)
    assert probe.max_length() > 32  # a view is longer than the model takes
    record = LayerWatch(probe, logdir=None, metrics="light").run(model, 1)
    assert record is not None and set(record.metrics) >= {"prompt_entropy", "dataset_entropy", "effective_rank"}
    with pytest.raises(ValueError, match="positions"):
        LayerWatch(probe, logdir=None, metrics="standard", strict=True).run(model, 1)
