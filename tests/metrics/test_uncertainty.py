"""Standard errors (SPEC §8): per-prompt metrics against numpy's std(ddof=1)/sqrt(n) of independently computed
per-prompt values; set-level metrics against a brute-force delete-a-group jackknife that calls the public metric
functions on the prompts each replicate keeps; and the record / read_run / TensorBoard round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import numpy_prompt_entropy
from models import TINY_VOCAB, block_hidden, tiny_model

from layerwatch import LayerWatch, Probe, read_run
from layerwatch import metrics as M
from layerwatch.metrics import names, registry
from layerwatch.metrics.registry import SetInputs, standard_errors
from layerwatch.rundir.runs import _from_event_files



def brute_jackknife(values_of, m: int, seed: int, groups: int = 8) -> np.ndarray:
    """The documented delete-a-group jackknife written out: seeded permutation, G groups of M // G, formula."""
    order = torch.randperm(m, generator=torch.Generator().manual_seed(seed)).numpy()
    size = m // groups
    replicates = []
    for g in range(groups):
        keep = np.sort(np.setdiff1d(np.arange(m), order[g * size : (g + 1) * size]))
        replicates.append(np.asarray(values_of(torch.from_numpy(keep)), dtype=np.float64))
    replicates = np.stack(replicates)
    return np.sqrt((groups - 1) / groups * ((replicates - replicates.mean(0)) ** 2).sum(0))


def test_prompt_stderr_is_numpys_std_ddof1_over_sqrt_n_of_the_finite_values():
    values = torch.randn(4, 37, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values[1, :5] = math.nan
    values[3, 1:] = math.nan  # one finite value: undefined
    expected = []
    for row in values.numpy():
        finite = row[np.isfinite(row)]
        expected.append(finite.std(ddof=1) / math.sqrt(finite.size) if finite.size > 1 else math.nan)
    np.testing.assert_allclose(M.prompt_stderr(values).numpy(), expected, rtol=1e-12)
    assert math.isnan(float(M.prompt_stderr(values)[3]))


def test_jackknife_groups_are_seeded_disjoint_and_equal_sized():
    keep = M.jackknife_groups(100, groups=8, seed=3)
    assert keep.shape == (8, 100 - 12)
    assert torch.equal(keep, M.jackknife_groups(100, groups=8, seed=3))
    assert not torch.equal(keep, M.jackknife_groups(100, groups=8, seed=4))
    left_out = [set(range(100)) - set(row.tolist()) for row in keep]
    assert all(len(a & b) == 0 for i, a in enumerate(left_out) for b in left_out[i + 1 :])  # disjoint deletions
    assert M.jackknife_groups(5, groups=8).shape == (5, 4)  # fewer prompts than groups: delete-1 jackknife
    with pytest.raises(ValueError, match="at least 2 prompts"):
        M.jackknife_groups(1)


def set_inputs(m: int, seed: int = 0, layers: int = 3, d: int = 24) -> SetInputs:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(layers, 6, d, generator=g)
    pooled = torch.randn(layers, m, 6, generator=g) @ basis + 0.3 * torch.randn(layers, m, d, generator=g)
    views = pooled.unsqueeze(2) + 0.5 * torch.randn(layers, m, 2, d, generator=g)
    labels = [i % 2 for i in range(m)]
    pooled[:, torch.tensor(labels, dtype=torch.bool)] += 0.8  # a decodable class
    per_prompt = {names.PROMPT_ENTROPY: torch.rand(layers, m, generator=g)}
    return SetInputs(per_prompt=per_prompt, pooled=pooled, views=views, health=None, max_abs=None, alpha=1.0,
                     seed=seed, labels=labels, reference={"first": pooled + 0.1 * torch.randn(layers, m, d, generator=g)})


SET_LEVEL = {
    names.DATASET_ENTROPY: lambda s, keep: M.dataset_entropy(s.pooled[:, keep]),
    names.EFFECTIVE_RANK: lambda s, keep: M.effective_rank(s.pooled[:, keep]),
    names.INTRINSIC_DIMENSION: lambda s, keep: M.intrinsic_dimension(s.pooled[:, keep]),
    names.INFONCE: lambda s, keep: M.infonce(s.views[:, keep, 0], s.views[:, keep, 1]),
    names.LIDAR: lambda s, keep: M.lidar(s.views[:, keep]),
    names.DIME: lambda s, keep: M.dime(s.views[:, keep, 0], s.views[:, keep, 1],
                                       generator=torch.Generator().manual_seed(s.seed)),
    names.CKA_TO_FIRST: lambda s, keep: M.linear_cka(s.pooled[:, keep], s.reference["first"][:, keep]),
    names.PROBE_ACCURACY: lambda s, keep: M.probe_accuracy(s.pooled[:, keep].double(),
                                                           [s.labels[i] for i in keep.tolist()], seed=0),
    names.PROMPT_ENTROPY_BIMODALITY: lambda s, keep: M.bimodality(s.per_prompt[names.PROMPT_ENTROPY][:, keep].double()),
}


def test_set_level_stderr_equals_a_brute_force_jackknife_of_the_public_functions():
    inputs = set_inputs(64, seed=5)
    errors = standard_errors(list(SET_LEVEL) + [names.PROMPT_ENTROPY], inputs)
    for name, function in SET_LEVEL.items():
        expected = brute_jackknife(lambda keep: function(inputs, keep), 64, seed=5)
        np.testing.assert_allclose(errors[name].numpy(), expected, rtol=1e-9, atol=1e-12, err_msg=name)
        assert (errors[name] > 0).all(), name
    np.testing.assert_allclose(errors[names.PROMPT_ENTROPY].numpy(),
                               inputs.per_prompt[names.PROMPT_ENTROPY].double().std(-1).numpy() / 8, rtol=1e-9)


def test_set_level_stderr_is_reproducible_and_shrinks_with_more_prompts():
    chosen = [names.DATASET_ENTROPY, names.EFFECTIVE_RANK, names.INFONCE, names.LIDAR, names.INTRINSIC_DIMENSION]
    small = [standard_errors(chosen, set_inputs(16, seed=s)) for s in range(4)]
    large = [standard_errors(chosen, set_inputs(128, seed=s)) for s in range(4)]
    again = standard_errors(chosen, set_inputs(16, seed=0))
    for name in chosen:
        assert torch.equal(again[name], small[0][name]), name  # same seed, same estimate
        few = torch.stack([e[name] for e in small]).mean()
        many = torch.stack([e[name] for e in large]).mean()
        assert 0 < many < few, (name, float(few), float(many))
    assert standard_errors(chosen, set_inputs(16, seed=0), groups=0) == {}  # groups=0: no set-level ones


def test_a_metric_refusing_a_replicate_gives_nan_not_an_error():
    inputs = set_inputs(10)
    inputs.labels = [0] * 5 + [1] * 5  # 5 per class, as many as the folds: every replicate leaves a class 4
    error = standard_errors([names.PROBE_ACCURACY], inputs)[names.PROBE_ACCURACY]
    assert error.shape == (3,) and bool(torch.isnan(error).all())


def test_the_monitor_records_stderr_that_match_independent_computations(tmp_path):
    model = tiny_model("gpt2", layers=2)
    ids = torch.randint(3, TINY_VOCAB, (24, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::3, 10:] = 0  # some shorter prompts
    probe = Probe.from_tensors(ids, mask, vocab_size=TINY_VOCAB, views=2)
    chosen = [names.PROMPT_ENTROPY, names.DATASET_ENTROPY, names.CURVATURE, names.LIDAR, names.INTRINSIC_DIMENSION]
    with LayerWatch(probe, logdir=tmp_path, metrics=chosen + ["health"], batch_size=8) as watch:  # few pictures
        record = watch.run(model, 7)
    assert set(record.stderr) == {n for n in record.metrics if registry.spec(n).stderr}
    outputs = []  # block outputs (HF's last hidden state is after the final norm; layerwatch's is the block's)
    handles = [block.register_forward_hook(lambda m, a, out: outputs.append(block_hidden(out)))
               for block in model.transformer.h]
    with torch.no_grad():
        hidden = model(input_ids=probe.input_ids, attention_mask=probe.attention_mask,
                       output_hidden_states=True).hidden_states[:1] + tuple(outputs)
    for handle in handles:
        handle.remove()
    real = probe.attention_mask.bool().numpy()
    for layer, states in enumerate(hidden):
        prompts = [row[keep] for row, keep in zip(states.double().numpy(), real)]
        entropies = np.array([numpy_prompt_entropy(tokens) for tokens in prompts])
        expected = entropies.std(ddof=1) / math.sqrt(len(entropies))
        assert record.stderr[names.PROMPT_ENTROPY][layer] == pytest.approx(expected, rel=1e-4)
        pooled = torch.from_numpy(np.stack([tokens.mean(0) for tokens in prompts]))
        jack = brute_jackknife(lambda keep: M.dataset_entropy(pooled[keep]), len(prompts), seed=watch.seed)
        assert record.stderr[names.DATASET_ENTROPY][layer] == pytest.approx(float(jack), rel=1e-4)
    run = read_run(tmp_path)
    events = _from_event_files(tmp_path)  # TensorBoard: layer_NN/layerwatch_stderr/<metric> (float32 there)
    for name, per_layer in record.stderr.items():
        assert run.stderr(name).shape == (1, len(record.layers))
        np.testing.assert_allclose(run.stderr(name)[0], per_layer, rtol=1e-12)
        np.testing.assert_allclose(events.stderr(name)[0], per_layer, rtol=1e-6, atol=1e-9)
    assert np.isnan(run.stderr(names.RMS)).all()  # activation health: no standard error
    with pytest.raises(KeyError, match="not in this run"):
        run.stderr("no_such_metric")
