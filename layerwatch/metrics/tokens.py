"""Token-level metrics (SPEC §1): one prompt's tokens at a time, fused in one pass (``token_metrics``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

import layerwatch.metrics.names as names
from layerwatch.metrics.base import (
    CURVATURE_ZERO_TOL,
    _bool_mask,
    _center_,
    _center_unit,
    _check_alpha,
    _check_sets,
    _check_tokens,
    _inverse_norms,
    _matrix_entropies,
    _result_dtype,
    _Scratch,
    _spread,
    _TokenBlocks,
    _valid_mean,
    _working_dtype,
)

#: The key of the mean-pooled embeddings in :func:`token_metrics`' result (not a metric: one vector per prompt).
MEAN_POOL = "mean_pool"


def _curvature_from_bands(
    d0: Tensor, d1: Tensor, d2: Tensor, count: Tensor
) -> tuple[Tensor, Tensor]:
    """Signed and absolute curvature from the three Gram diagonals of compacted unit tokens.

    ``d0[..., T] = <z_k, z_k>``, ``d1[..., T-1] = <z_k, z_{k+1}>``, ``d2[..., T-2] = <z_k, z_{k+2}>``;
    ``count[...]`` = number of valid tokens (they come first).
    """
    t = d0.shape[-1]
    if t < 3:
        nan = torch.full(d0.shape[:-1], math.nan, dtype=d0.dtype, device=d0.device)
        return nan, nan.clone()
    length_sq = d0[..., :-1] + d0[..., 1:] - 2.0 * d1  # |v_k|^2, k = 0..T-2
    dot = d1[..., 1:] - d0[..., 1:-1] - d2 + d1[..., :-1]  # <v_k, v_{k+1}>, k = 0..T-3
    nonzero = length_sq > CURVATURE_ZERO_TOL
    index = torch.arange(t - 2, device=d0.device)
    pair = (index < (count.unsqueeze(-1) - 2)) & nonzero[..., :-1] & nonzero[..., 1:]
    denominator = torch.sqrt(torch.where(pair, length_sq[..., :-1] * length_sq[..., 1:], 1.0))
    cosine = torch.where(pair, dot / denominator, 0.0).clamp(-1.0, 1.0)
    pairs = pair.sum(-1)
    signed = torch.where(pair, torch.arccos(cosine), 0.0).sum(-1) / pairs
    absolute = torch.where(pair, torch.arccos(cosine.abs()), 0.0).sum(-1) / pairs
    none = pairs == 0
    return torch.where(none, math.nan, signed), torch.where(none, math.nan, absolute)

# Prompt-entropy Gram matrices are grouped by size in steps of this many rows, and each group goes through
# eigvalsh at its own size: LAPACK's cost grows as n^3, so short prompts must not pay for the longest one.
_GRAM_SIZE_STEP = 16



class _TokenPass:
    """The shared engine of mean_pool, prompt_entropy, curvature and token_metrics (float64 results, ``[..., B]``).

    Blocks of prompts (see :class:`_TokenBlocks`) are copied to the working dtype (:func:`_working_dtype`: float32
    for float32/bfloat16/float16 states, float64 for float64 ones) and centered; their means (summed in float64) are
    the mean-pooled embeddings. For entropy, the Gram matrices of their unit rows (or the D x D covariances when the
    longest prompt exceeds D) are written into zero-padded stacks, one per size group, that go through one spread-out
    ``eigvalsh`` batch (``alpha = 2``: Frobenius norms instead, no eigenvalues); the entropies are computed in float64
    from the eigenvalues. Curvature needs only the Gram diagonals ``<z_k, z_k>``, ``<z_k, z_{k+1}>``,
    ``<z_k, z_{k+2}>``: read from the Gram matrices when there are some, else computed as one batched product of
    each token with itself and its next two.
    """

    def __init__(self, hidden: Tensor, mask: Tensor | None, *, entropy: bool, curvature: bool, pool: bool) -> None:
        self.entropy, self.curvature, self.pool = entropy, curvature, pool
        work = _working_dtype(hidden)
        self.blocks = blocks = _TokenBlocks(hidden, mask, itemsize=torch.finfo(work).bits // 8)
        rows, d = blocks.rows, blocks.hidden_size
        self.size = max(blocks.longest, 1)  # all-padding token positions are dropped everywhere
        self.use_gram = entropy and self.size <= d
        self.use_cov = entropy and self.size > d
        if self.use_gram:
            blocks.group_by_size(_GRAM_SIZE_STEP)
        f64 = dict(dtype=torch.float64, device=hidden.device)
        # the zero-padded Gram (n x n) or covariance (D x D) matrices of each group of rows
        sizes = [(stop - start, n if self.use_gram else d) for start, stop, n in blocks.groups] if entropy else []
        self.matrices = [torch.empty(count, n, n, dtype=work, device=hidden.device) for count, n in sizes]
        self.bad = torch.zeros(rows, dtype=torch.bool, device=hidden.device)  # prompts holding non-finite values
        # bands[row, i, k] = <c_i, c_{i+k}> of the centered tokens (of the unit tokens with a Gram)
        self.bands = torch.zeros(rows, self.size, 3, **f64) if curvature else None
        # without a Gram: the mean norms, to scale the bands to unit tokens afterwards
        self.mean_norms = torch.zeros(rows, 1, **f64) if curvature and not self.use_gram else None
        self.pooled = torch.full((rows, d), math.nan, **f64) if pool else None
        self.scratch = _Scratch(hidden.device, work)

    def run(self) -> None:
        """Reduce every block; Gram blocks are matrix products (threads help), the others memory-bound (they don't)."""
        blocks = self.blocks
        todo = [
            (group, first, *block)
            for group, (first, last, _) in enumerate(blocks.groups)
            for block in blocks.blocks(first, last)
        ]
        _spread(self.reduce_block, todo, device=blocks.device, enough=self.use_gram and len(todo) >= 4)

    def reduce_block(self, block: tuple[int, int, int, int, int]) -> None:
        group, first, start, stop, width = block
        p, d = stop - start, self.blocks.hidden_size
        # two spare zero rows after the block: the band products of its last tokens read past it
        flat = self.scratch.take(p * width + 2, d)
        c = flat[: p * width].view(p, width, d)
        mb = self.blocks.gather_into(c, start, stop, width)
        if not (self.entropy or self.curvature):  # mean pooling only: one pass (rounding relative to the mean)
            self.pooled[start:stop] = _valid_mean(c, mb).squeeze(-2)
            return
        mean, mean_norm = _center_(c, mb, zero_invalid=self.entropy)
        if self.pool:
            self.pooled[start:stop] = mean.squeeze(-2)
        if self.use_gram:
            self._gram_block(c, mean_norm, self.matrices[group][start - first : stop - first], start, stop, width)
            return
        if self.curvature:
            flat[-2:] = 0.0
            # token i times tokens i, i+1, i+2 of the flattened block, as one batched (1 x D) @ (D x 3); the
            # products that reach into the next prompt land beyond each prompt's band and are never read
            products = torch.bmm(flat[:-2].unsqueeze(-2), flat.unfold(0, 3, 1))
            self.bands[start:stop, :width] = products.view(p, width, 3)
            self.mean_norms[start:stop] = mean_norm
        if self.use_cov:
            squared = self.bands[start:stop, :width, 0] if self.curvature else torch.linalg.vector_norm(c, dim=-1).square_()
            inverse, self.bad[start:stop] = _inverse_norms(squared, mean_norm)
            z = c.mul_(inverse.unsqueeze(-1))
            torch.matmul(z.mT, z, out=self.matrices[group][start - first : stop - first])

    def _gram_block(self, c: Tensor, mean_norm: Tensor, stack: Tensor, start: int, stop: int, width: int) -> None:
        """Gram of the centered rows scaled to unit rows, ``G_ij = <c_i, c_j> / (|c_i| |c_j|)``, into ``stack``; the
        rows and columns beyond the block's longest prompt are exactly zero."""
        stack[:, width:] = 0.0
        stack[:, :width, width:] = 0.0
        g = torch.matmul(c, c.mT, out=stack[:, :width, :width])
        inverse, self.bad[start:stop] = _inverse_norms(torch.diagonal(g, 0, -2, -1), mean_norm)
        g.mul_(inverse.unsqueeze(-1)).mul_(inverse.unsqueeze(-2))
        if self.curvature:
            for k in range(min(3, width)):
                self.bands[start:stop, : width - k, k] = torch.diagonal(g, k, -2, -1)

    def entropies(self, alpha: float, normalized: bool) -> Tensor:
        """``[rows]`` prompt entropies (sorted order) from the filled matrices."""
        blocks, count = self.blocks, self.blocks.count
        values = torch.full((blocks.rows,), math.nan, dtype=torch.float64, device=blocks.device)
        bads = [self.bad[start:stop] for start, stop, _ in blocks.groups]
        for (start, stop, _), group_values in zip(blocks.groups, _matrix_entropies(self.matrices, alpha, bads)):
            values[start:stop] = group_values
        if normalized:
            values = values / torch.log(count.to(torch.float64).clamp(max=blocks.hidden_size))
        return torch.where((count < 2) | self.bad, math.nan, values)

    def curvatures(self) -> tuple[Tensor, Tensor]:
        """``([rows], [rows])`` signed and absolute curvature (sorted order) from the bands."""
        bands, size = self.bands, self.size
        d0, d1, d2 = bands[..., 0], bands[:, : size - 1, 1], bands[:, : max(size - 2, 0), 2]
        bad = self.bad
        if not self.use_gram:  # products of the centered tokens -> products of the unit tokens
            inverse, bad = _inverse_norms(d0, self.mean_norms)
            d0 = d0 * inverse * inverse
            d1 = d1 * inverse[:, :-1] * inverse[:, 1:]
            d2 = d2 * inverse[:, :-2] * inverse[:, 2:]
        signed, absolute = _curvature_from_bands(d0, d1, d2, self.blocks.count)
        return torch.where(bad, math.nan, signed), torch.where(bad, math.nan, absolute)


def _token_core(
    hidden: Tensor,
    mask: Tensor | None,
    *,
    entropy: bool = False,
    curvature: bool = False,
    pool: bool = False,
    alpha: float = 1.0,
    normalized: bool = True,
) -> dict[str, Tensor]:
    """``{names.PROMPT_ENTROPY, names.CURVATURE, names.CURVATURE_ABS, MEAN_POOL}`` (those asked for) of
    :class:`_TokenPass`, back in the prompts' order."""
    hidden, mask = _check_tokens(hidden, mask)
    engine = _TokenPass(hidden, mask, entropy=entropy, curvature=curvature, pool=pool)
    engine.run()
    results: dict[str, Tensor] = {}
    if entropy:
        results[names.PROMPT_ENTROPY] = engine.entropies(alpha, normalized)
    if curvature:
        results[names.CURVATURE], results[names.CURVATURE_ABS] = engine.curvatures()
    if pool:
        results[MEAN_POOL] = engine.pooled
    return {key: engine.blocks.unsort(value) for key, value in results.items()}


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def normalize(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Center the (valid) rows of each set and scale every row to unit L2 norm.

    This is the preprocessing the papers apply before every metric, and part of each metric's
    definition. A row equal to the mean (up to rounding) becomes a zero row instead of NaN.

    Args:
        x: ``[..., N, D]`` rows (any real dtype).
        mask: optional ``[..., N]`` (broadcastable; bool or 0/1, True = valid row). Invalid rows are
            excluded from the mean and returned as zeros.

    Returns:
        ``[..., N, D]``, float64 for float64 input and float32 otherwise. A set holding a non-finite
        valid value returns NaN in its valid rows.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import normalize
        >>> normalize(torch.tensor([[1.0, 1.0], [3.0, 1.0], [7.0, 7.0]]), torch.tensor([True, True, False]))
        tensor([[-1.,  0.],
                [ 1.,  0.],
                [ 0.,  0.]])
    """
    _check_sets(x, "x")
    bool_mask = None
    if mask is not None:
        bool_mask = _bool_mask(mask, x.shape[:-1], x.device)
    z, bad = _center_unit(x, bool_mask)
    if bool(bad.any()):
        poisoned = bad[..., None] if bool_mask is None else bad[..., None] & bool_mask
        z = torch.where(poisoned.unsqueeze(-1), math.nan, z)
    return z.to(_result_dtype(x))


@torch.no_grad()
def mean_pool(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of each prompt's valid (raw, not normalized) token vectors.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask (broadcastable to ``hidden.shape[:-1]``; True/1 = real).

    Returns:
        ``[..., B, D]``; NaN for a prompt without valid tokens.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import mean_pool
        >>> hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), 0.0]]])
        >>> mean_pool(hidden, torch.tensor([[1, 1, 0]]))
        tensor([[2., 3.]])
    """
    hidden, bool_mask = _check_tokens(hidden, mask)
    if bool_mask is None or bool(bool_mask.all()):  # every token real: one reduction over the input, no copy
        return hidden.mean(-2, dtype=_result_dtype(hidden))
    return _token_core(hidden, bool_mask, pool=True)[MEAN_POOL].to(_result_dtype(hidden))


@torch.no_grad()
def prompt_entropy(
    hidden: Tensor, mask: Tensor | None = None, *, alpha: float = 1.0, normalized: bool = True
) -> Tensor:
    """Matrix Rényi entropy of each prompt's normalized tokens (SPEC §1).

    Per prompt: ``Z = normalize(valid tokens)``, ``S_alpha(Z)`` from the eigenvalues of the ``N x N``
    Gram, zero-padded to the longest prompt of the call (or of the ``D x D`` covariance when the longest
    prompt exceeds ``D``); if ``normalized``, divided by ``ln(min(N, D))`` with ``N`` the prompt's number
    of valid tokens.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask (any padding side; padded values are ignored).
        alpha: Rényi order (1 = von Neumann / Shannon, the papers' choice).
        normalized: divide by ``ln(min(N, D))``.

    Returns:
        ``[..., B]``; NaN for prompts with fewer than 2 valid tokens, with all tokens identical, or with
        non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import prompt_entropy
        >>> tokens = torch.tensor([[[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]])
        >>> prompt_entropy(tokens, normalized=False)  # two orthogonal directions: ln 2
        tensor([0.6931])
        >>> prompt_entropy(tokens)  # divided by ln(min(4, 3))
        tensor([0.6309])
    """
    alpha = _check_alpha(alpha)
    out = _token_core(hidden, mask, entropy=True, curvature=False, alpha=alpha, normalized=normalized)
    return out[names.PROMPT_ENTROPY].to(_result_dtype(hidden))


@torch.no_grad()
def curvature(hidden: Tensor, mask: Tensor | None = None, *, absolute: bool = False) -> Tensor:
    """Average curvature of each prompt's token trajectory (SPEC §1).

    Per prompt: ``Z = normalize(valid tokens)``, ``v_k = z_{k+1} - z_k``, ``c_k = arccos(cos(v_k, v_{k+1}))``
    in ``[0, pi]``, mean over ``k``. Pairs with a zero-length ``v`` are skipped. ``absolute=True`` uses
    ``arccos(|cos|)`` in ``[0, pi/2]`` (the authors' later code).

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask (any padding side, holes allowed: consecutive means
            consecutive among the valid tokens).
        absolute: fold the angle as in the authors' ICML code.

    Returns:
        ``[..., B]`` in radians; NaN when no pair remains (fewer than 3 valid tokens) or the prompt holds
        non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import curvature
        >>> square = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]   # turns by 90 degrees
        >>> zigzag = [[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]   # reverses every step
        >>> curvature(torch.tensor([square, zigzag]))
        tensor([1.5708, 3.1416])
        >>> curvature(torch.tensor([square, zigzag]), absolute=True)
        tensor([1.5708, 0.0000])
    """
    out = _token_core(hidden, mask, entropy=False, curvature=True)
    return out[names.CURVATURE_ABS if absolute else names.CURVATURE].to(_result_dtype(hidden))


@torch.no_grad()
def token_metrics(
    hidden: Tensor, mask: Tensor | None = None, *, alpha: float = 1.0, normalized: bool = True
) -> dict[str, Tensor]:
    """Prompt entropy, curvature, absolute curvature and the mean-pooled embeddings in one pass.

    Equivalent to calling :func:`prompt_entropy`, :func:`curvature` (both variants) and :func:`mean_pool`,
    but every prompt is read, centered and turned into a Gram matrix once: centering yields the mean, and
    curvature only needs the Gram entries ``<z_k, z_k>``, ``<z_k, z_{k+1}>`` and ``<z_k, z_{k+2}>``.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask.
        alpha: Rényi order of the entropy.
        normalized: divide the entropy by ``ln(min(N, D))``.

    Returns:
        ``{"prompt_entropy", "curvature", "curvature_abs"}``, each ``[..., B]``, and ``"mean_pool"``
        ``[..., B, D]``.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import token_metrics
        >>> tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]])
        >>> values = token_metrics(tokens)
        >>> sorted(values)
        ['curvature', 'curvature_abs', 'mean_pool', 'prompt_entropy']
        >>> values["prompt_entropy"], values["curvature"]
        (tensor([1.]), tensor([1.5708]))
    """
    alpha = _check_alpha(alpha)
    out = _token_core(hidden, mask, entropy=True, curvature=True, pool=True, alpha=alpha, normalized=normalized)
    dtype = _result_dtype(hidden)
    return {key: value.to(dtype) for key, value in out.items()}


