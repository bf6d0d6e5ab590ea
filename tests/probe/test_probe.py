"""Tests of layerwatch.probe.Probe: constructors, views, save/load (SPEC §2)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from layerwatch._version import __version__
from layerwatch.probe import PROBE_FORMAT, Probe

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a layer by layer look at what language models learn",
    "hello world and hello again to the whole wide world",
    "entropy curvature and invariance of hidden states",
    "the dog sleeps while the fox runs over the hill",
    "models compress their inputs in the middle layers",
    "short one",
    "tokens go in and representations come out of each block",
]


def _word_level(*, template: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"])
    )
    if template:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)]
        )
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """A WordLevel tokenizer with BOS/EOS template and a pad token, built offline."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_word_level(template=True),
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        name_or_path="tiny-wordlevel",
    )


@pytest.fixture(scope="module")
def tokenizer_without_pad():
    """No pad token and no BOS/EOS template: prompts are bare words."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_word_level(template=False), eos_token="[EOS]", unk_token="[UNK]"
    )


def _assert_same_probe(a: Probe, b: Probe) -> None:
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert len(a.views) == len(b.views)
    for (a_ids, a_mask), (b_ids, b_mask) in zip(a.views, b.views):
        assert torch.equal(a_ids, b_ids) and torch.equal(a_mask, b_mask)
    assert a.metadata == b.metadata
    assert a.content_hash == b.content_hash


def _tensor_probe(views: int = 2, seed: int = 0, **kwargs) -> Probe:
    generator = torch.Generator().manual_seed(123)
    ids = torch.randint(3, 200, (10, 24), generator=generator)
    ids[:, 0] = 1
    lengths = torch.tensor([24, 20, 3, 17, 9, 24, 12, 5, 8, 15])
    mask = (torch.arange(24)[None, :] < lengths[:, None]).long()
    return Probe.from_tensors(ids, mask, vocab_size=200, views=views, seed=seed, special_token_ids=(0, 1, 2), **kwargs)


# ------------------------------------------------------------------------------------------------
# from_texts
# ------------------------------------------------------------------------------------------------


def test_from_texts_with_pad_token(tokenizer):
    probe = Probe.from_texts(SENTENCES, tokenizer, views=3, seed=5)
    assert probe.num_prompts == len(SENTENCES)
    assert probe.vocab_size == len(tokenizer)
    assert probe.pad_token_id == tokenizer.pad_token_id == 0
    assert probe.special_token_ids == tuple(sorted(tokenizer.all_special_ids))
    assert probe.tokenizer_name == "tiny-wordlevel"
    assert probe.seed == 5 and len(probe.views) == 3
    expected = tokenizer(SENTENCES[0])["input_ids"]
    assert probe.input_ids[0, : len(expected)].tolist() == expected
    assert probe.attention_mask.sum(dim=1).tolist() == [len(tokenizer(t)["input_ids"]) for t in SENTENCES]
    # BOS is position 0 of every prompt and every view; EOS stays the last real token.
    for ids, mask in [(probe.input_ids, probe.attention_mask), *probe.views]:
        assert bool((ids[:, 0] == tokenizer.bos_token_id).all())
        last = ids.gather(1, (mask.sum(dim=1, keepdim=True) - 1))
        assert bool((last == tokenizer.eos_token_id).all())
    assert probe.max_token_id() < probe.vocab_size


def test_from_texts_without_pad_token_uses_eos_and_leaves_tokenizer_alone(tokenizer_without_pad):
    assert tokenizer_without_pad.pad_token is None
    probe = Probe.from_texts(SENTENCES, tokenizer_without_pad, views=1)
    assert tokenizer_without_pad.pad_token is None  # never modified
    assert probe.pad_token_id == tokenizer_without_pad.eos_token_id
    assert probe.tokenizer_name is None
    padded = probe.input_ids[probe.attention_mask == 0]
    assert padded.numel() > 0 and bool((padded == probe.pad_token_id).all())


def test_from_texts_drops_short_prompts_with_warning(tokenizer_without_pad, caplog):
    texts = ["hello world", "", "   ", *SENTENCES[:3], "fox"]
    with caplog.at_level(logging.WARNING, logger="layerwatch.probe"):
        probe = Probe.from_texts(texts, tokenizer_without_pad)
    assert probe.num_prompts == 3  # "hello world" (2) and "fox" (1) are dropped; blanks are skipped
    assert "dropped 2 prompt(s)" in caplog.text
    with pytest.raises(ValueError, match="no usable prompt"):
        Probe.from_texts(["hello world", "fox", ""], tokenizer_without_pad)


def test_from_texts_num_prompts_and_max_length(tokenizer):
    probe = Probe.from_texts(SENTENCES, tokenizer, num_prompts=3, max_length=5, views=2)
    assert probe.num_prompts == 3
    assert int(probe.attention_mask.sum(dim=1).max()) == 5
    assert probe.input_ids.shape[1] == 5
    assert probe.max_length() > 5  # views grow by their insertions
    everything = Probe.from_texts(SENTENCES * 20, tokenizer, num_prompts=None, views=0)
    assert everything.num_prompts == 160 and everything.views == []


def test_from_texts_does_not_touch_global_rng(tokenizer):
    state = torch.get_rng_state()
    Probe.from_texts(SENTENCES, tokenizer, views=4)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("texts", "kwargs", "error", "match"),
    [
        ("a single string", {}, TypeError, "single string"),
        ([], {}, ValueError, "empty"),
        (["ok text", 3], {}, TypeError, r"texts\[1\]"),
        (SENTENCES, {"views": -1}, ValueError, "views"),
        (SENTENCES, {"max_length": 2}, ValueError, "max_length"),
        (SENTENCES, {"num_prompts": 0}, ValueError, "num_prompts"),
    ],
)
def test_from_texts_validation(tokenizer, texts, kwargs, error, match):
    with pytest.raises(error, match=match):
        Probe.from_texts(texts, tokenizer, **kwargs)


def test_from_texts_rejects_a_non_tokenizer():
    with pytest.raises(TypeError, match="tokenizer"):
        Probe.from_texts(SENTENCES, object())
    with pytest.raises(TypeError, match="PreTrainedTokenizerFast"):
        Probe.from_texts(SENTENCES, _word_level(template=True))


# ------------------------------------------------------------------------------------------------
# from_tensors
# ------------------------------------------------------------------------------------------------


def test_from_tensors_right_aligns_left_padding_and_drops_short_rows(caplog):
    ids = torch.tensor([[0, 0, 1, 5, 6, 2], [1, 7, 8, 9, 10, 2], [0, 0, 0, 0, 1, 2]])
    mask = ids != 0
    with caplog.at_level(logging.WARNING, logger="layerwatch.probe"):
        probe = Probe.from_tensors(ids, mask, vocab_size=20, pad_token_id=0, special_token_ids=(0, 1, 2))
    assert "dropped 1 prompt(s)" in caplog.text
    assert probe.input_ids.tolist() == [[1, 5, 6, 2, 0, 0], [1, 7, 8, 9, 10, 2]]
    assert probe.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert probe.input_ids.dtype == probe.attention_mask.dtype == torch.long
    # Same prompts, right-padded: same probe, same hash.
    right = Probe.from_tensors(
        torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 8, 9, 10, 2]]), None, vocab_size=20, special_token_ids=(0, 1, 2)
    )
    assert right.content_hash != probe.content_hash  # no mask: the pads are real tokens here
    right = Probe.from_tensors(
        torch.tensor([[1, 5, 6, 2, 0, 0, 0], [1, 7, 8, 9, 10, 2, 0]]),
        torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]),
        vocab_size=20,
        special_token_ids=(0, 1, 2),
    )
    _assert_same_probe(right, probe)


def test_from_tensors_accepts_numpy_and_lists():
    import numpy as np

    probe = Probe.from_tensors(np.array([[1, 5, 6, 7]]), vocab_size=10, views=1)
    assert probe.input_ids.tolist() == [[1, 5, 6, 7]]
    assert Probe.from_tensors([[1, 5, 6, 7]], vocab_size=10, views=1).content_hash == probe.content_hash


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.tensor([1, 5, 6]),), {}, ValueError, "2-D"),
        ((torch.ones(2, 4),), {}, TypeError, "integer"),
        ((torch.ones(2, 4, dtype=torch.long), torch.ones(2, 5)), {}, ValueError, "shape"),
        ((torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4)), {}, TypeError, "attention_mask"),
        ((torch.ones(2, 4, dtype=torch.long), torch.full((2, 4), 3)), {}, ValueError, "only 0"),
        ((torch.tensor([[1, -5, 6, 7]]),), {}, ValueError, "negative"),
        ((torch.tensor([[1, 5, 6, 99]]),), {}, ValueError, "vocab_size"),
        ((torch.ones(2, 4, dtype=torch.long),), {"views": -1}, ValueError, "views"),
        ((torch.ones(2, 4, dtype=torch.long),), {"views": 1.5}, TypeError, "views"),
        ((torch.ones(2, 4, dtype=torch.long),), {"vocab_size": 0}, ValueError, "vocab_size"),
        ((torch.ones(2, 4, dtype=torch.long),), {"pad_token_id": 50}, ValueError, "pad_token_id"),
        ((torch.ones(2, 4, dtype=torch.long),), {"special_token_ids": (70,)}, ValueError, "special_token_ids"),
        ((torch.ones(2, 4, dtype=torch.long),), {"edit_fraction": 0}, ValueError, "edit_fraction"),
        ((torch.ones(0, 4, dtype=torch.long),), {}, ValueError, "no prompts"),
        ((torch.ones(2, 2, dtype=torch.long),), {}, ValueError, "fewer than 3"),
        (("not ids",), {}, TypeError, "input_ids"),
    ],
)
def test_from_tensors_validation(args, kwargs, error, match):
    kwargs = {"vocab_size": 10, **kwargs}
    with pytest.raises(error, match=match):
        Probe.from_tensors(*args, **kwargs)


def test_negative_ids_in_padding_are_fine():
    ids = torch.tensor([[1, 5, 6, -100], [1, 5, 6, 7]])
    probe = Probe.from_tensors(ids, ids >= 0, vocab_size=10, pad_token_id=3)
    assert probe.input_ids.tolist() == [[1, 5, 6, 3], [1, 5, 6, 7]]


def test_constructor_validates_views():
    ids = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(ValueError, match="views\\[0\\]"):
        Probe(ids, views=[(torch.ones(2, 4, dtype=torch.long), None)], vocab_size=10)
    with pytest.raises(TypeError, match="pair"):
        Probe(ids, views=[ids], vocab_size=10)
    with pytest.raises(TypeError, match="with_views"):
        Probe(ids, views=2, vocab_size=10)
    probe = Probe(ids, views=[(torch.tensor([[1, 9, 9, 9, 9]]), None)], vocab_size=10)
    assert probe.max_token_id() == 9 and probe.max_length() == 5


# ------------------------------------------------------------------------------------------------
# from_dataset
# ------------------------------------------------------------------------------------------------


def test_from_dataset_with_hf_dataset_texts(tokenizer):
    import datasets

    texts = SENTENCES + ["", "   "] * 5
    dataset = datasets.Dataset.from_dict({"text": texts, "label": list(range(len(texts)))})
    probe = Probe.from_dataset(dataset, tokenizer=tokenizer, num_prompts=5, views=2, seed=3)
    assert probe.num_prompts == 5
    assert probe.tokenizer_name == "tiny-wordlevel" and probe.vocab_size == len(tokenizer)
    rows = {tuple(r[m.bool()].tolist()) for r, m in zip(probe.input_ids, probe.attention_mask)}
    assert rows <= {tuple(tokenizer(t)["input_ids"]) for t in SENTENCES}
    same = Probe.from_dataset(dataset, tokenizer=tokenizer, num_prompts=5, views=2, seed=3)
    _assert_same_probe(probe, same)
    everything = Probe.from_dataset(dataset, tokenizer=tokenizer, num_prompts=None, views=0)
    assert everything.num_prompts == len(SENTENCES)  # every non-empty row once


def test_from_dataset_with_hf_dataset_input_ids(tokenizer):
    import datasets

    encoded = tokenizer(SENTENCES)
    dataset = datasets.Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    )
    probe = Probe.from_dataset(dataset, tokenizer=tokenizer, num_prompts=None, max_length=6)
    assert probe.num_prompts == len(SENTENCES)
    assert probe.input_ids.shape[1] == 6
    dataset.set_format("torch")
    assert Probe.from_dataset(dataset, tokenizer=tokenizer, num_prompts=None, max_length=6).content_hash == (
        probe.content_hash
    )


def test_from_dataset_with_list_of_dicts(caplog):
    rows = [
        {"input_ids": [1, 5, 6, 7, 2]},
        {"input_ids": []},  # empty: skipped silently
        {"input_ids": [1, 8, 9, 9, 9, 2, 0, 0], "attention_mask": [1, 1, 1, 1, 1, 1, 0, 0]},
        {"input_ids": [1, 2]},  # short: dropped with a warning
        {"input_ids": [0, 0, 1, 4, 4, 2], "attention_mask": [0, 0, 1, 1, 1, 1]},
    ]
    with caplog.at_level(logging.WARNING, logger="layerwatch.probe"):
        probe = Probe.from_dataset(rows, vocab_size=16, special_token_ids=(0, 1, 2), num_prompts=None)
    assert "dropped 1 prompt(s)" in caplog.text
    assert sorted(r[m.bool()].tolist() for r, m in zip(probe.input_ids, probe.attention_mask)) == sorted(
        [[1, 5, 6, 7, 2], [1, 8, 9, 9, 9, 2], [1, 4, 4, 2]]
    )
    assert probe.vocab_size == 16 and probe.tokenizer_name is None and probe.pad_token_id == 0


def test_from_dataset_row_choice_depends_on_seed():
    rows = [{"input_ids": [1, i, i, i]} for i in range(3, 203)]
    chosen = {
        seed: [int(r[1]) for r in Probe.from_dataset(rows, vocab_size=300, num_prompts=8, seed=seed, views=0).input_ids]
        for seed in (0, 1)
    }
    assert chosen[0] != chosen[1]
    assert chosen[0] == [
        int(r[1]) for r in Probe.from_dataset(rows, vocab_size=300, num_prompts=8, seed=0, views=0).input_ids
    ]


def test_from_dataset_errors(tokenizer):
    import datasets

    with pytest.raises(ValueError, match="vocab_size"):
        Probe.from_dataset([{"input_ids": [1, 2, 3]}])
    with pytest.raises(ValueError, match="tokenizer"):
        Probe.from_dataset([{"text": "some words here"}], vocab_size=10)
    with pytest.raises(ValueError, match="text_column"):
        Probe.from_dataset(datasets.Dataset.from_dict({"body": ["a b c"]}), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="text_column"):
        Probe.from_dataset([{"body": "a b c"}], tokenizer=tokenizer)
    with pytest.raises(TypeError, match="indexing"):
        Probe.from_dataset(iter([{"input_ids": [1, 2, 3]}]), vocab_size=10)
    with pytest.raises(TypeError, match="from_dict"):
        Probe.from_dataset({"text": ["a b c"]}, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="empty"):
        Probe.from_dataset([], vocab_size=10)
    with pytest.raises(ValueError, match="no usable prompt"):
        Probe.from_dataset([{"text": ""}, {"text": None}], tokenizer=tokenizer)


def test_from_dataset_text_column_and_plain_strings(tokenizer):
    by_column = Probe.from_dataset([{"body": t} for t in SENTENCES], tokenizer=tokenizer, text_column="body", seed=1)
    plain = Probe.from_dataset(SENTENCES, tokenizer=tokenizer, seed=1)
    _assert_same_probe(by_column, plain)


# ------------------------------------------------------------------------------------------------
# Views
# ------------------------------------------------------------------------------------------------


def test_with_views_is_prefix_stable():
    two = _tensor_probe(views=2)
    sixteen = _tensor_probe(views=16)
    for a, b in zip(two.views, sixteen.views[:2]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _assert_same_probe(two.with_views(16), sixteen)
    _assert_same_probe(sixteen.with_views(2), two)
    assert sixteen.with_views(0).views == [] and len(sixteen.views) == 16  # the original is unchanged
    assert two.with_views(16).content_hash != two.content_hash
    assert torch.equal(two.with_views(5).input_ids, two.input_ids)


def test_views_depend_on_the_seed_and_differ_from_each_other():
    a, b = _tensor_probe(views=2, seed=0), _tensor_probe(views=2, seed=1)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.views[0][0], b.views[0][0])
    assert not torch.equal(a.views[0][0], a.views[1][0])
    assert a.content_hash != b.content_hash


def test_max_token_id_max_length_and_repr():
    probe = _tensor_probe(views=2)
    assert probe.max_length() == max(int(m.sum(dim=1).max()) for _, m in [(None, probe.attention_mask), *probe.views])
    assert probe.max_length() > 24
    assert 3 <= probe.max_token_id() < 200
    text = repr(probe)
    assert text.startswith("Probe(num_prompts=10,") and "views=2" in text and "vocab_size=200" in text


def test_edit_fraction_is_part_of_the_probe():
    weak, strong = _tensor_probe(edit_fraction=0.1), _tensor_probe(edit_fraction=0.6)
    assert weak.max_length() < strong.max_length()
    assert weak.content_hash != strong.content_hash
    assert weak.with_views(3).edit_fraction == 0.1


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, tokenizer):
    probe = Probe.from_texts(SENTENCES, tokenizer, views=3, seed=4)
    path = probe.save(tmp_path / "run" / "nested" / "probe.safetensors")
    assert path.exists() and os.listdir(path.parent) == ["probe.safetensors"]  # no temporary file left
    loaded = Probe.load(path)
    _assert_same_probe(loaded, probe)
    assert loaded.tokenizer_name == "tiny-wordlevel"
    assert loaded.special_token_ids == probe.special_token_ids and loaded.seed == 4
    # The layout a user (or another tool) can read directly.
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        names = set(file.keys())
    assert names == {"input_ids", "attention_mask"} | {
        f"view_{k}_{part}" for k in range(3) for part in ("input_ids", "attention_mask")
    }
    assert metadata["format"] == PROBE_FORMAT and metadata["format_version"] == "1"
    assert metadata["layerwatch_version"] == __version__
    assert metadata["content_hash"] == probe.content_hash
    assert int(metadata["vocab_size"]) == probe.vocab_size and metadata["seed"] == "4"
    assert json.loads(metadata["special_token_ids"]) == list(probe.special_token_ids)
    # Overwrite in place, and directory paths mean <dir>/probe.safetensors.
    probe.with_views(1).save(path)
    assert len(Probe.load(tmp_path / "run" / "nested").views) == 1


def test_save_load_without_tokenizer_name_and_views(tmp_path):
    probe = _tensor_probe(views=0)
    loaded = Probe.load(probe.save(tmp_path / "p.safetensors"))
    _assert_same_probe(loaded, probe)
    assert loaded.tokenizer_name is None and loaded.views == []


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    path = _tensor_probe(views=2).save(tmp_path / "probe.safetensors")
    data = path.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "random.safetensors": os.urandom(4096),
        "empty.safetensors": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.*not a readable safetensors file"):
            Probe.load(tmp_path / name)
    weights = tmp_path / "model.safetensors"
    save_file({"embed.weight": torch.zeros(4, 3)}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.safetensors is a safetensors file but not a layerwatch probe"):
        Probe.load(weights)
    with pytest.raises(FileNotFoundError, match="missing"):
        Probe.load(tmp_path / "missing.safetensors")


def _rewrite(path, target, *, tensors_update=None, metadata_update=None, drop=()):
    with safe_open(str(path), framework="pt") as file:
        metadata = dict(file.metadata())
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    tensors.update(tensors_update or {})
    metadata.update(metadata_update or {})
    for name in drop:
        tensors.pop(name, None)
        metadata.pop(name, None)
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_load_detects_tampering_and_newer_formats(tmp_path):
    path = _tensor_probe(views=2).save(tmp_path / "probe.safetensors")
    ids = Probe.load(path).input_ids.clone()
    ids[0, 1] = 7 if int(ids[0, 1]) != 7 else 8
    tampered = _rewrite(path, tmp_path / "tampered.safetensors", tensors_update={"input_ids": ids})
    with pytest.raises(ValueError, match="tampered.safetensors: content hash mismatch"):
        Probe.load(tampered)
    other_seed = _rewrite(path, tmp_path / "seed.safetensors", metadata_update={"seed": "99"})
    with pytest.raises(ValueError, match="content hash mismatch"):
        Probe.load(other_seed)
    newer = _rewrite(path, tmp_path / "newer.safetensors", metadata_update={"format_version": "999"})
    with pytest.raises(ValueError, match="newer.safetensors.*version 999.*upgrade layerwatch"):
        Probe.load(newer)
    missing_view = _rewrite(path, tmp_path / "partial.safetensors", drop=("view_1_input_ids",))
    with pytest.raises(ValueError, match="partial.safetensors is a damaged layerwatch probe"):
        Probe.load(missing_view)


@pytest.mark.parametrize(
    "metadata_update, tensors_update",
    [
        ({"augmentation": "[1, 2]"}, None),  # a JSON list where an object belongs (was an AttributeError)
        ({"augmentation": '{"edit_fraction": "lots"}'}, None),
        ({"augmentation": "[" * 100_000}, None),  # nesting deep enough to exhaust the JSON parser
        ({"special_token_ids": '{"a": 1}'}, None),
        ({"special_token_ids": "not json"}, None),
        ({"vocab_size": "-3"}, None),
        ({"num_views": "two"}, None),
        ({"num_views": "5"}, None),
        ({"pad_token_id": "1e9"}, None),
        ({"content_hash": ""}, None),
        (None, {"input_ids": torch.zeros(2, 3, 4, dtype=torch.int64)}),
        (None, {"input_ids": torch.zeros(3, 5, dtype=torch.float32)}),
        (None, {"attention_mask": torch.ones(1, 1, dtype=torch.int64)}),
        (None, {"view_0_input_ids": torch.zeros(0, 4, dtype=torch.int64)}),
    ],
)
def test_crafted_probe_files_are_refused_with_value_error(tmp_path, metadata_update, tensors_update):
    path = _tensor_probe(views=2).save(tmp_path / "probe.safetensors")
    crafted = _rewrite(path, tmp_path / "crafted.safetensors", metadata_update=metadata_update,
                       tensors_update=tensors_update)
    with pytest.raises(ValueError, match="crafted.safetensors"):
        Probe.load(crafted)


@pytest.mark.slow  # a subprocess
def test_crafted_probe_is_a_clean_cli_error(tmp_path):
    """Through the command line a damaged probe is one error line and exit code 2, never a traceback."""
    import subprocess
    import sys

    path = _tensor_probe(views=2).save(tmp_path / "probe.safetensors")
    crafted = _rewrite(path, tmp_path / "crafted.safetensors", metadata_update={"augmentation": "[1]"})
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    done = subprocess.run(
        [sys.executable, "-m", "layerwatch.cli", "trajectory", str(checkpoint), "--probe", str(crafted),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "damaged layerwatch probe" in done.stderr


def test_saved_probe_has_the_mode_of_the_run_s_other_files(tmp_path):
    previous = os.umask(0o022)
    try:
        path = _tensor_probe(views=0).save(tmp_path / "probe.safetensors")
        other = tmp_path / "other.txt"
        other.write_text("x")
    finally:
        os.umask(previous)
    assert (path.stat().st_mode & 0o777) == (other.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_take_rows_matches_realigning_each_chunk():
    """Probe batches are right-aligned once; cutting rows must equal re-aligning them (what chunks used to do)."""
    from layerwatch.probe.augment import right_align
    from layerwatch.probe import take_rows

    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 40, (9, 12), generator=generator)
    mask = torch.rand(9, 12, generator=generator) < 0.7  # holes anywhere: any padding side
    mask[:, :3] = True
    probe = Probe.from_tensors(ids, mask, vocab_size=40, views=2, pad_token_id=1)
    for batch_ids, batch_mask in [(probe.input_ids, probe.attention_mask), *probe.views]:
        for rows in ([0], [8, 2, 5], list(range(9)), [4, 4]):
            chunk = torch.tensor(rows)
            got = take_rows(batch_ids, batch_mask, chunk)
            expected = right_align(batch_ids[chunk], batch_mask[chunk], pad_token_id=1)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_builders_return_the_calling_class():
    class Tagged(Probe):
        pass

    probe = Tagged.from_tensors(torch.tensor([[1, 2, 3, 4]]), vocab_size=8, views=1)
    assert type(probe) is Tagged and type(probe.with_views(3)) is Tagged


def test_a_from_texts_probe_is_fitted_to_a_32_position_model(tokenizer, caplog):
    """The README's plain-PyTorch probe (max_length=128) on a 32-position model: its 128-token prompts make
    167-token views; the monitor cuts it to 24 tokens (views of 31) before the first forward and says so."""
    import transformers

    from layerwatch.monitor import LayerWatch
    from layerwatch.probe.augment import max_view_length

    texts = [" ".join(SENTENCES[i:] + SENTENCES[:i]) * 3 for i in range(len(SENTENCES))]
    probe = Probe.from_texts(texts, tokenizer, num_prompts=8)
    assert int(probe.attention_mask.sum(1).max()) == 128 and 160 < probe.max_length() <= max_view_length(128) == 167
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        watch = LayerWatch(probe, logdir=None, metrics="standard", strict=True)
        record = watch.run(model, 1)
    assert record is not None and all(len(values) == 3 for values in record.metrics.values())
    assert "max_length=24" in caplog.text and int(watch.probe.attention_mask.sum(1).max()) == 24
    assert watch.probe.max_length() <= 32
    again = Probe.from_texts(texts, tokenizer, num_prompts=8, max_length=24)  # the length it names fits as built
    assert again.max_length() <= 32 and again.fitted_to(32) is again


def test_cropped_and_fitted_to_keep_the_settings_and_regenerate_the_views():
    ids = torch.randint(4, 30, (10, 40), generator=torch.Generator().manual_seed(0))
    probe = Probe.from_tensors(ids, vocab_size=30, views=3, seed=4, special_token_ids=(0, 1), labels=[0, 1] * 5)
    assert probe.fitted_to(probe.max_length()) is probe
    assert probe.fitted_to(40, uses_views=False) is probe
    cut = probe.fitted_to(32)
    assert cut.max_length() <= 32 and int(cut.attention_mask.sum(1).max()) == 24 and len(cut.views) == 3
    assert (cut.seed, cut.special_token_ids, cut.labels, cut.vocab_size) == (4, (0, 1), probe.labels, 30)
    assert cut.content_hash == Probe.from_tensors(ids[:, :24], vocab_size=30, views=3, seed=4, special_token_ids=(0, 1),
                                                 labels=probe.labels).content_hash
    with pytest.raises(ValueError, match="metrics='light'"):
        probe.fitted_to(3)
    assert int(probe.fitted_to(3, uses_views=False).attention_mask.sum(1).max()) == 3
