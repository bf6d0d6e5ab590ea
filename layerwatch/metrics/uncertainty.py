"""Standard errors of the per-layer metrics (SPEC §8): how much a value would move with other prompts.

Two estimates, both over the probe's prompts (the sampling unit):

- per-prompt metrics (prompt entropy, curvature, the sink-free entropy, massive activation), whose per-layer value
  is the mean of one value per prompt: :func:`prompt_stderr`, ``std(ddof=1) / sqrt(n)`` of the finite per-prompt
  values, exactly;
- set-level metrics (dataset entropy, effective rank, InfoNCE, DiME, LiDAR, CKA, probe accuracy, intrinsic
  dimension, bimodality), which are not means: a **delete-a-group jackknife** (:func:`jackknife_groups`,
  :func:`jackknife_stderr`). The prompts are split, by a seeded random permutation, into ``G`` disjoint groups of
  ``d = M // G`` prompts (``G`` = :data:`JACKKNIFE_GROUPS`, or ``M`` when there are fewer prompts; the
  ``M - G·d`` left over are never deleted); the metric is recomputed ``G`` times, each time without one group,
  and ``SE = sqrt((G - 1) / G · Σ_g (θ_g - θ̄)²)`` with ``θ̄`` the mean of the ``G`` replicates (Efron & Tibshirani,
  *An Introduction to the Bootstrap*, §11.5). A jackknife rather than a bootstrap: resampling with replacement
  duplicates prompts, and a duplicated row lowers a set's entropy and rank by itself, so bootstrap replicates of
  the spectral metrics would be biased low; deleting prompts never duplicates one. Its cost is ``G``
  recomputations of each set-level metric at ``(1 - 1/G)`` of the prompts (the forward passes are not repeated),
  measured in ``benchmarks/stderr_cost.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

#: Number of delete-a-group jackknife replicates of the set-level standard errors (0 turns them off).
JACKKNIFE_GROUPS = 8


@torch.no_grad()
def prompt_stderr(values: Tensor, dim: int = -1) -> Tensor:
    """Standard error of the mean of the finite ``values`` along ``dim``: ``std(ddof=1) / sqrt(n)`` (float64).

    Returns NaN where fewer than 2 finite values remain.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import prompt_stderr
        >>> prompt_stderr(torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, float("nan"), 1.0, 1.0]]))
        tensor([0.6455, 0.0000], dtype=torch.float64)
    """
    x = values.movedim(dim, -1).to(torch.float64)
    finite = torch.isfinite(x)
    n = finite.sum(-1).to(torch.float64)
    x = torch.where(finite, x, 0.0)
    mean = x.sum(-1, keepdim=True) / n.clamp_min(1).unsqueeze(-1)
    squares = torch.where(finite, (x - mean) ** 2, 0.0).sum(-1)
    result = torch.sqrt(squares / (n - 1).clamp_min(1) / n.clamp_min(1))
    return torch.where(n < 2, math.nan, result)


def jackknife_groups(num_prompts: int, *, groups: int = JACKKNIFE_GROUPS, seed: int = 0) -> Tensor:
    """``[G, M - d]`` int64: the prompts each delete-a-group jackknife replicate keeps (sorted), ``d = M // G``.

    The ``M`` prompts are permuted by a ``torch.Generator`` seeded with ``seed``; replicate ``g`` leaves out the
    prompts at positions ``g·d .. (g+1)·d - 1`` of the permutation. ``G = min(groups, M)``.

    Example:
        >>> from layerwatch.metrics import jackknife_groups
        >>> jackknife_groups(5, groups=2, seed=0).shape  # 2 replicates of 5 - 2 prompts; 1 prompt always kept
        torch.Size([2, 3])
    """
    m, groups = int(num_prompts), int(groups)
    if m < 2 or groups < 2:
        raise ValueError(f"a jackknife needs at least 2 prompts and 2 groups, got num_prompts={m}, groups={groups}")
    groups = min(groups, m)
    size = m // groups
    order = torch.randperm(m, generator=torch.Generator().manual_seed(int(seed)))
    keep = []
    for g in range(groups):
        left_out = torch.zeros(m, dtype=torch.bool)
        left_out[order[g * size : (g + 1) * size]] = True
        keep.append((~left_out).nonzero().squeeze(-1))
    return torch.stack(keep)


def jackknife_stderr(replicates: Tensor) -> Tensor:
    """Delete-a-group jackknife standard error from ``[G, ...]`` replicate values: ``sqrt((G-1)/G Σ (θ_g - θ̄)²)``.

    NaN wherever a replicate is not finite.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import jackknife_stderr
        >>> jackknife_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # sqrt(3/4 * 5)
        tensor(1.9365, dtype=torch.float64)
    """
    x = replicates.to(torch.float64)
    groups = x.shape[0]
    spread = ((x - x.mean(0)) ** 2).sum(0)
    result = torch.sqrt((groups - 1) / groups * spread)
    return torch.where(torch.isfinite(x).all(0), result, math.nan)


def jackknife(
    statistic: Callable[[Tensor], Tensor], num_prompts: int, *, groups: int = JACKKNIFE_GROUPS, seed: int = 0
) -> Tensor:
    """Delete-a-group jackknife standard error of ``statistic(kept prompt indices) -> [...]`` values (float64).

    Example:
        >>> import torch
        >>> from layerwatch.metrics import dataset_entropy, jackknife
        >>> pooled = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
        >>> se = jackknife(lambda keep: dataset_entropy(pooled[keep]), 64, seed=0)
        >>> 0 < float(se) < 0.05
        True
    """
    replicates = [statistic(keep) for keep in jackknife_groups(num_prompts, groups=groups, seed=seed)]
    return jackknife_stderr(torch.stack([r.detach().to(torch.float64).cpu() for r in replicates]))
