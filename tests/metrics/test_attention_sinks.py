"""massive_activation and prompt_entropy_without_sinks through the monitor: a massive activation injected into the
first token at chosen layers of a tiny model shows at exactly those layers, and the sink-free entropy there equals
the entropy of the layer's states computed without that token."""

from __future__ import annotations

import pytest
import torch
from models import TINY_VOCAB, tiny_model

from layerwatch import LayerWatch, Probe
from layerwatch.metrics import SINK_NORM_RATIO, prompt_entropy

SINK_LAYERS = (1, 3)  # layer i = output of block i - 1 ... here: index in the monitor's 0..L numbering


def inject(model, layers, norm=1e4):
    """Forward hooks adding a huge vector to token 0 at the given monitor layers and removing it one block later
    (so the residual stream does not carry it on): the sink sits at exactly those layers. Also records every
    block's output for an independent check."""
    blocks = model.transformer.h
    direction = torch.nn.functional.normalize(torch.ones(model.config.n_embd), dim=0) * norm
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for index, block in enumerate(blocks):
        layer = index + 1
        sign = 1.0 if layer in layers else (-1.0 if layer - 1 in layers else 0.0)

        def hook(module, args, output, sign=sign, layer=layer):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, 0] += sign * direction
            seen.setdefault(layer, []).append(hidden.detach())
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handles.append(block.register_forward_hook(hook))
    return seen, handles


def test_injected_massive_activation_shows_at_exactly_those_layers_and_entropy_without_it():
    model = tiny_model("gpt2", layers=5)
    ids = torch.randint(3, TINY_VOCAB, (6, 12), generator=torch.Generator().manual_seed(0))
    probe = Probe.from_tensors(ids, vocab_size=TINY_VOCAB, views=0)
    seen, handles = inject(model, SINK_LAYERS)
    watch = LayerWatch(probe, logdir=None, metrics=["prompt_entropy", "massive_activation", "prompt_entropy_without_sinks"],
                       batch_size=6)
    record = watch.run(model, 0)
    for handle in handles:
        handle.remove()
    massive = record.metrics["massive_activation"]
    assert [layer for layer, v in enumerate(massive) if v > SINK_NORM_RATIO] == list(SINK_LAYERS)
    assert max(v for layer, v in enumerate(massive) if layer not in SINK_LAYERS) < 4
    with_sink = record.metrics["prompt_entropy"]
    without = record.metrics["prompt_entropy_without_sinks"]
    for layer in range(len(massive)):
        if layer not in SINK_LAYERS:
            assert without[layer] == with_sink[layer]  # no sink: the same values
    for layer in SINK_LAYERS:
        states = seen[layer][-1]  # [6, 12, D], recorded by the injection hook during the probe's forward
        expected = prompt_entropy(states[:, 1:].double()).mean().item()
        assert without[layer] == pytest.approx(expected, rel=1e-5)
        assert with_sink[layer] < 0.5 * without[layer]  # the sink alone made the layer look compressed
