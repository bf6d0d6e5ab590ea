"""Trustworthy runs (issue 13): nothing lost, nothing wrong, training never harmed. One test (or more) per class."""

import logging
import os

import pytest
import torch
import transformers

import layerwatch
from layerwatch.monitor import LayerWatch
from helpers import monitored_run, random_probe as make_probe, tiny_trainer
from models import TINY_VOCAB, tiny_config, tiny_model


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


def test_a_repeated_step_is_quiet_and_a_decreasing_step_warns(caplog):
    model = tiny_model("gpt2")
    watch = LayerWatch(make_probe(), logdir=None, every=4, metrics="light")
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        for step in range(1, 10):
            watch.step(model, step)
            watch.step(model, step)  # called again for one optimizer step (gradient accumulation, per micro-batch)
        assert not [r for r in caplog.records if "steps must increase" in r.getMessage()]
        watch.step(model, 8)  # a counter going back
    watch.close()
    assert [r for r in caplog.records if "step 8 after step 9" in r.getMessage()]


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
    fitted = LayerWatch(probe, logdir=None, metrics="standard", strict=True)  # views fed: the probe is cut to fit
    assert fitted.run(model, 1) is not None and fitted.probe.max_length() <= 32


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


# ---------------------------------------------------------------------------------------------------- collapse alerts


def _collapse_alerts(records):
    return [(r.step, a) for r in records for a in r.alerts if a.startswith("collapse")]


def test_collapse_rule_floor_for_consecutive_probes_not_a_relative_drop():
    from layerwatch.monitor.alerts import AlertTracker

    tracker = AlertTracker()
    healthy = {"dataset_entropy": [0.9, 0.8], "effective_rank": [40.0, 30.0], "nonfinite": [0.0, 0.0]}
    compressed = {"dataset_entropy": [0.85, 0.12], "effective_rank": [38.0, 6.0], "nonfinite": [0.0, 0.0]}
    assert tracker.check(1, [0, 1], healthy) == []
    assert tracker.check(2, [0, 1], compressed) == []  # an 85% drop in one probe: strong compression, not collapse
    assert tracker.check(3, [0, 1], {**compressed, "dataset_entropy": [0.85, 0.04]}) == []  # one probe at the floor
    assert tracker.check(4, [0, 1], compressed) == []  # and back: the streak restarts
    assert tracker.check(5, [0, 1], {**compressed, "effective_rank": [38.0, 1.2]}) == []
    alerts = tracker.check(6, [0, 1], {**compressed, "effective_rank": [38.0, 1.01]})
    assert len(alerts) == 1 and alerts[0].startswith("collapse: effective_rank at layer 1")
    assert "steps 5 to 6" in alerts[0]
    assert tracker.check(7, [0, 1], {**compressed, "effective_rank": [38.0, 1.0]}) == []  # once per condition
    # Undefined after being defined, with finite activations: every prompt identical, the floor of floors.
    tracker = AlertTracker()
    tracker.check(1, [0], {"dataset_entropy": [0.9], "nonfinite": [0.0]})
    assert tracker.check(2, [0], {"dataset_entropy": [float("nan")], "nonfinite": [0.0]}) == []
    assert "undefined" in tracker.check(3, [0], {"dataset_entropy": [float("nan")], "nonfinite": [0.0]})[0]
    # Undefined because the activations are not finite: the nonfinite alert, not a collapse.
    tracker = AlertTracker()
    tracker.check(1, [0], {"dataset_entropy": [0.9], "nonfinite": [0.0]})
    for step in (2, 3, 4):
        alerts = tracker.check(step, [0], {"dataset_entropy": [float("nan")], "nonfinite": [12.0]})
        assert not [a for a in alerts if a.startswith("collapse")]
    # A layer carrying an attention sink is not judged.
    tracker = AlertTracker()
    sink = {"dataset_entropy": [0.02], "effective_rank": [2.5], "massive_activation": [900.0], "nonfinite": [0.0]}
    assert [tracker.check(step, [0], sink) for step in (1, 2, 3)] == [[], [], []]


def _tiny_trained_probe_run(model, probe, hook_from_probe=None, hook=None, probes=4, **watch_options):
    """Probe ``model`` ``probes`` times; from probe number ``hook_from_probe`` on, ``hook`` rewrites a block."""
    watch = LayerWatch(probe, logdir=None, metrics="light", strict=True, **watch_options)
    records, handle = [], None
    for number in range(probes):
        if hook is not None and number == hook_from_probe:
            handle = hook()
        records.append(watch.run(model, number + 1))
    if handle is not None:
        handle.remove()
    return records


def _replace_block_output(block, replace):
    def forward_hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = replace(hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return lambda: block.register_forward_hook(forward_hook)


@pytest.mark.parametrize("injection", ["constant", "rank1"])
def test_an_injected_collapse_alerts_within_two_probes(injection):
    torch.manual_seed(0)
    model = tiny_model("gpt2", layers=3)
    block = model.transformer.h[1]  # its output is layer 2
    direction = torch.randn(32)
    if injection == "constant":
        replace = lambda h: direction.expand_as(h).clone()  # noqa: E731
    else:  # every token on one line: (h . u) u
        unit = direction / direction.norm()
        replace = lambda h: (h @ unit)[..., None] * unit  # noqa: E731
    records = _tiny_trained_probe_run(model, make_probe(prompts=12, views=0), 1, _replace_block_output(block, replace))
    assert _collapse_alerts(records[:2]) == []  # healthy first probe, then one probe at the floor
    alerted = {a.split(" at layer ")[1].split()[0] for _, a in _collapse_alerts(records[2:3])}
    assert "2" in alerted, records[2].alerts  # the second probe of the collapsed block raises it
    if injection == "rank1":
        # float32 hidden states are reduced with float32 products (issue 12): agreement to 1e-4, not 1e-6
        assert records[2].metrics["effective_rank"][2] == pytest.approx(1.0, abs=1e-4)


def test_a_massive_activation_on_the_first_token_does_not_alarm():
    """An attention sink injected from block 1 on (token 0 gets a norm 1000x the median): dataset entropy falls below
    the floor there, as in real LLMs, yet no collapse alert, because massive_activation marks the sink."""
    torch.manual_seed(0)
    model = tiny_model("llama", layers=3, hidden=64)
    direction = torch.randn(64)
    direction /= direction.norm()

    def add_writer(h):
        h = h.clone()
        h[:, 0] += 1000 * h.norm(dim=-1).median() * direction
        return h

    hooks = [_replace_block_output(block, add_writer) for block in model.model.layers[1:]]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY_VOCAB, (24, 20), generator=generator)
    ids[:, 0] = 1  # the same first token, like a BOS
    lengths = torch.randint(8, 21, (24,), generator=generator)
    mask = (torch.arange(20)[None] < lengths[:, None]).long()
    probe = layerwatch.Probe.from_tensors(ids, mask, vocab_size=TINY_VOCAB, views=0)
    handles = [hook() for hook in hooks]
    records = _tiny_trained_probe_run(model, probe, probes=4)
    for handle in handles:
        handle.remove()
    assert _collapse_alerts(records) == []
    last = records[-1].metrics
    sink_layers = [layer for layer in (2, 3) if last["massive_activation"][layer] >= 100]
    assert sink_layers == [2, 3] and last["massive_activation"][1] < 10
    assert min(last["dataset_entropy"][layer] for layer in sink_layers) < 0.05  # would look collapsed


def test_a_blown_up_learning_rate_alerts_within_two_probes():
    """AdamW at lr=30 on a tiny Llama: the deeper layers' dataset entropy sinks to the floor and stays there (finite
    activations, no NaN); the alert comes at the first or second probe of that state."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", layers=3, hidden=32))
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(1, TINY_VOCAB, (256, 24), generator=generator)
    probe = layerwatch.Probe.from_tensors(data[:24], vocab_size=TINY_VOCAB, views=0)
    watch = LayerWatch(probe, logdir=None, metrics="light", every=4, log_spaced_start=False, strict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=30.0)
    records = []
    for step in range(1, 33):
        batch = data[torch.randint(0, 256, (8,), generator=generator)]
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record = watch.step(model, step)
        if record is not None:
            records.append(record)
    if any(sum(r.metrics["nonfinite"]) for r in records):
        # The run is chaotic: on some CPUs (this one since late 2026) the same seeds overflow to NaN by step 4
        # instead of settling at the floor, with or without layerwatch. Then there is no collapse to alert on;
        # the injected-collapse tests above cover the rule.
        pytest.skip("AdamW at lr=30 overflowed on this CPU instead of collapsing (non-finite activations)")
    deepest = len(records[0].layers) - 1
    at_floor = [r.metrics["dataset_entropy"][deepest] <= 0.05 or r.metrics["effective_rank"][deepest] <= 1.5
                for r in records]
    first = next(k for k in range(len(records)) if all(at_floor[k:]))  # from here on it stays collapsed
    assert first < len(records) - 1, at_floor
    alerted = [k for k, r in enumerate(records) if any(a.startswith("collapse: ") and f"layer {deepest} " in a
                                                      for a in r.alerts)]
    assert alerted and alerted[0] <= first + 1, (alerted, at_floor)


def test_the_trainer_example_compresses_strongly_and_raises_no_collapse_alert(tmp_path):
    """examples/trainer_pretraining.py to step 50: at step 25 the old relative-drop rule raised seven false alerts
    (mid-depth entropies fall by 70-80% while the loss falls). Now: no collapse alert, though the compression is
    there."""
    import os
    import subprocess
    import sys

    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                           "trainer_pretraining.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, example, "--out", str(tmp_path / "out"), "--steps", "50"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run = layerwatch.read_run(tmp_path / "out" / "layerwatch")
    assert 25 in run.steps.tolist() and run.steps[-1] == 50
    entropy = run.metric("dataset_entropy")
    assert (entropy[-1, 1:] < 0.5 * entropy[0, 1:]).any()  # strong compression happened
    assert _collapse_alerts(run.records) == []


# ---------------------------------------------------------------------------------------------------- several runs


@pytest.mark.parametrize("kind", ["jsonl", "tensorboard-only"])
def test_a_folder_with_several_runs_is_never_merged(tmp_path, kind, capsys):
    from layerwatch.cli import report  # the front end (add_arguments, main)
    from layerwatch.rundir.runs import SeveralRunsError, find_runs

    jsonl = kind == "jsonl"
    live = monitored_run(tmp_path / "out" / "layerwatch", layers=3, steps=[1, 2, 4], jsonl=jsonl)
    post_hoc = monitored_run(tmp_path / "out" / "layerwatch-trajectory", layers=4, steps=[2, 3], jsonl=jsonl)
    (tmp_path / "out" / "runs").mkdir()  # the Trainer's own TensorBoard logs are not a layerwatch run
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "out" / "runs")) as writer:
        writer.add_scalar("train/loss", 1.0, 1)
    assert find_runs(tmp_path / "out") == [live, post_hoc]
    with pytest.raises(SeveralRunsError) as caught:
        layerwatch.read_run(tmp_path / "out")
    assert str(live) in str(caught.value) and str(post_hoc) in str(caught.value)
    assert caught.value.runs == [live, post_hoc]
    # Each one reads on its own, with its own steps and layers.
    assert layerwatch.read_run(live).steps.tolist() == [1, 2, 4] and len(layerwatch.read_run(live).layers) == 3
    assert layerwatch.read_run(post_hoc).steps.tolist() == [2, 3] and len(layerwatch.read_run(post_hoc).layers) == 4
    # The report refuses too, naming both, and writes nothing.
    parser = __import__("argparse").ArgumentParser()
    report.add_arguments(parser)
    assert report.main(parser.parse_args([str(tmp_path / "out")])) == 2
    err = capsys.readouterr().err
    assert "2 layerwatch runs" in err and str(live) in err and str(post_hoc) in err
    assert not (tmp_path / "out" / "report.html").exists()


def test_a_folder_holding_one_run_reads_that_run_and_says_so(tmp_path, caplog):
    run_dir = monitored_run(tmp_path / "out" / "layerwatch", layers=3, steps=[1, 2])
    with caplog.at_level(logging.INFO, logger="layerwatch"):
        run = layerwatch.read_run(tmp_path / "out")
    assert run.logdir == run_dir and run.steps.tolist() == [1, 2]
    assert any(str(run_dir) in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ resume, every preset


def _trainer(out, callbacks, *, steps=4):
    ids = torch.randint(1, TINY_VOCAB, (32, 12), generator=torch.Generator().manual_seed(0))
    return tiny_trainer(out, callbacks, train_dataset=[{"input_ids": row, "labels": row} for row in ids],
                        max_steps=steps, save_steps=2, save_strategy="steps", logging_strategy="no")


@pytest.mark.parametrize("preset", ["light", "standard", "paper"])
def test_resume_works_for_every_preset_with_the_trainer_and_trajectory(tmp_path, preset, caplog, trainer_can_resume):
    """The probe a run saves may hold more views than the one the user passes (16 for "paper"): the series is the
    prompts and the views the preset uses, so resuming (Trainer) and continuing (trajectory) work, silently."""
    from layerwatch.integrations.hf_trainer import LayerWatchCallback
    from layerwatch.analysis.trajectory import TrajectoryError, run_trajectory

    probe = make_probe(views=2)  # what Probe.from_texts gives by default
    out = tmp_path / "out"

    def callback():
        return LayerWatchCallback(every=2, probe=probe, metrics=preset, batch_size=8)

    _trainer(out, [callback()]).train()
    saved = layerwatch.Probe.load(out / "layerwatch" / "probe.safetensors")
    assert len(saved.views) == {"light": 2, "standard": 2, "paper": 16}[preset]
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        _trainer(out, [callback()]).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert not [r for r in caplog.records if "differs" in r.getMessage()], caplog.text
    assert layerwatch.read_run(out / "layerwatch").steps.tolist() == [1, 2, 4]

    trajectory = tmp_path / "trajectory"
    first = run_trajectory([out / "checkpoint-2"], probe=probe, out=trajectory, metrics=preset)
    assert first.steps.tolist() == [2]
    assert len(layerwatch.Probe.load(trajectory).views) == len(saved.views)
    again = run_trajectory([out], probe=probe, out=trajectory, metrics=preset)  # continue its own output
    assert again.steps.tolist() == [2, 4]
    # What does define the series still counts: other prompts are refused; another seed only where views are used.
    with pytest.raises(TrajectoryError, match="different probe"):
        run_trajectory([out], probe=make_probe(views=2, seed=5), out=trajectory, metrics=preset)
    reseeded = layerwatch.Probe.from_tensors(probe.input_ids, probe.attention_mask, vocab_size=TINY_VOCAB, seed=9)
    (tmp_path / "more").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "more" / name).write_bytes((out / "checkpoint-4" / name).read_bytes())
    if preset == "light":
        assert run_trajectory([tmp_path / "more"], probe=reseeded, out=trajectory, metrics=preset, steps=[6]).steps[-1] == 6
    else:
        with pytest.raises(TrajectoryError, match="different probe"):
            run_trajectory([tmp_path / "more"], probe=reseeded, out=trajectory, metrics=preset, steps=[6])


# ------------------------------------------------------------------------------------------ one live writer, no loss

_HOLDER = r"""
import sys, os, torch
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import layerwatch
from layerwatch.monitor import LayerWatch
from models import TINY_VOCAB
ids = torch.randint(1, TINY_VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
watch = LayerWatch(layerwatch.Probe.from_tensors(ids, vocab_size=TINY_VOCAB, views=0), logdir=sys.argv[1],
                   metrics="light")
print("READY", os.getpid(), flush=True)
sys.stdin.read()  # hold the directory until the parent closes our stdin (or kills us)
watch.close()
"""


def _start_holder(logdir):
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(logdir)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = child.stdout.readline()
    assert line.startswith("READY"), line
    return child, int(line.split()[1])


def test_a_second_process_is_refused_while_the_first_writes_and_takes_over_a_stale_lock(tmp_path, caplog):
    import signal
    import socket

    logdir = tmp_path / "run"
    child, pid = _start_holder(logdir)
    try:
        model = tiny_model("gpt2")
        # A fresh Trainer-style start (resume_step=-1) used to truncate the live run's records: now it is refused.
        for options in ({}, {"resume_step": -1}, {"tensorboard": False}):
            with pytest.raises(ValueError) as caught:
                LayerWatch(make_probe(), logdir=logdir, **options)
            message = str(caught.value)
            assert str(logdir) in message and f"pid {pid}" in message and socket.gethostname() in message
        child.kill()  # a writer that dies without closing: its lock is stale
        child.wait()
        with caplog.at_level(logging.WARNING, logger="layerwatch"):
            watch = LayerWatch(make_probe(), logdir=logdir, metrics="light")
        assert any("gone" in r.getMessage() and f"pid {pid}" in r.getMessage() for r in caplog.records)
        assert watch.run(model, 1) is not None
        watch.close()
        assert not (logdir / "layerwatch.lock").exists()  # released on close
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()


def test_a_writer_that_closes_hands_the_directory_over(tmp_path):
    logdir = tmp_path / "run"
    child, _ = _start_holder(logdir)
    child.stdin.close()  # the child closes its LayerWatch and exits
    child.wait()
    LayerWatch(make_probe(), logdir=logdir).close()


def test_a_fresh_run_over_a_finished_run_keeps_it_under_a_clear_name(tmp_path, caplog):
    logdir = tmp_path / "out" / "layerwatch"
    model = tiny_model("gpt2")
    with LayerWatch(make_probe(), logdir=logdir, metrics="light") as watch:
        for step in (1, 2, 4):
            watch.run(model, step)
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        with LayerWatch(make_probe(), logdir=logdir, metrics="light", resume_step=-1) as watch:  # start over
            watch.run(model, 1)
    kept = sorted((tmp_path / "out").glob("layerwatch.previous-*"))
    assert len(kept) == 1
    assert layerwatch.read_run(kept[0]).steps.tolist() == [1, 2, 4]  # nothing deleted
    assert list(kept[0].glob("all_layers/events.out.tfevents.*")) and (kept[0] / "probe.safetensors").is_file()
    assert layerwatch.read_run(logdir).steps.tolist() == [1]
    assert len(list(logdir.glob("all_layers/events.out.tfevents.*"))) == 1
    warning = [r.getMessage() for r in caplog.records if "finished run" in r.getMessage()]
    assert len(warning) == 1 and str(kept[0]) in warning[0] and "nothing was deleted" in warning[0]


# ------------------------------------------------------------------------------------------------------ disk faults


class _BrokenDisk(layerwatch.rundir.writers.Writer):
    """A writer whose disk went bad: every write raises the OSError of a full (ENOSPC) or read-only (EROFS) disk."""

    def __init__(self, code=None):
        import errno

        self.code = errno.ENOSPC if code is None else code
        self.closed = False

    def write(self, record):
        raise OSError(self.code, os.strerror(self.code))

    def close(self):
        self.closed = True


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"])
def test_a_failing_writer_is_counted_apart_from_probe_failures_and_never_raises(tmp_path, caplog, code):
    import errno

    model = tiny_model("gpt2")
    broken = _BrokenDisk(getattr(errno, code))
    watch = LayerWatch(make_probe(), logdir=tmp_path / "run", metrics="light", writers=[broken], every=1)
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        records = [watch.step(model, step) for step in (1, 2, 3)]
    watch.close()
    assert all(r is not None for r in records)  # the probes computed fine: not failed probes
    assert watch.error_count == 0 and watch.writer_error_count == 1 and broken.closed
    warnings = [r.getMessage() for r in caplog.records if "writer" in r.getMessage()]
    assert len(warnings) == 1 and "_BrokenDisk" in warnings[0] and os.strerror(broken.code) in warnings[0]
    assert layerwatch.read_run(tmp_path / "run").steps.tolist() == [1, 2, 3]  # the other writers kept writing
    strict = LayerWatch(make_probe(), logdir=None, metrics="light", writers=[_BrokenDisk(broken.code)], strict=True)
    with pytest.raises(OSError, match=os.strerror(broken.code)):
        strict.run(model, 1)


def _mount_tmpfs(path, size):
    import subprocess

    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _fill(path):
    """Write zeros to ``path`` until its file system is full."""
    try:
        with open(path, "wb") as handle:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
    except OSError:
        pass


def _unmount(path):
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_logdir_mid_run_never_reaches_trainer_train(tmp_path, caplog):
    """A real tiny tmpfs (needs root; else skipped: the simulated OSError test above covers the same path) fills up
    in the middle of a Trainer run. (A read-only remount is refused while files are open for writing, so the
    read-only case is the simulated EROFS above.)"""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from layerwatch.integrations.hf_trainer import LayerWatchCallback

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "32m"):
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        class Fault(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step != 3:
                    return
                _fill(disk / "filler")

        ids = torch.randint(1, TINY_VOCAB, (64, 16), generator=torch.Generator().manual_seed(0))
        dataset = [{"input_ids": row, "labels": row} for row in ids]
        watcher = LayerWatchCallback(every=2, probe=make_probe(views=0), metrics="light", logdir=str(disk / "run"))
        args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4,
                                 use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                                 disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=tiny_model("gpt2"), args=args, train_dataset=dataset, callbacks=[Fault(), watcher])
        with caplog.at_level(logging.WARNING, logger="layerwatch"):
            trainer.train()  # must not raise
        assert trainer.state.global_step == 8
        messages = [r.getMessage() for r in caplog.records]
        assert any("writer" in m and "No space left" in m for m in messages), messages
        assert not any("probe at step" in m and "failed" in m for m in messages)  # no probe counted as failed
        steps = layerwatch.read_run(disk / "run").steps.tolist()
        assert steps[:2] == [1, 2]  # what was written before the fault is intact
        assert not (disk / "run" / "layerwatch.lock").exists()
        # The guard was released: a new run works in the same process (another directory, and this one).
        LayerWatch(make_probe(), logdir=tmp_path / "elsewhere").close()
    finally:
        _unmount(disk)


def test_the_demo_never_replaces_an_output_that_is_still_being_written(tmp_path):
    import subprocess
    import sys

    from layerwatch.cli.demo import MARKER_FILE

    out = tmp_path / "demo"
    out.mkdir()
    (out / MARKER_FILE).write_text("")  # a previous demo's output, which the demo may replace...
    child, pid = _start_holder(out / "layerwatch")  # ...but that demo is still writing
    try:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-m", "layerwatch.cli", "demo", "--out", str(out), "--steps", "1"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 2 and f"pid {pid}" in done.stderr, done.stderr
        assert (out / "layerwatch" / "layerwatch.jsonl").exists() and (out / MARKER_FILE).exists()
    finally:
        child.kill()
        child.wait()


def test_when_the_run_directory_writers_die_the_directory_is_released(tmp_path):
    """The disk fills up under an open monitor: its JSONL and TensorBoard writers die, and with them its claim on the
    directory, so (space freed) a new monitor can take the directory in the same process."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "32m"):
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        model = tiny_model("gpt2")
        watch = LayerWatch(make_probe(), logdir=disk / "run", metrics="light")
        assert watch.run(model, 1) is not None
        _fill(disk / "filler")
        for step in range(2, 6):
            assert watch.run(model, step) is not None  # the probes still compute
        assert watch.error_count == 0 and watch.writer_error_count >= 2
        assert not (disk / "run" / "layerwatch.lock").exists()
        (disk / "filler").unlink()
        LayerWatch(make_probe(), logdir=disk / "run", metrics="light").close()  # not refused: the claim is gone
        watch.close()
    finally:
        _unmount(disk)


def test_crafted_jsonl_lines_are_skipped_not_a_traceback(tmp_path, capsys):
    from layerwatch.cli import report  # the front end (add_arguments, main)

    run_dir = tmp_path / "run"
    with LayerWatch(make_probe(), logdir=run_dir, metrics="light") as watch:
        watch.run(tiny_model("gpt2"), 1)
    with open(run_dir / "layerwatch.jsonl", "a") as handle:
        handle.write('{"step": 2, "layers": [0], "metrics": [1, 2]}\n')  # metrics must be an object
        handle.write('{"step": 3, "layers": "abc", "metrics": {}}\n')
        handle.write('[1, 2, 3]\n')
    assert layerwatch.read_run(run_dir).steps.tolist() == [1]
    parser = __import__("argparse").ArgumentParser()
    report.add_arguments(parser)
    assert report.main(parser.parse_args([str(run_dir)])) == 0

# Trainer runs, subprocesses and real disk faults: out of the quick loop (`-m "not slow"`).
pytestmark = pytest.mark.slow
