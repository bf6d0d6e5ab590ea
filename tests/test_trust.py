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


# ------------------------------------------------------------------------------------------------------ bounded cost

_LIMITED_CHILD = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from layerwatch import metrics as M
import layerwatch
from layerwatch.monitor import LayerWatch
from models import TINY_VOCAB, tiny_model

def vm_bytes():
    return int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024

limit = vm_bytes() + 700 * 2**20  # everything imported, plus 700 MiB of address space
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out = {}
generator = torch.Generator().manual_seed(0)
a = torch.randn(2, 500, 16, generator=generator, dtype=torch.float64)
b = a + 0.5 * torch.randn(2, 500, 16, generator=generator, dtype=torch.float64)
# Unchunked, 100 permutations would hold 2 x 101 x 500^2 float64 matrices (400 MiB) several times over.
for permutations in (4, 100):
    value = M.dime(a, b, n_permutations=permutations, generator=torch.Generator().manual_seed(1))
    out[f"dime_{permutations}"] = value.tolist()
    out[f"rss_{permutations}"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out["infonce"] = M.infonce(a, b).tolist()
ids = torch.randint(1, TINY_VOCAB, (10_000, 8), generator=generator)
big = layerwatch.Probe.from_tensors(ids, vocab_size=TINY_VOCAB, views=2)
started = time.perf_counter()
try:
    LayerWatch(big, logdir=None, metrics="standard")
    out["refused"] = None
except ValueError as error:
    out["refused"] = str(error)
out["refused_after_s"] = time.perf_counter() - started
small = layerwatch.Probe.from_tensors(ids[:300], vocab_size=TINY_VOCAB, views=2)
record = LayerWatch(small, logdir=None, metrics="standard", strict=True).run(tiny_model("gpt2"), 1)
out["small_ok"] = record is not None and all(v == v for v in record.metrics["dime"])
print(json.dumps(out))
"""


def test_a_large_probe_is_refused_up_front_and_set_metrics_fit_a_memory_limit():
    """Under RLIMIT_AS (700 MiB above the imports), in a child process: DiME with 100 permutations runs in the
    memory that 4 permutations take (chunked; it used to materialise all permutations x layers x M^2 at once), a
    10,000-prompt standard probe is refused at construction with the estimate and the knobs, and a 300-prompt probe
    runs end to end."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _LIMITED_CHILD], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["rss_100"] - out["rss_4"] < 150 * 2**20, out  # peak memory does not follow the permutation count
    assert all(0 < v < 5 for v in out["dime_100"])  # finite, and views that share structure give DiME > 0
    assert out["refused"] is not None and "10000 prompts" in out["refused"] and "GiB" in out["refused"]
    assert "memory_budget" in out["refused"] and "metrics='light'" in out["refused"]
    assert out["refused_after_s"] < 5
    assert out["small_ok"]
