"""Building a :class:`layerwatch.Probe` from texts, a dataset or token tensors (SPEC §2).

:meth:`Probe.from_texts`, :meth:`Probe.from_dataset` and :meth:`Probe.from_tensors` are these functions
(bound as classmethods: their first argument ``cls`` is the probe class, so a subclass builds its own type). All three
feed one tokenize-and-filter path, :class:`_Prompts`: texts are tokenized in batches (with the tokenizer's
special tokens, truncated to ``max_length``), token rows are cut to ``max_length``, and prompts with fewer than
:data:`layerwatch.checks.MIN_PROMPT_LENGTH` tokens are dropped and reported, until the wanted number of prompts
is collected. The prompts are then packed into one batch and handed to the :class:`~layerwatch.Probe`
constructor, which right-aligns it (once) and validates it; the views are generated last.

Datasets are read by ``len`` and integer indexing, in a pseudo-random row order drawn from ``seed``; they are
never iterated through a DataLoader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from layerwatch.probe.augment import DEFAULT_EDIT_FRACTION
from layerwatch.checks import MIN_PROMPT_LENGTH, as_id_tensor, as_mask_tensor, check_id_range, check_int

if TYPE_CHECKING:
    from layerwatch.probe import Probe

__all__ = ["from_dataset", "from_tensors", "from_texts"]

logger = logging.getLogger(__name__)

# Rows examined at most by from_dataset before giving up on finding more usable prompts.
_MAX_ROWS_FACTOR = 100
_MIN_ROWS_EXAMINED = 10_000
# Up to this many rows, from_dataset draws a full random permutation; above, random indices.
_FULL_PERMUTATION_LIMIT = 1 << 20
# Texts are tokenized in batches of at least this many.
_MIN_TOKENIZE_BATCH = 16


# --------------------------------------------------------------------------------------------------
# The one tokenize-and-filter path
# --------------------------------------------------------------------------------------------------


class _Prompts:
    """Collects token sequences in order until ``wanted``; short ones are counted as dropped, not kept."""

    def __init__(self, wanted: int, *, max_length: int | None = None, tokenizer: Any = None) -> None:
        self.wanted = wanted
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.sequences: list[list[int]] = []
        self.tags: list[Any] = []  # one per kept prompt: its label (None when unlabelled)
        self.dropped = 0
        self._texts: list[str] = []
        self._text_tags: list[Any] = []

    @property
    def full(self) -> bool:
        return len(self.sequences) >= self.wanted

    def add_ids(self, ids: list[int], tag: Any = None) -> None:
        """One prompt's token ids (truncated to ``max_length``) and its label; ignored once full."""
        if self.full:
            return
        if self.max_length is not None:
            ids = ids[: self.max_length]
        if len(ids) < MIN_PROMPT_LENGTH:
            self.dropped += 1
        else:
            self.sequences.append(ids)
            self.tags.append(tag)

    def add_text(self, text: str, tag: Any = None) -> None:
        """One prompt's text (and label), tokenized with the next batch (about as many texts as prompts missing)."""
        self._texts.append(text)
        self._text_tags.append(tag)
        if len(self._texts) >= max(self.wanted - len(self.sequences), _MIN_TOKENIZE_BATCH):
            self.flush()

    def flush(self) -> None:
        """Tokenize the pending texts and keep their prompts."""
        texts, self._texts = self._texts, []
        tags, self._text_tags = self._text_tags, []
        if not texts:
            return
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length)
        for ids, tag in zip(encoded["input_ids"], tags):
            self.add_ids([int(token) for token in ids], tag)

    def probe(
        self, cls: type[Probe], source: str, why_none: str, *, views: int, labelled: bool = False, **settings: Any
    ) -> Probe:
        """A ``cls`` probe of the collected prompts (``settings``: the constructor's keywords) with ``views`` views;
        ``labelled``: the kept prompts' tags are the probe's labels."""
        self.flush()
        if self.dropped:
            logger.warning(
                "layerwatch probe: dropped %d prompt(s) from %s with fewer than %d tokens",
                self.dropped, source, MIN_PROMPT_LENGTH,
            )
        if not self.sequences:
            raise ValueError(f"no usable prompt in {source}: {why_none}")
        width = max(len(seq) for seq in self.sequences)
        ids = torch.zeros((len(self.sequences), width), dtype=torch.long)
        mask = torch.zeros((len(self.sequences), width), dtype=torch.long)
        for row, seq in enumerate(self.sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return cls(ids, mask, labels=self.tags if labelled else None, **settings).with_views(views)


# --------------------------------------------------------------------------------------------------
# Checks and tokenizer settings
# --------------------------------------------------------------------------------------------------


def _check_labels_length(labels: object, count: int, what: str) -> list[Any] | None:
    """``labels`` as a list with one entry per ``what`` (None stays None); the values are checked by Probe."""
    if labels is None:
        return None
    values = labels.tolist() if isinstance(labels, torch.Tensor) else labels
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"labels must be a list with one class (int or str) per {what}, got {type(labels).__name__}")
    if len(values) != count:
        raise ValueError(f"labels has {len(values)} entries but there are {count} {what}s; give one label per {what}")
    return list(values)


def _check_views_count(views: object) -> int:
    return check_int(views, "views", minimum=0, hint=" (the number of augmented views; 2 for the default metrics)")


def _check_num_prompts(num_prompts: object) -> int | None:
    if num_prompts is None:
        return None
    return check_int(num_prompts, "num_prompts", minimum=1, hint=" (or None for all prompts)")


def _check_max_length(max_length: object) -> int:
    return check_int(
        max_length,
        "max_length",
        minimum=MIN_PROMPT_LENGTH,
        hint=f" (prompts shorter than {MIN_PROMPT_LENGTH} tokens are dropped)",
    )


def _check_tokenizer(tokenizer: object) -> None:
    if tokenizer is None or not callable(tokenizer) or not hasattr(tokenizer, "all_special_ids"):
        hint = ""
        if type(tokenizer).__module__.startswith("tokenizers"):
            hint = (
                "; wrap a `tokenizers.Tokenizer` as "
                "transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=..., eos_token=...)"
            )
        raise TypeError(
            "tokenizer must be a Hugging Face tokenizer (transformers.PreTrainedTokenizerBase, e.g. "
            f"AutoTokenizer.from_pretrained(...)), got {type(tokenizer).__name__}{hint}"
        )


def _tokenizer_settings(tokenizer: Any) -> dict[str, Any]:
    """vocab size, pad id, special ids and name of a tokenizer, without modifying it."""
    vocab_size = len(tokenizer)
    special = tuple(sorted({int(i) for i in tokenizer.all_special_ids if i is not None}))
    pad = getattr(tokenizer, "pad_token_id", None)
    if not isinstance(pad, int):
        pad = getattr(tokenizer, "eos_token_id", None)
        if not isinstance(pad, int):
            pad = 0
        logger.debug("tokenizer has no pad token; padding the probe with id %d", pad)
    name = getattr(tokenizer, "name_or_path", None)
    return {
        "vocab_size": vocab_size,
        "special_token_ids": special,
        "pad_token_id": int(pad),
        "tokenizer_name": str(name) if name else None,
    }


def _vocab_covering(vocab_size: int, sequences: list[list[int]]) -> int:
    """``len(tokenizer)``, raised (with a warning) if the tokenizer produced ids beyond it."""
    highest = max((max(seq) for seq in sequences if seq), default=-1)
    if highest >= vocab_size:
        logger.warning(
            "layerwatch probe: the tokenizer produced id %d >= len(tokenizer) = %d; using vocab_size=%d",
            highest,
            vocab_size,
            highest + 1,
        )
        return highest + 1
    return vocab_size


# --------------------------------------------------------------------------------------------------
# Texts and tensors
# --------------------------------------------------------------------------------------------------


def from_texts(
    cls: type[Probe],
    texts: Iterable[str],
    tokenizer: Any,
    *,
    max_length: int = 128,
    num_prompts: int | None = 64,
    views: int = 2,
    seed: int = 0,
    edit_fraction: float = DEFAULT_EDIT_FRACTION,
    labels: Sequence[int | str] | None = None,
) -> Probe:
    """Build a probe from raw texts and a Hugging Face tokenizer.

    Texts are taken in order; empty (whitespace-only) texts are skipped and prompts shorter than 3
    tokens are dropped with a warning, until ``num_prompts`` prompts are collected. Each text is
    tokenized with the tokenizer's special tokens (a BOS it adds is position 0 and never edited)
    and truncated to ``max_length`` tokens. The tokenizer is not modified: without a pad token,
    the probe pads with its EOS id (else 0). ``vocab_size = len(tokenizer)``,
    ``special_token_ids = tokenizer.all_special_ids``, ``tokenizer_name = tokenizer.name_or_path``.

    Args:
        texts: a list (or iterable) of strings.
        tokenizer: a ``transformers`` tokenizer.
        max_length: longest prompt in tokens (>= 3).
        num_prompts: number of prompts to keep (``None``: all usable texts).
        views: number of augmented views to generate.
        seed: seed of the views (and of ``probe_accuracy``'s folds).
        edit_fraction: fraction of positions edited per augmentation operation.
        labels: optional class (int or str) of each text, aligned with ``texts``; the labels of dropped texts
            are dropped with them. Enables ``probe_accuracy`` and ``best_layer``.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, got a single string; wrap it: [text]")
    if not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; pass at least one text (a few dozen for useful dataset metrics)")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
    _check_tokenizer(tokenizer)
    max_length = _check_max_length(max_length)
    num_prompts = _check_num_prompts(num_prompts)
    views = _check_views_count(views)
    seed = check_int(seed, "seed")
    settings = _tokenizer_settings(tokenizer)
    tags = _check_labels_length(labels, len(texts), "text")

    candidates = [(text, None if tags is None else tags[i]) for i, text in enumerate(texts) if text.strip()]
    wanted = len(candidates) if num_prompts is None else num_prompts
    prompts = _Prompts(wanted, max_length=max_length, tokenizer=tokenizer)
    for text, tag in candidates:
        if prompts.full:
            break
        prompts.add_text(text, tag)
    prompts.flush()
    settings["vocab_size"] = _vocab_covering(settings["vocab_size"], prompts.sequences)
    if num_prompts is not None and len(prompts.sequences) < num_prompts:
        logger.info("layerwatch probe: %d usable prompt(s) found (num_prompts=%d)", len(prompts.sequences), num_prompts)
    why_none = f"every prompt was empty or shorter than {MIN_PROMPT_LENGTH} tokens; pass longer texts"
    return prompts.probe(
        cls, "texts", why_none, views=views, labelled=tags is not None, seed=seed, edit_fraction=edit_fraction,
        **settings,
    )


def from_tensors(
    cls: type[Probe],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    vocab_size: int,
    views: int = 2,
    seed: int = 0,
    pad_token_id: int = 0,
    special_token_ids: Sequence[int] = (),
    edit_fraction: float = DEFAULT_EDIT_FRACTION,
    tokenizer_name: str | None = None,
    labels: Sequence[int | str] | torch.Tensor | None = None,
) -> Probe:
    """Build a probe from a padded batch of token ids.

    Args:
        input_ids: ``[B, T]`` integer ids, padded on either side.
        attention_mask: ``[B, T]`` bool or 0/1 (1 = real token); ``None``: every position is real.
        vocab_size: the model's vocabulary size (every real id must be below it).
        views: number of augmented views to generate.
        seed: seed of the views.
        pad_token_id: id used for padding in the stored batch and views.
        special_token_ids: ids never edited (and never drawn) by the augmentation, e.g. BOS/EOS.
        edit_fraction: fraction of positions edited per augmentation operation.
        tokenizer_name: optional name recorded with the probe.
        labels: optional class (int or str) of each row; enables ``probe_accuracy`` and ``best_layer``.

    Rows with fewer than 3 real tokens are dropped with a warning (with their labels).
    """
    vocab_size = check_int(vocab_size, "vocab_size", minimum=1, hint=" (e.g. model.config.vocab_size)")
    views = _check_views_count(views)
    ids = as_id_tensor(input_ids, "input_ids")
    mask = as_mask_tensor(attention_mask, ids.shape, "attention_mask", "input_ids")
    if ids.shape[0] == 0:
        raise ValueError("input_ids has no prompts (0 rows); a probe needs at least one prompt")
    check_id_range(ids, mask, vocab_size, "input_ids")
    tags = _check_labels_length(labels, ids.shape[0], "row")
    prompts = _Prompts(ids.shape[0])
    for index, (row_ids, row_mask) in enumerate(zip(ids.long(), mask)):
        prompts.add_ids(row_ids[row_mask].tolist(), None if tags is None else tags[index])
    why_none = f"every row has fewer than {MIN_PROMPT_LENGTH} real tokens (check attention_mask)"
    return prompts.probe(
        cls, "input_ids", why_none, views=views, labelled=tags is not None, vocab_size=vocab_size, seed=seed,
        tokenizer_name=tokenizer_name,
        pad_token_id=pad_token_id, special_token_ids=special_token_ids, edit_fraction=edit_fraction,
    )


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


def from_dataset(
    cls: type[Probe],
    dataset: Any,
    *,
    tokenizer: Any = None,
    text_column: str = "text",
    num_prompts: int | None = 64,
    max_length: int = 128,
    views: int = 2,
    seed: int = 0,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    special_token_ids: Sequence[int] | None = None,
    edit_fraction: float = DEFAULT_EDIT_FRACTION,
    label_column: str | None = None,
) -> Probe:
    """Build a probe from rows of a dataset, chosen deterministically from ``seed``.

    ``dataset`` is a ``datasets.Dataset`` or any sequence of dicts (``len`` and integer indexing;
    it is never iterated through a DataLoader). Rows are visited in a pseudo-random order drawn from
    ``seed`` and taken until ``num_prompts`` prompts are collected; empty rows are skipped and
    prompts shorter than 3 tokens dropped with a warning. A row gives its ``input_ids`` (filtered by
    its ``attention_mask`` if present, truncated to ``max_length``) when it has them, otherwise its
    ``text_column`` tokenized with ``tokenizer``. Rows that are plain strings are texts.

    Args:
        dataset: the rows.
        tokenizer: a ``transformers`` tokenizer; needed for text rows, and it provides the vocabulary
            size, pad id, special ids and name (as in :meth:`from_texts`).
        text_column: the key of the text in each row.
        num_prompts: number of prompts (``None``: all usable rows).
        max_length: longest prompt in tokens.
        views: number of augmented views to generate.
        seed: seed of the row choice and of the views.
        vocab_size: required when there is no tokenizer (e.g. ``model.config.vocab_size``); overrides
            ``len(tokenizer)`` otherwise.
        pad_token_id: overrides the tokenizer's pad id (default without tokenizer: 0).
        special_token_ids: overrides the tokenizer's special ids (default without tokenizer: none).
        edit_fraction: fraction of positions edited per augmentation operation.
        label_column: optional key of each row's class (int or str); enables ``probe_accuracy`` and
            ``best_layer``.
    """
    _check_dataset(dataset, text_column)
    if label_column is not None and not isinstance(label_column, str):
        raise TypeError(f"label_column must be a str or None, got {type(label_column).__name__}")
    if tokenizer is not None:
        _check_tokenizer(tokenizer)
    max_length = _check_max_length(max_length)
    num_prompts = _check_num_prompts(num_prompts)
    views = _check_views_count(views)
    seed = check_int(seed, "seed")
    settings = _dataset_settings(tokenizer, vocab_size, pad_token_id, special_token_ids)
    num_rows = _check_rows(dataset, text_column)
    prompts = _Prompts(num_rows if num_prompts is None else num_prompts, max_length=max_length, tokenizer=tokenizer)
    max_rows = num_rows if num_prompts is None else max(_MAX_ROWS_FACTOR * num_prompts, _MIN_ROWS_EXAMINED)
    examined = _collect_rows(dataset, prompts, text_column, _row_order(num_rows, seed), max_rows, label_column)
    prompts.flush()
    if tokenizer is not None and vocab_size is None:
        settings["vocab_size"] = _vocab_covering(settings["vocab_size"], prompts.sequences)
    if num_prompts is not None and len(prompts.sequences) < num_prompts:
        logger.info(
            "layerwatch probe: %d usable prompt(s) found in %d dataset rows examined (num_prompts=%d)",
            len(prompts.sequences), examined, num_prompts,
        )
    why_none = f"every prompt was empty or shorter than {MIN_PROMPT_LENGTH} tokens; pass longer texts"
    return prompts.probe(
        cls, "dataset", why_none, views=views, labelled=label_column is not None, seed=seed,
        edit_fraction=edit_fraction, **settings,
    )


def _check_dataset(dataset: Any, text_column: object) -> None:
    if isinstance(dataset, Mapping):
        raise TypeError(
            "dataset must be a sequence of rows, got a mapping (columns); use "
            "datasets.Dataset.from_dict(...) or a list of dicts"
        )
    if isinstance(dataset, (str, bytes)) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"dataset must support len() and integer indexing (a datasets.Dataset or a list of dicts), got "
            f"{type(dataset).__name__}; for a streaming/iterable dataset take rows first, e.g. "
            "datasets.Dataset.from_list(list(dataset.take(1000)))"
        )
    if not isinstance(text_column, str):
        raise TypeError(f"text_column must be a str, got {type(text_column).__name__}")


def _check_rows(dataset: Any, text_column: str) -> int:
    """The number of rows; refuses an empty dataset and one whose columns hold neither ids nor text."""
    num_rows = len(dataset)
    if num_rows == 0:
        raise ValueError("dataset is empty; pass a dataset with at least one non-empty row")
    column_names = getattr(dataset, "column_names", None)
    if isinstance(column_names, list) and "input_ids" not in column_names and text_column not in column_names:
        raise ValueError(
            f"dataset has neither an 'input_ids' column nor the text column {text_column!r} "
            f"(columns: {column_names}); pass text_column=..."
        )
    return num_rows


def _dataset_settings(
    tokenizer: Any, vocab_size: object, pad_token_id: object, special_token_ids: object
) -> dict[str, Any]:
    """The Probe settings of a dataset probe: the tokenizer's, overridden by the explicit arguments."""
    settings: dict[str, Any] = (
        _tokenizer_settings(tokenizer)
        if tokenizer is not None
        else {"vocab_size": None, "special_token_ids": (), "pad_token_id": 0, "tokenizer_name": None}
    )
    if vocab_size is not None:
        settings["vocab_size"] = check_int(vocab_size, "vocab_size", minimum=1)
    if settings["vocab_size"] is None:
        raise ValueError(
            "from_dataset needs the vocabulary size: pass tokenizer=... or vocab_size=... "
            "(e.g. model.config.vocab_size)"
        )
    if pad_token_id is not None:
        settings["pad_token_id"] = pad_token_id
    if special_token_ids is not None:
        settings["special_token_ids"] = special_token_ids
    return settings


def _collect_rows(
    dataset: Any, prompts: _Prompts, text_column: str, order: Iterator[int], max_rows: int, label_column: str | None
) -> int:
    """Feed rows in ``order`` to ``prompts`` until it is full or ``max_rows`` were examined; returns that count."""
    examined = 0
    for index in order:
        if prompts.full or examined >= max_rows:
            break
        examined += 1
        row = dataset[index]
        if isinstance(row, str):
            row = {text_column: row}
        if not isinstance(row, Mapping):
            raise TypeError(
                f"dataset row {index} is a {type(row).__name__}; rows must be dicts with 'input_ids' or "
                f"{text_column!r} (or strings)"
            )
        tag = _label_from_row(row, label_column, index)
        if row.get("input_ids") is not None:
            ids = _ids_from_row(row["input_ids"], row.get("attention_mask"), index)
            if ids:
                prompts.add_ids(ids, tag)
        elif text_column in row:
            text = _text_from_row(row[text_column], text_column, index)
            if text:
                if prompts.tokenizer is None:
                    raise ValueError(
                        f"dataset rows have text in {text_column!r} but no 'input_ids'; pass tokenizer=..."
                    )
                prompts.add_text(text, tag)
        else:
            raise ValueError(
                f"dataset row {index} has neither 'input_ids' nor {text_column!r} (keys: {sorted(row)}); "
                "pass text_column=..."
            )
    return examined


def _label_from_row(row: Mapping[str, Any], label_column: str | None, row_index: int) -> Any:
    """The row's label (None when no ``label_column`` is asked for)."""
    if label_column is None:
        return None
    if row.get(label_column) is None:
        raise ValueError(
            f"dataset row {row_index} has no label in label_column={label_column!r} (keys: {sorted(row)}); every "
            "row needs one"
        )
    return row[label_column]


def _row_order(num_rows: int, seed: int) -> Iterator[int]:
    """A deterministic pseudo-random order of row indices (all rows when the dataset is small)."""
    generator = torch.Generator().manual_seed(seed)
    if num_rows <= _FULL_PERMUTATION_LIMIT:
        yield from torch.randperm(num_rows, generator=generator).tolist()
        return
    seen: set[int] = set()
    while len(seen) < num_rows:
        for index in torch.randint(0, num_rows, (4096,), generator=generator).tolist():
            if index not in seen:
                seen.add(index)
                yield index


def _text_from_row(text: object, text_column: str, row_index: int) -> str | None:
    """The row's text, or ``None`` when it is missing or blank."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"dataset row {row_index}: {text_column!r} must be a str, got {type(text).__name__}")
    return text if text.strip() else None


def _ids_from_row(value: object, mask: object, row_index: int) -> list[int]:
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return []
    ids = torch.as_tensor(value)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"dataset row {row_index}: input_ids must be a 1-D list of integer token ids, got shape "
            f"{tuple(ids.shape)} and dtype {ids.dtype}"
        )
    if mask is not None:
        mask_tensor = torch.as_tensor(mask)
        if mask_tensor.shape != ids.shape:
            raise ValueError(
                f"dataset row {row_index}: attention_mask has shape {tuple(mask_tensor.shape)} but input_ids "
                f"has shape {tuple(ids.shape)}"
            )
        ids = ids[mask_tensor.bool()]
    return ids.long().tolist()
