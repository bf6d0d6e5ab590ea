"""The probe: a fixed batch of prompts and their augmented views, saved with a run (SPEC §2).

A :class:`Probe` is built once (from texts, token tensors or a dataset), then every probe of a run
feeds the same prompts and the same views to the model, so that metric changes come from the model
and not from the data. It is stored in the run directory as one ``probe.safetensors`` file.

Conventions:

* The clean batch and every view are **right-padded** with ``pad_token_id`` and trimmed to their
  longest prompt, whatever padding side the input had (valid tokens are read through the attention
  mask). Right padding lets causal models without ``position_ids`` see positions ``0..n-1``.
* Masks and ids are ``torch.long`` CPU tensors; the monitor moves them to the model's device.
* Prompts with fewer than :data:`MIN_PROMPT_LENGTH` (3) real tokens are dropped with a logged warning
  (curvature needs 3 tokens); if none remains, the constructor raises ``ValueError``.
* View ``k`` is :func:`layerwatch.augment.augment_batch` of the clean batch with the generator
  :func:`layerwatch.augment.view_generator` ``(seed, k)``: views form a prefix-stable sequence, so
  :meth:`Probe.with_views` extends a probe (e.g. 2 -> 16 for the ``"paper"`` preset) deterministically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from layerwatch.augment import DEFAULT_EDIT_FRACTION, DEFAULT_OPERATIONS, augment_batch, right_align, view_generator
from layerwatch.rundir import PROBE_FILENAME  # re-exported: the probe's file name in a run directory

__all__ = ["MIN_PROMPT_LENGTH", "PROBE_FILENAME", "PROBE_FORMAT", "PROBE_FORMAT_VERSION", "Probe"]

logger = logging.getLogger(__name__)

MIN_PROMPT_LENGTH: int = 3
"""Prompts with fewer real tokens than this are dropped (curvature needs three tokens)."""

PROBE_FORMAT: str = "layerwatch-probe"
"""Value of the ``format`` key in the safetensors header metadata of a saved probe."""

PROBE_FORMAT_VERSION: int = 1
"""Version of the saved-probe layout; :meth:`Probe.load` refuses files written by a newer layout."""

# Rows examined at most by from_dataset before giving up on finding more usable prompts.
_MAX_ROWS_FACTOR = 100
_MIN_ROWS_EXAMINED = 10_000
# Up to this many rows, from_dataset draws a full random permutation; above, random indices.
_FULL_PERMUTATION_LIMIT = 1 << 20


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _report_short_prompts(dropped: int, kept: int, source: str, why_none: str) -> None:
    """Warn about prompts dropped for having fewer than MIN_PROMPT_LENGTH tokens; refuse when none is left."""
    if dropped:
        logger.warning(
            "layerwatch probe: dropped %d prompt(s) from %s with fewer than %d tokens", dropped, source, MIN_PROMPT_LENGTH
        )
    if not kept:
        raise ValueError(f"no usable prompt in {source}: {why_none}")


def _check_int(value: object, name: str, *, minimum: int | None = None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}{hint}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{hint}")
    return int(value)


def _check_views_count(views: object) -> int:
    return _check_int(views, "views", minimum=0, hint=" (the number of augmented views; 2 for the default metrics)")


def _check_num_prompts(num_prompts: object) -> int | None:
    if num_prompts is None:
        return None
    return _check_int(num_prompts, "num_prompts", minimum=1, hint=" (or None for all prompts)")


def _check_max_length(max_length: object) -> int:
    return _check_int(
        max_length,
        "max_length",
        minimum=MIN_PROMPT_LENGTH,
        hint=f" (prompts shorter than {MIN_PROMPT_LENGTH} tokens are dropped)",
    )


def _check_edit_fraction(edit_fraction: object) -> float:
    if isinstance(edit_fraction, bool) or not isinstance(edit_fraction, (int, float)):
        raise TypeError(f"edit_fraction must be a float in (0, 1], got {type(edit_fraction).__name__}")
    if not 0.0 < float(edit_fraction) <= 1.0:
        raise ValueError(f"edit_fraction must be in (0, 1], got {edit_fraction}")
    return float(edit_fraction)


def _as_id_tensor(value: object, name: str) -> torch.Tensor:
    """A 2-D integer tensor from a tensor, numpy array or nested list, with a clear error otherwise."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"{name} must be a 2-D integer torch.Tensor [prompts, tokens] (or a numpy array / list of "
                f"equal-length lists), got {type(value).__name__}: {exc}"
            ) from exc
    if value.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [prompts, tokens], got shape {tuple(value.shape)}"
            + ("; use .unsqueeze(0) for a single prompt" if value.dim() == 1 else "")
        )
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {value.dtype}; use .long()")
    return value.detach().cpu()


def _as_mask_tensor(value: object, shape: torch.Size, name: str, ids_name: str) -> torch.Tensor:
    if value is None:
        return torch.ones(shape, dtype=torch.bool)
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a bool or 0/1 integer tensor, got {type(value).__name__}") from exc
    if value.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but {ids_name} has shape {tuple(shape)}; they must match"
        )
    if value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"{name} must be bool or integer (1 = real token, 0 = padding), got dtype {value.dtype}")
    value = value.detach().cpu()
    if value.dtype != torch.bool and value.numel() and not bool(((value == 0) | (value == 1)).all()):
        raise ValueError(f"{name} must contain only 0 (padding) and 1 (real token)")
    return value.bool()


def _check_id_range(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int, name: str) -> None:
    valid = ids[mask]
    if valid.numel() == 0:
        return
    low, high = int(valid.min()), int(valid.max())
    if low < 0:
        raise ValueError(
            f"{name} contains negative token id {low} at a real-token position; mark padding with "
            "attention_mask=0 or replace it with a valid id"
        )
    if high >= vocab_size:
        raise ValueError(
            f"{name} contains token id {high} but vocab_size is {vocab_size}; every id must be < vocab_size "
            "(pass the model's vocabulary size, e.g. len(tokenizer) or model.config.vocab_size)"
        )


def _normalize_special_ids(special_token_ids: object, vocab_size: int) -> tuple[int, ...]:
    if isinstance(special_token_ids, (str, bytes)) or not isinstance(special_token_ids, Iterable):
        raise TypeError(f"special_token_ids must be a sequence of ints, got {type(special_token_ids).__name__}")
    ids: set[int] = set()
    for value in special_token_ids:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"special_token_ids must contain ints, got {value!r}")
        if not 0 <= value < vocab_size:
            raise ValueError(f"special_token_ids contains {value}, outside [0, vocab_size={vocab_size})")
        ids.add(int(value))
    return tuple(sorted(ids))


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False).tobytes()


# --------------------------------------------------------------------------------------------------
# Tokenizer and dataset helpers
# --------------------------------------------------------------------------------------------------


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


def _tokenize(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)
    return [list(map(int, ids)) for ids in encoded["input_ids"]]


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


# --------------------------------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------------------------------


class Probe:
    """A fixed batch of probe prompts and their augmented views.

    Build one with :meth:`from_texts`, :meth:`from_tensors` or :meth:`from_dataset`, save it with
    :meth:`save` and read it back with :meth:`load`. The constructor takes already prepared tensors
    and views (e.g. views from your own augmentation) and only validates and right-aligns them.

    Args:
        input_ids: ``[B, T]`` integer token ids of the clean prompts (any padding side).
        attention_mask: ``[B, T]`` bool or 0/1, 1 = real token; ``None`` = every position is real.
        views: sequence of ``(input_ids, attention_mask)`` pairs, each with ``B`` rows.
        vocab_size: the vocabulary size; every id must be below it and random view tokens come from it.
        seed: seed of the views (view ``k`` uses ``view_generator(seed, k)``).
        tokenizer_name: the tokenizer's ``name_or_path``, for the record only.
        pad_token_id: the id in padding positions.
        special_token_ids: ids never edited by the augmentation nor drawn as random tokens.
        edit_fraction: the augmentation's fraction of edited positions per operation.

    Attributes:
        input_ids: ``[B, T]`` ``torch.long``, right-padded with ``pad_token_id``.
        attention_mask: ``[B, T]`` ``torch.long``, 1 on real tokens.
        views: list of ``(input_ids, attention_mask)`` pairs, each ``[B, T_k]``, right-padded.
        vocab_size, seed, tokenizer_name, pad_token_id, special_token_ids, edit_fraction: as above.

    Example:
        >>> import torch
        >>> from layerwatch.probe import Probe
        >>> ids = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 11, 2, 0]])
        >>> probe = Probe.from_tensors(ids, ids != 0, vocab_size=32, special_token_ids=(0, 1, 2))
        >>> probe.num_prompts, len(probe.views)
        (2, 2)
        >>> probe.views[0][1].sum(dim=1)  # each view is longer by its "split" insertions
        tensor([8, 6])
        >>> bool(probe.with_views(16).views[1][0].equal(probe.views[1][0]))  # extending keeps the views
        True
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        views: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
        *,
        vocab_size: int,
        seed: int = 0,
        tokenizer_name: str | None = None,
        pad_token_id: int = 0,
        special_token_ids: Sequence[int] = (),
        edit_fraction: float = DEFAULT_EDIT_FRACTION,
    ) -> None:
        vocab_size = _check_int(vocab_size, "vocab_size", minimum=1, hint=" (e.g. len(tokenizer))")
        seed = _check_int(seed, "seed")
        pad_token_id = _check_int(pad_token_id, "pad_token_id", minimum=0)
        if pad_token_id >= vocab_size:
            raise ValueError(
                f"pad_token_id {pad_token_id} must be < vocab_size {vocab_size} (padding is fed to the "
                "embedding, masked); pass a valid id such as the EOS id or 0"
            )
        if tokenizer_name is not None and not isinstance(tokenizer_name, str):
            raise TypeError(f"tokenizer_name must be a str or None, got {type(tokenizer_name).__name__}")
        special = _normalize_special_ids(special_token_ids, vocab_size)
        edit_fraction = _check_edit_fraction(edit_fraction)

        self.input_ids, self.attention_mask = self._prepare(
            input_ids, attention_mask, vocab_size, pad_token_id, "input_ids", "attention_mask"
        )
        if self.input_ids.shape[0] == 0:
            raise ValueError("input_ids has no prompts (0 rows); a probe needs at least one prompt")
        short = (self.attention_mask.sum(dim=1) < MIN_PROMPT_LENGTH).nonzero().flatten().tolist()
        if short:
            raise ValueError(
                f"prompts {short[:10]} have fewer than {MIN_PROMPT_LENGTH} real tokens; remove them "
                "(Probe.from_tensors drops them with a warning)"
            )
        if isinstance(views, (str, bytes)) or not isinstance(views, Sequence):
            raise TypeError(
                "views must be a list of (input_ids, attention_mask) pairs; to generate views, use "
                "Probe.from_tensors(..., views=n) or probe.with_views(n)"
            )
        prepared = []
        for index, view in enumerate(views):
            if not isinstance(view, (tuple, list)) or len(view) != 2:
                raise TypeError(f"views[{index}] must be an (input_ids, attention_mask) pair")
            view_ids, view_mask = self._prepare(
                view[0], view[1], vocab_size, pad_token_id, f"views[{index}] input_ids",
                f"views[{index}] attention_mask",
            )
            if view_ids.shape[0] != self.input_ids.shape[0]:
                raise ValueError(
                    f"views[{index}] has {view_ids.shape[0]} prompts but the clean batch has "
                    f"{self.input_ids.shape[0]}; every view needs one row per prompt"
                )
            if not bool((view_mask.sum(dim=1) > 0).all()):
                raise ValueError(f"views[{index}] has a prompt without any real token")
            prepared.append((view_ids, view_mask))
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = prepared
        self.vocab_size: int = vocab_size
        self.seed: int = seed
        self.tokenizer_name: str | None = tokenizer_name
        self.pad_token_id: int = pad_token_id
        self.special_token_ids: tuple[int, ...] = special
        self.edit_fraction: float = edit_fraction

    @staticmethod
    def _prepare(
        input_ids: object, attention_mask: object, vocab_size: int, pad_token_id: int, name: str, mask_name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = _as_id_tensor(input_ids, name)
        mask = _as_mask_tensor(attention_mask, ids.shape, mask_name, name)
        _check_id_range(ids, mask, vocab_size, name)
        return right_align(ids.long(), mask, pad_token_id=pad_token_id)

    # ---------------------------------------------------------------------------------------------
    # Constructors
    # ---------------------------------------------------------------------------------------------

    @classmethod
    def _from_sequences(
        cls,
        sequences: list[list[int]],
        *,
        dropped_short: int,
        source: str,
        views: int,
        seed: int,
        vocab_size: int,
        pad_token_id: int,
        special_token_ids: Sequence[int],
        tokenizer_name: str | None,
        edit_fraction: float,
    ) -> Probe:
        _report_short_prompts(dropped_short, len(sequences), source, "every prompt was empty or shorter than "
                              f"{MIN_PROMPT_LENGTH} tokens; pass longer texts")
        width = max(len(seq) for seq in sequences)
        ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        probe = cls(
            ids,
            mask,
            vocab_size=vocab_size,
            seed=seed,
            tokenizer_name=tokenizer_name,
            pad_token_id=pad_token_id,
            special_token_ids=special_token_ids,
            edit_fraction=edit_fraction,
        )
        return probe.with_views(views)

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        tokenizer: Any,
        *,
        max_length: int = 128,
        num_prompts: int | None = 64,
        views: int = 2,
        seed: int = 0,
        edit_fraction: float = DEFAULT_EDIT_FRACTION,
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
            seed: seed of the views.
            edit_fraction: fraction of positions edited per augmentation operation.
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
        seed = _check_int(seed, "seed")
        settings = _tokenizer_settings(tokenizer)

        candidates = [text for text in texts if text.strip()]
        wanted = len(candidates) if num_prompts is None else num_prompts
        sequences: list[list[int]] = []
        dropped = 0
        chunk = max(wanted, 16)
        for start in range(0, len(candidates), chunk):
            if len(sequences) >= wanted:
                break
            for seq in _tokenize(tokenizer, candidates[start : start + chunk], max_length):
                if len(sequences) >= wanted:
                    break
                if len(seq) < MIN_PROMPT_LENGTH:
                    dropped += 1
                else:
                    sequences.append(seq)
        settings["vocab_size"] = cls._vocab_covering(settings["vocab_size"], sequences)
        if num_prompts is not None and len(sequences) < num_prompts:
            logger.info("layerwatch probe: %d usable prompt(s) found (num_prompts=%d)", len(sequences), num_prompts)
        return cls._from_sequences(
            sequences,
            dropped_short=dropped,
            source="texts",
            views=views,
            seed=seed,
            edit_fraction=edit_fraction,
            **settings,
        )

    @classmethod
    def from_tensors(
        cls,
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

        Rows with fewer than 3 real tokens are dropped with a warning.
        """
        vocab_size = _check_int(vocab_size, "vocab_size", minimum=1, hint=" (e.g. model.config.vocab_size)")
        views = _check_views_count(views)
        ids = _as_id_tensor(input_ids, "input_ids")
        mask = _as_mask_tensor(attention_mask, ids.shape, "attention_mask", "input_ids")
        if ids.shape[0] == 0:
            raise ValueError("input_ids has no prompts (0 rows); a probe needs at least one prompt")
        _check_id_range(ids, mask, vocab_size, "input_ids")
        keep = mask.sum(dim=1) >= MIN_PROMPT_LENGTH
        _report_short_prompts(int((~keep).sum()), int(keep.sum()), "input_ids", "every row has fewer than "
                              f"{MIN_PROMPT_LENGTH} real tokens (check attention_mask)")
        probe = cls(
            ids[keep],
            mask[keep],
            vocab_size=vocab_size,
            seed=seed,
            tokenizer_name=tokenizer_name,
            pad_token_id=pad_token_id,
            special_token_ids=special_token_ids,
            edit_fraction=edit_fraction,
        )
        return probe.with_views(views)

    @classmethod
    def from_dataset(
        cls,
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
        """
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
        if tokenizer is not None:
            _check_tokenizer(tokenizer)
        max_length = _check_max_length(max_length)
        num_prompts = _check_num_prompts(num_prompts)
        views = _check_views_count(views)
        seed = _check_int(seed, "seed")

        settings: dict[str, Any] = (
            _tokenizer_settings(tokenizer)
            if tokenizer is not None
            else {"vocab_size": None, "special_token_ids": (), "pad_token_id": 0, "tokenizer_name": None}
        )
        if vocab_size is not None:
            settings["vocab_size"] = _check_int(vocab_size, "vocab_size", minimum=1)
        if settings["vocab_size"] is None:
            raise ValueError(
                "from_dataset needs the vocabulary size: pass tokenizer=... or vocab_size=... "
                "(e.g. model.config.vocab_size)"
            )
        if pad_token_id is not None:
            settings["pad_token_id"] = pad_token_id
        if special_token_ids is not None:
            settings["special_token_ids"] = special_token_ids

        num_rows = len(dataset)
        if num_rows == 0:
            raise ValueError("dataset is empty; pass a dataset with at least one non-empty row")
        column_names = getattr(dataset, "column_names", None)
        if isinstance(column_names, list) and "input_ids" not in column_names and text_column not in column_names:
            raise ValueError(
                f"dataset has neither an 'input_ids' column nor the text column {text_column!r} "
                f"(columns: {column_names}); pass text_column=..."
            )

        wanted = num_rows if num_prompts is None else num_prompts
        max_rows = num_rows if num_prompts is None else max(_MAX_ROWS_FACTOR * num_prompts, _MIN_ROWS_EXAMINED)
        sequences: list[list[int]] = []
        dropped = 0
        examined = 0
        pending_texts: list[str] = []
        order = _row_order(num_rows, seed)

        def flush_texts() -> None:
            nonlocal dropped
            if not pending_texts:
                return
            for seq in _tokenize(tokenizer, pending_texts, max_length):
                if len(sequences) >= wanted:
                    break
                if len(seq) < MIN_PROMPT_LENGTH:
                    dropped += 1
                else:
                    sequences.append(seq)
            pending_texts.clear()

        for index in order:
            if len(sequences) >= wanted or examined >= max_rows:
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
            if row.get("input_ids") is not None:
                ids = _ids_from_row(row["input_ids"], row.get("attention_mask"), index)[:max_length]
                if not ids:
                    continue
                if len(ids) < MIN_PROMPT_LENGTH:
                    dropped += 1
                else:
                    sequences.append(ids)
            elif text_column in row:
                text = row[text_column]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise TypeError(f"dataset row {index}: {text_column!r} must be a str, got {type(text).__name__}")
                if not text.strip():
                    continue
                if tokenizer is None:
                    raise ValueError(
                        f"dataset rows have text in {text_column!r} but no 'input_ids'; pass tokenizer=..."
                    )
                pending_texts.append(text)
                if len(pending_texts) >= max(wanted - len(sequences), 16):
                    flush_texts()
            else:
                raise ValueError(
                    f"dataset row {index} has neither 'input_ids' nor {text_column!r} (keys: {sorted(row)}); "
                    "pass text_column=..."
                )
        if len(sequences) < wanted:
            flush_texts()
        if tokenizer is not None and vocab_size is None:
            settings["vocab_size"] = cls._vocab_covering(settings["vocab_size"], sequences)
        if num_prompts is not None and len(sequences) < num_prompts:
            logger.info(
                "layerwatch probe: %d usable prompt(s) found in %d dataset rows examined (num_prompts=%d)",
                len(sequences),
                examined,
                num_prompts,
            )
        return cls._from_sequences(
            sequences,
            dropped_short=dropped,
            source="dataset",
            views=views,
            seed=seed,
            edit_fraction=edit_fraction,
            **settings,
        )

    @staticmethod
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

    # ---------------------------------------------------------------------------------------------
    # Views and properties
    # ---------------------------------------------------------------------------------------------

    def _make_view(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return augment_batch(
            self.input_ids,
            self.attention_mask,
            vocab_size=self.vocab_size,
            generator=view_generator(self.seed, index),
            pad_token_id=self.pad_token_id,
            special_token_ids=self.special_token_ids,
            edit_fraction=self.edit_fraction,
            operations=DEFAULT_OPERATIONS,
        )

    def with_views(self, n: int) -> Probe:
        """A probe with ``n`` views: the first ``min(n, len(self.views))`` are this probe's, the rest generated.

        View ``k`` is generated from :func:`layerwatch.augment.view_generator` ``(seed, k)``, so the
        result does not depend on how many views existed before: ``p.with_views(2).with_views(16)``
        equals ``p.with_views(16)``. Tensors are shared with this probe, not copied.
        """
        n = _check_int(n, "n", minimum=0, hint=" (the number of views)")
        views = list(self.views[:n])
        views.extend(self._make_view(index) for index in range(len(views), n))
        probe = object.__new__(type(self))
        probe.__dict__.update(self.__dict__)
        probe.views = views
        return probe

    @property
    def num_prompts(self) -> int:
        """Number of prompts ``B``."""
        return int(self.input_ids.shape[0])

    def max_token_id(self) -> int:
        """The largest real-token id in the clean batch and all views."""
        values = [int(ids[mask.bool()].max()) for ids, mask in self._batches() if bool(mask.any())]
        return max(values)

    def max_length(self) -> int:
        """The longest real length (tokens) of a prompt in the clean batch and all views."""
        return max(int(mask.sum(dim=1).max()) for _, mask in self._batches())

    def _batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.input_ids, self.attention_mask), *self.views]

    @property
    def metadata(self) -> dict[str, Any]:
        """The probe's settings (what :meth:`save` writes next to the tensors, plus the content hash)."""
        return {
            "vocab_size": self.vocab_size,
            "seed": self.seed,
            "tokenizer_name": self.tokenizer_name,
            "pad_token_id": self.pad_token_id,
            "special_token_ids": list(self.special_token_ids),
            "num_prompts": self.num_prompts,
            "num_views": len(self.views),
            "augmentation": self._augmentation_settings(),
            "content_hash": self.content_hash,
        }

    def _augmentation_settings(self) -> dict[str, Any]:
        return {"edit_fraction": self.edit_fraction, "operations": list(DEFAULT_OPERATIONS)}

    @property
    def content_hash(self) -> str:
        """sha256 (hex) over the clean batch, every view, and the settings that determine them.

        Covered: all tensors (as little-endian int64 with their shapes), ``vocab_size``, ``seed``,
        ``pad_token_id``, ``special_token_ids`` and the augmentation settings. Not covered:
        ``tokenizer_name`` (a label: the same tokenizer loaded from a local path hashes the same).
        """
        digest = hashlib.sha256()
        settings = {
            "vocab_size": self.vocab_size,
            "seed": self.seed,
            "pad_token_id": self.pad_token_id,
            "special_token_ids": list(self.special_token_ids),
            "augmentation": self._augmentation_settings(),
        }
        digest.update(f"{PROBE_FORMAT}:{PROBE_FORMAT_VERSION}\n".encode())
        digest.update(json.dumps(settings, sort_keys=True).encode())
        for name, tensor in self._named_tensors().items():
            digest.update(f"\n{name}:{list(tensor.shape)}\n".encode())
            digest.update(_tensor_bytes(tensor))
        return digest.hexdigest()

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        for index, (ids, mask) in enumerate(self.views):
            tensors[f"view_{index}_input_ids"] = ids
            tensors[f"view_{index}_attention_mask"] = mask
        return tensors

    def __repr__(self) -> str:
        return (
            f"Probe(num_prompts={self.num_prompts}, max_length={self.max_length()}, views={len(self.views)}, "
            f"vocab_size={self.vocab_size}, tokenizer_name={self.tokenizer_name!r}, seed={self.seed}, "
            f"content_hash={self.content_hash[:12]!r})"
        )

    # ---------------------------------------------------------------------------------------------
    # Save / load
    # ---------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the probe to one safetensors file and return its path.

        Tensors: ``input_ids``, ``attention_mask``, ``view_<k>_input_ids``, ``view_<k>_attention_mask``
        (int64). Header metadata (strings): ``format`` (``"layerwatch-probe"``), ``format_version``,
        ``layerwatch_version``, ``vocab_size``, ``seed``, ``pad_token_id``, ``num_views``,
        ``content_hash``, ``tokenizer_name`` (absent when unknown), and JSON ``special_token_ids`` and
        ``augmentation``. If ``path`` is an existing directory the file is ``<path>/probe.safetensors``.
        Parent directories are created; the file is written to a temporary file and renamed into
        place, so a reader never sees a partial probe.
        """
        from safetensors.torch import save as safetensors_save

        from layerwatch._version import __version__

        path = Path(path)
        if path.is_dir():
            path = path / PROBE_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": PROBE_FORMAT,
            "format_version": str(PROBE_FORMAT_VERSION),
            "layerwatch_version": __version__,
            "vocab_size": str(self.vocab_size),
            "seed": str(self.seed),
            "pad_token_id": str(self.pad_token_id),
            "special_token_ids": json.dumps(list(self.special_token_ids)),
            "num_views": str(len(self.views)),
            "augmentation": json.dumps(self._augmentation_settings(), sort_keys=True),
            "content_hash": self.content_hash,
        }
        if self.tokenizer_name is not None:
            metadata["tokenizer_name"] = self.tokenizer_name
        tensors = {
            name: tensor.detach().to("cpu", torch.int64).contiguous().clone()
            for name, tensor in self._named_tensors().items()
        }
        payload = safetensors_save(tensors, metadata=metadata)
        # Created like the run's other files (0666 less the umask), not 0600 as tempfile.mkstemp would.
        tmp_name = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        handle = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
            raise
        logger.debug("layerwatch probe saved to %s", path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Probe:
        """Read a probe written by :meth:`save` (a file, or a run directory holding ``probe.safetensors``).

        Raises:
            FileNotFoundError: nothing at ``path``.
            ValueError: the file is not a valid safetensors file (truncated, corrupt), is a safetensors
                file that is not a layerwatch probe (e.g. model weights), was written by a newer probe
                format, or its content does not match its stored hash.
        """
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / PROBE_FILENAME
        if not path.exists():
            raise FileNotFoundError(f"no probe file at {path}")
        tensors: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                names = list(file.keys())
                if metadata.get("format") == PROBE_FORMAT:  # never read the tensors of a foreign file
                    tensors = {name: file.get_tensor(name) for name in names}
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ValueError(
                f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it may be truncated "
                "or corrupt; rebuild the probe and save it again"
            ) from exc
        if metadata.get("format") != PROBE_FORMAT:
            shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
            raise ValueError(
                f"{path} is a safetensors file but not a layerwatch probe (metadata format="
                f"{metadata.get('format')!r}; tensors: {shown or 'none'}), e.g. model weights; pass the "
                "probe.safetensors of a layerwatch run or a file written by Probe.save"
            )
        try:
            version = int(metadata.get("format_version", ""))
        except ValueError:
            raise ValueError(f"{path}: invalid probe format_version {metadata.get('format_version')!r}") from None
        if version > PROBE_FORMAT_VERSION:
            raise ValueError(
                f"{path} was written with probe format version {version} (layerwatch "
                f"{metadata.get('layerwatch_version', '?')}); this layerwatch reads up to version "
                f"{PROBE_FORMAT_VERSION}: upgrade layerwatch"
            )
        try:
            num_views = int(metadata["num_views"])
            views = [
                (tensors[f"view_{k}_input_ids"], tensors[f"view_{k}_attention_mask"]) for k in range(num_views)
            ]
            augmentation = json.loads(metadata.get("augmentation", "{}"))
            probe = cls(
                tensors["input_ids"],
                tensors["attention_mask"],
                views,
                vocab_size=int(metadata["vocab_size"]),
                seed=int(metadata["seed"]),
                tokenizer_name=metadata.get("tokenizer_name"),
                pad_token_id=int(metadata["pad_token_id"]),
                special_token_ids=json.loads(metadata["special_token_ids"]),
                edit_fraction=float(augmentation.get("edit_fraction", DEFAULT_EDIT_FRACTION)),
            )
            stored_hash = str(metadata["content_hash"])
        except Exception as exc:  # noqa: BLE001 - whatever a crafted header or tensor triggers, it is a bad file
            detail = f"missing {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise ValueError(f"{path} is a damaged layerwatch probe: {detail}") from exc
        if probe.content_hash != stored_hash:
            raise ValueError(
                f"{path}: content hash mismatch (stored {stored_hash[:12]}..., computed "
                f"{probe.content_hash[:12]}...); the file was modified or corrupted; rebuild the probe"
            )
        return probe
