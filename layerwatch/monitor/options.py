"""The options of :class:`layerwatch.LayerWatch`, in groups that belong together, each checked once, where it is made.

=====================  ==============================================================================================
group                  keywords
=====================  ==============================================================================================
:class:`Schedule`      ``every``, ``log_spaced_start``, ``probe_at_start``, ``max_overhead`` (when to probe)
:class:`Measurement`   ``metrics``, ``alpha``, ``seed``, ``memory_budget`` (what a probe computes)
:class:`Probing`       ``layers``, ``batch_size``, ``device``, ``strict``, ``forward_inputs``, ``block_output``
:class:`AlertRules`    ``collapse_threshold``, ``collapse_probes`` (when a collapse is raised)
:class:`Outputs`       ``tensorboard``, ``jsonl``, ``writers`` (where records go)
=====================  ==============================================================================================

``LayerWatch(probe, logdir=..., every=50, alpha=2.0)`` takes the keywords flat; ``LayerWatch(probe, logdir=...,
schedule=Schedule(every=50))`` takes a whole group (not both for one group). Each group's ``__post_init__`` is the
one place its values are checked; :meth:`LayerWatchOptions.from_keywords` and :func:`check_keywords` (for the
integrations, before training) refuse unknown names. Renamed: ``sinks=`` is ``writers=`` (the old name still works,
with a ``DeprecationWarning``).

The settings a record carries (:func:`run_settings`) are the values the probe used: the options above and the
parameters the metric functions run with. A run continued in the same directory (a resume, a ``trajectory``
continuation) with a setting that changes the values of the series (:data:`SERIES_SETTINGS`) is refused by
:func:`check_continuation`, naming the setting.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerwatch import metrics as M
from layerwatch._version import __version__
from layerwatch.metrics import names, registry
from layerwatch.rundir.writers import check_writers

__all__ = [
    "DEFAULT_MEMORY_BUDGET", "KEYWORDS", "SERIES_SETTINGS", "AlertRules", "LayerWatchOptions", "Measurement",
    "Outputs", "Probing", "Schedule", "check_continuation", "check_keywords", "first_recorded_settings",
    "run_settings",
]

DEFAULT_MEMORY_BUDGET = 2 << 30
"""Default ``memory_budget``: 2 GiB for the set-level metrics' peak (about 7,000 prompts with DiME)."""


def _positive_int(value: Any, name: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer {what}, got {value!r}")


def _flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class Schedule:
    """When to probe.

    Attributes:
        every: probe every ``every`` optimizer steps.
        log_spaced_start: also probe at steps 1, 2, 4, 8, ... below ``every``.
        probe_at_start: also probe at step 0.
        max_overhead: the largest fraction of training time probes may take (the interval is stretched to keep
            it); ``None``: no limit.
    """

    every: int = 100
    log_spaced_start: bool = True
    probe_at_start: bool = False
    max_overhead: float | None = None

    def __post_init__(self) -> None:
        _positive_int(self.every, "every", "number of optimizer steps")
        _flag(self.log_spaced_start, "log_spaced_start")
        _flag(self.probe_at_start, "probe_at_start")
        overhead = self.max_overhead
        if overhead is not None and not (
            isinstance(overhead, (int, float)) and not isinstance(overhead, bool) and 0 < float(overhead) < 1
        ):
            raise ValueError(
                f"max_overhead must be a fraction of wall time in (0, 1), e.g. 0.05 for 5%; got {overhead!r}"
            )


@dataclass(frozen=True)
class Measurement:
    """What a probe computes.

    Attributes:
        metrics: ``"light"``, ``"standard"``, ``"paper"`` or a list of metric names (kept as a tuple).
        alpha: Rényi order of the matrix entropies (1 = von Neumann).
        seed: seeds DiME's permutations.
        memory_budget: bytes the set-level metrics may use at their peak (``None``: no check).
    """

    metrics: str | tuple[str, ...] = "standard"
    alpha: float = 1.0
    seed: int = 0
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET

    def __post_init__(self) -> None:
        if not isinstance(self.metrics, str):
            if not isinstance(self.metrics, Sequence):
                raise ValueError(f"metrics= must be a preset name or a list of metric names, got {self.metrics!r}")
            object.__setattr__(self, "metrics", tuple(self.metrics))
        registry.resolve_metrics(self.metrics)  # ValueError naming metrics=
        alpha = self.alpha
        if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a positive number (1 = von Neumann entropy), got {alpha!r}")
        object.__setattr__(self, "alpha", float(alpha))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        budget = self.memory_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"memory_budget must be a positive number of bytes or None (no check), got {budget!r}")

    @property
    def preset(self) -> str:
        """The preset name, or ``"custom"`` for a list of metrics."""
        return registry.resolve_metrics(self.metrics)[0]

    @property
    def views(self) -> int:
        """The augmented views the metrics feed (0 when none needs them)."""
        return registry.resolve_metrics(self.metrics)[2]


@dataclass(frozen=True)
class Probing:
    """How a probe runs.

    Attributes:
        layers: override block discovery: a dotted path (``"model.layers"``) or a list of modules (kept as a tuple).
        batch_size: prompts per probe forward; bounds the probe's memory.
        device: where probe inputs go (``None``: the device of the model's first parameter).
        strict: re-raise probe failures instead of logging them and carrying on.
        forward_inputs: ``callable(input_ids, attention_mask)`` returning the forward's keyword arguments (a dict)
            or positional ones (a tuple), for a model that takes neither ``input_ids=`` nor the ids first
            (:class:`layerwatch.monitor.capture.ForwardInputs`; ``None``: found from the forward's signature).
        block_output: ``callable(block output) -> [batch, tokens, hidden]`` tensor, for blocks whose output is not
            a tensor, a tuple led by one or a dict with ``hidden_states`` (``None``: that rule).
    """

    layers: str | tuple[Any, ...] | None = None
    batch_size: int = 16
    device: Any = None
    strict: bool = False
    forward_inputs: Callable[..., Any] | None = None
    block_output: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if self.layers is not None and not isinstance(self.layers, str):
            if not isinstance(self.layers, Sequence):
                raise TypeError(f"layers= must be a dotted path or a list of modules, got {type(self.layers).__name__}")
            object.__setattr__(self, "layers", tuple(self.layers))
        _positive_int(self.batch_size, "batch_size", "number of prompts per forward")
        _flag(self.strict, "strict")
        if self.forward_inputs is not None and not callable(self.forward_inputs):
            raise TypeError(
                "forward_inputs= must be a callable(input_ids, attention_mask) returning the forward's keyword "
                f"arguments (a dict) or positional ones (a tuple), got {self.forward_inputs!r}"
            )
        if self.block_output is not None and not callable(self.block_output):
            raise TypeError(f"block_output= must be a callable(output) -> tensor, got {self.block_output!r}")


@dataclass(frozen=True)
class AlertRules:
    """When a layer raises a collapse alert (see :mod:`layerwatch.monitor.alerts`).

    Attributes:
        collapse_threshold: the floor of the normalized dataset entropy (and the other collapse-watched metrics
            without a floor of their own).
        collapse_probes: consecutive probes at or below the floor before the alert.
    """

    collapse_threshold: float = 0.05
    collapse_probes: int = 2

    def __post_init__(self) -> None:
        threshold = self.collapse_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"collapse_threshold must be a finite number, got {threshold!r}")
        _positive_int(self.collapse_probes, "collapse_probes", "number of consecutive probes")


@dataclass(frozen=True)
class Outputs:
    """Where records go (on the main process).

    Attributes:
        tensorboard: write TensorBoard events into ``logdir``.
        jsonl: write ``layerwatch.jsonl`` into ``logdir``.
        writers: extra writers (objects with ``write(record)`` and ``close()``; kept as a tuple).
    """

    tensorboard: bool = True
    jsonl: bool = True
    writers: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        _flag(self.tensorboard, "tensorboard")
        _flag(self.jsonl, "jsonl")
        writers = () if self.writers is None else self.writers
        if not isinstance(writers, Sequence):
            raise TypeError(f"writers= must be a list of writers, got {type(writers).__name__}")
        object.__setattr__(self, "writers", tuple(check_writers(list(writers))))


GROUPS: dict[str, type] = {
    "schedule": Schedule, "measurement": Measurement, "probing": Probing, "alerts": AlertRules, "outputs": Outputs,
}
KEYWORDS: dict[str, str] = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
"""Every flat keyword of :class:`layerwatch.LayerWatch`'s options -> the group it belongs to."""
RENAMED = {"sinks": "writers"}


@dataclass(frozen=True)
class LayerWatchOptions:
    """All options of one :class:`layerwatch.LayerWatch`, by group."""

    schedule: Schedule = field(default_factory=Schedule)
    measurement: Measurement = field(default_factory=Measurement)
    probing: Probing = field(default_factory=Probing)
    alerts: AlertRules = field(default_factory=AlertRules)
    outputs: Outputs = field(default_factory=Outputs)

    def __post_init__(self) -> None:
        for name, cls in GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name}= must be a layerwatch.monitor.options.{cls.__name__}, got {getattr(self, name)!r}")

    @classmethod
    def from_keywords(cls, **keywords: Any) -> LayerWatchOptions:
        """Options from flat keywords (``every=50``) and whole groups (``schedule=Schedule(...)``).

        Raises:
            TypeError: an unknown keyword (the known ones are listed), or a group given with one of its keywords.
            ValueError: a value its group refuses (the message names the keyword).
        """
        keywords = _renamed(keywords)
        unknown = sorted(name for name in keywords if name not in KEYWORDS and name not in GROUPS)
        if unknown:
            raise TypeError(
                f"unknown LayerWatch option(s) {', '.join(unknown)}; the options are {sorted(KEYWORDS)} "
                f"(or whole groups: {sorted(GROUPS)})"
            )
        groups: dict[str, Any] = {}
        for group, group_cls in GROUPS.items():
            flat = {name: value for name, value in keywords.items() if KEYWORDS.get(name) == group}
            if group in keywords and flat:
                raise TypeError(f"give {group}= or its keywords ({', '.join(sorted(flat))}), not both")
            groups[group] = keywords[group] if group in keywords else group_cls(**flat)
        return cls(**groups)

    def flat(self) -> dict[str, Any]:
        """Every option as a flat keyword."""
        return {f.name: getattr(getattr(self, KEYWORDS[f.name]), f.name) for cls in GROUPS.values()
                for f in dataclasses.fields(cls)}


def _renamed(keywords: Mapping[str, Any]) -> dict[str, Any]:
    """``keywords`` with deprecated names replaced (a ``DeprecationWarning`` each)."""
    out = dict(keywords)
    for old, new in RENAMED.items():
        if old in out:
            if new in out:
                raise TypeError(f"give {new}= only; {old}= is its deprecated name")
            warnings.warn(f"LayerWatch({old}=...) is deprecated; pass {new}=", DeprecationWarning, stacklevel=4)
            out[new] = out.pop(old)
    return out


def check_keywords(
    keywords: Mapping[str, Any], *, owner: str | None = None, reserved: Sequence[str] = ()
) -> dict[str, Any]:
    """Check :class:`layerwatch.LayerWatch` keyword options before training (for the integrations); returns them
    with deprecated names replaced.

    Args:
        keywords: the options, flat or as whole groups.
        owner: prefixed to error messages (e.g. ``"LayerWatchCallback"``).
        reserved: names the caller sets itself (refused here).

    Raises:
        TypeError: a reserved or unknown name. ValueError: a value :class:`LayerWatch` would refuse.
    """
    prefix = f"{owner}: " if owner else ""
    taken = [name for name in keywords if name in reserved]
    if taken:
        raise TypeError(f"{prefix}{', '.join(taken)} is set by {owner or 'the caller'} itself; pass it as its own argument")
    renamed = _renamed(keywords)
    try:
        LayerWatchOptions.from_keywords(**renamed)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{prefix}{error}") from None
    return renamed


# -------------------------------------------------------------------------------------- the recorded settings


def _default(function: Callable[..., Any], parameter: str) -> Any:
    """The default of ``function``'s ``parameter``: the value the registry's call (which does not pass it) uses."""
    return inspect.signature(function).parameters[parameter].default


METRIC_PARAMETERS: dict[str, Any] = {
    "infonce_temperature": _default(M.infonce, "temperature"),
    "lidar_delta": _default(M.lidar, "delta"),
    "dime_permutations": _default(M.dime, "n_permutations"),
}
"""The parameters the built-in metrics run with, read from the metric functions themselves."""

SERIES_SETTINGS: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "alpha": (None, "alpha="),
    "block_paths": (None, "layers="),
    "views": ((names.LIDAR,), "metrics= (the preset sets LiDAR's views)"),
    "seed": ((names.DIME,), "seed="),
    "infonce_temperature": ((names.INFONCE, names.INFONCE_CHANCE), "the same layerwatch version"),
    "lidar_delta": ((names.LIDAR,), "the same layerwatch version"),
    "dime_permutations": ((names.DIME,), "the same layerwatch version"),
}
"""Settings that change the values of a series -> (the metrics whose values they change, ``None``: all; the option
that sets them). A continued run must keep them (:func:`check_continuation`)."""


def run_settings(
    options: LayerWatchOptions, probe: Any, metric_names: Sequence[str], views: int, *, world: int,
    block_paths: Sequence[str] | None,
) -> dict[str, Any]:
    """The settings a record carries: the values this monitor runs with, so that runs can be compared honestly."""
    measurement = options.measurement
    settings: dict[str, Any] = {
        "preset": measurement.preset,
        "metrics": list(metric_names),
        "alpha": measurement.alpha,
        "views": int(views),
        **METRIC_PARAMETERS,
        "seed": measurement.seed,
        "num_prompts": probe.num_prompts,
        "batch_size": options.probing.batch_size,
        "world_size": int(world),
        "probe_hash": probe.content_hash,
        "layerwatch_version": __version__,
    }
    if block_paths is not None:
        settings["block_paths"] = list(block_paths)
    return settings


def check_continuation(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], *, where: str) -> None:
    """Refuse to continue a series recorded with ``recorded`` settings under ``current`` ones that change its values.

    Only the :data:`SERIES_SETTINGS` both hold are compared, and a metric-specific one only when both runs compute
    one of its metrics. Raises ``ValueError`` naming the setting, both values and the fix.
    """
    if not recorded:
        return
    for key, (affects, option) in SERIES_SETTINGS.items():
        if key not in recorded or key not in current:
            continue
        if affects is not None and not (
            set(affects) & set(recorded.get("metrics", ())) and set(affects) & set(current.get("metrics", ()))
        ):
            continue
        old, new = recorded[key], current[key]
        if _same(old, new):
            continue
        raise ValueError(
            f"{where} holds a series recorded with {key}={_shown(old)}, but this run has {key}={_shown(new)}: the "
            f"values would not continue that series. Continue it with {option} as recorded ({_shown(old)}), or "
            "write this run to another logdir"
        )


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return math.isclose(float(old), float(new), rel_tol=1e-12, abs_tol=0.0)
    return json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True)


def _shown(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{value[0]!r}, ..., {value[-1]!r}] ({len(value)} blocks)"
    return repr(value)


_MAX_LINES_READ = 1000  # a continued run's first record is its first line; damaged lines before it are skipped
_MAX_LINE_BYTES = 16 << 20  # a longer line is skipped unread (a damaged or hostile file)


def first_recorded_settings(path: str | Path, resume_step: int | None) -> dict[str, Any] | None:
    """The settings of the first record in the JSONL file ``path`` that a continued run keeps (at or before
    ``resume_step``); ``None`` without one. Reads only up to that record, a bounded line at a time."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        for _ in range(_MAX_LINES_READ):
            line = handle.readline(_MAX_LINE_BYTES)
            if not line:
                return None
            if not line.endswith(b"\n") and len(line) >= _MAX_LINE_BYTES:
                while line and not line.endswith(b"\n"):  # skip the rest of an oversized line
                    line = handle.readline(_MAX_LINE_BYTES)
                continue
            settings = _settings_of(line, resume_step)
            if settings is not None:
                return settings
    return None


def _settings_of(line: bytes, resume_step: int | None) -> dict[str, Any] | None:
    try:
        data = json.loads(line.decode("utf-8"))
        step, settings = int(data["step"]), data.get("settings")
    except (ValueError, KeyError, TypeError, AttributeError):  # UnicodeDecodeError is a ValueError
        return None
    if isinstance(settings, dict) and (resume_step is None or step <= resume_step):
        return settings
    return None
