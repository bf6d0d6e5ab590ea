"""Collection: buffers declared from the registry, the set-level step as a pure function, and step()'s outcome."""

import math

import numpy as np
import pytest
import torch

from layerwatch import metrics as M
from layerwatch.monitor.capture import find_blocks
from layerwatch.monitor.collect import CLEAN, Collector, passes, set_level_metrics
from layerwatch.monitor import LayerWatch, ProbeOutcome
from layerwatch.metrics.registry import SetInputs
from helpers import random_probe
from models import TINY_VOCAB, tiny_model


def _probe(prompts=8, length=12, views=2):
    return random_probe(prompts, length, views, seed=1)


def test_buffers_and_passes_follow_what_the_selected_metrics_need():
    probe = _probe()
    light = Collector(["prompt_entropy_bimodality", "rms"], probe, layers=3, views=2, alpha=1.0)
    assert light.token_names == ("prompt_entropy",)  # bimodality uses prompt entropy's per-prompt values
    assert {name: (b.shape, b.reduce) for name, b in light.buffers.items()} == {
        "per_prompt/prompt_entropy": ((3, 8), "sum"),
        "health": ((3, 3), "sum"),
        "max_abs": ((3,), "max"),
    }
    assert [p[0] for p in passes(light.names, probe, light.views)] == [CLEAN]
    views_only = Collector(["lidar"], probe, layers=3, views=2, alpha=1.0)
    assert {name: b.shape for name, b in views_only.buffers.items()} == {"views": (3, 8, 2, None)}
    assert [p[0] for p in passes(views_only.names, probe, views_only.views)] == [0, 1]


def test_set_level_metrics_is_a_function_of_the_buffers_alone():
    generator = torch.Generator().manual_seed(0)
    layers, prompts, width = 3, 10, 6
    entropy = torch.rand(layers, prompts, generator=generator)
    pooled = torch.randn(layers, prompts, width, generator=generator)
    health = torch.tensor([[8.0, 2.0, 0.0], [18.0, 2.0, 0.0], [2.0, 1.0, 1.0]])  # layer 2 saw a NaN
    inputs = SetInputs(
        per_prompt={"prompt_entropy": entropy}, pooled=pooled, views=None, health=health,
        max_abs=torch.tensor([1.0, 2.0, 3.0]), alpha=1.0, seed=0,
    )
    names = ["prompt_entropy", "dataset_entropy", "rms", "max_abs", "nonfinite"]
    metrics, per_prompt = set_level_metrics(names, inputs)
    assert list(metrics) == names and list(per_prompt) == ["prompt_entropy"]
    np.testing.assert_allclose(metrics["prompt_entropy"][:2], entropy.double().mean(1)[:2].numpy(), rtol=1e-12)
    np.testing.assert_allclose(metrics["dataset_entropy"][:2], M.dataset_entropy(pooled)[:2].double().numpy(), rtol=1e-6)
    assert math.isnan(metrics["prompt_entropy"][2]) and math.isnan(metrics["dataset_entropy"][2])
    np.testing.assert_allclose(metrics["rms"], [2.0, 3.0, math.sqrt(2.0)], rtol=1e-15)  # sqrt(squares / finite)
    assert metrics["nonfinite"] == [0.0, 0.0, 1.0] and metrics["max_abs"] == [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(per_prompt["prompt_entropy"], entropy.numpy())


def test_step_tells_not_due_from_failed():
    model = tiny_model("gpt2")
    watch = LayerWatch(_probe(), logdir=None, every=4, metrics="light", log_spaced_start=False)
    assert watch.last_outcome is None
    assert watch.step(model, 1) is None and watch.last_outcome == ProbeOutcome.NOT_DUE == "not due"
    assert watch.step(model, 4) is not None and watch.last_outcome is ProbeOutcome.PROBED
    handle = find_blocks(model)[0].register_forward_hook(lambda *args: 1 / 0)
    assert watch.step(model, 8) is None and watch.last_outcome is ProbeOutcome.FAILED
    handle.remove()
    assert watch.step(model, 9) is None and watch.last_outcome is ProbeOutcome.NOT_DUE
    assert watch.run(model, 10) is not None and watch.last_outcome is ProbeOutcome.PROBED
    strict = LayerWatch(_probe(), logdir=None, metrics="light", strict=True)
    find_blocks(model)[0].register_forward_hook(lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        strict.run(model, 1)
    assert strict.last_outcome is ProbeOutcome.FAILED


# ---------------------------------------------------------------- models that do not take input_ids= (issue 18.3)


class _NanoBlock(torch.nn.Module):
    """A nanoGPT-style block; ``output`` chooses what it returns: a tensor, a dict, or an ambiguous dict."""

    def __init__(self, width: int, output: str) -> None:
        super().__init__()
        self.ln, self.mlp, self.output = torch.nn.LayerNorm(width), torch.nn.Linear(width, width), output

    def forward(self, x):
        x = x + self.mlp(self.ln(x))
        if self.output == "tensor":
            return x
        if self.output == "dict":
            return {"x": x, "aux_loss": x.pow(2).mean()}
        return {"out": x, "residual_copy": x * 2}  # two [B, T, D] values: no rule picks one


class NanoGPT(torch.nn.Module):
    """``forward(idx, targets=None)``, blocks under ``transformer.h`` (as in nanoGPT); ``keyword_only`` makes the
    forward take ``*, tokens`` instead, which needs ``forward_inputs=``."""

    def __init__(self, output: str = "tensor", keyword_only: bool = False, width: int = 16, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transformer = torch.nn.ModuleDict(
            {
                "wte": torch.nn.Embedding(TINY_VOCAB, width),
                "h": torch.nn.ModuleList(_NanoBlock(width, output) for _ in range(layers)),
                "ln_f": torch.nn.LayerNorm(width),
            }
        )
        self.head = torch.nn.Linear(width, TINY_VOCAB)
        if keyword_only:
            self.forward = self._keyword_forward

    def forward(self, idx, targets=None):
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            out = block(x)
            x = out if isinstance(out, torch.Tensor) else next(iter(out.values()))
        return self.head(self.transformer.ln_f(x))

    def _keyword_forward(self, *, tokens):
        return NanoGPT.forward(self, tokens)


def _rms_by_hand(model: NanoGPT, probe) -> list[float]:
    """Per-layer RMS over the probe's real tokens, from hidden states computed here without layerwatch."""
    with torch.no_grad():
        x = model.transformer.wte(probe.input_ids)
        hidden = [x]
        for block in model.transformer.h:
            out = block(x)
            x = out if isinstance(out, torch.Tensor) else next(iter(out.values()))
            hidden.append(x)
    mask = probe.attention_mask.bool()
    return [float(h[mask].double().pow(2).mean().sqrt()) for h in hidden]


def test_a_nanogpt_forward_idx_just_works():
    probe, model = _probe(prompts=6, views=0), NanoGPT()
    watch = LayerWatch(probe, logdir=None, metrics=["rms", "dataset_entropy"], strict=True, batch_size=4)
    record = watch.run(model, 1)
    np.testing.assert_allclose(record.metrics["rms"], _rms_by_hand(model, probe), rtol=1e-5)
    assert all(math.isfinite(v) for v in record.metrics["dataset_entropy"])


def test_blocks_returning_dicts_follow_the_documented_rule_or_block_output():
    probe = _probe(prompts=6, views=0)
    model = NanoGPT(output="dict")  # {"x": ..., "aux_loss": ...}: the "x" entry, by the rule
    record = LayerWatch(probe, logdir=None, metrics=["rms"], strict=True).run(model, 1)
    np.testing.assert_allclose(record.metrics["rms"], _rms_by_hand(model, probe), rtol=1e-5)

    ambiguous = NanoGPT(output="ambiguous")
    with pytest.raises(Exception, match="block_output="):
        LayerWatch(probe, logdir=None, metrics=["rms"], strict=True).run(ambiguous, 1)
    chosen = LayerWatch(probe, logdir=None, metrics=["rms"], strict=True, block_output=lambda out: out["out"])
    np.testing.assert_allclose(chosen.run(ambiguous, 1).metrics["rms"], _rms_by_hand(ambiguous, probe), rtol=1e-5)


def test_a_forward_without_input_ids_or_positional_ids_names_forward_inputs():
    probe, model = _probe(prompts=6, views=0), NanoGPT(keyword_only=True)
    with pytest.raises(TypeError, match="forward_inputs="):
        LayerWatch(probe, logdir=None, metrics=["rms"], strict=True).run(model, 1)
    adapted = LayerWatch(
        probe, logdir=None, metrics=["rms"], strict=True, forward_inputs=lambda ids, mask: {"tokens": ids}
    )
    np.testing.assert_allclose(adapted.run(model, 1).metrics["rms"], _rms_by_hand(model, probe), rtol=1e-5)
    with pytest.raises(TypeError, match="forward_inputs=? must be a callable"):
        LayerWatch(probe, logdir=None, metrics=["rms"], strict=True, forward_inputs="tokens").run(model, 1)


def test_a_hook_failure_is_kept_and_raised_after_the_forward_finishes():
    from layerwatch.monitor.capture import LayerHooks

    model, seen = NanoGPT(layers=3), []

    def callback(index, hidden):
        seen.append(index)
        if index == 1 and len(seen) == 2:  # the first forward only
            raise np.linalg.LinAlgError("injected")

    after = []
    handle = model.transformer.h[2].register_forward_hook(lambda m, a, out: after.append(True))
    with LayerHooks(list(model.transformer.h), callback) as hooks:
        model(torch.randint(0, TINY_VOCAB, (2, 5)))  # does not raise: the forward runs to the end
        assert after == [True] and seen == [0, 1]  # the later layers ran; layerwatch's work stopped at the error
        with pytest.raises(np.linalg.LinAlgError, match="injected"):
            hooks.check_and_reset()
        model(torch.randint(0, TINY_VOCAB, (2, 5)))
        hooks.check_and_reset()  # the next forward is clean again
    handle.remove()


def test_a_failed_collective_states_the_same_steps_rule():
    from layerwatch.monitor.distributed import ProbeError, agree_before_forward, collective

    with pytest.raises(ProbeError, match=r"every rank must call step\(\) at the same steps") as caught:
        with collective("first (probe agreement)"):
            raise RuntimeError("Timed out waiting 60000ms for send operation to complete")  # what gloo raises
    assert "Timed out waiting" in str(caught.value) and isinstance(caught.value.__cause__, RuntimeError)
    refusal = ValueError("layers='x' does not name a block list")
    with pytest.raises(ValueError, match="layers='x'"):  # one process: the refusal itself, unchanged
        agree_before_forward([1, 2, 3, 4, 5], refusal)
    agree_before_forward([1, 2, 3, 4, 5], None)  # nothing to agree with: a no-op
