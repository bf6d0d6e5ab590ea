"""Attention-sink diagnostics (SPEC §7): massive activations, the tokens that carry them, and prompt entropy
without them."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from layerwatch.metrics.base import _check_alpha, _check_tokens, _result_dtype
from layerwatch.metrics.tokens import prompt_entropy

#: A token whose norm exceeds this multiple of its prompt's median token norm is a sink token (a massive
#: activation, as on the first token of many pretrained decoders). Ordinary tokens of a prompt stay within a
#: few times the median; the sinks reported in the literature sit 100 to 1000 times above it.
SINK_NORM_RATIO = 10.0


def _token_norms(hidden: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Token norms ``[..., B, T]`` (float64, NaN at invalid slots), each prompt's median norm ``[..., B]``
    (mean of the two middle values for an even count) and a bad-prompt flag (no valid token, or a non-finite one)."""
    hidden, mask = _check_tokens(hidden, mask)
    # float32 norms (float64 for float64 input) are accurate to ~1e-7 relative and avoid a float64 copy of hidden
    norms = torch.linalg.vector_norm(hidden, dim=-1, dtype=_result_dtype(hidden)).to(torch.float64)
    valid = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask
    count = valid.sum(-1)
    bad = (count == 0) | (valid & ~torch.isfinite(norms)).any(-1)
    norms = torch.where(valid & ~bad[..., None], norms, math.nan)
    ordered = torch.sort(norms, dim=-1).values  # NaN (invalid slots) sort last
    low = ((count - 1).clamp_min(0) // 2).unsqueeze(-1)
    high = (count // 2).clamp_max(norms.shape[-1] - 1).unsqueeze(-1)
    median = 0.5 * (ordered.gather(-1, low) + ordered.gather(-1, high)).squeeze(-1)
    return norms, median, bad


@torch.no_grad()
def massive_activation(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Largest token norm over the median token norm of each prompt (SPEC §7).

    About 1 to 3 for ordinary layers; far above :data:`SINK_NORM_RATIO` where one token (often the first)
    carries a massive activation, the signature of an attention sink.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask.

    Returns:
        ``[..., B]``; NaN for prompts without valid tokens, with non-finite values or a zero median norm.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import massive_activation
        >>> tokens = torch.tensor([[[300.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]]])
        >>> massive_activation(tokens)  # 300 / median(300, 1, 1, 2) = 300 / 1.5
        tensor([200.])
    """
    norms, median, bad = _token_norms(hidden, mask)
    ratio = torch.where(torch.isnan(norms), -math.inf, norms).amax(-1) / median
    return torch.where(bad | ~torch.isfinite(ratio), math.nan, ratio).to(_result_dtype(hidden))


def sink_tokens(hidden: Tensor, mask: Tensor | None = None, *, ratio: float = SINK_NORM_RATIO) -> Tensor:
    """``[..., B, T]`` bool: valid tokens whose norm exceeds ``ratio`` times their prompt's median token norm.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import sink_tokens
        >>> sink_tokens(torch.tensor([[[300.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]]]))
        tensor([[ True, False, False, False]])
    """
    if not float(ratio) > 1:
        raise ValueError(f"`ratio` must be a multiple of the median norm above 1, got {ratio}")
    norms, median, _ = _token_norms(hidden, mask)
    return norms > float(ratio) * median[..., None]  # NaN compares False


@torch.no_grad()
def prompt_entropy_without_sinks(
    hidden: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 1.0,
    normalized: bool = True,
    ratio: float = SINK_NORM_RATIO,
    entropy: Tensor | None = None,
) -> Tensor:
    """:func:`prompt_entropy` of each prompt with its sink tokens (:func:`sink_tokens`) left out (SPEC §7).

    Equal to ``prompt_entropy`` for prompts without a sink token. With ``normalized``, the divisor is
    ``ln(min(N', D))`` with ``N'`` the tokens kept.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask.
        alpha, normalized: as in :func:`prompt_entropy`.
        ratio: the sink threshold, a multiple of the prompt's median token norm.
        entropy: ``prompt_entropy(hidden, mask, alpha=alpha, normalized=normalized)`` if already computed:
            then only prompts holding a sink are recomputed.

    Returns:
        ``[..., B]``.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import prompt_entropy, prompt_entropy_without_sinks
        >>> tokens = torch.tensor([[[900.0, 900.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0],
        ...                         [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]])
        >>> float(prompt_entropy(tokens)) < 1e-3  # the sink dominates the mean: all others look alike
        True
        >>> prompt_entropy_without_sinks(tokens)  # two orthogonal directions, ln 2 / ln 3
        tensor([0.6309])
    """
    alpha = _check_alpha(alpha)
    hidden, bool_mask = _check_tokens(hidden, mask)
    sinks = sink_tokens(hidden, bool_mask, ratio=ratio)
    keep = ~sinks if bool_mask is None else bool_mask & ~sinks
    if entropy is None:
        return prompt_entropy(hidden, keep, alpha=alpha, normalized=normalized)
    if entropy.shape != hidden.shape[:-2]:
        raise ValueError(f"`entropy` must have shape {tuple(hidden.shape[:-2])} (one value per prompt), got {tuple(entropy.shape)}")
    result = entropy.clone()
    rows = sinks.any(-1).reshape(-1).nonzero().squeeze(-1)
    if rows.numel():
        flat = hidden.reshape(-1, *hidden.shape[-2:])
        values = prompt_entropy(flat[rows], keep.reshape(-1, keep.shape[-1])[rows], alpha=alpha, normalized=normalized)
        result.view(-1)[rows] = values.to(result.dtype)
    return result
