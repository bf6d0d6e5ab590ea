"""`layerwatch trajectory ORG/NAME --revisions ...` on a real Hugging Face cache layout built from tiny models
(``models--ORG--NAME/{blobs,refs,snapshots}``), run offline (HF_HUB_OFFLINE=1, HF_HUB_CACHE pointing at it)."""

from __future__ import annotations

import hashlib
import os
import string
import subprocess
import sys

import pytest
import torch
from models import tiny_config

from layerwatch import LayerWatch, read_run
from layerwatch.probe import Probe
from layerwatch.analysis.revisions import EXIT_SKIPPED, plan_revisions, revision_step
from layerwatch.analysis.trajectory import TrajectoryError, load_checkpoint

TEXTS = ["the cat sat on the mat", "a bird sang in the tree", "the sun rose over the hill", "she read a book"] * 2


def char_tokenizer(shift: int = 0):
    """A character-level fast tokenizer; ``shift`` rotates its ids (so two tokenizers give different ids)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set(string.ascii_lowercase + " .,"))
    alphabet = alphabet[shift:] + alphabet[:shift]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def add_revision(cache, repo, revision, model=None, *, pickle=False, tokenizer=None, tmp):
    """Store a revision as huggingface_hub does: files in blobs/<sha>, snapshots/<commit>/<name> -> symlinks,
    refs/<revision> holding the commit hash."""
    root = cache / f"models--{repo.replace('/', '--')}"
    staging = tmp / f"staging-{revision}"
    model.save_pretrained(staging)
    if pickle:  # what older suites publish: pytorch_model.bin only
        (staging / "model.safetensors").unlink()
        torch.save(model.state_dict(), staging / "pytorch_model.bin")
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in staging.iterdir():
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snapshot


def tiny(seed):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_config("gpt2", layers=2)).eval()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    cache = tmp / "cache"
    snapshots = {}
    for seed, revision in enumerate(("step100", "step200", "step500")):
        snapshots[revision] = add_revision(cache, "org/tiny", revision, tiny(seed), tokenizer=char_tokenizer(), tmp=tmp)
    add_revision(cache, "org/tiny", "step300", tiny(7), pickle=True, tokenizer=char_tokenizer(), tmp=tmp)
    texts = tmp / "prompts.txt"
    texts.write_text("\n".join(TEXTS))
    return {"cache": cache, "texts": texts, "snapshots": snapshots, "tmp": tmp}


def layerwatch_cmd(hub, *argv, offline=True):
    env = dict(os.environ, HF_HUB_CACHE=str(hub["cache"]), HF_HUB_OFFLINE="1" if offline else "0")
    argv = [sys.executable, "-m", "layerwatch.cli", "trajectory", *map(str, argv)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def test_revisions_offline_skip_missing_and_pickle_only_then_resume(hub, tmp_path):
    out = tmp_path / "run"
    done = layerwatch_cmd(
        hub, "org/tiny", "--revisions", "step200,step100,step300,step400", "--texts", hub["texts"],
        "--out", out, "--metrics", "light", "--dtype", "float32",
    )
    assert done.returncode == EXIT_SKIPPED, done.stderr
    assert "skipped revision step300" in done.stderr and "pickle" in done.stderr
    assert "skipped revision step400" in done.stderr and "step100" in done.stderr
    run = read_run(out)
    assert run.steps.tolist() == [100, 200]
    # The values are those of probing each revision's model directly with the run's probe.
    probe = Probe.load(out / "probe.safetensors")
    for step, revision in ((100, "step100"), (200, "step200")):
        model = load_checkpoint(hub["snapshots"][revision])
        with LayerWatch(probe, logdir=None, metrics="light") as watch:
            record = watch.run(model, step)
        got = run.metric("prompt_entropy")[run.steps.tolist().index(step)]
        assert got.tolist() == pytest.approx(record.metrics["prompt_entropy"], rel=1e-6)
    # Resume from a file: finished revisions are not probed again, a new one is, and nothing skipped -> 0.
    listing = tmp_path / "revisions.txt"
    listing.write_text("# the suite\nstep100\nstep200\n\nstep500  # newest\n")
    again = layerwatch_cmd(hub, "org/tiny", "--revisions-file", listing, "--texts", hub["texts"], "--out", out,
                           "--metrics", "light")
    assert again.returncode == 0, again.stderr
    assert "revision step500 (step 500)" in again.stderr and "revision step100 (step" not in again.stderr
    run = read_run(out)
    assert run.steps.tolist() == [100, 200, 500]
    # the second invocation continued the CKA comparison with the first revision's embeddings (kept in the run
    # directory); starting afresh would have compared step 500 with itself (exactly 1 everywhere)
    assert run.metric("cka_to_first")[0].tolist() == pytest.approx([1.0] * len(run.layers))
    assert run.metric("cka_to_first")[2].min() < 0.999


def test_tokenizer_comes_from_the_revision_unless_given(hub, tmp_path):
    other = tmp_path / "other-tokenizer"
    char_tokenizer(shift=5).save_pretrained(other)
    for out, tokenizer in ((tmp_path / "own", char_tokenizer()), (tmp_path / "given", char_tokenizer(shift=5))):
        extra = ["--tokenizer", other] if out.name == "given" else []
        done = layerwatch_cmd(hub, "org/tiny", "--revisions", "step100", "--texts", hub["texts"], "--out", out,
                              "--metrics", "light", *extra)
        assert done.returncode == 0, done.stderr
        probe = Probe.load(out / "probe.safetensors")
        first = tokenizer(TEXTS[0])["input_ids"]
        assert probe.input_ids[0, : len(first)].tolist() == first


def test_local_folder_in_cache_layout_with_explicit_steps(hub, tmp_path):
    folder = hub["cache"] / "models--org--tiny"
    commit = (folder / "refs" / "step200").read_text()
    probe = Probe.from_texts(TEXTS, char_tokenizer(), num_prompts=None)
    probe.save(tmp_path / "probe.safetensors")
    done = layerwatch_cmd(hub, folder, "--revisions", f"{commit},step100", "--steps", "7", "3",
                          "--probe", tmp_path / "probe.safetensors", "--out", tmp_path / "run", "--metrics", "light",
                          offline=False)  # a local folder never asks the Hub
    assert done.returncode == 0, done.stderr
    assert read_run(tmp_path / "run").steps.tolist() == [3, 7]


def test_revision_names_and_plan():
    assert revision_step("step143000") == 143000
    assert revision_step("step1000-tokens4B") == 1000
    assert revision_step("ckpt_100") == 100
    assert revision_step("main") is None and revision_step("stepper") is None
    assert [r.step for r in plan_revisions(["step20", "step3"])] == [3, 20]
    with pytest.raises(TrajectoryError, match="cannot tell the step of revision 'main'"):
        plan_revisions(["main"])
    with pytest.raises(TrajectoryError, match="one per revision"):
        plan_revisions(["a", "b"], [1])
    with pytest.raises(TrajectoryError, match="both have step 5"):
        plan_revisions(["step5", "ckpt_5"])
    with pytest.raises(TrajectoryError, match="no revisions"):
        plan_revisions([" "])


def test_a_revisions_run_without_probe_or_texts_continues_with_the_saved_probe(tmp_path):
    import argparse

    from layerwatch.analysis import revisions
    from layerwatch.rundir.files import PROBE_FILENAME

    args = argparse.Namespace(probe=None, texts=None)
    with pytest.raises(revisions.TrajectoryError, match="no probe"):
        revisions._probe_source(args, tmp_path)
    (tmp_path / PROBE_FILENAME).write_bytes(b"")
    assert revisions._probe_source(args, tmp_path) == tmp_path / PROBE_FILENAME
