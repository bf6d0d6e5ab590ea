"""Helpers shared by the test files: import them as ``from helpers import ...`` (tests/conftest.py and the torchrun
worker scripts put tests/ on sys.path), like the tiny models of tests/models.py.

- ``random_probe``: a tiny random probe (optionally padded, left or right);
- ``char_tokenizer``: a character-level fast tokenizer built offline;
- ``write_run``: a hand-written run directory in the JSONL format (no model), and ``run_report_cli``;
- ``monitored_run``: a real run directory written by ``LayerWatch`` on a tiny model;
- ``run_script``: an example script of examples/ run as a user runs it (a subprocess), failing with its output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from layerwatch.probe import Probe
from models import TINY_VOCAB, tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------------------ probes


def random_probe(
    prompts: int = 8,
    length: int = 16,
    views: int = 2,
    seed: int = 0,
    *,
    probe_seed: int | None = None,
    left_pad: bool = False,
    min_length: int | None = None,
    first_full: bool = False,
    lengths: Sequence[int] | None = None,
    vocab: int = TINY_VOCAB,
) -> Probe:
    """``prompts`` x ``length`` token ids drawn from ``1..vocab-1`` by a generator seeded with ``seed``.

    No padding unless ``min_length`` (each prompt's length drawn from ``min_length..length`` by the same generator,
    the first one kept full when ``first_full``) or explicit ``lengths`` are given; padded positions hold id 0, on
    the left when ``left_pad``. ``probe_seed`` (default ``seed``) seeds the probe's views.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (prompts, length), generator=generator)
    probe_seed = seed if probe_seed is None else probe_seed
    if lengths is None and min_length is None:
        return Probe.from_tensors(ids, vocab_size=vocab, views=views, seed=probe_seed)
    if lengths is None:
        lengths = torch.randint(min_length, length + 1, (prompts,), generator=generator)
        if first_full:
            lengths[0] = length
    else:
        lengths = torch.as_tensor(list(lengths))
    positions = torch.arange(length)[None, :]
    mask = positions >= (length - lengths[:, None]) if left_pad else positions < lengths[:, None]
    ids = torch.where(mask, ids, torch.zeros_like(ids))
    return Probe.from_tensors(ids, mask.long(), vocab_size=vocab, views=views, seed=probe_seed)


# -------------------------------------------------------------------------------------------------------- tokenizers

FULL_ALPHABET = string.ascii_lowercase + string.digits + " .,;:!?'-\n"
SMALL_ALPHABET = string.ascii_lowercase + " .,"


def char_tokenizer(shift: int = 0, *, alphabet: str = FULL_ALPHABET, bos: bool = True):
    """A character-level fast tokenizer (vocabulary well under the tiny model's 128 rows).

    Ids: ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2 when ``bos``, then the sorted ``alphabet``, rotated by ``shift``
    (so two tokenizers give different ids).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = sorted(set(alphabet))
    letters = letters[shift:] + letters[:shift]
    vocab = {"[PAD]": 0, "[UNK]": 1, **({"[BOS]": 2} if bos else {})}
    vocab.update({c: i + len(vocab) for i, c in enumerate(letters)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    special = {"bos_token": "[BOS]"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", **special)


# ------------------------------------------------------------------------------------------------------------- runs

STEPS = [0, 1, 2, 4, 8, 16, 100, 200, 300]
LAYERS = 7


def valley(step_index: int, layer: int) -> float:
    # A mid-depth valley that deepens over training, like Pythia's prompt entropy (notes §10.3).
    depth = layer / (LAYERS - 1)
    dip = 0.35 * (step_index / (len(STEPS) - 1)) * math.exp(-(((depth - 0.5) / 0.2) ** 2))
    return 0.9 - dip


def _per_prompt_rows(rng, entropy, last: bool) -> list[list[float | None]]:
    rows = []
    for layer in range(LAYERS):
        if layer in (2, 3, 4) and last:  # two modes in the middle at the end
            values = np.concatenate([rng.normal(0.3, 0.03, 20), rng.normal(0.8, 0.03, 20)])
        else:
            values = rng.normal(entropy[layer], 0.02, 40)
        rows.append([float(v) for v in np.clip(values, 0, 1)])
    rows[0][0] = None  # a prompt too short for the metric
    return rows


def write_run(
    logdir, *, steps=STEPS, with_per_prompt=True, nan_metric=False, settings=None, shift=None, stderr=None,
    extra=None,
):
    """A run directory in the JSONL format the monitor writes (one record per line), ``LAYERS`` layers.

    ``shift(step, layer)`` is added to prompt_entropy (to make a second run that differs by a known amount);
    ``stderr(step, layer)`` gives prompt_entropy's standard error (the record's ``"stderr"`` field, SPEC §8);
    ``extra(step_index)`` returns more metrics ``{name: per-layer list}`` for a record.
    """
    logdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, step in enumerate(steps):
        entropy = [valley(i, layer) + (shift(step, layer) if shift else 0.0) for layer in range(LAYERS)]
        metrics = {
            "prompt_entropy": entropy,
            "dataset_entropy": [0.2 + 0.05 * layer - 0.01 * i for layer in range(LAYERS)],
            "curvature": [1.04 + 0.02 * i * (layer > 0) for layer in range(LAYERS)],
            "effective_rank": [10.0 + layer - 0.3 * i for layer in range(LAYERS)],
            "infonce": [6.0 - 0.3 * layer for layer in range(LAYERS)],
            "rms": [1.0 + 0.1 * layer for layer in range(LAYERS)],
            "max_abs": [5.0 + layer for layer in range(LAYERS)],
            "nonfinite": [0.0] * LAYERS,
        }
        if extra:
            metrics.update(extra(i))
        if nan_metric:
            metrics["dime"] = [None] * LAYERS  # JSON null = NaN: never finite, so not drawn
        per_prompt = {}
        if with_per_prompt:
            per_prompt["prompt_entropy"] = _per_prompt_rows(rng, entropy, last=i == len(steps) - 1)
        record = {
            "step": step,
            "time": 1.7e9 + i,
            "wall_time_s": 0.5,
            "layers": list(range(LAYERS)),
            "metrics": metrics,
            "per_prompt": per_prompt,
            "alerts": ["prompt_entropy collapsed at layer 3"] if i == len(steps) - 1 else [],
            "settings": settings or {"preset": "standard", "alpha": 1.0},
        }
        if stderr:
            record["stderr"] = {"prompt_entropy": [stderr(step, layer) for layer in range(LAYERS)]}
        lines.append(json.dumps(record))
    (logdir / "layerwatch.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return logdir


def run_report_cli(*argv) -> int:
    """``layerwatch report ARGV...`` in this process; returns the exit status."""
    from layerwatch.cli import report as report_cli  # needs matplotlib: only when called

    parser = argparse.ArgumentParser()
    report_cli.add_arguments(parser)
    return report_cli.main(parser.parse_args([str(a) for a in argv]))


def monitored_run(logdir, *, layers, steps, jsonl=True, tensorboard=True, seed=0):
    """A run directory written by ``LayerWatch`` ("light", no views) on a tiny GPT-2 with ``layers`` layers
    (the embedding output counts as one)."""
    from layerwatch.monitor import LayerWatch

    model = tiny_model("gpt2", layers=layers - 1)
    probe = random_probe(views=0, seed=seed)
    with LayerWatch(probe, logdir=logdir, metrics="light", jsonl=jsonl, tensorboard=tensorboard) as watch:
        for step in steps:
            watch.run(model, step)
    return logdir


# ---------------------------------------------------------------------------------------------------------- Trainer


def tiny_trainer(out, callbacks=(), *, train_dataset, model=None, eval_dataset=None, processing_class=None, **arguments):
    """A ``transformers.Trainer`` on CPU without trackers (``layerwatch.cli.demo.training_arguments``), writing to
    ``out``. ``arguments`` are ``TrainingArguments`` over these defaults: batch 4, learning rate 1e-3, seed 0, no tqdm.
    The model defaults to a tiny GPT-2 (seed 0)."""
    from transformers import Trainer

    from layerwatch.cli.demo import training_arguments

    settings = dict(per_device_train_batch_size=4, learning_rate=1e-3, seed=0, disable_tqdm=True)
    settings.update(arguments)
    extra = {} if processing_class is None else {"processing_class": processing_class}
    return Trainer(
        model=model if model is not None else tiny_model("gpt2", seed=0),
        args=training_arguments(str(out), **settings),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=list(callbacks),
        **extra,
    )


def numpy_prompt_entropy(tokens: np.ndarray) -> float:
    """Normalized von Neumann entropy of one prompt's [N, D] tokens, straight from the definition (float64)."""
    z = tokens - tokens.mean(0)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    eig = np.linalg.eigvalsh(z @ z.T)
    eig = eig[eig > 1e-12 * eig.max()]
    p = eig / eig.sum()
    return float(-(p * np.log(p)).sum() / math.log(min(len(tokens), tokens.shape[1])))


# ------------------------------------------------------------------------------------------------------------ examples

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    # Our own model configs cause no transformers warnings (special tokens outside the vocabulary or differing from
    # the tokenizer's, loss_type); transformers 5 prefixes its warnings with "[transformers]".
    for noise in ("[transformers]", "bos_token_id", "eos_token_id", "loss_type"):
        assert noise not in result.stderr, f"{name}: {noise!r} warning in stderr:\n{result.stderr[-3000:]}"
    return result
