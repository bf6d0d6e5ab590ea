"""Model facts: resolved once per model object, forgotten with it, and the one probe-fits check."""

import gc
import inspect
import weakref

import pytest
import torch

import layerwatch
from layerwatch.monitor import model_facts as facts_module
from layerwatch.monitor.capture import find_blocks
from layerwatch.monitor.model_facts import forget_model_facts, model_facts
from layerwatch.monitor import LayerWatch
from models import TINY_VOCAB, tiny_model


def test_facts_match_the_model(tmp_path):
    model = tiny_model("llama", layers=3)
    facts = model_facts(model)
    assert list(facts.blocks()) == list(model.model.layers) and len(facts.blocks()) == 3
    assert facts.vocab_size == TINY_VOCAB == model.get_input_embeddings().num_embeddings
    assert facts.max_positions == 256
    assert facts.accepts_attention_mask is True
    assert facts.forward_options["use_cache"] is False
    # transformers 5.x names it logits_to_keep, 4.46-4.4x num_logits_to_keep: whichever forward() takes is set to 1.
    keep = "logits_to_keep" if "logits_to_keep" in inspect.signature(model.forward).parameters else "num_logits_to_keep"
    assert facts.forward_options[keep] == 1
    mamba = model_facts(tiny_model("mamba"))
    assert mamba.max_positions is None and mamba.vocab_size == TINY_VOCAB


def test_vocabulary_from_the_embedding_without_a_config():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(40, 8)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids):
            hidden = self.embed(input_ids)
            for layer in self.layers:
                hidden = layer(hidden)
            return hidden

    bare = Bare()
    facts = model_facts(bare)
    assert facts.blocks() == tuple(bare.layers)
    assert facts.vocab_size == 40 and facts.max_positions is None and facts.accepts_attention_mask is False


def test_resolved_once_per_model_and_forgotten_when_freed(tmp_path, monkeypatch):
    calls = []

    def counting_find_blocks(model, layers=None):
        calls.append(layers)
        return find_blocks(model, layers)

    monkeypatch.setattr(facts_module, "find_blocks", counting_find_blocks)
    model = tiny_model("gpt2")
    probe = layerwatch.Probe.from_tensors(torch.randint(1, TINY_VOCAB, (4, 10)), vocab_size=TINY_VOCAB, views=2)
    watch = LayerWatch(probe, logdir=None, every=1, log_spaced_start=False)
    for step in (1, 2, 3):
        assert watch.step(model, step) is not None
    assert calls == [None]  # three probes, one walk
    assert model_facts(model) is model_facts(model)
    assert model_facts(model).blocks("transformer.h") == model_facts(model).blocks()
    assert calls == [None, "transformer.h"]
    forget_model_facts(model)
    model_facts(model).blocks()
    assert calls == [None, "transformer.h", None]

    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the cache does not keep a model alive


def test_check_probe_names_both_vocabularies_and_the_positions(caplog):
    facts = model_facts(tiny_model("gpt2"))
    too_big = layerwatch.Probe.from_tensors(torch.arange(900, 1000).reshape(4, 25), vocab_size=1000, views=0)
    with pytest.raises(ValueError, match=r"token id 999 .*vocabulary of 1000 tokens.* has 128 entries"):
        facts.check_probe(too_big)
    wide = layerwatch.Probe.from_tensors(torch.ones(2, 10, dtype=torch.long), vocab_size=500, views=0)
    with caplog.at_level("WARNING"):
        facts.check_probe(wide)  # ids fit: a warning only
    assert "vocabulary of 500 tokens but the model has 128" in caplog.text
    long = layerwatch.Probe.from_tensors(torch.ones(2, 300, dtype=torch.long), vocab_size=TINY_VOCAB, views=0)
    with pytest.raises(ValueError, match="300 tokens .* at most 256 positions"):
        facts.check_probe(long)
    facts.check_probe(long, longest=200)  # only what will be fed is checked


def _count_facts(monkeypatch):
    """Count the facts resolutions (ModelFacts built) from here on."""
    built = []
    original = facts_module.ModelFacts

    class Counted(original):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("_model"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(facts_module, "ModelFacts", Counted)
    return built


def test_facts_are_resolved_once_on_the_trainer_start_up_path(tmp_path, monkeypatch):
    """on_train_begin (probe fitting, the model check, the monitor) and the first probes (validation, the cost
    estimate, hooks): one resolution of the model's facts."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from layerwatch.integrations.hf_trainer import LayerWatchCallback

    built = _count_facts(monkeypatch)
    model = tiny_model("gpt2")
    probe = layerwatch.Probe.from_tensors(torch.randint(1, TINY_VOCAB, (6, 12)), vocab_size=TINY_VOCAB, views=2)
    callback = LayerWatchCallback(every=1, probe=probe, logdir=tmp_path / "run", tensorboard=False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    for step in (1, 2):
        state.global_step = step
        callback.on_step_end(args, state, control, model=model)
    callback.on_train_end(args, state, control, model=model)
    assert len(built) == 1 and built[0]() is model
    assert layerwatch.read_run(tmp_path / "run").steps.tolist() == [1, 2]


@pytest.mark.slow
def test_facts_are_resolved_once_on_the_accelerate_start_up_path(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from layerwatch.integrations.accelerate_loop import LayerWatchAccelerate

    built = _count_facts(monkeypatch)
    model = tiny_model("gpt2")
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    probe = layerwatch.Probe.from_tensors(torch.randint(1, TINY_VOCAB, (6, 12)), vocab_size=TINY_VOCAB, views=2)
    watch = LayerWatchAccelerate(accelerator, prepared, probe, every=1, logdir=tmp_path, register_for_checkpointing=False)
    for step in (1, 2):
        assert watch.step(step=step) is not None
    watch.close()
    assert len(built) == 1


def test_the_cost_estimate_reads_the_facts_not_the_config(monkeypatch):
    from layerwatch.monitor import capture, cost

    model = tiny_model("gpt2", layers=3, hidden=32)
    facts = model_facts(model)
    assert (facts.width, facts.parameters) == (32, sum(p.numel() for p in model.parameters()))
    monkeypatch.setattr(capture, "model_config", lambda *a: pytest.fail("the config is read again"))
    estimate = cost.check_probe_cost(
        facts, layers=4, lengths=[10] * 6, metric_names=["dataset_entropy"], views=0, alpha=1.0, batch_size=4,
    )
    expected = cost.estimate_probe_cost(
        layers=4, width=32, tokens=[10] * 6, parameters=facts.parameters, views=0, token_metrics=False,
        metric_names=["dataset_entropy"], batch_size=4,
    )
    assert estimate == expected
