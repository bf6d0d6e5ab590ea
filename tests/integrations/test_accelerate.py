"""The Accelerate integration with a real single-process ``Accelerator(cpu=True)``.

Multi-process behaviour (DDP, FSDP) is covered by tests/test_distributed.py.
"""

from __future__ import annotations

import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow  # real training loops

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from helpers import random_probe  # noqa: E402
from models import TINY_VOCAB, tiny_model  # noqa: E402

import layerwatch  # noqa: E402
from layerwatch import Probe  # noqa: E402
from layerwatch.integrations.accelerate_loop import (  # noqa: E402
    LayerWatchAccelerate,
    default_logdir,
    resolve_probe_module,
)

FLAT_TAG = "layerwatch/rms/layer_00"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; give every test a clean Accelerator."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def probe() -> Probe:
    return random_probe(prompts=6, length=10, views=2, lengths=[10, 7, 10, 10, 5, 10])  # rows 1 and 4 padded


def batches(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY_VOCAB, (4, 12), generator=generator) for _ in range(count)]


def prepared(accelerator: Accelerator, seed: int = 0, dropout: float = 0.1):
    model = tiny_model("gpt2", seed=seed, dropout=dropout).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return accelerator.prepare(model, optimizer)


def train(accelerator, model, optimizer, data, watch=None, calls_per_iteration: int = 1, explicit: bool = False):
    """A standard Accelerate loop; returns the per-micro-batch losses and the records the watch returned."""
    losses, records, completed = [], [], 0
    for ids in data:
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(float(loss.detach()))
        if accelerator.sync_gradients:
            completed += 1
        if watch is not None:
            for _ in range(calls_per_iteration):
                record = watch.step(step=completed) if explicit else watch.step()
                if record is not None:
                    records.append(record)
    return losses, records


def jsonl_steps(logdir) -> list[int]:
    with open(os.path.join(logdir, "layerwatch.jsonl")) as handle:
        return [json.loads(line)["step"] for line in handle if line.strip()]


def event_scalars(directory) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def event_files(directory) -> list[str]:
    return glob.glob(os.path.join(str(directory), "events.out.tfevents.*"))


def test_configured_tensorboard_tracker_receives_flat_keys(tmp_path, probe):
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("exp")
    model, optimizer = prepared(accelerator)
    watch = LayerWatchAccelerate(accelerator, model, probe, every=2, metrics="light", batch_size=4)
    assert watch.module is model  # single process: nothing to unwrap
    _, records = train(accelerator, model, optimizer, batches(4), watch)
    watch.close()
    accelerator.end_training()

    assert [r.step for r in records] == [1, 2, 4]
    tracker_scalars = event_scalars(tmp_path / "exp")
    expected_tags = set(records[-1].flat_scalars())
    assert FLAT_TAG in expected_tags
    assert expected_tags <= set(tracker_scalars), sorted(expected_tags - set(tracker_scalars))[:5]
    assert tracker_scalars[FLAT_TAG] == [1, 2, 4]
    # layerwatch's own run is written too, in its own folder: the JSONL, and its rich TensorBoard run (one run per
    # layer, beside the trackers' flat charts).
    logdir = default_logdir(accelerator)
    assert logdir == os.path.join(str(tmp_path), "layerwatch")
    run = layerwatch.read_run(logdir)
    assert list(run.steps) == [1, 2, 4]
    assert event_scalars(os.path.join(logdir, "layer_00"))["layerwatch/rms"] == [1, 2, 4]
    assert not glob.glob(os.path.join(str(tmp_path), "exp", "layer_*"))  # nothing of it in the tracker's folder


def test_tensorboard_false_leaves_out_layerwatchs_own_tensorboard_run(tmp_path, probe):
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("exp")
    model, optimizer = prepared(accelerator)
    with LayerWatchAccelerate(accelerator, model, probe, every=2, metrics="light", tensorboard=False) as watch:
        train(accelerator, model, optimizer, batches(2), watch)
    accelerator.end_training()
    logdir = tmp_path / "layerwatch"
    assert jsonl_steps(logdir) == [1, 2]
    assert glob.glob(str(logdir / "**" / "events.out.tfevents.*"), recursive=True) == []
    assert FLAT_TAG in event_scalars(tmp_path / "exp")  # the trackers still get the scalars


def test_without_trackers_falls_back_to_own_tensorboard_writer(tmp_path, probe):
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path / "proj"))
    model, optimizer = prepared(accelerator)
    with LayerWatchAccelerate(accelerator, model, probe, every=2, metrics="light", batch_size=4) as watch:
        train(accelerator, model, optimizer, batches(3), watch)
    logdir = tmp_path / "proj" / "layerwatch"
    assert len(event_files(logdir / "all_layers")) == 1 and len(event_files(logdir / "layer_00")) == 1
    scalars = event_scalars(logdir / "layer_00")  # layerwatch's own writer: one TensorBoard run per layer
    assert scalars["layerwatch/rms"] == [1, 2]
    assert jsonl_steps(logdir) == [1, 2]
    assert (logdir / "probe.safetensors").exists()


def test_explicit_logdir_and_no_project_dir(tmp_path, probe):
    accelerator = Accelerator(cpu=True)
    model, optimizer = prepared(accelerator)
    watch = LayerWatchAccelerate(accelerator, model, probe, every=1, metrics="light", logdir=tmp_path / "lw")
    train(accelerator, model, optimizer, batches(1), watch)
    watch.close()
    assert jsonl_steps(tmp_path / "lw") == [1]
    assert default_logdir(accelerator) == os.path.join("runs", "layerwatch")


def test_gradient_accumulation_counts_optimizer_steps_and_keeps_losses(tmp_path, probe):
    data = batches(9)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    torch.manual_seed(5)
    model, optimizer = prepared(accelerator)
    plain_losses, _ = train(accelerator, model, optimizer, data)

    torch.manual_seed(5)
    model, optimizer = prepared(accelerator)
    watch = LayerWatchAccelerate(accelerator, model, probe, every=2, logdir=tmp_path, metrics="standard", batch_size=4)
    watched_losses, records = train(accelerator, model, optimizer, data, watch)
    watch.close()

    assert watch.optimizer_step == 3  # 9 micro-batches / 3
    assert [r.step for r in records] == [1, 2]
    assert jsonl_steps(tmp_path) == [1, 2]
    assert watched_losses == plain_losses  # dropout is on: the probe must not touch the RNG or the modes
    assert model.training


def test_repeated_calls_for_the_same_step_are_ignored(tmp_path, probe):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer = prepared(accelerator)
    watch = LayerWatchAccelerate(accelerator, model, probe, every=1, logdir=tmp_path, metrics="light")
    _, records = train(accelerator, model, optimizer, batches(6), watch, calls_per_iteration=3, explicit=True)
    watch.close()
    assert [r.step for r in records] == [1, 2, 3]
    assert jsonl_steps(tmp_path) == [1, 2, 3]
    assert watch.optimizer_step == 3


def test_step_zero_baseline_then_implicit_counting(tmp_path, probe):
    accelerator = Accelerator(cpu=True)
    model, optimizer = prepared(accelerator)
    watch = LayerWatchAccelerate(
        accelerator, model, probe, every=2, logdir=tmp_path, metrics="light", probe_at_start=True
    )
    assert watch.step(step=0) is not None  # before the loop: weights at initialisation
    train(accelerator, model, optimizer, batches(2), watch)
    watch.close()
    assert jsonl_steps(tmp_path) == [0, 1, 2]


def test_save_state_and_load_state_resume_the_schedule(tmp_path, probe):
    project = tmp_path / "proj"
    data = batches(6)
    checkpoint = tmp_path / "ckpt"

    # The interrupted run: 5 optimizer steps, a checkpoint after step 3.
    accelerator = Accelerator(cpu=True, project_dir=str(project))
    model, optimizer = prepared(accelerator)
    watch = LayerWatchAccelerate(accelerator, model, probe, every=2, metrics="light")
    for index, ids in enumerate(data[:5], start=1):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        watch.step()
        if index == 3:
            accelerator.save_state(str(checkpoint))
    watch.close()
    logdir = project / "layerwatch"
    assert jsonl_steps(logdir) == [1, 2, 4]
    assert watch.state_dict()["optimizer_step"] == 5

    # The resumed run: a new process would build everything again, then load_state.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, project_dir=str(project))
    model, optimizer = prepared(accelerator)
    watch = LayerWatchAccelerate(accelerator, model, probe, every=2, metrics="light")
    accelerator.load_state(str(checkpoint))
    assert watch.optimizer_step == 3
    records = []
    for ids in data[3:]:
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        record = watch.step()
        if record is not None:
            records.append(record.step)
    watch.close()
    assert watch.optimizer_step == 6
    assert records == [4, 6]
    # The interrupted run's step-4 record is replaced, not duplicated.
    assert jsonl_steps(logdir) == [1, 2, 4, 6]
    assert list(layerwatch.read_run(logdir).steps) == [1, 2, 4, 6]


def test_register_for_checkpointing_can_be_disabled(tmp_path, probe):
    accelerator = Accelerator(cpu=True)
    model, _ = prepared(accelerator)
    LayerWatchAccelerate(accelerator, model, probe, logdir=tmp_path, register_for_checkpointing=False)
    assert accelerator._custom_objects == []
    watch = LayerWatchAccelerate(accelerator, model, probe, logdir=tmp_path)
    assert accelerator._custom_objects == [watch]


def test_state_dict_round_trip_before_the_first_probe(tmp_path, probe):
    accelerator = Accelerator(cpu=True)
    model, _ = prepared(accelerator)
    watch = LayerWatchAccelerate(accelerator, model, probe, logdir=tmp_path, register_for_checkpointing=False)
    state = watch.state_dict()
    assert state["optimizer_step"] == 0
    other = LayerWatchAccelerate(accelerator, model, probe, logdir=tmp_path, register_for_checkpointing=False)
    other.load_state_dict({**state, "optimizer_step": 7})
    assert other.optimizer_step == 7
    with pytest.raises(ValueError, match="optimizer_step"):
        other.load_state_dict({"nope": 1})


def test_bad_arguments(tmp_path, probe):
    accelerator = Accelerator(cpu=True)
    model, _ = prepared(accelerator)
    for every in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="every"):
            LayerWatchAccelerate(accelerator, model, probe, every=every, logdir=tmp_path)
    with pytest.raises(TypeError, match="unknown LayerWatch option.*n_layers"):
        LayerWatchAccelerate(accelerator, model, probe, logdir=tmp_path, n_layers=3)
    with pytest.raises(TypeError, match="layerwatch.Probe"):
        LayerWatchAccelerate(accelerator, model, ["some text"], logdir=tmp_path)
    watch = LayerWatchAccelerate(accelerator, model, probe, logdir=tmp_path, register_for_checkpointing=False)
    assert watch.last_probed_step is None
    with pytest.raises(ValueError, match="step"):
        watch.step(step=-1)


def test_probe_given_as_a_saved_file(tmp_path, probe):
    probe.save(tmp_path / "probe.safetensors")
    accelerator = Accelerator(cpu=True)
    model, optimizer = prepared(accelerator)
    watch = LayerWatchAccelerate(accelerator, model, str(tmp_path / "probe.safetensors"), every=1,
                                 logdir=tmp_path / "run", metrics="light")
    assert watch.probe.content_hash == probe.content_hash
    train(accelerator, model, optimizer, batches(1), watch)
    watch.close()
    assert watch.last_probed_step == 1


def test_resolve_probe_module_per_backend():
    accelerator = Accelerator(cpu=True)
    model = tiny_model("gpt2")
    assert accelerator.distributed_type == DistributedType.NO
    assert resolve_probe_module(accelerator, model) is model
    compiled = torch.compile(model, backend="eager")
    assert resolve_probe_module(accelerator, compiled) is model  # compile stripped (the monitor runs eagerly)

    ddp_like = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, parallelism_config=None,
                               unwrap_model=accelerator.unwrap_model)
    wrapper = torch.nn.DataParallel(model)  # unwrapped by the same code path as DDP
    assert resolve_probe_module(ddp_like, wrapper) is model

    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False, parallelism_config=None)
    with pytest.raises(ValueError, match="FullyShardedDataParallel root"):
        resolve_probe_module(fsdp1, model)
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True, parallelism_config=None)
    with pytest.raises(ValueError, match="fully_shard"):
        resolve_probe_module(fsdp2, model)

    engine = object()
    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, parallelism_config=None)
    assert resolve_probe_module(deepspeed, engine) is engine

    tensor_parallel = SimpleNamespace(
        distributed_type=DistributedType.MULTI_GPU,
        parallelism_config=SimpleNamespace(tp_enabled=True, cp_enabled=False, sp_enabled=False),
    )
    with pytest.raises(ValueError, match="data parallelism only"):
        resolve_probe_module(tensor_parallel, model)
    xla = SimpleNamespace(distributed_type=DistributedType.XLA, parallelism_config=None)
    with pytest.raises(ValueError, match="XLA"):
        resolve_probe_module(xla, model)


def test_finish_probes_the_last_step_once(tmp_path, probe):
    accelerator = Accelerator(cpu=True)
    model, optimizer = prepared(accelerator)
    watch = LayerWatchAccelerate(accelerator, model, probe, every=2, logdir=tmp_path / "a", metrics="light")
    train(accelerator, model, optimizer, batches(3), watch)
    assert watch.finish().step == 3
    assert jsonl_steps(tmp_path / "a") == [1, 2, 3]

    watch = LayerWatchAccelerate(accelerator, model, probe, every=2, logdir=tmp_path / "b", metrics="light")
    train(accelerator, model, optimizer, batches(4), watch)
    assert watch.finish() is None  # step 4 was on the schedule
    assert jsonl_steps(tmp_path / "b") == [1, 2, 4]


def test_a_fresh_run_replaces_an_older_run_in_the_same_logdir(tmp_path, probe):
    for _ in range(2):
        accelerator = Accelerator(cpu=True)
        model, optimizer = prepared(accelerator)
        with LayerWatchAccelerate(accelerator, model, probe, every=1, logdir=tmp_path, metrics="light") as watch:
            train(accelerator, model, optimizer, batches(2), watch)
    assert jsonl_steps(tmp_path) == [1, 2]
