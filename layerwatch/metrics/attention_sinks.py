"""Attention-sink diagnostics (SPEC §7): massive activations, the tokens that carry them, and prompt entropy
without them."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from layerwatch.metrics.base import _check_alpha, _check_tokens, _result_dtype
from layerwatch.metrics.tokens import prompt_entropy

#: A sink token's norm exceeds this multiple of its prompt's median token norm (the first of the two conditions of
#: :func:`sink_tokens`). Ordinary tokens of trained models stay near 1.2-1.8 times the median; random-init models
#: stay below about 2 except on the first token of some architectures (up to about 3.5 at random init, but never
#: standing apart from the second token: see :data:`SINK_GAP`); the sinks reported in the literature sit 100 to 1000
#: times above the median, weak ones of mid-depth layers 4 to 9 times.
SINK_NORM_RATIO = 3.0

#: A sink token's norm is at least this multiple of the norm of every token that is not a sink (the second
#: condition of :func:`sink_tokens`): sinks stand apart from the prompt's ordinary tokens, they are not the top of
#: a continuous spread. Largest token over the second-largest stays below about 1.65 in random-init models.
SINK_GAP = 2.0


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

    About 1 to 2 for ordinary layers (up to about 3.5 in an early layer of some random-init models, from the first
    token); 4 to 10 where a weak attention sink sits on one token (often the first) and 100 to 1000 where it carries
    a massive activation, the signature of a strong attention sink. Which tokens are sinks: :func:`sink_tokens`.

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


def sink_tokens(
    hidden: Tensor, mask: Tensor | None = None, *, ratio: float = SINK_NORM_RATIO, gap: float = SINK_GAP
) -> Tensor:
    """``[..., B, T]`` bool: each prompt's sink tokens, the valid tokens whose norms stand apart above the rest.

    With a prompt's valid token norms sorted in decreasing order, ``n_1 >= n_2 >= ... >= n_N``, and ``m`` their
    median, the sinks are the ``k`` largest tokens for the largest ``k < N`` such that

    - ``n_k > ratio * m`` (far above the prompt's typical token), and
    - ``n_k > gap * n_{k+1}`` (at least ``gap`` times every token left in: a separate group, not the top of a
      continuous spread of norms),

    and none when no ``k`` satisfies both. One strong sink (1000x) and one weak one (5x) over ordinary tokens (<= 2x)
    are both sinks; a tail of ordinary tokens rising smoothly to 3.5x has none. The rule looks at one prompt at a
    time, so a prompt's result does not depend on the other prompts, the batch size or the number of ranks.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask.
        ratio: :data:`SINK_NORM_RATIO`, a multiple of the prompt's median token norm (> 1).
        gap: :data:`SINK_GAP`, how many times larger than every kept token a sink is (>= 1).

    Example:
        >>> import torch
        >>> from layerwatch.metrics import sink_tokens
        >>> sink_tokens(torch.tensor([[[300.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [0.0, 9.0]]]))
        tensor([[ True, False, False, False,  True]])
        >>> sink_tokens(torch.tensor([[[4.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.5]]]))  # 4 < 2 x 2.5
        tensor([[False, False, False, False, False]])
    """
    if not float(ratio) > 1:
        raise ValueError(f"`ratio` must be a multiple of the median norm above 1, got {ratio}")
    if not float(gap) >= 1:
        raise ValueError(f"`gap` must be a factor of at least 1 between a sink and the largest kept token, got {gap}")
    norms, median, _ = _token_norms(hidden, mask)
    ordered = torch.sort(torch.nan_to_num(norms, nan=-math.inf), dim=-1, descending=True).values  # invalid: last
    above = ordered[..., :-1] > float(ratio) * median[..., None]
    apart = ordered[..., :-1] > float(gap) * ordered[..., 1:]  # n_k > gap * n_{k+1}; False against an invalid slot
    cut = torch.where(above & apart & torch.isfinite(ordered[..., 1:]), ordered[..., :-1], math.inf).amin(-1)
    return norms >= cut[..., None]  # NaN (invalid slots) compares False; no k: cut = inf


@torch.no_grad()
def prompt_entropy_without_sinks(
    hidden: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 1.0,
    normalized: bool = True,
    ratio: float = SINK_NORM_RATIO,
    gap: float = SINK_GAP,
    entropy: Tensor | None = None,
) -> Tensor:
    """:func:`prompt_entropy` of each prompt with its sink tokens (:func:`sink_tokens`) left out (SPEC §7).

    Equal to ``prompt_entropy`` for prompts without a sink token. With ``normalized``, the divisor is
    ``ln(min(N', D))`` with ``N'`` the tokens kept.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask.
        alpha, normalized: as in :func:`prompt_entropy`.
        ratio, gap: the sink rule's two thresholds (:func:`sink_tokens`).
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
    sinks = sink_tokens(hidden, bool_mask, ratio=ratio, gap=gap)
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
