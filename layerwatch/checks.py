"""Argument checks shared by several modules: clear ``TypeError``/``ValueError`` messages naming the argument.

* :func:`check_int` and :func:`check_fraction`: plain numbers (bools refused).
* :data:`MIN_PROMPT_LENGTH`: the shortest usable probe prompt.
* :func:`as_id_tensor`, :func:`as_mask_tensor` and :func:`check_id_range`: a batch of token ids and its
  attention mask, as :class:`layerwatch.Probe` and its sources accept them.
"""

from __future__ import annotations

import torch

__all__ = ["MIN_PROMPT_LENGTH", "as_id_tensor", "as_mask_tensor", "check_fraction", "check_id_range", "check_int"]

MIN_PROMPT_LENGTH: int = 3
"""Prompts with fewer real tokens than this are dropped (curvature needs three tokens)."""


def check_int(value: object, name: str, *, minimum: int | None = None, hint: str = "") -> int:
    """``value`` as an ``int`` (bools refused), at least ``minimum``; ``hint`` is appended to the error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}{hint}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{hint}")
    return int(value)


def check_fraction(value: object, name: str) -> float:
    """``value`` as a ``float`` in ``(0, 1]`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(value).__name__}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def as_id_tensor(value: object, name: str) -> torch.Tensor:
    """A 2-D integer CPU tensor from a tensor, numpy array or nested list, with a clear error otherwise."""
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


def as_mask_tensor(value: object, shape: torch.Size, name: str, ids_name: str) -> torch.Tensor:
    """A bool CPU mask of ``shape`` (``None``: all real) from bool or 0/1 values; ``ids_name`` names its ids."""
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


def check_id_range(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int, name: str) -> None:
    """Refuse a real-token id outside ``[0, vocab_size)`` (padding positions may hold anything)."""
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
