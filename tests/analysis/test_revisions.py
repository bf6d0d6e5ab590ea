"""`layerwatch trajectory ORG/NAME --revisions ...` on a real Hugging Face cache layout built from tiny models
(``models--ORG--NAME/{blobs,refs,snapshots}``), run offline (HF_HUB_OFFLINE=1, HF_HUB_CACHE pointing at it)."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys

import pytest
import torch
import helpers
from models import tiny_config

from layerwatch import LayerWatch, read_run
from layerwatch.probe import Probe
from layerwatch.analysis.revisions import (
    EXIT_SKIPPED,
    check_revision_name,
    plan_revisions,
    resolve_revision,
    revision_step,
)
from layerwatch.analysis.trajectory import TrajectoryError, load_checkpoint

TEXTS = ["the cat sat on the mat", "a bird sang in the tree", "the sun rose over the hill", "she read a book"] * 2


# This file's character tokenizer: a small alphabet and no [BOS]; ``shift`` rotates its ids (so two tokenizers give
# different ids).
char_tokenizer = functools.partial(helpers.char_tokenizer, alphabet=helpers.SMALL_ALPHABET, bos=False)


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


def test_a_revisions_run_without_probe_or_texts_continues_with_the_saved_probe(hub, tmp_path):
    out = tmp_path / "run"
    first = layerwatch_cmd(hub, "org/tiny", "--revisions", "step100", "--out", out, "--metrics", "light")
    assert first.returncode == 2 and "no probe" in first.stderr and "Traceback" not in first.stderr
    assert not out.exists()  # a refused command leaves no empty folder behind
    assert layerwatch_cmd(hub, "org/tiny", "--revisions", "step100", "--texts", hub["texts"], "--out", out,
                          "--metrics", "light").returncode == 0
    again = layerwatch_cmd(hub, "org/tiny", "--revisions", "step100,step200", "--out", out, "--metrics", "light")
    assert again.returncode == 0, again.stderr
    assert read_run(out).steps.tolist() == [100, 200]


@pytest.mark.parametrize("name", ["../../elsewhere", "step1/../../x", "/etc", "..", "C:\\x", "a\\..\\b"])
def test_revision_names_that_are_paths_are_refused(name):
    with pytest.raises(TrajectoryError, match="not a branch, tag or commit name"):
        check_revision_name(name)
    with pytest.raises(TrajectoryError, match="not a branch, tag or commit name"):
        plan_revisions([name], [7])


def test_revision_path_traversal_never_loads_from_outside_the_cache(hub, tmp_path):
    """Issue 18 point 9: `--revisions ../../../elsewhere --steps 7` on a local cache folder loads nothing from outside
    it; nor does a ref file naming a commit that walks out, or a snapshot that is a symlink to elsewhere."""
    folder = hub["cache"] / "models--org--tiny"
    outside = tmp_path / "elsewhere"
    tiny(3).save_pretrained(outside)  # a loadable model outside the cache
    relative = os.path.relpath(outside, folder / "snapshots")
    probe = Probe.from_texts(TEXTS, char_tokenizer(), num_prompts=None)
    probe.save(tmp_path / "probe.safetensors")
    common = ("--probe", tmp_path / "probe.safetensors", "--metrics", "light")
    done = layerwatch_cmd(hub, folder, "--revisions", relative, "--steps", "7", "--out", tmp_path / "a", *common)
    assert done.returncode == 2, done.stderr
    assert "--revisions" in done.stderr or "revision" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    # a ref whose content walks out of snapshots/, and a snapshot symlinked to a folder outside the cache
    (folder / "refs" / "evil").write_text(relative)
    (folder / "snapshots" / "linked").symlink_to(outside, target_is_directory=True)
    for revision in ("evil", "linked"):
        done = layerwatch_cmd(hub, folder, "--revisions", revision, "--steps", "7", "--out", tmp_path / revision, *common)
        assert done.returncode == 2, done.stderr
        assert "outside" in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / revision).exists()
    with pytest.raises(TrajectoryError, match="inside the model's cache folder"):
        resolve_revision(str(folder), "evil")
    assert resolve_revision(str(folder), "step100") == hub["snapshots"]["step100"]


@pytest.mark.slow
def test_revisions_split_in_two_shards_equal_one_process(hub, tmp_path):
    """`--shard K/N` over revisions (issue 19 point 3): the pickle-only step300 is skipped by the shard that holds
    it, and the merged run equals a one-process replay, CKA across the shard boundary included."""
    import numpy as np

    names = ("--revisions", "step100,step200,step300,step500", "--texts", hub["texts"], "--metrics", "light")
    whole = layerwatch_cmd(hub, "org/tiny", *names, "--out", tmp_path / "whole", "--no-tensorboard")
    assert whole.returncode == EXIT_SKIPPED, whole.stderr
    codes = []
    for shard in ("2/2", "1/2"):
        done = layerwatch_cmd(hub, "org/tiny", *names, "--out", tmp_path / "split", "--shard", shard,
                              "--no-tensorboard")
        codes.append(done.returncode)
        assert done.returncode in (0, EXIT_SKIPPED), done.stderr
    assert codes == [EXIT_SKIPPED, 0]  # the second half holds step300
    one, split = read_run(tmp_path / "whole"), read_run(tmp_path / "split")
    assert one.steps.tolist() == split.steps.tolist() == [100, 200, 500]
    for metric in one.metrics:
        np.testing.assert_allclose(split.metric(metric), one.metric(metric), rtol=1e-6, atol=1e-6, err_msg=metric)
    assert np.isfinite(split.metric("cka_to_previous")[2]).all()

# Checkpoints, subprocesses and full HTML reports: out of the quick loop (`-m "not slow"`).
pytestmark = pytest.mark.slow
