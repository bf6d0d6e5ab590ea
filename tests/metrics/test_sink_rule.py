"""The sink rule (issue 21.1): weak sinks (5x the median, on the first token of most prompts), strong ones
(100-1000x) and none. The sink-free entropy is checked against an independent numpy entropy of each prompt
without exactly the injected tokens; where nothing stands out it equals prompt_entropy exactly."""

from __future__ import annotations


import pytest
import torch
from helpers import numpy_prompt_entropy as numpy_entropy
from models import TINY_VOCAB, tiny_model

from layerwatch.metrics import SINK_GAP, SINK_NORM_RATIO, prompt_entropy, prompt_entropy_without_sinks, sink_tokens



def prompts(b=12, t=20, d=32, seed=0):
    """Ordinary tokens: Gaussian in 32-D, whose norms' max/median stays near 1.2-1.6 (as ordinary tokens do)."""
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def scale_token(hidden, b, t, ratio):
    """Rescale token t of prompt b to ``ratio`` times the median norm of the prompt's other tokens."""
    norms = hidden[b].norm(dim=-1)
    others = torch.cat([norms[:t], norms[t + 1 :]])
    hidden[b, t] *= ratio * others.median() / norms[t]


def check_against_numpy(hidden, expected_sinks):
    """sink_tokens == expected_sinks; the sink-free entropy == numpy's entropy without exactly those tokens."""
    assert torch.equal(sink_tokens(hidden), expected_sinks)
    full = prompt_entropy(hidden)
    got = prompt_entropy_without_sinks(hidden)
    reused = prompt_entropy_without_sinks(hidden, entropy=full)
    for b in range(hidden.shape[0]):
        kept = hidden[b][~expected_sinks[b]].numpy()
        assert float(got[b]) == pytest.approx(numpy_entropy(kept), rel=1e-9, abs=1e-12)
        assert float(reused[b]) == pytest.approx(float(got[b]), rel=1e-12)
        if not expected_sinks[b].any():
            assert float(got[b]) == float(full[b]) and float(reused[b]) == float(full[b])  # exactly
    return full, got


def test_weak_first_token_sinks_in_most_prompts_are_left_out():
    hidden = prompts()
    expected = torch.zeros(12, 20, dtype=torch.bool)
    for b in range(9):  # 75% of the prompts: the first token at 5x the median, the norm's argmax there
        scale_token(hidden, b, 0, 5.0)
        expected[b, 0] = True
    scale_token(hidden, 10, 0, 2.0)  # a first token only twice the median: ordinary
    full, got = check_against_numpy(hidden, expected)
    assert (got[:9] > full[:9]).all()  # the sink made these prompts look more compressed


def test_strong_sinks_and_a_weak_one_beside_a_strong_one_are_left_out():
    hidden = prompts()
    expected = torch.zeros(12, 20, dtype=torch.bool)
    for b, ratio in enumerate((100.0, 300.0, 1000.0, 1000.0)):
        scale_token(hidden, b, 0, ratio)
        expected[b, 0] = True
    scale_token(hidden, 3, 7, 8.0)  # prompt 3: a 1000x first token and an 8x delimiter-like token
    expected[3, 7] = True
    scale_token(hidden, 4, 5, 120.0)  # a massive token in the middle of a prompt
    expected[4, 5] = True
    check_against_numpy(hidden, expected)


def test_nothing_stands_out_nothing_is_left_out():
    hidden = prompts(seed=3)
    none = torch.zeros(12, 20, dtype=torch.bool)
    check_against_numpy(hidden, none)
    # a tail of ordinary tokens rising smoothly to 3.5x the median: above the ratio, but no gap
    tail = prompts(seed=4)
    for t, ratio in enumerate((3.5, 2.9, 2.5, 2.2, 1.9)):
        scale_token(tail, 0, t, ratio)
    check_against_numpy(tail, none)
    # a first token at 4x but a second one at 2.5x: 4 < SINK_GAP x 2.5, so no token stands apart
    pair = prompts(seed=5)
    scale_token(pair, 0, 1, 2.5)
    scale_token(pair, 0, 0, 4.0)
    assert 4.0 < SINK_GAP * 2.5 and 4.0 > SINK_NORM_RATIO
    check_against_numpy(pair, none)


def test_short_and_padded_prompts():
    tokens = torch.zeros(3, 4, 2, dtype=torch.float64)
    tokens[0, :3] = torch.tensor([[100.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # 3 real tokens, one a sink
    tokens[1, :2] = torch.tensor([[100.0, 0.0], [0.0, 1.0]])  # 2 tokens: the median is their mean; no sink
    tokens[2] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1e4]])  # the sink sits in padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert sink_tokens(tokens, mask).tolist() == [[True, False, False, False], [False] * 4, [False] * 4]
    with pytest.raises(ValueError, match="gap"):
        sink_tokens(tokens, mask, gap=0.5)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox", "bert"])
def test_random_init_models_have_no_sink(kind):
    """Random-init models carry no attention sink: nothing is left out at any layer, although the first token of a
    random-init Llama sits 2-3.5x above the median at layer 1 (it attends to itself only)."""
    model = tiny_model(kind, layers=3, hidden=256)
    ids = torch.randint(3, TINY_VOCAB, (16, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    hidden = torch.stack(states)
    assert not bool(sink_tokens(hidden).any())
    assert torch.equal(prompt_entropy_without_sinks(hidden), prompt_entropy(hidden))
