"""Which layer is best and which layers move (SPEC §7): cross-validated probe accuracy, best layer, linear CKA."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from layerwatch.metrics.base import _center_unit, _check_sets, _result_dtype

# ----------------------------------------------------------------------------------------------------
# beyond the papers: which layer is best, which layers move, compression or attention sink (SPEC §7)
# ----------------------------------------------------------------------------------------------------

#: Number of cross-validation folds of :func:`probe_accuracy`; every class needs at least this many prompts.
PROBE_FOLDS = 5

#: Ridge strength of :func:`probe_accuracy`, relative to the mean diagonal of the training Gram matrix (the
#: rows are unit-norm after :func:`normalize`, so this is sklearn's ``RidgeClassifier(alpha=1.0)`` on them).
PROBE_RIDGE = 1.0



def check_labels(labels: Any, num_prompts: int | None = None, *, folds: int = PROBE_FOLDS) -> Tensor:
    """Validate per-prompt class labels; return them as class indices ``0..C-1`` (int64 ``[M]``).

    Labels may be any hashable values (ints, strings); classes are numbered in sorted order.

    Raises:
        ValueError: fewer than two classes, fewer than ``folds`` prompts in some class (the cross-validation
            could not test every class in every fold), or a length different from ``num_prompts``.

    Example:
        >>> from layerwatch.metrics import check_labels
        >>> check_labels(["b", "a", "b", "a", "a", "b"], folds=3)
        tensor([1, 0, 1, 0, 0, 1])
    """
    if isinstance(labels, Tensor):
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"`labels` must be a 1-D integer tensor or a list, got {labels.dtype} of shape {tuple(labels.shape)}")
        labels = labels.tolist()
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise TypeError(f"`labels` must be a sequence with one class per prompt, got {type(labels).__name__}")
    labels = list(labels)
    if num_prompts is not None and len(labels) != num_prompts:
        raise ValueError(f"`labels` has {len(labels)} entries but the probe has {num_prompts} prompts; give one label per prompt")
    try:
        classes = sorted(set(labels))
    except TypeError as error:
        raise TypeError(f"`labels` must be comparable values of one kind (ints or strings): {error}") from None
    if len(classes) < 2:
        raise ValueError(f"`labels` must hold at least two classes for probe_accuracy, got {classes}")
    counts = {c: 0 for c in classes}
    for label in labels:
        counts[label] += 1
    small = {c: n for c, n in counts.items() if n < folds}
    if small:
        raise ValueError(
            f"`labels`: every class needs at least {folds} prompts for {folds}-fold cross-validation; these have fewer: "
            f"{small}. Add prompts of those classes or drop them"
        )
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[label] for label in labels], dtype=torch.int64)


def label_folds(classes: Tensor, *, folds: int = PROBE_FOLDS, seed: int = 0) -> Tensor:
    """Stratified k-fold assignment ``[M]`` (fold of each prompt) fixed by ``seed``.

    Prompts are shuffled with a generator seeded by ``seed``; each class's prompts are then dealt to the folds
    in turn, continuing where the previous class stopped, so folds differ in size by at most one and hold
    every class (given at least ``folds`` prompts per class).

    Example:
        >>> import torch
        >>> from layerwatch.metrics import label_folds
        >>> fold = label_folds(torch.tensor([0, 0, 0, 1, 1, 1]), folds=3)
        >>> sorted(fold[:3].tolist()), sorted(fold[3:].tolist())
        ([0, 1, 2], [0, 1, 2])
    """
    classes = classes.cpu()
    order = torch.randperm(classes.numel(), generator=torch.Generator().manual_seed(int(seed)))
    fold = torch.empty(classes.numel(), dtype=torch.int64)
    dealt = 0
    for c in torch.unique(classes).tolist():  # a loop over classes, not prompts
        members = order[classes[order] == c]
        fold[members] = (torch.arange(members.numel()) + dealt) % folds
        dealt += members.numel()
    return fold


def _ridge_fold_scores(gram: Tensor, targets: Tensor, train: Tensor, test: Tensor, ridge: float) -> Tensor:
    """Class scores ``[..., n_test, C]`` of a ridge regression (with intercept) fitted on the ``train`` rows,
    in the dual form: ``Ktest,train (Ktrain + lambda I)^-1 Y`` with both Grams centered on the training mean."""
    k_train = gram[..., train[:, None], train[None, :]]
    k_test = gram[..., test[:, None], train[None, :]]
    train_means = k_train.mean(-1)  # <x_i, mu_train> for training rows
    grand = train_means.mean(-1, keepdim=True)
    k_train = k_train - train_means[..., :, None] - train_means[..., None, :] + grand[..., None]
    k_test = k_test - k_test.mean(-1, keepdim=True) - train_means[..., None, :] + grand[..., None]
    y = targets[train]
    y_mean = y.mean(0)
    n = train.numel()
    scale = torch.diagonal(k_train, 0, -2, -1).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
    system = k_train + (ridge * scale)[..., None, None] * torch.eye(n, dtype=gram.dtype, device=gram.device)
    coefficients = torch.linalg.solve(system, (y - y_mean).expand(*system.shape[:-1], y.shape[-1]))
    return y_mean + k_test @ coefficients


@torch.no_grad()
def probe_accuracy(
    pooled: Tensor, labels: Any, *, folds: int = PROBE_FOLDS, ridge: float = PROBE_RIDGE, seed: int = 0
) -> Tensor:
    """Cross-validated accuracy of a linear (ridge) classifier of the labels on each layer's embeddings (SPEC §7).

    ``Z = normalize(pooled)`` (label-free, so it leaks nothing between folds). For each of ``folds`` stratified
    folds (:func:`label_folds`, fixed by ``seed``) a ridge regression with intercept onto one-hot targets is
    fitted on the other folds in closed form, in the dual ``M x M`` form (cost independent of ``D``), with
    ``lambda = ridge * mean diagonal`` of the centered training Gram; a prompt is predicted as the class with the
    highest score. The result is the fraction of prompts predicted correctly, each tested once.

    Args:
        pooled: ``[..., M, D]`` mean-pooled clean embeddings.
        labels: ``M`` class labels (see :func:`check_labels`).
        folds: number of folds; every class needs at least this many prompts.
        ridge: relative ridge strength.
        seed: fixes the folds.

    Returns:
        ``[...]`` accuracies in ``[0, 1]`` (chance is about ``1 / classes`` for balanced classes); NaN for layers
        with non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import probe_accuracy
        >>> g = torch.Generator().manual_seed(0)
        >>> labels = torch.arange(40) % 2
        >>> signal = torch.randn(40, 8, generator=g); signal[:, 0] += 6 * (2 * labels - 1)
        >>> noise = torch.randn(40, 8, generator=g)
        >>> probe_accuracy(torch.stack([signal, noise]), labels)[0]
        tensor(1.)
    """
    _check_sets(pooled, "pooled")
    if int(folds) != folds or folds < 2:
        raise ValueError(f"`folds` must be an integer >= 2, got {folds}")
    if not float(ridge) > 0:
        raise ValueError(f"`ridge` must be positive, got {ridge}")
    classes = check_labels(labels, pooled.shape[-2], folds=int(folds)).to(pooled.device)
    fold = label_folds(classes, folds=int(folds), seed=seed).to(pooled.device)
    z, bad = _center_unit(pooled, None)
    z = torch.where(bad[..., None, None], 0.0, z)
    gram = z @ z.mT
    targets = torch.nn.functional.one_hot(classes).to(torch.float64)
    correct = torch.zeros(gram.shape[:-1], dtype=torch.float64, device=gram.device)
    for k in range(int(folds)):
        train, test = (fold != k).nonzero().squeeze(-1), (fold == k).nonzero().squeeze(-1)
        predicted = _ridge_fold_scores(gram, targets, train, test, float(ridge)).argmax(-1)
        correct[..., test] = (predicted == classes[test]).to(torch.float64)
    return torch.where(bad, math.nan, correct.mean(-1)).to(_result_dtype(pooled))


def best_layer(accuracy: Tensor) -> int | None:
    """Index of the highest finite value of the per-layer ``accuracy[L]``, the earliest on ties; None if none.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import best_layer
        >>> best_layer(torch.tensor([0.5, 0.9, float("nan"), 0.9]))
        1
    """
    values = torch.as_tensor(accuracy, dtype=torch.float64).reshape(-1)
    finite = torch.isfinite(values)
    if not bool(finite.any()):
        return None
    return int(torch.where(finite, values, -math.inf).argmax())  # argmax returns the first maximum


@torch.no_grad()
def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear centered kernel alignment between two sets of embeddings of the same prompts (SPEC §7).

    ``K = X̃ X̃ᵀ``, ``L = Ỹ Ỹᵀ`` (``M x M`` Grams of the mean-centered rows; dual form),
    ``CKA = <K, L>_F / (||K||_F ||L||_F)``. It is 1 when ``y`` is an orthogonal transform and isotropic scaling
    of ``x`` (nothing moved up to rotation and scale) and 0 for unrelated sets with many samples; for
    independent isotropic Gaussian sets of ``M`` rows and ``D`` features its expectation is about ``D / (M + D)``
    (close to 1 when ``D >> M``: compare values across layers and steps, not with 0).

    Args:
        x: ``[..., M, D1]``.
        y: ``[..., M, D2]`` (same M; D may differ).

    Returns:
        ``[...]`` in ``[0, 1]``; NaN where a set is constant or holds non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import linear_cka
        >>> x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
        >>> rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
        >>> round(float(linear_cka(x, 3.0 * x @ rotation)), 6)
        1.0
    """
    _check_sets(x, "x")
    _check_sets(y, "y")
    if x.shape[-2] != y.shape[-2]:
        raise ValueError(f"`x` and `y` must hold the same prompts (same M), got {tuple(x.shape)} and {tuple(y.shape)}")
    grams = []
    for rows in (x, y):
        centered = rows.to(torch.float64, copy=True)
        centered -= centered.mean(-2, keepdim=True)
        grams.append(centered @ centered.mT)
    k, l = grams
    result = (k * l).sum((-2, -1)) / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l))
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    return torch.where(torch.isfinite(result), result, math.nan).to(dtype)


