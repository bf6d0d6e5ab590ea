"""The probe: a fixed batch of prompts and their augmented views, saved with a run (SPEC §2).

A :class:`Probe` is built once (from texts, token tensors or a dataset), then every probe of a run
feeds the same prompts and the same views to the model, so that metric changes come from the model
and not from the data. It is stored in the run directory as one ``probe.safetensors`` file.

This module holds the probe's data, its views and save/load. Building it from texts, datasets and
tensors lives in :mod:`layerwatch.probe.sources` (the ``Probe.from_*`` classmethods delegate there);
argument checks shared with other modules live in :mod:`layerwatch.checks`.

Conventions:

* The clean batch and every view are **right-padded** with ``pad_token_id`` and trimmed to their
  longest prompt, whatever padding side the input had (valid tokens are read through the attention
  mask). Right padding lets causal models without ``position_ids`` see positions ``0..n-1``. This is
  done once, when the probe is built; :func:`take_rows` then cuts micro-batches without re-aligning.
* Masks and ids are ``torch.long`` CPU tensors; the monitor moves them to the model's device.
* Prompts with fewer than :data:`MIN_PROMPT_LENGTH` (3) real tokens are dropped with a logged warning
  by the ``from_*`` builders (curvature needs 3 tokens); the constructor refuses them with ``ValueError``.
* View ``k`` is :func:`layerwatch.probe.augment.augment_batch` of the clean batch with the generator
  :func:`layerwatch.probe.augment.view_generator` ``(seed, k)``: views form a prefix-stable sequence, so
  :meth:`Probe.with_views` extends a probe (e.g. 2 -> 16 for the ``"paper"`` preset) deterministically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from layerwatch.probe.augment import (
    DEFAULT_EDIT_FRACTION,
    DEFAULT_OPERATIONS,
    augment_batch,
    fitting_length,
    right_align,
    view_generator,
)
from layerwatch._version import __version__
from layerwatch.metrics import check_labels
from layerwatch.probe import sources as probe_sources
from layerwatch.checks import (
    MIN_PROMPT_LENGTH,
    as_id_tensor,
    as_mask_tensor,
    check_fraction,
    check_id_range,
    check_int,
)
from layerwatch.rundir.files import PROBE_FILENAME, write_atomically  # PROBE_FILENAME re-exported

__all__ = ["MIN_PROMPT_LENGTH", "PROBE_FILENAME", "PROBE_FORMAT", "PROBE_FORMAT_VERSION", "Probe", "take_rows"]

logger = logging.getLogger(__name__)

PROBE_FORMAT: str = "layerwatch-probe"
"""Value of the ``format`` key in the safetensors header metadata of a saved probe."""

PROBE_FORMAT_VERSION: int = 1
"""Version of the saved-probe layout; :meth:`Probe.load` refuses files written by a newer layout."""


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


def _prepare(
    input_ids: object, attention_mask: object, vocab_size: int, pad_token_id: int, name: str, mask_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ids and mask, right-aligned (the only place a probe batch is right-aligned)."""
    ids = as_id_tensor(input_ids, name)
    mask = as_mask_tensor(attention_mask, ids.shape, mask_name, name)
    check_id_range(ids, mask, vocab_size, name)
    return right_align(ids.long(), mask, pad_token_id=pad_token_id)


def _prepare_views(
    views: object, num_prompts: int, vocab_size: int, pad_token_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validated, right-aligned ``(input_ids, attention_mask)`` views with one row per prompt."""
    if isinstance(views, (str, bytes)) or not isinstance(views, Sequence):
        raise TypeError(
            "views must be a list of (input_ids, attention_mask) pairs; to generate views, use "
            "Probe.from_tensors(..., views=n) or probe.with_views(n)"
        )
    prepared = []
    for index, view in enumerate(views):
        if not isinstance(view, (tuple, list)) or len(view) != 2:
            raise TypeError(f"views[{index}] must be an (input_ids, attention_mask) pair")
        view_ids, view_mask = _prepare(
            view[0], view[1], vocab_size, pad_token_id, f"views[{index}] input_ids",
            f"views[{index}] attention_mask",
        )
        if view_ids.shape[0] != num_prompts:
            raise ValueError(
                f"views[{index}] has {view_ids.shape[0]} prompts but the clean batch has "
                f"{num_prompts}; every view needs one row per prompt"
            )
        if not bool((view_mask.sum(dim=1) > 0).all()):
            raise ValueError(f"views[{index}] has a prompt without any real token")
        prepared.append((view_ids, view_mask))
    return prepared


def take_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` of a probe batch (the clean one or a view), cut to their longest prompt.

    Probe batches are right-aligned once, when the probe is built, so the chosen rows are too: positions
    still start at 0 and only the padding columns past the longest chosen prompt are dropped.
    """
    ids, mask = input_ids[rows], attention_mask[rows]
    width = int(mask.sum(dim=1).max()) if mask.numel() else 0
    return ids[:, :width], mask[:, :width]


def _tensors_digest(digest: Any, tensors: dict[str, torch.Tensor]) -> str:
    """Feed named tensors (name, shape, little-endian int64 bytes) to ``digest``; its hex digest."""
    for name, tensor in tensors.items():
        digest.update(f"\n{name}:{list(tensor.shape)}\n".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _check_probe_labels(labels: object, num_prompts: int) -> list[int | str] | None:
    """The labels as a list of ints or strings, checked for probe_accuracy's folds; None stays None."""
    if labels is None:
        return None
    values = labels.tolist() if isinstance(labels, torch.Tensor) else labels
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"labels must be a list with one class (int or str) per prompt, got {type(labels).__name__}")
    out: list[int | str] = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (str, int)) and not hasattr(value, "__index__"):
            raise TypeError(f"labels[{index}] must be an int or a str (a class), got {type(value).__name__}")
        out.append(value if isinstance(value, str) else int(value))
    check_labels(out, num_prompts)  # ValueError: one class, too few prompts per class, wrong length
    return out


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False).tobytes()


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
        labels: optional class of each prompt (ints or strings), for ``probe_accuracy`` and ``best_layer``: at
            least two classes with at least :data:`layerwatch.metrics.PROBE_FOLDS` prompts each.

    Attributes:
        input_ids: ``[B, T]`` ``torch.long``, right-padded with ``pad_token_id``.
        attention_mask: ``[B, T]`` ``torch.long``, 1 on real tokens.
        views: list of ``(input_ids, attention_mask)`` pairs, each ``[B, T_k]``, right-padded.
        vocab_size, seed, tokenizer_name, pad_token_id, special_token_ids, edit_fraction, labels: as above
            (``labels`` is a list, or None for an unlabelled probe).

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
        labels: Sequence[int | str] | torch.Tensor | None = None,
    ) -> None:
        vocab_size = check_int(vocab_size, "vocab_size", minimum=1, hint=" (e.g. len(tokenizer))")
        seed = check_int(seed, "seed")
        pad_token_id = check_int(pad_token_id, "pad_token_id", minimum=0)
        if pad_token_id >= vocab_size:
            raise ValueError(
                f"pad_token_id {pad_token_id} must be < vocab_size {vocab_size} (padding is fed to the "
                "embedding, masked); pass a valid id such as the EOS id or 0"
            )
        if tokenizer_name is not None and not isinstance(tokenizer_name, str):
            raise TypeError(f"tokenizer_name must be a str or None, got {type(tokenizer_name).__name__}")
        special = _normalize_special_ids(special_token_ids, vocab_size)
        edit_fraction = check_fraction(edit_fraction, "edit_fraction")

        self.input_ids, self.attention_mask = _prepare(
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
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = _prepare_views(
            views, self.input_ids.shape[0], vocab_size, pad_token_id
        )
        self.vocab_size: int = vocab_size
        self.seed: int = seed
        self.tokenizer_name: str | None = tokenizer_name
        self.pad_token_id: int = pad_token_id
        self.special_token_ids: tuple[int, ...] = special
        self.edit_fraction: float = edit_fraction
        self.labels: list[int | str] | None = _check_probe_labels(labels, self.num_prompts)

    # ---------------------------------------------------------------------------------------------
    # Constructors: built in layerwatch.probe.sources (signatures and docstrings there)
    # ---------------------------------------------------------------------------------------------

    from_texts = classmethod(probe_sources.from_texts)
    from_tensors = classmethod(probe_sources.from_tensors)
    from_dataset = classmethod(probe_sources.from_dataset)

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

        View ``k`` is generated from :func:`layerwatch.probe.augment.view_generator` ``(seed, k)``, so the
        result does not depend on how many views existed before: ``p.with_views(2).with_views(16)``
        equals ``p.with_views(16)``. Tensors are shared with this probe, not copied.
        """
        n = check_int(n, "n", minimum=0, hint=" (the number of views)")
        views = list(self.views[:n])
        views.extend(self._make_view(index) for index in range(len(views), n))
        probe = object.__new__(type(self))
        probe.__dict__.update(self.__dict__)
        probe.views = views
        return probe

    def cropped(self, max_length: int) -> Probe:
        """This probe with every prompt cut to its first ``max_length`` tokens, and as many views as it has,
        generated again (from the same seed) from the cut prompts; settings and labels are kept."""
        max_length = check_int(max_length, "max_length", minimum=MIN_PROMPT_LENGTH)
        probe = type(self)(
            self.input_ids[:, :max_length], self.attention_mask[:, :max_length], vocab_size=self.vocab_size,
            seed=self.seed, tokenizer_name=self.tokenizer_name, pad_token_id=self.pad_token_id,
            special_token_ids=self.special_token_ids, edit_fraction=self.edit_fraction, labels=self.labels,
        )
        return probe.with_views(len(self.views))

    def fitted_to(self, positions: int, *, uses_views: bool = True) -> Probe:
        """This probe when its prompts (and, where ``uses_views``, its views) fit a model of ``positions``
        positions; else :meth:`cropped` to the longest prompt length whose views fit
        (:func:`layerwatch.probe.augment.fitting_length`).

        Raises:
            ValueError: not even a prompt of :data:`MIN_PROMPT_LENGTH` tokens (and its views) fits.
        """
        positions = check_int(positions, "positions", minimum=1)
        clean = int(self.attention_mask.sum(dim=1).max())
        longest = self.max_length() if uses_views else clean
        if longest <= positions:
            return self
        fitting = fitting_length(positions, uses_views=uses_views, edit_fraction=self.edit_fraction)
        if fitting < MIN_PROMPT_LENGTH:
            raise ValueError(
                f"the model takes {positions} positions, too few for a probe prompt of {MIN_PROMPT_LENGTH} tokens and "
                "its augmented views; use metrics='light' (no views) or a model with more positions"
            )
        return self.cropped(fitting)

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
            "labels": self.labels,
            "content_hash": self.content_hash,
        }

    def _augmentation_settings(self) -> dict[str, Any]:
        return {"edit_fraction": self.edit_fraction, "operations": list(DEFAULT_OPERATIONS)}

    @property
    def content_hash(self) -> str:
        """sha256 (hex) over the clean batch, every view, and the settings that determine them.

        Covered: all tensors (as little-endian int64 with their shapes), ``vocab_size``, ``seed``,
        ``pad_token_id``, ``special_token_ids``, the augmentation settings and the labels. Not covered:
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
        if self.labels is not None:  # labels define the series too; an unlabelled probe hashes as before
            settings["labels"] = self.labels
        digest.update(f"{PROBE_FORMAT}:{PROBE_FORMAT_VERSION}\n".encode())
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return _tensors_digest(digest, self._named_tensors())

    def series_hash(self, views: int) -> str:
        """sha256 (hex) of what defines a series measured with ``views`` augmented views: the clean prompts and
        views ``0..views-1`` (generated from the seed where this probe has fewer).

        Resume and ``layerwatch trajectory`` compare this, not :attr:`content_hash`: views the metrics do not use
        do not matter (the probe a ``metrics="paper"`` run saved has 16 views and continues a series of the same
        prompts and seed given with 2), and with ``views=0`` (``metrics="light"``) neither do the seed and the
        augmentation settings.
        """
        views = check_int(views, "views", minimum=0, hint=" (the number of augmented views the metrics use)")
        digest = hashlib.sha256(f"layerwatch-series:{views}\n".encode())
        if self.labels is not None:  # the labels define the series too (probe_accuracy); unlabelled: as before
            digest.update(f"labels:{json.dumps(self.labels)}\n".encode())
        return _tensors_digest(digest, self.with_views(views)._named_tensors())

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
            f"{'' if self.labels is None else f'classes={len(set(self.labels))}, '}"
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
        ``content_hash``, ``tokenizer_name`` (absent when unknown), and JSON ``special_token_ids``,
        ``augmentation`` and ``labels`` (absent for an unlabelled probe). If ``path`` is an existing directory the file is ``<path>/probe.safetensors``.
        Parent directories are created; the file is written to a temporary file and renamed into
        place, so a reader never sees a partial probe.
        """
        from safetensors.torch import save as safetensors_save

        path = _probe_file(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: tensor.detach().to("cpu", torch.int64).contiguous().clone()
            for name, tensor in self._named_tensors().items()
        }
        write_atomically(path, safetensors_save(tensors, metadata=self._header()))
        logger.debug("layerwatch probe saved to %s", path)
        return path

    def _header(self) -> dict[str, str]:
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
        if self.labels is not None:
            metadata["labels"] = json.dumps(self.labels)
        return metadata

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Probe:
        """Read a probe written by :meth:`save` (a file, or a run directory holding ``probe.safetensors``).

        Raises:
            FileNotFoundError: nothing at ``path``.
            ValueError: the file is not a valid safetensors file (truncated, corrupt), is a safetensors
                file that is not a layerwatch probe (e.g. model weights), was written by a newer probe
                format, or its content does not match its stored hash.
        """
        path = _probe_file(path)
        metadata, tensors = _read_probe_file(path)
        return _probe_from_file(cls, path, metadata, tensors)


# --------------------------------------------------------------------------------------------------
# The probe file
# --------------------------------------------------------------------------------------------------


def _probe_file(path: str | os.PathLike[str]) -> Path:
    """``path``, or ``<path>/probe.safetensors`` when it is a directory."""
    path = Path(path)
    return path / PROBE_FILENAME if path.is_dir() else path




def _probe_from_file(
    cls: type[Probe], path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]
) -> Probe:
    """The probe a file's header and tensors describe, checked against its stored content hash."""
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
            labels=json.loads(metadata["labels"]) if "labels" in metadata else None,
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


def _read_probe_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The header metadata and tensors of a probe file; refuses missing, corrupt, foreign and newer files."""
    from safetensors import safe_open

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
    return metadata, tensors
