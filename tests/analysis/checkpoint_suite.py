"""Tiny checkpoint suites for the replay tests: ``checkpoint-<step>`` folders of random-init models saved with
``save_pretrained`` (each step its own seed, so the series moves), a character tokenizer saved beside each (for
``--texts``), a probe file and prompt files (plain, labelled TSV, separate labels)."""

from __future__ import annotations

from pathlib import Path

import torch

from layerwatch.probe import Probe
from helpers import char_tokenizer
from models import TINY_VOCAB, tiny_model

SENTENCES = {
    "animal": [
        "the cat sat on the mat", "a dog ran in the park", "the bird sang a song", "a fox hid in the den",
        "the cow ate the grass", "a horse ran fast",
    ],
    "weather": [
        "the rain fell all day", "a cold wind blew hard", "the sun was hot today", "snow fell on the hill",
        "the fog was thick", "a storm came at night",
    ],
}


def save_checkpoints(root: Path, steps=(10, 20, 30, 40), kind: str = "gpt2") -> Path:
    """``root/checkpoint-<step>`` for each step (model seed = its index), with the tokenizer; returns ``root``."""
    tokenizer = char_tokenizer()
    for seed, step in enumerate(steps):
        folder = root / f"checkpoint-{step}"
        tiny_model(kind, seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return root


def save_probe(path: Path, prompts: int = 12, length: int = 16, seed: int = 0) -> Path:
    ids = torch.randint(3, TINY_VOCAB, (prompts, length), generator=torch.Generator().manual_seed(seed))
    Probe.from_tensors(ids, vocab_size=TINY_VOCAB).save(path)
    return path


def labelled_sentences() -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for label, sentences in SENTENCES.items():
        texts += sentences
        labels += [label] * len(sentences)
    return texts, labels
