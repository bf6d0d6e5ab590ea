"""Token-level augmented views of probe prompts (SPEC §2).

The invariance metrics (InfoNCE, DiME, LiDAR) compare the representations of several *views* of each
probe prompt. The reference code augments raw text with nlpaug (split a word, substitute random
characters, substitute keyboard-neighbour characters). layerwatch works on token ids and needs no
tokenizer, so it mirrors those three augmenters at the token level. Per view and per prompt, three
operations run in sequence:

1. ``"split"``: insert a random token right after each of ``k`` chosen positions (length grows by ``k``,
   like a word that becomes two sub-words);
2. ``"substitute"``: replace the token at each of ``k`` chosen positions by a uniform random token;
3. ``"substitute"`` again (the reference's keyboard augmenter; there is no keyboard at the token level).

Rules, all of which hold for every operation:

* Only *editable* positions are chosen: a position is editable unless it is the first valid token of
  its prompt (the BOS position) or its id is one of ``special_token_ids``. Tokens inserted by an
  earlier operation are ordinary tokens and editable by the later ones.
* ``k = max(1, ceil(edit_fraction * T_eff))`` distinct positions, where ``T_eff`` is the number of
  editable positions of the sequence the operation receives (so the substitutions see the ``k``
  inserted tokens too); optionally capped at ``max_edits`` (10 mimics nlpaug's cap, which makes long
  prompts relatively less augmented). A prompt with no editable position is left unchanged.
* Random tokens are drawn uniformly from ``[0, vocab_size)`` without ``special_token_ids``. A
  substitution always changes the token (it draws from that set without the current token), so each
  ``"substitute"`` changes exactly ``k`` tokens when the vocabulary has at least two non-special ids.
* All randomness comes from the ``torch.Generator`` passed in; the global RNGs of torch, numpy and
  ``random`` are never used. The same generator state gives the same views on every platform.

Inputs may be padded on either side (or have holes): the valid tokens of each row are read through
``attention_mask``. Outputs are **right-padded** with ``pad_token_id``, and their width is the longest
valid row of the view; ``attention_mask`` is ``1`` exactly on the valid tokens. Both outputs are
``torch.long`` and live on the device of ``input_ids``.

Invariance values depend on these settings (they are not comparable across different rates), which
is why :class:`layerwatch.Probe` generates its views once and stores them with the probe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from layerwatch.checks import check_int

__all__ = [
    "DEFAULT_EDIT_FRACTION",
    "DEFAULT_OPERATIONS",
    "augment_batch",
    "make_views",
    "fitting_length",
    "max_view_length",
    "right_align",
    "view_generator",
]

DEFAULT_EDIT_FRACTION: float = 0.3
"""Fraction of a prompt's editable positions that each operation edits (nlpaug's ``aug_p``)."""

DEFAULT_OPERATIONS: tuple[str, ...] = ("split", "substitute", "substitute")
"""The three operations applied in sequence, mirroring SplitAug, RandomCharAug and KeyboardAug."""

_KNOWN_OPERATIONS = frozenset({"split", "substitute"})


# --------------------------------------------------------------------------------------------------
# Validation and small helpers
# --------------------------------------------------------------------------------------------------


def _check_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"input_ids must be a torch.Tensor of shape [batch, tokens], got {type(input_ids).__name__}"
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be 2-D [batch, tokens], got shape {tuple(input_ids.shape)}; "
            "use input_ids.unsqueeze(0) for a single prompt"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
            f"{tuple(input_ids.shape)}; they must match"
        )
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool or integer (1 = real token), got {attention_mask.dtype}")
    if attention_mask.dtype != torch.bool and attention_mask.numel() and not bool(
        ((attention_mask == 0) | (attention_mask == 1)).all()
    ):
        raise ValueError("attention_mask must contain only 0 (padding) and 1 (real token)")
    return input_ids, attention_mask.to(input_ids.device).bool()


def _special_tensor(special_token_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    try:
        ids = sorted({int(i) for i in special_token_ids})
    except (TypeError, ValueError) as exc:
        raise TypeError(f"special_token_ids must be a sequence of ints, got {special_token_ids!r}") from exc
    return torch.tensor(ids, dtype=torch.long, device=device)


def _allowed_tokens(vocab_size: int, special: torch.Tensor) -> torch.Tensor:
    """Sorted ids in ``[0, vocab_size)`` that are not special (the pool random tokens come from)."""
    everything = torch.arange(vocab_size, device=special.device)
    allowed = everything[~torch.isin(everything, special)]
    if allowed.numel() == 0:
        raise ValueError(
            f"every id in [0, vocab_size={vocab_size}) is in special_token_ids, so there is no token to "
            "insert or substitute; pass the full vocabulary size"
        )
    return allowed


def view_generator(seed: int, view_index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator that :class:`layerwatch.Probe` uses for view ``view_index`` of a probe with ``seed``.

    The generator's seed is derived by hashing ``(seed, view_index)`` (sha256), so views are independent
    of each other, and view ``k`` does not depend on how many views were generated before it: a probe
    extended from 2 to 16 views keeps its first two.

    Example:
        >>> from layerwatch.probe.augment import view_generator
        >>> view_generator(0, 1).initial_seed() == view_generator(0, 1).initial_seed()
        True
        >>> view_generator(0, 0).initial_seed() == view_generator(0, 1).initial_seed()
        False
    """
    seed = check_int(seed, "seed")
    view_index = check_int(view_index, "view_index", minimum=0)
    digest = hashlib.sha256(f"layerwatch-view:{seed}:{view_index}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def right_align(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid tokens to the left, in order, and right-pad with ``pad_token_id``.

    Works for left padding, right padding and masks with holes. The result's width is the longest
    valid row (0 for a batch without valid tokens). Returns ``(input_ids, attention_mask)``, both
    ``torch.long``.

    Example:
        >>> import torch
        >>> from layerwatch.probe.augment import right_align
        >>> ids = torch.tensor([[0, 0, 7, 8], [5, 6, 7, 8]])
        >>> mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
        >>> right_align(ids, mask, pad_token_id=3)
        (tensor([[7, 8, 3, 3],
                [5, 6, 7, 8]]), tensor([[1, 1, 0, 0],
                [1, 1, 1, 1]]))
    """
    input_ids, mask = _check_batch(input_ids, attention_mask)
    ids, valid, _ = _right_align(input_ids.long(), mask, pad_token_id)
    return ids, valid.long()


def _right_align(
    ids: torch.Tensor, mask: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = mask.sum(dim=1)
    # A stable sort of "is padding" brings the valid tokens to the front, keeping their order.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    width = int(lengths.max()) if lengths.numel() else 0
    ids = ids.gather(1, order)[:, :width]
    valid = torch.arange(width, device=ids.device)[None, :] < lengths[:, None]
    return ids.masked_fill(~valid, pad_token_id), valid, lengths


# --------------------------------------------------------------------------------------------------
# The operations (all on right-aligned batches: ids [B, T], valid [B, T] bool, lengths [B])
# --------------------------------------------------------------------------------------------------


def _editable(ids: torch.Tensor, valid: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    editable = valid & ~torch.isin(ids, special)
    editable[:, :1] = False  # the first token of every prompt (BOS) is never edited
    return editable


def _num_edits(editable: torch.Tensor, edit_fraction: float, max_edits: int | None) -> torch.Tensor:
    t_eff = editable.sum(dim=1)
    # The small epsilon keeps exact products (0.3 * 10 = 3) from rounding up to the next integer.
    k = torch.ceil(t_eff.double() * edit_fraction - 1e-9).long().clamp(min=1)
    if max_edits is not None:
        k = k.clamp(max=max_edits)
    return torch.minimum(k, t_eff)


def _choose(editable: torch.Tensor, k: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pick ``k[b]`` distinct editable positions of row ``b`` uniformly at random (bool mask)."""
    batch, width = editable.shape
    scores = torch.rand((batch, width), generator=generator, device=editable.device)
    scores = scores.masked_fill(~editable, 2.0)  # non-editable positions sort last
    order = scores.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(width, device=editable.device).expand(batch, width))
    return (rank < k[:, None]) & editable


def _split(
    ids: torch.Tensor,
    valid: torch.Tensor,
    lengths: torch.Tensor,
    chosen: torch.Tensor,
    allowed: torch.Tensor,
    generator: torch.Generator,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Insert one random allowed token right after every chosen position."""
    batch, width = ids.shape
    chosen_long = chosen.long()
    # Original token j moves right by the number of insertions before it.
    new_position = torch.arange(width, device=ids.device)[None, :] + torch.cumsum(chosen_long, 1) - chosen_long
    new_lengths = lengths + chosen_long.sum(dim=1)
    new_width = int(new_lengths.max()) if new_lengths.numel() else 0
    out = torch.full((batch, new_width), pad_token_id, dtype=ids.dtype, device=ids.device)
    rows, cols = valid.nonzero(as_tuple=True)
    out[rows, new_position[rows, cols]] = ids[rows, cols]
    rows, cols = chosen.nonzero(as_tuple=True)
    draws = torch.randint(0, allowed.numel(), (rows.numel(),), generator=generator, device=ids.device)
    out[rows, new_position[rows, cols] + 1] = allowed[draws]
    new_valid = torch.arange(new_width, device=ids.device)[None, :] < new_lengths[:, None]
    return out, new_valid, new_lengths


def _substitute(
    ids: torch.Tensor, chosen: torch.Tensor, allowed: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Replace every chosen token by a uniform random allowed token different from it."""
    rows, cols = chosen.nonzero(as_tuple=True)
    current = ids[rows, cols]
    n_allowed = allowed.numel()
    if n_allowed == 1:  # nothing else to draw from
        replacement = allowed.expand(rows.numel())
    else:
        # Draw from the n_allowed - 1 ids that are not the current one: skip over its index.
        current_index = torch.searchsorted(allowed, current)
        draws = torch.randint(0, n_allowed - 1, (rows.numel(),), generator=generator, device=ids.device)
        replacement = allowed[draws + (draws >= current_index).long()]
    ids = ids.clone()
    ids[rows, cols] = replacement
    return ids


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def max_view_length(
    length: int,
    *,
    edit_fraction: float = DEFAULT_EDIT_FRACTION,
    max_edits: int | None = None,
    operations: Sequence[str] = DEFAULT_OPERATIONS,
) -> int:
    """The longest a view of a prompt of ``length`` real tokens can be (all positions but the first editable).

    Each ``"split"`` adds ``min(T_eff, max(1, ceil(edit_fraction * T_eff)))`` tokens (capped at
    ``max_edits``), with ``T_eff`` the editable positions it sees. Use it to choose a ``max_length``
    whose views still fit a model's position limit.

    Example:
        >>> from layerwatch.probe.augment import max_view_length
        >>> max_view_length(128)  # 127 editable positions: ceil(0.3 * 127) = 39 insertions
        167
        >>> max_view_length(1)  # nothing is editable
        1
    """
    length = check_int(length, "length", minimum=0)
    if not 0.0 < float(edit_fraction) <= 1.0:
        raise ValueError(f"edit_fraction must be in (0, 1], got {edit_fraction}")
    if isinstance(operations, str):
        operations = (operations,)
    for operation in operations:
        if operation == "split":
            t_eff = max(0, length - 1)
            editable = torch.tensor([[True] * t_eff], dtype=torch.bool)
            length += int(_num_edits(editable, float(edit_fraction), max_edits)[0])
    return length


def fitting_length(
    positions: int,
    *,
    uses_views: bool = True,
    edit_fraction: float = DEFAULT_EDIT_FRACTION,
    max_edits: int | None = None,
    operations: Sequence[str] = DEFAULT_OPERATIONS,
) -> int:
    """The longest prompt whose augmented views (when ``uses_views``) still fit ``positions`` positions: the
    ``max_length`` that fits a model (views insert tokens, so a prompt of ``positions`` tokens does not).

    Example:
        >>> from layerwatch.probe.augment import fitting_length
        >>> fitting_length(32), fitting_length(32, uses_views=False), fitting_length(128)
        (24, 32, 98)
    """
    positions = check_int(positions, "positions", minimum=1)
    if not uses_views:
        return positions
    low, high = 1, positions  # max_view_length grows with the length: the largest fitting one, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if max_view_length(middle, edit_fraction=edit_fraction, max_edits=max_edits, operations=operations) <= positions:
            low = middle
        else:
            high = middle - 1
    return low


def augment_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    vocab_size: int,
    generator: torch.Generator,
    pad_token_id: int = 0,
    special_token_ids: Sequence[int] = (),
    edit_fraction: float = DEFAULT_EDIT_FRACTION,
    max_edits: int | None = None,
    operations: Sequence[str] = DEFAULT_OPERATIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented view of a padded batch of prompts (see the module docstring for the rules).

    Args:
        input_ids: ``[B, T]`` integer token ids, padded on either side.
        attention_mask: ``[B, T]`` bool or 0/1 integers, 1 = real token. ``None``: every position is real.
        vocab_size: random tokens are drawn from ``[0, vocab_size)``; every valid id must be below it.
        generator: the only source of randomness (its state advances). Computation runs on its device.
        pad_token_id: id written into the padding of the output.
        special_token_ids: ids that are never edited and never drawn as random tokens.
        edit_fraction: fraction of the editable positions that each operation edits, in ``(0, 1]``.
        max_edits: optional cap on the positions edited per operation and prompt (nlpaug uses 10).
        operations: the sequence of operations, each ``"split"`` or ``"substitute"``.

    Returns:
        ``(input_ids, attention_mask)`` of the view: ``torch.long``, right-padded with ``pad_token_id``,
        ``[B, T']`` with ``T'`` the longest valid row, on the device of ``input_ids``. Each row's valid
        length is its original length plus the number of ``"split"`` insertions.

    Example:
        >>> import torch
        >>> from layerwatch.probe.augment import augment_batch
        >>> ids = torch.tensor([[1, 5, 6, 7, 8, 9, 2]])  # 1 = BOS, 2 = EOS
        >>> generator = torch.Generator().manual_seed(0)
        >>> view_ids, view_mask = augment_batch(ids, vocab_size=50, generator=generator,
        ...                                     special_token_ids=(0, 1, 2), operations=("split",))
        >>> view_ids.shape  # 5 editable positions: ceil(0.3 * 5) = 2 insertions
        torch.Size([1, 9])
        >>> int(view_ids[0, 0]), int(view_ids[0, -1])  # BOS and EOS are kept
        (1, 2)
    """
    input_ids, mask = _check_batch(input_ids, attention_mask)
    vocab_size = check_int(vocab_size, "vocab_size", minimum=1)
    pad_token_id = check_int(pad_token_id, "pad_token_id")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"got {type(generator).__name__}"
        )
    if isinstance(edit_fraction, bool) or not isinstance(edit_fraction, (int, float)):
        raise TypeError(f"edit_fraction must be a float in (0, 1], got {type(edit_fraction).__name__}")
    if not 0.0 < float(edit_fraction) <= 1.0:
        raise ValueError(f"edit_fraction must be in (0, 1], got {edit_fraction}")
    if max_edits is not None:
        max_edits = check_int(max_edits, "max_edits", minimum=1)
    if isinstance(operations, str):
        operations = (operations,)
    unknown = [op for op in operations if op not in _KNOWN_OPERATIONS]
    if unknown:
        raise ValueError(f"unknown operations {unknown}; choose from {sorted(_KNOWN_OPERATIONS)}")

    output_device = input_ids.device
    device = generator.device
    ids = input_ids.to(device=device, dtype=torch.long)
    mask = mask.to(device)
    valid_ids = ids[mask]
    if valid_ids.numel() and (int(valid_ids.min()) < 0 or int(valid_ids.max()) >= vocab_size):
        raise ValueError(
            f"input_ids must lie in [0, vocab_size={vocab_size}) at real-token positions, found ids in "
            f"[{int(valid_ids.min())}, {int(valid_ids.max())}]; pass the model's vocabulary size"
        )
    special = _special_tensor(special_token_ids, device)
    allowed = _allowed_tokens(vocab_size, special)

    ids, valid, lengths = _right_align(ids, mask, pad_token_id)
    for operation in operations:
        editable = _editable(ids, valid, special)
        chosen = _choose(editable, _num_edits(editable, float(edit_fraction), max_edits), generator)
        if operation == "split":
            ids, valid, lengths = _split(ids, valid, lengths, chosen, allowed, generator, pad_token_id)
        else:
            ids = _substitute(ids, chosen, allowed, generator)
    return ids.to(output_device), valid.long().to(output_device)


def make_views(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_views: int,
    vocab_size: int,
    generator: torch.Generator,
    pad_token_id: int = 0,
    special_token_ids: Sequence[int] = (),
    edit_fraction: float = DEFAULT_EDIT_FRACTION,
    max_edits: int | None = None,
    operations: Sequence[str] = DEFAULT_OPERATIONS,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_views`` independent augmented views of a padded batch, drawn one after another from ``generator``.

    Every view is an independent draw of :func:`augment_batch` (there is no clean view among them).
    Arguments are those of :func:`augment_batch`. :class:`layerwatch.Probe` instead draws view ``k``
    from :func:`view_generator` ``(seed, k)``, so that adding views keeps the existing ones.

    Returns:
        A list of ``num_views`` pairs ``(input_ids, attention_mask)``, each right-padded with
        ``pad_token_id`` to its own width.

    Example:
        >>> import torch
        >>> from layerwatch.probe.augment import make_views
        >>> ids = torch.tensor([[1, 5, 6, 7, 8, 9, 2], [1, 5, 6, 2, 0, 0, 0]])  # 1 = BOS, 2 = EOS, 0 = pad
        >>> mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
        >>> views = make_views(ids, mask, num_views=2, vocab_size=50, special_token_ids=(0, 1, 2),
        ...                    generator=torch.Generator().manual_seed(0))
        >>> len(views)
        2
        >>> view_ids, view_mask = views[0]
        >>> view_mask.sum(dim=1)  # lengths grow by the "split" insertions: ceil(0.3 * 5) = 2, ceil(0.3 * 2) = 1
        tensor([9, 5])
        >>> view_ids[:, 0]  # BOS is never edited
        tensor([1, 1])
    """
    num_views = check_int(num_views, "num_views", minimum=0)
    return [
        augment_batch(
            input_ids,
            attention_mask,
            vocab_size=vocab_size,
            generator=generator,
            pad_token_id=pad_token_id,
            special_token_ids=special_token_ids,
            edit_fraction=edit_fraction,
            max_edits=max_edits,
            operations=operations,
        )
        for _ in range(num_views)
    ]
