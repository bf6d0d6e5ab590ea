"""``layerwatch trajectory`` on checkpoints saved by a short real Trainer run, and its errors.

The Trainer fixture trains a tiny GPT-2 (built from a config) for 6 steps with ``save_steps=2``: three
``checkpoint-<step>`` folders with safetensors weights, the optimizer/scheduler/RNG pickles a Trainer writes next to
them, and a character-level tokenizer (so ``--texts`` works without any download).
"""

import argparse
import json
import shutil

import pytest
import torch

from layerwatch import read_run

from layerwatch.analysis import trajectory
from layerwatch.cli import trajectory as trajectory_cli
from layerwatch.probe import Probe
from helpers import PNG_MAGIC, char_tokenizer, tiny_trainer
from models import TINY_VOCAB, tiny_config

TEXT = (
    "the cat sat on the mat. the dog sat on the log. a bird sang in the tree. the sun rose over the hill, and the "
    "farmer went out to the field. she read a book by the fire while the rain fell on the roof. "
) * 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Trainer output_dir with checkpoint-2, checkpoint-4 and checkpoint-6."""
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("trainer")
    tokenizer = char_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    block = 32
    rows = [ids[i : i + block] for i in range(0, len(ids) - block, block)]
    dataset = [
        {"input_ids": torch.tensor(r), "labels": torch.tensor(r), "attention_mask": torch.ones(block, dtype=torch.long)}
        for r in rows
    ]
    probe = Probe.from_tensors(torch.tensor(rows[:8]), vocab_size=TINY_VOCAB)
    probe_path = root / "probe.safetensors"
    probe.save(probe_path)
    callbacks = []
    try:  # the training-time run, to compare with the post-hoc one
        from layerwatch.integrations.hf_trainer import LayerWatchCallback

        callbacks.append(LayerWatchCallback(every=2, probe=probe, metrics="light"))
    except ImportError:  # pragma: no cover - the integration is tested in its own file
        pass
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config("gpt2", layers=2))
    tiny_trainer(
        root / "out", callbacks, model=model, train_dataset=dataset, processing_class=tokenizer,
        max_steps=6, save_steps=2, save_strategy="steps", logging_strategy="no",
    ).train()
    out = root / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    return {"out": out, "probe": probe_path, "root": root, "tokenizer": tokenizer}


def cli(*argv):
    parser = argparse.ArgumentParser()
    trajectory_cli.add_arguments(parser)
    return trajectory_cli.main(parser.parse_args([str(a) for a in argv]))


def jsonl_lines(run_dir):
    return (run_dir / "layerwatch.jsonl").read_text(encoding="utf-8").strip().splitlines()


def copy_checkpoint(source, target):
    """A checkpoint folder with only what loading needs (config + weights)."""
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, target / name)
    return target


def fake_checkpoint(folder, *, config=True, weights=False):
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    if weights:
        (folder / "model.safetensors").write_bytes(b"not really")
    return folder


# ----------------------------------------------------------------------------------------------------- discovery


def test_discovery_sorts_steps_numerically(tmp_path):
    for step in (10, 9, 100, 2):
        fake_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "runs").mkdir()  # Trainer's other folders are ignored
    (tmp_path / "checkpoint-final").mkdir()
    found = trajectory.discover_checkpoints([tmp_path])
    assert [c.step for c in found] == [2, 9, 10, 100]
    assert [c.name for c in found] == ["checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-100"]


def test_explicit_folders_take_their_step_from_name_state_or_flag(tmp_path):
    named = fake_checkpoint(tmp_path / "step300")
    stated = fake_checkpoint(tmp_path / "final")
    (stated / "trainer_state.json").write_text(json.dumps({"global_step": 42}))
    found = trajectory.discover_checkpoints([named, stated])
    assert [(c.name, c.step) for c in found] == [("final", 42), ("step300", 300)]

    unknown = fake_checkpoint(tmp_path / "mystery")
    with pytest.raises(trajectory.TrajectoryError, match="--steps"):
        trajectory.discover_checkpoints([unknown])
    found = trajectory.discover_checkpoints([unknown, named], steps=[7, 5])
    assert [(c.name, c.step) for c in found] == [("step300", 5), ("mystery", 7)]
    with pytest.raises(trajectory.TrajectoryError, match="one per folder"):
        trajectory.discover_checkpoints([unknown, named], steps=[7])
    with pytest.raises(trajectory.TrajectoryError, match="both have step"):
        trajectory.discover_checkpoints([unknown, named], steps=[5, 5])


def test_trainer_pickles_are_not_model_weights(trained):
    checkpoint = trained["out"] / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "training_args.bin").is_file()
    assert trajectory.pickle_weight_files(checkpoint) == []
    assert [p.name for p in trajectory.safe_weight_files(checkpoint)] == ["model.safetensors"]


# -------------------------------------------------------------------------------------------------- end to end


def test_trajectory_cli_resumes_and_reports(trained, tmp_path, capsys):
    from layerwatch.cli import report  # the front end (add_arguments, main)

    out_dir = tmp_path / "output_dir"
    shutil.copytree(trained["out"], out_dir)
    assert cli(out_dir, "--probe", trained["probe"], "--metrics", "light") == 0
    captured = capsys.readouterr()
    run_dir = out_dir / "layerwatch-trajectory"  # the default --out
    run = read_run(run_dir)
    assert run.steps.tolist() == [2, 4, 6]
    assert run.layers == [0, 1, 2]
    assert (run_dir / "probe.safetensors").is_file()
    assert list(run_dir.rglob("events.out.tfevents.*"))
    assert "changed most" in captured.out and "prompt_entropy" in captured.out
    assert "step 6" in captured.err
    assert len(jsonl_lines(run_dir)) == 3

    # Second invocation: nothing to do, nothing appended.
    assert cli(out_dir, "--probe", trained["probe"], "--metrics", "light") == 0
    assert "3 already in" in capsys.readouterr().err
    assert len(jsonl_lines(run_dir)) == 3

    # A new checkpoint appears (training went on): only it is probed. The probe defaults to the run's own.
    copy_checkpoint(out_dir / "checkpoint-6", out_dir / "checkpoint-8")
    assert cli(out_dir, "--metrics", "light") == 0
    assert "1 to probe" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in jsonl_lines(run_dir)] == [2, 4, 6, 8]
    run = read_run(run_dir)
    assert run.steps.tolist() == [2, 4, 6, 8]
    # checkpoint-8 holds the weights of checkpoint-6: the same model gives the same numbers
    entropy = run.metric("prompt_entropy")
    assert entropy[3] == pytest.approx(entropy[2], rel=1e-6)
    assert not (entropy[0] == entropy[2]).all()  # training changed something

    # The report of a trajectory run.
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.main(parser.parse_args([str(run_dir)])) == 0
    pictures = sorted((run_dir / "report").glob("*.png"))
    assert any(p.name == "heatmap_prompt_entropy.png" for p in pictures)
    assert any(p.name == "prompt_entropy_histograms.png" for p in pictures)
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pictures)
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(pictures)
    assert '<table class="numbers">' in page and "<th>8</th>" in page


def test_texts_probe_uses_the_checkpoint_tokenizer(trained, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat.\n\nthe dog sat on the log.\na bird sang in the tree.\n" * 3)
    out = tmp_path / "run"
    checkpoints = [trained["out"] / "checkpoint-4", trained["out"] / "checkpoint-2"]
    assert cli(*checkpoints, "--texts", texts, "--out", out, "--metrics", "light") == 0
    saved = Probe.load(out / "probe.safetensors")
    assert saved.num_prompts == 9
    assert read_run(out).steps.tolist() == [2, 4]
    # The same texts build the same probe: a rerun is a no-op, not a "different probe" error.
    assert cli(*checkpoints, "--texts", texts, "--out", out, "--metrics", "light") == 0
    assert "2 already in" in capsys.readouterr().err
    # An explicit --tokenizer works too.
    out2 = tmp_path / "run2"
    tokenizer_dir = tmp_path / "tok"
    trained["tokenizer"].save_pretrained(tokenizer_dir)
    assert cli(checkpoints[0], "--texts", texts, "--tokenizer", tokenizer_dir, "--out", out2, "--metrics", "light") == 0
    assert Probe.load(out2 / "probe.safetensors").content_hash == saved.content_hash


def test_pickle_weights_refused_unless_allowed(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    shutil.copy(trained["out"] / "checkpoint-2" / "config.json", folder / "config.json")
    state = load_file(str(trained["out"] / "checkpoint-2" / "model.safetensors"))
    torch.save(state, folder / "pytorch_model.bin")
    out = tmp_path / "run"
    assert cli(folder, "--probe", trained["probe"], "--out", out, "--metrics", "light") == 2
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and "pytorch_model.bin" in err and "arbitrary code" in err
    assert "Traceback" not in err
    assert not (out / "layerwatch.jsonl").exists()  # refused before anything was probed

    assert cli(folder, "--probe", trained["probe"], "--out", out, "--metrics", "light", "--allow-pickle") == 0
    assert read_run(out).steps.tolist() == [3]


def test_safetensors_index_naming_pickle_shards_is_refused(trained, tmp_path, capsys):
    """A model.safetensors.index.json whose weight_map names .bin shards makes transformers unpickle them: refused
    without --allow-pickle, like any pickle; an index of safetensors shards is still accepted."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(trained["out"] / "checkpoint-2" / "model.safetensors"))
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    shutil.copy(trained["out"] / "checkpoint-2" / "config.json", folder / "config.json")
    torch.save(state, folder / "shard-00001.bin")
    index = {"metadata": {}, "weight_map": {name: "shard-00001.bin" for name in state}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "run"
    assert cli(folder, "--probe", trained["probe"], "--out", out, "--metrics", "light") == 2
    err = capsys.readouterr().err
    assert "model.safetensors.index.json" in err and "--allow-pickle" in err and "Traceback" not in err
    assert not (out / "layerwatch.jsonl").exists()
    # An index escaping its folder, or one that does not parse, is not trusted either.
    for weight_map in ({name: "../elsewhere.safetensors" for name in state}, None):
        (folder / "model.safetensors.index.json").write_text("{" if weight_map is None else json.dumps({"weight_map": weight_map}))
        assert cli(folder, "--probe", trained["probe"], "--out", out, "--metrics", "light") == 2
        assert "--allow-pickle" in capsys.readouterr().err
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert cli(folder, "--probe", trained["probe"], "--out", out, "--metrics", "light", "--allow-pickle") == 0
    assert read_run(out).steps.tolist() == [5]

    safe = tmp_path / "checkpoint-7"
    safe.mkdir()
    shutil.copy(trained["out"] / "checkpoint-2" / "config.json", safe / "config.json")
    # metadata as transformers writes it (4.x refuses shards without it)
    save_file(state, str(safe / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    index["weight_map"] = {name: "model-00001-of-00001.safetensors" for name in state}
    (safe / "model.safetensors.index.json").write_text(json.dumps(index))
    assert trajectory.pickle_weight_files(safe) == []
    assert cli(safe, "--probe", trained["probe"], "--out", tmp_path / "run2", "--metrics", "light") == 0


def test_trajectory_reproduces_the_training_time_values(trained, tmp_path):
    """Post-hoc probing of checkpoint-k gives exactly what the Trainer callback logged at step k (same probe,
    same weights, same monitor), and without --probe the training run's probe is found and used."""
    training_run = trained["out"] / "layerwatch"
    if not (training_run / "layerwatch.jsonl").is_file():
        pytest.skip("the Trainer callback is not available")
    out = tmp_path / "run"
    assert cli(trained["out"], "--out", out, "--metrics", "light") == 0  # probe: <output_dir>/layerwatch/...
    during, after = read_run(training_run), read_run(out)
    assert set(after.steps.tolist()) <= set(during.steps.tolist())
    rows = [during.steps.tolist().index(s) for s in after.steps]
    for metric in ("prompt_entropy", "dataset_entropy", "curvature", "effective_rank", "rms"):
        assert after.metric(metric) == pytest.approx(during.metric(metric)[rows], rel=1e-5, abs=1e-6), metric


# ------------------------------------------------------------------------------------------------------ errors


def test_error_no_checkpoints(tmp_path, trained, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(empty, "--probe", trained["probe"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoints found" in err and "Traceback" not in err
    assert cli(tmp_path / "missing", "--probe", trained["probe"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_error_folder_without_weights(tmp_path, trained, capsys):
    folder = fake_checkpoint(tmp_path / "output" / "checkpoint-5")
    assert cli(folder.parent, "--probe", trained["probe"]) == 2
    err = capsys.readouterr().err
    assert "holds no model weights" in err and "checkpoint-5" in err


def test_error_probe_vocabulary_does_not_fit(tmp_path, trained, capsys):
    ids = torch.arange(900, 1000).reshape(4, 25)
    big = Probe.from_tensors(ids, vocab_size=1000)
    path = tmp_path / "big.safetensors"
    big.save(path)
    assert cli(trained["out"] / "checkpoint-2", "--probe", path, "--out", tmp_path / "run", "--metrics", "light") == 2
    err = capsys.readouterr().err
    assert "1000" in err and str(TINY_VOCAB) in err and "Traceback" not in err


def test_error_model_transformers_cannot_load(tmp_path, trained, capsys):
    folder = fake_checkpoint(tmp_path / "checkpoint-1", weights=True)  # garbage model.safetensors
    assert cli(folder, "--probe", trained["probe"], "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "transformers cannot load" in err and "Traceback" not in err
    (folder / "config.json").write_text("{not json")
    assert cli(folder, "--probe", trained["probe"], "--out", tmp_path / "run") == 2
    assert "cannot read the config" in capsys.readouterr().err


def test_failure_keeps_what_was_written_and_resumes(tmp_path, trained, capsys):
    out_dir = tmp_path / "output_dir"
    copy_checkpoint(trained["out"] / "checkpoint-2", out_dir / "checkpoint-2")
    broken = copy_checkpoint(trained["out"] / "checkpoint-4", out_dir / "checkpoint-4")
    good = broken.parent / "good-4"
    shutil.copytree(broken, good)
    (broken / "model.safetensors").write_bytes(b"truncated by a crash")
    run_dir = tmp_path / "run"
    assert cli(out_dir, "--probe", trained["probe"], "--out", run_dir, "--metrics", "light") == 2
    assert "checkpoint-4" in capsys.readouterr().err
    assert read_run(run_dir).steps.tolist() == [2]  # step 2 kept
    shutil.rmtree(broken)
    good.rename(broken)
    assert cli(out_dir, "--probe", trained["probe"], "--out", run_dir, "--metrics", "light") == 0
    assert read_run(run_dir).steps.tolist() == [2, 4]
    assert len(jsonl_lines(run_dir)) == 2


def test_error_different_probe_on_resume(tmp_path, trained, capsys):
    run_dir = tmp_path / "run"
    checkpoint = trained["out"] / "checkpoint-2"
    assert cli(checkpoint, "--probe", trained["probe"], "--out", run_dir, "--metrics", "light") == 0
    other_ids = torch.randint(3, 40, (4, 16), generator=torch.Generator().manual_seed(1))
    other = Probe.from_tensors(other_ids, vocab_size=TINY_VOCAB)
    other_path = tmp_path / "other.safetensors"
    other.save(other_path)
    assert cli(trained["out"] / "checkpoint-4", "--probe", other_path, "--out", run_dir) == 2
    assert "different probe" in capsys.readouterr().err


def test_missing_probe_is_a_clear_error(tmp_path, trained, capsys):
    assert cli(trained["out"] / "checkpoint-2", "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "--probe" in err and "--texts" in err


def test_encoder_checkpoint_loads_with_automodel(tmp_path, trained, capsys):
    """A BERT checkpoint (not a causal LM) loads with AutoModel and is probed like any other."""
    from models import tiny_model

    folder = tmp_path / "bert" / "checkpoint-7"
    tiny_model("bert").save_pretrained(folder)
    model = trajectory.load_checkpoint(folder)
    assert type(model).__name__ == "BertModel"
    assert cli(folder.parent, "--probe", trained["probe"], "--out", tmp_path / "run", "--metrics", "light") == 0
    assert read_run(tmp_path / "run").steps.tolist() == [7]


def test_through_the_layerwatch_command(trained, tmp_path, capsys):
    """`layerwatch trajectory` and `layerwatch report` as wired in layerwatch/cli.py, with bfloat16 weights."""
    from layerwatch.cli import main as layerwatch_main

    out = tmp_path / "run"
    argv = ["trajectory", str(trained["out"] / "checkpoint-6"), "--probe", str(trained["probe"]), "--out", str(out)]
    assert layerwatch_main(argv + ["--metrics", "light", "--dtype", "bfloat16", "--quiet"]) == 0
    assert read_run(out).steps.tolist() == [6]
    assert layerwatch_main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()

# Checkpoints, subprocesses and full HTML reports: out of the quick loop (`-m "not slow"`).
pytestmark = pytest.mark.slow
