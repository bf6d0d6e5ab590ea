"""The metric registry: one :class:`MetricSpec` per metric; everything that lists metrics derives from it.

A spec says, once, what a metric is called and means, what it needs from the probe (token states, pooled rows,
augmented views, activation-health sums), which presets include it, whether lower or higher values mean "more
compressed", whether its per-prompt values are kept (JSONL ``per_prompt``, TensorBoard histograms) and whether the
collapse alerts watch it. It also says how its values are computed, in two stages:

- ``per_prompt`` (token metrics only): one layer of one micro-batch (:class:`TokenInputs`) -> one value per prompt.
  The monitor's hooks call it as each layer is produced and keep the values in a ``[layers, prompts]`` buffer.
- ``compute``: the reduced buffers of the whole probe (:class:`SetInputs`) -> one value per layer. For a token
  metric without ``compute`` it is the mean over prompts of its per-prompt values.

Derived from the registry: the presets and :func:`resolve_metrics` (the monitor's ``metrics=``), the passes and
buffers the collector runs and fills (``layerwatch.monitor.collect``), the per-prompt values a record keeps and the histograms
TensorBoard draws (``layerwatch.rundir.writers``), the collapse alerts (``layerwatch.monitor.alerts``), the summary table
(``layerwatch.rundir.runs``) and the report's order and descriptions (``layerwatch.analysis.report``).

Adding a metric = a function in ``layerwatch.metrics`` plus one :func:`register` call here (tests may register a
throwaway metric and :func:`unregister` it afterwards)::

    register(MetricSpec(
        name="pooled_norm", description="mean L2 norm of the mean-pooled prompt vectors",
        needs=(POOLED,), compute=lambda s: M.pooled_norm(s.pooled),
    ))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

import layerwatch.metrics.names as N
from layerwatch.metrics.attention_sinks import massive_activation, prompt_entropy_without_sinks
from layerwatch.metrics.dimension import intrinsic_dimension
from layerwatch.metrics.labels import best_layer, linear_cka, probe_accuracy
from layerwatch.metrics.sets import bimodality, dataset_entropy, dime, effective_rank, infonce, infonce_chance, lidar
from layerwatch.metrics.tokens import MEAN_POOL, mean_pool, token_metrics
import layerwatch.metrics.uncertainty as uncertainty
from layerwatch.metrics.uncertainty import jackknife, prompt_stderr

# What a metric can need from the probe.
TOKENS = "tokens"  # per-prompt values computed from one layer's token states (a clean forward)
POOLED = "pooled"  # the mean-pooled [layers, prompts, D] rows of the clean batch
VIEWS = "views"  # the mean-pooled [layers, prompts, views, D] rows of the augmented views (extra forwards)
HEALTH = "health"  # per-layer activation sums: sum of squares, finite and non-finite counts, max |x|
LABELS = "labels"  # the probe's class labels (metrics needing them run only on a labelled probe)
REFERENCE = "reference"  # pooled rows of earlier probes of the run (layerwatch.monitor.references), kept in the run directory
NEEDS = (TOKENS, POOLED, VIEWS, HEALTH, LABELS, REFERENCE)

PRESETS = ("light", "standard", "paper")
PRESET_VIEWS = {"light": 0, "standard": 2, "paper": 16}  # augmented views (LiDAR's Q) each preset runs
CUSTOM_VIEWS = 2  # views of an explicit metric list that includes a view metric


@dataclass
class TokenInputs:
    """One layer of one micro-batch, as a per-prompt metric sees it: the real rows only.

    Attributes:
        hidden: ``[b, T, D]`` hidden states of the layer.
        mask: ``[b, T]`` bool, True for real tokens.
        alpha: the run's Rényi order.
    """

    hidden: Tensor
    mask: Tensor
    alpha: float
    _fused: dict[str, Tensor] | None = field(default=None, repr=False)

    def fused(self) -> dict[str, Tensor]:
        """``metrics.token_metrics`` of this layer (prompt entropy, curvature, mean pool), computed once."""
        if self._fused is None:
            self._fused = token_metrics(self.hidden, self.mask, alpha=self.alpha)
        return self._fused

    def pooled(self) -> Tensor:
        """``[b, D]`` mean-pooled rows (taken from :meth:`fused` when that already ran)."""
        if self._fused is not None:
            return self._fused[MEAN_POOL]
        return mean_pool(self.hidden, self.mask)


@dataclass
class SetInputs:
    """The probe's buffers after the cross-rank reduction: all set-level metrics are a function of these.

    Attributes:
        per_prompt: metric name -> ``[layers, prompts]`` per-prompt values (token metrics and what others use).
        pooled: ``[layers, prompts, D]`` mean-pooled clean rows, or None when nothing needs them.
        views: ``[layers, prompts, views, D]`` mean-pooled rows of the augmented views, or None.
        health: ``[layers, 3]`` sum of squares, finite count and non-finite count of the activations, or None.
        max_abs: ``[layers]`` largest finite absolute activation, or None.
        alpha: the Rényi order; seed: seeds random choices (DiME's permutations).
        labels: ``[prompts]`` class labels of a labelled probe, else None; probe_seed: the probe's seed (it fixes
            probe_accuracy's folds).
        reference: ``{"previous": ..., "first": ...}`` pooled ``[layers, prompts, D]`` rows of the run's previous and
            first probes of the same probe (None where there is none or it is not comparable).
        computed: values of the metrics computed so far in this probe, in registry order (best_layer reads
            probe_accuracy's).
        stderr: metric name -> per-layer standard errors, filled by the collector (``layerwatch.monitor.collect``)
            with :func:`standard_errors` after the metrics.
    """

    per_prompt: dict[str, Tensor]
    pooled: Tensor | None
    views: Tensor | None
    health: Tensor | None
    max_abs: Tensor | None
    alpha: float
    seed: int
    labels: list | None = None
    probe_seed: int = 0
    reference: dict[str, Tensor | None] = field(default_factory=dict)
    computed: dict[str, Tensor] = field(default_factory=dict)
    stderr: dict[str, list[float]] = field(default_factory=dict)

    @property
    def num_prompts(self) -> int:
        """The number of prompts M the buffers hold (0 when they hold no per-prompt rows)."""
        rows = [r for r in (self.pooled, self.views, *self.per_prompt.values()) if r is not None]
        return int(rows[0].shape[1]) if rows else 0

    @property
    def num_layers(self) -> int:
        """The number of layers the buffers hold."""
        rows = [r for r in (self.pooled, self.views, self.health, *self.per_prompt.values()) if r is not None]
        return int(rows[0].shape[0]) if rows else 0

    def subset(self, keep: Tensor) -> "SetInputs":
        """These inputs restricted to the prompts ``keep`` (indices; a jackknife replicate), nothing computed yet."""
        take = lambda rows: None if rows is None else rows[:, keep.to(rows.device)]  # noqa: E731
        labels = None if self.labels is None else [self.labels[i] for i in keep.tolist()]
        return replace(
            self, per_prompt={name: take(rows) for name, rows in self.per_prompt.items()}, pooled=take(self.pooled),
            views=take(self.views), labels=labels, reference={k: take(v) for k, v in self.reference.items()},
            computed={}, stderr={},
        )


@dataclass(frozen=True)
class MetricSpec:
    """The declaration of one metric (see the module docstring).

    Attributes:
        name: the metric's name in records, TensorBoard tags (``layerwatch/<name>`` in each ``layer_NN`` run) and
            ``metrics=``.
        description: one line for people (the report prints it).
        needs: what it needs from the probe, a subset of :data:`NEEDS`.
        compute: reduced buffers -> ``[layers]`` values; default for token metrics: mean of the per-prompt values.
        per_prompt: token metrics: one layer of one micro-batch -> ``[b]`` values, one per prompt.
        uses: other metrics whose per-prompt values ``compute`` reads (they are collected even when not selected).
        presets: the presets that include it.
        compressed_when: ``"lower"`` or ``"higher"``: which values mean a more compressed layer; None when the
            metric does not measure compression.
        histogram: keep its per-prompt values in the record (JSONL ``per_prompt``) and draw TensorBoard histograms.
        collapse_watched: the collapse alerts watch it: a value at or below its floor at consecutive probes is a
            collapse (:mod:`layerwatch.monitor.alerts`).
        collapse_floor: the floor of a collapse-watched metric in its own units; None: the monitor's
            ``collapse_threshold`` (for metrics normalized to [0, 1]).
        summary: shown by ``summary_table`` by default (a main metric).
        scalar: one value per probe (``compute`` returns a 0-d tensor), not one per layer: kept in the record's
            ``scalars`` and logged as ``layerwatch/<name>``.
        stderr: the record carries its standard error (:func:`standard_errors`): ``std(ddof=1)/sqrt(n)`` of the
            per-prompt values for a token metric without ``compute``, a delete-a-group jackknife over prompts
            otherwise. False for the activation-health sums and the one-number metrics.
        implies: metrics selected with it by an explicit list (:func:`resolve_metrics`): ``best_layer`` comes with
            ``probe_accuracy``.
    """

    name: str
    description: str
    needs: tuple[str, ...]
    compute: Callable[[SetInputs], Tensor] | None = None
    per_prompt: Callable[[TokenInputs], Tensor] | None = None
    uses: tuple[str, ...] = ()
    presets: tuple[str, ...] = ()
    compressed_when: Literal["lower", "higher"] | None = None
    histogram: bool = False
    collapse_watched: bool = False
    collapse_floor: float | None = None
    summary: bool = False
    scalar: bool = False
    stderr: bool = True
    implies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [need for need in self.needs if need not in NEEDS]
        if unknown or not self.needs:
            raise ValueError(f"MetricSpec {self.name!r}: needs={self.needs!r}; give a non-empty subset of {NEEDS}")
        if self.compute is None and self.per_prompt is None:
            raise ValueError(f"MetricSpec {self.name!r}: give compute= (set level) or per_prompt= (token level)")
        if self.per_prompt is not None and TOKENS not in self.needs:
            raise ValueError(f"MetricSpec {self.name!r}: a per_prompt function needs {TOKENS!r} in needs")
        if self.compressed_when not in ("lower", "higher", None):
            raise ValueError(f"MetricSpec {self.name!r}: compressed_when must be 'lower', 'higher' or None")
        if [p for p in self.presets if p not in PRESETS]:
            raise ValueError(f"MetricSpec {self.name!r}: presets={self.presets!r}; presets are {PRESETS}")

    def set_value(self, inputs: SetInputs) -> Tensor:
        """``[layers]`` values of this metric from the reduced buffers."""
        if self.compute is not None:
            return self.compute(inputs)
        return inputs.per_prompt[self.name].double().nanmean(dim=-1)

    def standard_error(self, inputs: SetInputs, *, groups: int = uncertainty.JACKKNIFE_GROUPS) -> Tensor | None:
        """``[layers]`` standard errors of this metric (float64, CPU), or None when it has none (see ``stderr``)."""
        if not self.stderr or self.scalar or (self.compute is not None and groups < 2) or inputs.num_prompts < 2:
            return None
        if self.compute is None:
            return prompt_stderr(inputs.per_prompt[self.name], dim=-1).cpu()
        statistic = lambda keep: self.set_value(inputs.subset(keep)).double()  # noqa: E731
        return jackknife(statistic, inputs.num_prompts, groups=groups, seed=inputs.seed)


REGISTRY: dict[str, MetricSpec] = {}


def register(spec: MetricSpec) -> MetricSpec:
    """Add ``spec`` to the registry (after the existing metrics); ValueError if the name is taken."""
    if not isinstance(spec, MetricSpec):
        raise TypeError(f"register() takes a MetricSpec, got {type(spec).__name__}")
    if spec.name in REGISTRY or spec.name == "health":
        raise ValueError(f"metric {spec.name!r} is already registered; pick another name or unregister it first")
    missing = [name for name in spec.uses if name not in REGISTRY or REGISTRY[name].per_prompt is None]
    if missing:
        raise ValueError(f"MetricSpec {spec.name!r}: uses={missing} are not registered token (per-prompt) metrics")
    REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> MetricSpec:
    """Remove a metric from the registry (for tests and experiments) and return its spec."""
    if name not in REGISTRY:
        raise KeyError(f"metric {name!r} is not registered")
    return REGISTRY.pop(name)


def spec(name: str) -> MetricSpec:
    """The spec of a registered metric; KeyError naming the known ones otherwise."""
    if name not in REGISTRY:
        raise KeyError(f"unknown metric {name!r}; known metrics are {list(REGISTRY)}")
    return REGISTRY[name]


def all_metrics() -> tuple[str, ...]:
    """Every registered metric, in registry order (the order records, charts and reports use)."""
    return tuple(REGISTRY)


def metrics_needing(need: str) -> tuple[str, ...]:
    """The registered metrics whose ``needs`` include ``need``."""
    return tuple(name for name, s in REGISTRY.items() if need in s.needs)


def preset(name: str) -> tuple[str, ...]:
    """The metrics of a preset, in registry order."""
    return tuple(metric for metric, s in REGISTRY.items() if name in s.presets)


def metric_presets() -> dict[str, tuple[str, ...]]:
    """``{preset: metric names}`` for every preset."""
    return {name: preset(name) for name in PRESETS}


def scalar_metrics() -> tuple[str, ...]:
    """Metrics with one value per probe (not per layer)."""
    return tuple(name for name, s in REGISTRY.items() if s.scalar)


def histogram_metrics() -> tuple[str, ...]:
    """Metrics whose per-prompt values are kept in records and drawn as histograms."""
    return tuple(name for name, s in REGISTRY.items() if s.histogram)


def collapse_metrics() -> tuple[str, ...]:
    """Metrics the collapse alerts watch."""
    return tuple(name for name, s in REGISTRY.items() if s.collapse_watched)


def summary_metrics() -> tuple[str, ...]:
    """The main metrics a summary table shows, in registry order."""
    return tuple(name for name, s in REGISTRY.items() if s.summary)


def describe(name: str) -> str:
    """The one-line description of a metric ('' for a metric the registry does not know, e.g. from an old run)."""
    return REGISTRY[name].description if name in REGISTRY else ""


def resolve_metrics(metrics: str | Sequence[str]) -> tuple[str, tuple[str, ...], int]:
    """(preset name, metric names, augmented views) from the ``metrics=`` argument; ValueError naming it if invalid.

    A preset name gives its metrics and views; a list of metric names (``"health"`` expands to the activation-health
    metrics; a single name may be given as a string) gives ``"custom"`` and 2 views when it holds a metric that needs
    views. A metric's ``implies`` come with it (``probe_accuracy`` brings ``best_layer``).
    """
    if isinstance(metrics, str) and (metrics in REGISTRY or metrics == "health"):
        metrics = [metrics]
    if isinstance(metrics, str):
        if metrics not in PRESETS:
            raise ValueError(
                f"metrics={metrics!r} is not a preset; use one of {sorted(PRESETS)} or a list of metric names "
                f"from {list(REGISTRY)}"
            )
        return metrics, preset(metrics), PRESET_VIEWS[metrics]
    names: list[str] = []
    for name in metrics:
        expanded = metrics_needing(HEALTH) if name == "health" else (name,)
        for item in expanded:
            if item not in REGISTRY:
                raise ValueError(f"metrics= contains unknown metric {item!r}; known metrics are {list(REGISTRY)}")
            for implied in (item, *REGISTRY[item].implies):
                if implied not in names:
                    names.append(implied)
    if not names:
        raise ValueError("metrics= is empty; give a preset ('light', 'standard', 'paper') or metric names")
    needs_views = any(VIEWS in REGISTRY[name].needs for name in names)
    return "custom", tuple(names), CUSTOM_VIEWS if needs_views else 0


def standard_errors(names: Sequence[str], inputs: SetInputs, *, groups: int | None = None) -> dict[str, Tensor]:
    """``{metric: [layers] standard errors}`` of the metrics ``names`` that have one (:attr:`MetricSpec.stderr`).

    Token metrics: :func:`layerwatch.metrics.uncertainty.prompt_stderr` of their per-prompt values. Set-level ones: a
    delete-a-group jackknife (:func:`layerwatch.metrics.uncertainty.jackknife`, ``groups`` replicates seeded by
    ``inputs.seed``; None: :data:`layerwatch.metrics.uncertainty.JACKKNIFE_GROUPS`; 0 skips them) that recomputes :meth:`MetricSpec.set_value` without each group of
    prompts. A replicate the metric refuses (e.g. a class with too few prompts left for ``probe_accuracy``'s folds)
    gives NaN standard errors, never a failed probe.
    """
    groups = uncertainty.JACKKNIFE_GROUPS if groups is None else int(groups)
    result: dict[str, Tensor] = {}
    for name in names:
        try:
            error = REGISTRY[name].standard_error(inputs, groups=groups)
        except ValueError:
            error = torch.full((inputs.num_layers,), float("nan"), dtype=torch.float64)
        if error is not None:
            result[name] = error
    return result


# ------------------------------------------------------------------------------------------- the built-in metrics
def _fused(key: str) -> Callable[[TokenInputs], Tensor]:
    """Per-prompt values taken from the fused ``metrics.token_metrics`` (one pass for all token metrics)."""

    def per_prompt(layer: TokenInputs) -> Tensor:
        return layer.fused()[key]

    per_prompt.__name__ = f"per_prompt_{key}"
    return per_prompt


def _entropy_without_sinks(t: TokenInputs) -> Tensor:
    entropy = t.fused()[N.PROMPT_ENTROPY]  # shared with prompt_entropy: only prompts holding a sink are recomputed
    return prompt_entropy_without_sinks(t.hidden, t.mask, alpha=t.alpha, entropy=entropy)


def _probe_accuracy(s: SetInputs) -> Tensor:
    return probe_accuracy(s.pooled.double(), s.labels, seed=s.probe_seed)


def _best_layer(s: SetInputs) -> Tensor:
    accuracy = s.computed[N.PROBE_ACCURACY] if N.PROBE_ACCURACY in s.computed else _probe_accuracy(s)
    best = best_layer(accuracy)
    return torch.tensor(float("nan") if best is None else float(best), dtype=torch.float64)


def _cka_to(which: str) -> Callable[[SetInputs], Tensor]:
    def compute(s: SetInputs) -> Tensor:
        reference = s.reference.get(which)
        if reference is None:  # no earlier probe, or one of a different probe (the monitor says why)
            return torch.full((s.pooled.shape[0],), float("nan"), dtype=torch.float64)
        return linear_cka(s.pooled, reference)

    compute.__name__ = f"cka_to_{which}"
    return compute


def _dime(s: SetInputs) -> Tensor:
    generator = torch.Generator(device=s.views.device).manual_seed(s.seed)
    return dime(s.views[:, :, 0], s.views[:, :, 1], alpha=s.alpha, generator=generator)


def _rms(s: SetInputs) -> Tensor:
    return (s.health[:, 0].double() / s.health[:, 1].double().clamp_min(1)).sqrt()  # of the finite values


_ALL, _WITH_VIEWS = PRESETS, ("standard", "paper")
_BUILTIN = (
    MetricSpec(
        N.PROMPT_ENTROPY,
        "how spread a prompt's tokens are (normalized Renyi entropy; lower = more compressed)",
        needs=(TOKENS,), per_prompt=_fused(N.PROMPT_ENTROPY), presets=_ALL, compressed_when="lower",
        histogram=True, summary=True,
    ),
    MetricSpec(
        N.PROMPT_ENTROPY_BIMODALITY,
        "Sarle's bimodality coefficient of per-prompt prompt entropy (> 5/9: two modes?)",
        needs=(TOKENS,), uses=(N.PROMPT_ENTROPY,), presets=_ALL,
        compute=lambda s: bimodality(s.per_prompt[N.PROMPT_ENTROPY].double(), dim=-1),
    ),
    MetricSpec(
        N.DATASET_ENTROPY,
        "how diverse the prompts' mean-pooled representations are (normalized Renyi entropy)",
        needs=(POOLED,), presets=_ALL, compressed_when="lower", collapse_watched=True, summary=True,
        compute=lambda s: dataset_entropy(s.pooled, alpha=s.alpha),
    ),
    MetricSpec(
        N.CURVATURE,
        "mean angle between consecutive token steps (radians; lower = straighter trajectories)",
        needs=(TOKENS,), per_prompt=_fused(N.CURVATURE), presets=_ALL, histogram=True, summary=True,
    ),
    MetricSpec(
        N.CURVATURE_ABS,
        "curvature with |cos| (the authors' later code)",
        needs=(TOKENS,), per_prompt=_fused(N.CURVATURE_ABS),
    ),
    MetricSpec(
        N.EFFECTIVE_RANK,
        "RankMe effective rank of the pooled representations",
        needs=(POOLED,), presets=_ALL, compressed_when="lower", summary=True,
        collapse_watched=True, collapse_floor=1.5,  # about one direction left
        compute=lambda s: effective_rank(s.pooled),
    ),
    MetricSpec(
        N.MASSIVE_ACTIVATION,
        "largest token norm over the prompt's median token norm (about 1-3 in ordinary layers; far above: a massive "
        "activation, an attention sink; then read prompt_entropy_without_sinks)",
        needs=(TOKENS,), presets=_ALL, per_prompt=lambda t: massive_activation(t.hidden, t.mask),
    ),
    MetricSpec(
        N.PROMPT_ENTROPY_WITHOUT_SINKS,
        "prompt entropy leaving out sink tokens (above 3x the prompt's median norm and 2x every other token); low "
        "here too = real compression, high while prompt_entropy is low = an attention sink",
        needs=(TOKENS,), presets=_ALL, compressed_when="lower", per_prompt=_entropy_without_sinks,
    ),
    MetricSpec(
        N.PROBE_ACCURACY,
        "cross-validated accuracy of a linear (ridge) classifier of the probe's labels on the layer's pooled "
        "embeddings (labelled probes only; chance is about 1/classes)",
        needs=(POOLED, LABELS), presets=_ALL, summary=True, compute=_probe_accuracy, implies=(N.BEST_LAYER,),
    ),
    MetricSpec(
        N.BEST_LAYER,
        "the layer with the highest probe_accuracy (earliest on ties): one number per probe",
        needs=(POOLED, LABELS), presets=_ALL, scalar=True, compute=_best_layer, stderr=False,
    ),
    MetricSpec(
        N.CKA_TO_PREVIOUS,
        "linear CKA between the layer's pooled embeddings now and at the previous probe (1 = unchanged up to "
        "rotation and scale; lower = the layer is moving)",
        needs=(POOLED, REFERENCE), presets=_ALL, compute=_cka_to("previous"),
    ),
    MetricSpec(
        N.CKA_TO_FIRST,
        "linear CKA between the layer's pooled embeddings now and at the run's first probe (how far it has moved)",
        needs=(POOLED, REFERENCE), presets=_ALL, compute=_cka_to("first"),
    ),
    MetricSpec(
        N.RMS, "root mean square of the activations", needs=(HEALTH,), presets=_ALL, compute=_rms, stderr=False,
    ),
    MetricSpec(
        N.MAX_ABS, "largest absolute activation",
        needs=(HEALTH,), presets=_ALL, compute=lambda s: s.max_abs.double(), stderr=False,
    ),
    MetricSpec(
        N.NONFINITE, "count of NaN/inf activation values",
        needs=(HEALTH,), presets=_ALL, compute=lambda s: s.health[:, 2].double(), stderr=False,
    ),
    MetricSpec(
        N.INFONCE,
        "InfoNCE loss between two augmented views (nats; lower = views identify their prompt; compare with "
        "infonce_chance)",
        needs=(VIEWS,), presets=_WITH_VIEWS, compressed_when="higher", summary=True,
        compute=lambda s: infonce(s.views[:, :, 0], s.views[:, :, 1]),
    ),
    MetricSpec(
        N.INFONCE_CHANCE,
        "InfoNCE of the same layer with the views paired to other prompts (shuffled): the chance baseline, in nats",
        needs=(VIEWS,), presets=_WITH_VIEWS,
        compute=lambda s: infonce_chance(s.views[:, :, 0], s.views[:, :, 1]),
    ),
    MetricSpec(
        N.DIME,
        "DiME: matrix-entropy difference between matched and shuffled view pairs",
        needs=(VIEWS,), presets=_WITH_VIEWS, compressed_when="lower", summary=True, compute=_dime,
    ),
    MetricSpec(
        N.LIDAR,
        "LiDAR: entropy of the between-prompt vs within-view scatter (nats)",
        needs=(VIEWS,), presets=_WITH_VIEWS, compressed_when="lower", summary=True,
        compute=lambda s: lidar(s.views, alpha=s.alpha),
    ),
    MetricSpec(
        N.INTRINSIC_DIMENSION,
        "TwoNN intrinsic dimension of the pooled representations (how many directions the prompts really vary in)",
        needs=(POOLED,), presets=_WITH_VIEWS, compressed_when="lower",
        compute=lambda s: intrinsic_dimension(s.pooled),
    ),
)
for _spec in _BUILTIN:
    register(_spec)
