"""Intrinsic dimension of a set of prompt embeddings (SPEC §8): the TwoNN estimate of Facco et al. (2017)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from layerwatch.metrics.base import SET_CHUNK_BYTES, _center_unit, _check_sets, _result_dtype

TWONN_MATRICES_PER_ITEM = 3  # the Gram matrix, the squared distances, topk's workspace (M x M float64 each)


def _two_nearest(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(r1, r2)``, each ``[..., M]``: every row's distance to its nearest and second-nearest other row.

    The neighbours are found from the Gram matrix (``|a-b|² = |a|² + |b|² - 2<a,b>``); their distances are then
    recomputed from the differences themselves, so an exact duplicate gives ``r1 = 0`` exactly.
    """
    squared = (z * z).sum(-1)
    distances = squared.unsqueeze(-1) + squared.unsqueeze(-2) - 2.0 * (z @ z.mT)
    distances.diagonal(dim1=-2, dim2=-1).fill_(math.inf)
    nearest = distances.topk(2, dim=-1, largest=False).indices  # [..., M, 2]
    del distances
    d = z.shape[-1]
    pairs = []
    for k in range(2):
        neighbour = z.gather(-2, nearest[..., k : k + 1].expand(*nearest.shape[:-1], d))
        pairs.append(torch.linalg.vector_norm(z - neighbour, dim=-1))
    return torch.minimum(*pairs), torch.maximum(*pairs)


@torch.no_grad()
def intrinsic_dimension(pooled: Tensor) -> Tensor:
    """TwoNN maximum-likelihood intrinsic dimension of the pooled prompt embeddings (SPEC §8).

    ``Z = normalize(pooled)`` (centred, rows scaled to unit L2 norm); for each row, ``r1`` and ``r2`` are the
    Euclidean distances to its nearest and second-nearest other row; rows with ``r1 = 0`` (duplicates) are dropped
    and ``d = n / Σ ln(r2 / r1)`` over the ``n`` rows left (Facco et al., "Estimating the intrinsic dimension of
    datasets by a minimal neighborhood information", Sci. Rep. 2017; the maximum-likelihood form of the Pareto fit
    of ``r2 / r1``). Points spread over a ``k``-dimensional patch give about ``k``, whatever ``D``; since
    ``normalize`` puts every row on the unit sphere, rows spanning a ``k``-dimensional linear subspace give about
    ``k - 1`` (the sphere inside it). The ``M x M`` distances are built in chunks of leading indices of at most
    :data:`SET_CHUNK_BYTES`.

    Args:
        pooled: ``[..., M, D]``, one row per prompt.

    Returns:
        ``[...]``; NaN for sets with non-finite values, fewer than 3 rows, no row left, or all ``r2 = r1``.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import intrinsic_dimension
        >>> g = torch.Generator().manual_seed(0)
        >>> plane = torch.randn(400, 3, generator=g) @ torch.randn(3, 32, generator=g)  # a 3-D subspace of 32-D
        >>> round(float(intrinsic_dimension(plane)), 1)  # normalized: the 2-sphere inside it
        2.1
    """
    _check_sets(pooled, "pooled")
    lead, (m, d) = pooled.shape[:-2], pooled.shape[-2:]
    flat = pooled.reshape(-1, m, d)
    result = torch.full((flat.shape[0],), math.nan, dtype=torch.float64, device=pooled.device)
    if m >= 3:
        step = max(1, SET_CHUNK_BYTES // (TWONN_MATRICES_PER_ITEM * m * m * 8))
        for start in range(0, flat.shape[0], step):
            z, bad = _center_unit(flat[start : start + step], None)
            r1, r2 = _two_nearest(torch.where(bad[..., None, None], 0.0, z))
            kept = r1 > 0
            logs = torch.where(kept, torch.log(torch.where(kept, r2 / r1, 1.0)), 0.0).sum(-1)
            estimate = kept.sum(-1).to(torch.float64) / logs
            undefined = bad | (logs <= 0) | ~torch.isfinite(estimate)
            result[start : start + step] = torch.where(undefined, math.nan, estimate)
    return result.reshape(lead).to(_result_dtype(pooled))
