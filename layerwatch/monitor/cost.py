"""What a probe will cost, estimated from shapes before it runs: time of its forward passes and of its metrics,
and the memory the metrics add.

The model (README, "What it costs"), per probe:

- forward passes: ``2 · parameters · tokens + 4 · blocks · T² · D`` FLOPs per prompt and pass (weights, and
  attention's two ``T x T`` products), one clean pass plus one per augmented view;
- token metrics, per prompt of ``T`` tokens and per layer (the clean pass only): the Gram matrix of the
  smaller side, ``2 · T² · D`` FLOPs when ``T <= D`` else ``2 · T · D²`` (the ``D x D`` covariance), its
  eigenvalues, about ``n³`` LAPACK work for ``n = min(T, D)`` (none with ``alpha=2``: collision entropy from a
  Frobenius norm), and a few memory passes over the ``T x D`` states;
- set-level metrics: ``M x M`` eigenvalue problems per layer (dataset entropy, effective rank, DiME's
  ``1 + permutations`` Hadamard products) and LiDAR's ``min(M·Q, D)``-sized one; their peak memory is
  :func:`layerwatch.metrics.set_level_peak_bytes`;
- their standard errors: the delete-a-group jackknife recomputes each set-level metric that has one
  ``G = JACKKNIFE_GROUPS`` times on ``M - M // G`` prompts (:mod:`layerwatch.metrics.uncertainty`), plus a fixed
  cost per recomputation and layer (``set_call_seconds``).

Rates are per device kind (:data:`RATES`, measured on a 2-core x86 CPU and set conservatively for a recent data
center GPU, whose eigenvalue path is at worst the host's CPU cores). Estimates are within a factor of about 2 of
what ``benchmarks/probe_cost.py`` measures; they are meant to tell seconds from hours.

What a whole run pays on top (:func:`estimate_run_overhead`, checked against a real Trainer run by
``benchmarks/overhead.py``) adds, to the probes themselves, what happens on the host around them: writing each
record (the JSONL line and its fsync, one TensorBoard scalar per layer and series, the histograms) and drawing the
TensorBoard pictures, two per per-layer series (a heatmap and a depth profile) at each drawing of the bounded
schedule (:func:`layerwatch.rundir.pictures.picture_due`) and for the last probe at ``close()``. The pictures are
drawn on a background thread, but matplotlib holds Python's lock for most of a drawing, so on a CPU-bound run they
cost the training loop about their full time; at small scale they dominate a probe.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from layerwatch.metrics import names, set_level_peak_bytes
from layerwatch.metrics.uncertainty import JACKKNIFE_GROUPS
from layerwatch.metrics.registry import REGISTRY, TOKENS, VIEWS
from layerwatch.monitor.capture import model_device
from layerwatch.monitor.model_facts import ModelFacts, model_facts
from layerwatch.rundir.pictures import PICTURE_SCHEDULE, picture_due

logger = logging.getLogger(__name__)

__all__ = [
    "DeviceRates", "ProbeCost", "RATES", "RunOverhead", "check_probe_cost", "estimate_probe_cost",
    "estimate_run_overhead", "warn_if_expensive",
]

#: A probe whose metrics are estimated to take more than this many times its forward passes ...
WARN_FACTOR = 3.0
#: ... and more than this many seconds is warned about before its first forward pass.
WARN_MIN_SECONDS = 30.0


@dataclass(frozen=True)
class DeviceRates:
    """Throughputs of one device kind.

    Attributes:
        forward_flops: FLOP/s of the model's forward passes (its dtype, all cores or tensor cores).
        gram_flops: FLOP/s of the metrics' float32 matrix products.
        eigen_units: ``n³`` units per second of batched symmetric eigenvalue problems (``eigvalsh``) of size
            ``n = 128``. LAPACK's reduction to tridiagonal form is memory-bound for small ``n``: the rate grows
            like ``n^0.85`` (measured from 64 to 1,024) up to ``eigen_cap`` (about n = 2,048).
        eigen_cap: the largest rate, in the same units.
        bandwidth: bytes per second of the metrics' elementwise passes.
        call_seconds: fixed cost of one metric call on one layer of one micro-batch (Python, small ops, syncs).
        set_call_seconds: fixed cost of one set-level metric on one layer (a jackknife replicate included).
        per_core: the CPU rates are per core (multiplied by ``os.cpu_count()``).
    """

    forward_flops: float
    gram_flops: float
    eigen_units: float
    eigen_cap: float
    bandwidth: float
    call_seconds: float
    set_call_seconds: float = 2e-4
    per_core: bool = False


#: Measured on the development machine (x86, AVX-512, per core) and, for CUDA, set for an H100/H200-class GPU
#: with the eigenvalues on the path :class:`layerwatch.metrics.EigenvaluePaths` picks (at worst the host CPU).
RATES = {
    "cpu": DeviceRates(
        forward_flops=5e10, gram_flops=5e10, eigen_units=5.4e9, eigen_cap=3e10, bandwidth=4e9, call_seconds=1e-3,
        per_core=True,
    ),
    "cuda": DeviceRates(
        forward_flops=2e14, gram_flops=4e13, eigen_units=2e10, eigen_cap=2e11, bandwidth=1.5e12, call_seconds=2e-3
    ),
}


@dataclass(frozen=True)
class ProbeCost:
    """Estimated cost of one probe.

    Attributes:
        forward_seconds: the probe's forward passes (clean batch and augmented views).
        metric_seconds: the metrics layerwatch computes on top of them.
        parts: seconds of ``"gram"``, ``"eigenvalues"``, ``"passes"`` (token metrics), ``"set_level"``,
            ``"stderr"`` (the set-level metrics' jackknife replicates) and ``"calls"`` (fixed cost per metric call
            on one layer of one micro-batch, and per set-level metric and replicate on one layer).
        token_bytes: working memory of the token metrics for one layer of one micro-batch.
        set_level_bytes: peak working memory of the set-level step (:func:`metrics.set_level_peak_bytes`, an
            upper bound: a full chunk of :data:`metrics.SET_CHUNK_BYTES` whenever DiME or InfoNCE run).
        stored_bytes: the reduced buffers kept for the whole probe (pooled rows and views, per-prompt values).
    """

    forward_seconds: float
    metric_seconds: float
    parts: dict[str, float]
    token_bytes: int
    set_level_bytes: int
    stored_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Memory the metrics add at their peak: the stored buffers plus the larger working set."""
        return self.stored_bytes + max(self.token_bytes, self.set_level_bytes)

    @property
    def ratio(self) -> float:
        """Metric time over forward time."""
        return self.metric_seconds / max(self.forward_seconds, 1e-12)


def _rates(device: str, cores: int | None = None) -> DeviceRates:
    kind = device.split(":")[0]
    rates = RATES.get(kind, RATES["cuda"])  # other accelerators: as a GPU
    if not rates.per_core:
        return rates
    cores = cores or os.cpu_count() or 1
    values = (rates.forward_flops, rates.gram_flops, rates.eigen_units, rates.eigen_cap, rates.bandwidth)
    return DeviceRates(
        *(value * cores for value in values), call_seconds=rates.call_seconds, set_call_seconds=rates.set_call_seconds
    )


def _eigen_seconds(sizes: Iterable[tuple[int, float]], rates: DeviceRates) -> float:
    """Seconds of ``count`` eigenvalue problems of size ``n`` for each ``(n, count)``."""
    total = 0.0
    for n, count in sizes:
        if n > 0:
            rate = min(rates.eigen_units * (n / 128) ** 0.85, rates.eigen_cap)
            total += count * float(n) ** 3 / rate
    return total


def estimate_probe_cost(
    *,
    layers: int,
    width: int,
    tokens: int | Sequence[int],
    prompts: int | None = None,
    parameters: int | None = None,
    views: int = 2,
    token_metrics: bool = True,
    metric_names: Iterable[str] = (names.DATASET_ENTROPY, names.EFFECTIVE_RANK, names.INFONCE, names.DIME, names.LIDAR),
    alpha: float = 1.0,
    batch_size: int = 16,
    permutations: int = 10,
    device: str = "cpu",
    cores: int | None = None,
    stderr_groups: int | None = None,
) -> ProbeCost:
    """Estimate the time and memory of one probe from its shape (no tensor is allocated).

    Args:
        layers: hidden states probed (decoder blocks + 1 for the embeddings).
        width: hidden size ``D``.
        tokens: tokens per prompt: one number for every prompt, or each prompt's length.
        prompts: number of prompts ``M`` (needed when ``tokens`` is one number).
        parameters: the model's parameter count (default: ``12 · blocks · D²``, a GPT-style estimate).
        views: augmented views (extra forward passes; 0 for ``metrics="light"``).
        token_metrics: whether prompt entropy/curvature run (Gram matrices and eigenvalues per prompt and layer).
        metric_names: the metrics that run (only the set-level ones count here; token metrics are ``token_metrics``).
        alpha: the Rényi order; ``2`` needs no eigenvalues.
        batch_size: prompts per probe forward (bounds the token metrics' memory).
        permutations: DiME's random permutations.
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:1"``, ...).
        cores: CPU cores the CPU rates are multiplied by (default: ``os.cpu_count()``).
        stderr_groups: jackknife replicates of the set-level standard errors (default:
            :data:`layerwatch.metrics.uncertainty.JACKKNIFE_GROUPS`; 0: none).
    """
    lengths = [int(tokens)] * int(prompts or 0) if isinstance(tokens, int) else [int(n) for n in tokens]
    m, d, blocks = len(lengths), int(width), max(int(layers) - 1, 1)
    if parameters is None:
        parameters = 12 * blocks * d * d
    rates = _rates(device, cores)
    passes = 1 + int(views)
    forward = passes * sum(2.0 * parameters * n + 4.0 * blocks * n * n * d for n in lengths)
    parts = {"gram": 0.0, "eigenvalues": 0.0, "passes": 0.0, "set_level": 0.0}
    micro_batches = -(-m // max(int(batch_size), 1))
    parts["calls"] = layers * micro_batches * (int(token_metrics) + int(views)) * rates.call_seconds
    if token_metrics:
        gram = sum(2.0 * n * n * d if n <= d else 2.0 * n * d * d for n in lengths)
        parts["gram"] = layers * gram / rates.gram_flops
        if alpha != 2.0:
            parts["eigenvalues"] = _eigen_seconds([(min(n, d), layers) for n in lengths], rates)
        parts["passes"] = layers * sum(8.0 * n * d * 4 for n in lengths) / rates.bandwidth
    selected = set(metric_names)
    parts["set_level"] = _eigen_seconds(_set_level_sizes(selected, m, d, layers, views, permutations), rates)
    # set-level metrics (those with a compute step; callers may pass the token metrics too, which cost nothing here)
    set_level = {name for name in selected if name in REGISTRY and REGISTRY[name].compute is not None}
    parts["calls"] += layers * len(set_level) * rates.set_call_seconds
    groups = min(JACKKNIFE_GROUPS if stderr_groups is None else int(stderr_groups), m)
    resampled = {name for name in set_level if REGISTRY[name].stderr and not REGISTRY[name].scalar}  # the jackknifed
    if groups >= 2 and resampled:
        kept = m - m // groups
        replicate = _eigen_seconds(_set_level_sizes(resampled, kept, d, layers, views, permutations), rates)
        parts["stderr"] = groups * (replicate + layers * len(resampled) * rates.set_call_seconds)
    else:
        parts["stderr"] = 0.0
    longest = max(lengths, default=0)
    n = min(longest, d)
    token_bytes = batch_size * (longest * d * 4 + 2 * n * n * 4 + longest * 3 * 8) if token_metrics else 0
    stored = layers * m * (1 + views) * d * 4 + layers * m * 3 * 4
    return ProbeCost(
        forward_seconds=forward / rates.forward_flops,
        metric_seconds=sum(parts.values()),
        parts=parts,
        token_bytes=token_bytes,
        set_level_bytes=set_level_peak_bytes(m, selected),
        stored_bytes=stored,
    )


#: Host-side costs of a run's outputs, measured on the development machine (one core, ``benchmarks/overhead.py``
#: and ``benchmarks/picture_cost.py``): seconds per record written (JSONL line, fsync and the TensorBoard flushes) ...
RECORD_SECONDS = 0.004
#: ... per per-layer value written to TensorBoard (a scalar of one layer's run, its standard error, a histogram) ...
VALUE_SECONDS = 1.5e-4
#: ... per TensorBoard picture drawn and encoded (matplotlib Agg; a heatmap or a depth profile) ...
PICTURE_SECONDS = 0.06
#: ... and once per run: opening the writers and the first probe's set-up (hooks, model facts, the probe's file).
START_SECONDS = 0.5


@dataclass(frozen=True)
class RunOverhead:
    """Estimated seconds that layerwatch adds to a whole run (:func:`estimate_run_overhead`).

    Attributes:
        probes: probes of the run.
        drawings: times the TensorBoard pictures are drawn (the bounded schedule, plus the last probe at close).
        parts: seconds of ``"probes"`` (forward passes and metrics), ``"records"`` (writing each probe's values),
            ``"pictures"`` and ``"start"``.
    """

    probes: int
    drawings: int
    parts: dict[str, float]

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())

    def slowdown(self, train_seconds: float) -> float:
        """The overhead as a fraction of the training time without layerwatch (0.05 = 5% slower)."""
        return self.seconds / max(float(train_seconds), 1e-12)


def picture_drawings(probes: int, schedule: str = PICTURE_SCHEDULE) -> int:
    """How often a run of ``probes`` probes draws its pictures: at each due probe, and at ``close()`` for the last
    probe when the schedule skipped it."""
    due = sum(picture_due(count, schedule) for count in range(1, int(probes) + 1))
    return due + int(probes > 0 and not picture_due(int(probes), schedule))


def estimate_run_overhead(
    probe: ProbeCost,
    *,
    probes: int,
    layers: int,
    series: int,
    tensorboard: bool = True,
    jsonl: bool = True,
    histograms: int = 0,
    schedule: str = PICTURE_SCHEDULE,
) -> RunOverhead:
    """Estimate what ``probes`` probes, their records and pictures add to a run, in seconds.

    Args:
        probe: one probe's cost (:func:`estimate_probe_cost`).
        probes: probes of the run (at ``every=N`` over ``S`` steps, about ``S / N`` plus the final probe).
        layers: hidden states probed.
        series: per-layer series in each record (the selected metrics that are not single numbers, e.g. 17 for
            ``metrics="standard"``); each has a TensorBoard scalar per layer and two pictures per drawing.
        tensorboard: whether the TensorBoard writer runs (no per-layer values or pictures otherwise).
        jsonl: whether ``layerwatch.jsonl`` is written.
        histograms: per-layer histograms in each record (the per-prompt metrics that have one).
        schedule: the picture schedule (:data:`layerwatch.rundir.pictures.PICTURE_SCHEDULE`).
    """
    probes = int(probes)
    drawings = picture_drawings(probes, schedule) if tensorboard else 0
    values = layers * (2 * series + histograms) if tensorboard else 0  # a scalar and its standard error per series
    writers = int(tensorboard) + int(jsonl)
    parts = {
        "probes": probes * (probe.forward_seconds + probe.metric_seconds),
        "records": probes * (writers * RECORD_SECONDS + values * VALUE_SECONDS),
        "pictures": drawings * 2 * series * PICTURE_SECONDS,
        "start": START_SECONDS if probes else 0.0,
    }
    return RunOverhead(probes=probes, drawings=drawings, parts=parts)


def _set_level_sizes(
    selected: set[str], m: int, d: int, layers: int, views: int, permutations: int
) -> list[tuple[int, float]]:
    """``(n, count)`` of the set-level eigenvalue problems of one probe."""
    entropies = (names.DATASET_ENTROPY in selected) + (names.EFFECTIVE_RANK in selected)
    return [
        (min(m, d), layers * entropies),
        (m, layers * (1 + permutations) * (names.DIME in selected)),
        (min(m * views, d), layers * (names.LIDAR in selected)),
    ]


def warn_if_expensive(cost: ProbeCost, *, device: str = "cpu") -> bool:
    """Log one warning when the metrics would take far longer than the forward passes (more than
    :data:`WARN_FACTOR` times and :data:`WARN_MIN_SECONDS`), with the estimate and the knobs that lower it.
    Returns whether it warned."""
    if not (cost.metric_seconds > WARN_FACTOR * cost.forward_seconds and cost.metric_seconds > WARN_MIN_SECONDS):
        return False
    heaviest = max(cost.parts, key=cost.parts.__getitem__)
    logger.warning(
        "layerwatch: each probe's metrics are estimated at %.0f s on %s (%.0fx the probe's own forward passes, "
        "%.0f s; mostly %s) and %.0f MiB. Lower max_length (Gram cost grows like T^2 D, eigenvalues like "
        "min(T, D)^3 per prompt and layer), use fewer prompts (num_prompts), metrics=\"light\", or alpha=2 "
        "(no eigenvalues).",
        cost.metric_seconds, device, cost.ratio, cost.forward_seconds, heaviest, cost.peak_bytes / 2**20,
    )
    return True


def check_probe_cost(
    model: ModelFacts | nn.Module,
    *,
    layers: int,
    lengths: Sequence[int],
    metric_names: Iterable[str],
    views: int,
    alpha: float,
    batch_size: int,
    device: str | None = None,
) -> ProbeCost | None:
    """Estimate a probe of a model and warn (:func:`warn_if_expensive`) before its first forward pass.

    The monitor calls this once per model, when the probed depth (``layers`` hidden states) is known, with the
    model's :class:`~layerwatch.monitor.model_facts.ModelFacts` (a model is looked up with
    :func:`~layerwatch.monitor.model_facts.model_facts`): their width and parameter count. ``device`` is the
    device kind the probe runs on (default: the model's). Returns ``None`` when the width is unknown.
    """
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    if facts.width is None:
        return None
    if device is None:
        owner = facts.model if not isinstance(model, nn.Module) else model
        device = model_device(owner).type if owner is not None else "cpu"
    selected = list(metric_names)
    cost = estimate_probe_cost(
        layers=layers,
        width=facts.width,
        tokens=[int(n) for n in lengths],
        parameters=facts.parameters or None,
        views=views if any(VIEWS in REGISTRY[name].needs for name in selected) else 0,
        token_metrics=any(TOKENS in REGISTRY[name].needs for name in selected),
        metric_names=selected,
        alpha=alpha,
        batch_size=batch_size,
        device=device,
    )
    warn_if_expensive(cost, device=device)
    return cost
