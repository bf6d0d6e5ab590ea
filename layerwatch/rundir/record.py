"""The result of one probe, as a plain dataclass, and its JSON form (one line of ``layerwatch.jsonl``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from layerwatch.metrics import names

SCALAR_PREFIX = "layerwatch"

PROBE_SECONDS = "probe_seconds"
"""The scalar with each probe's wall time (``ProbeRecord.wall_time_s``): ``layerwatch/probe_seconds`` in TensorBoard
and the trackers, ``read_run(...).scalar("probe_seconds")``."""

ERRORS = "errors"
"""The running count of failed probes, ``layerwatch/errors`` in TensorBoard (written at every probe and at each failure)."""

ALERT_KINDS = ("collapse", names.NONFINITE, "bimodal", "cka", "note")
"""Kinds of :class:`Alert`: a collapse, non-finite activations, a bimodal per-prompt distribution, a CKA reference
that could not be used, and ``"note"`` for any other message (e.g. an alert string of an older run)."""


@dataclass(frozen=True)
class Alert(str):
    """One alert: a typed, frozen value (SPEC §8) that is also its message string.

    Attributes:
        kind: one of :data:`ALERT_KINDS` (``"collapse"``, ``"nonfinite"``, ``"bimodal"``, ``"cka"``, ``"note"``).
        metric: the metric it is about (``None`` when none is).
        layer: the layer it is about (``None`` for the whole probe).
        step: the step of the probe that raised it.
        message: the text people read (TensorBoard, the log, the report).

    Read ``alert.kind`` to tell alerts apart. An alert is a ``str`` equal to its message, so code written for the
    earlier plain-string alerts (``str(alert)``, ``alert.startswith(...)``, JSON) keeps working.
    """

    kind: str
    metric: str | None
    layer: int | None
    step: int
    message: str

    def __new__(cls, kind: str, metric: str | None, layer: int | None, step: int, message: str) -> "Alert":
        return str.__new__(cls, message)

    def __post_init__(self) -> None:
        if self.kind not in ALERT_KINDS:
            raise ValueError(f"Alert kind must be one of {ALERT_KINDS}, got {self.kind!r}")

    def __getnewargs__(self) -> tuple[Any, ...]:  # pickling and copying rebuild the typed value
        return (self.kind, self.metric, self.layer, self.step, self.message)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "metric": self.metric, "layer": self.layer, "step": self.step, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Alert":
        layer = data.get("layer")
        return cls(
            str(data["kind"]), data.get("metric"), None if layer is None else int(layer), int(data["step"]),
            str(data["message"]),
        )

    @classmethod
    def from_message(cls, message: str, step: int) -> "Alert":
        """An alert from its message alone (records written before alerts were typed): the kind is read from the
        message's first word (``"collapse: ..."``), else ``"note"``."""
        if isinstance(message, Alert):
            return message
        head = str(message).split(":", 1)[0].split(" ", 1)[0]
        kind = "cka" if head.startswith("cka_to_") else head if head in ALERT_KINDS else "note"
        return cls(kind, head if kind == "cka" else None, None, int(step), str(message))


def scalar_tag(metric: str, layer: int) -> str:
    """The flat key of one metric at one layer, e.g. ``layerwatch/prompt_entropy/layer_03``.

    Trackers without runs-within-runs (``accelerator.log``) get these keys; layerwatch's own TensorBoard writer uses
    :func:`layer_run` and :func:`metric_tag` instead (earlier versions wrote these tags in the run itself).
    """
    return f"{SCALAR_PREFIX}/{metric}/{layer_run(layer)}"


STDERR_PREFIX = "layerwatch_stderr"


def stderr_tag(metric: str) -> str:
    """The tag of a metric's standard error inside a layer's TensorBoard run, e.g. ``layerwatch_stderr/dime``
    (its own TensorBoard section, one chart per metric with every layer as a line, beside ``layerwatch/``)."""
    return f"{STDERR_PREFIX}/{metric}"


def layer_run(layer: int) -> str:
    """The TensorBoard run (sub-folder of the run directory) that holds one layer's scalars, e.g. ``layer_03``."""
    return f"layer_{layer:02d}"


def metric_tag(metric: str) -> str:
    """The tag of a metric inside a layer's TensorBoard run, e.g. ``layerwatch/prompt_entropy``."""
    return f"{SCALAR_PREFIX}/{metric}"


def _to_json_number(value: float) -> float | None:
    # JSON has no NaN/inf; null stands for "not a number" and reads back as NaN.
    value = float(value)
    return value if math.isfinite(value) else None


def _from_json_number(value: Any) -> float:
    return math.nan if value is None else float(value)


@dataclass
class ProbeRecord:
    """Everything one probe measured.

    Attributes:
        step: the optimizer step (or checkpoint step) the probe ran at.
        time: Unix time at the end of the probe.
        wall_time_s: how long the probe took, forward passes and metrics included.
        layers: layer indices; 0 is the embedding output (the input of the first block), i the output of block i.
        metrics: metric name -> one value per layer (NaN where undefined).
        per_prompt: metric name -> ``[layer][prompt]`` values, for the distributions (histograms, bimodality).
        alerts: the alerts this probe raised (each reported once per run), as :class:`Alert` values (plain strings
            given here become alerts of the kind their first word names).
        settings: the metric settings (preset, alpha, views, ...), so runs can be compared honestly.
        scalars: metric name -> one value for the whole probe (e.g. ``best_layer``), logged as ``layerwatch/<name>``.
        stderr: metric name -> one standard error per layer (NaN where undefined): std(ddof=1)/sqrt(n) of the
            per-prompt values for per-prompt metrics, a seeded resampling estimate over prompts for set-level ones
            (:mod:`layerwatch.metrics.uncertainty`).
    """

    step: int
    time: float
    wall_time_s: float
    layers: list[int]
    metrics: dict[str, list[float]]
    per_prompt: dict[str, list[list[float]]] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.alerts = [Alert.from_message(alert, self.step) for alert in self.alerts]

    def flat_scalars(self) -> dict[str, float]:
        """``{"layerwatch/<metric>/layer_<NN>": value}`` (and ``{"layerwatch/<scalar>": value}`` for the probe's
        single-number metrics) for trackers that take flat keys (``accelerator.log``)."""
        flat = {
            scalar_tag(name, layer): float(value)
            for name, values in self.metrics.items()
            for layer, value in zip(self.layers, values)
        }
        flat.update({f"{SCALAR_PREFIX}/{name}": float(value) for name, value in self.scalars.items()})
        return flat

    def to_json(self) -> str:
        payload = {
            "step": int(self.step),
            "time": float(self.time),
            "wall_time_s": float(self.wall_time_s),
            "layers": [int(layer) for layer in self.layers],
            "metrics": {k: [_to_json_number(v) for v in vals] for k, vals in self.metrics.items()},
            "per_prompt": {
                k: [[_to_json_number(v) for v in row] for row in rows] for k, rows in self.per_prompt.items()
            },
            "alerts": [alert.message for alert in self.alerts],  # the messages, as older readers expect
            "alert_details": [alert.to_dict() for alert in self.alerts],
            "settings": self.settings,
        }
        if self.scalars:
            payload["scalars"] = {k: _to_json_number(v) for k, v in self.scalars.items()}
        if self.stderr:
            payload["stderr"] = {k: [_to_json_number(v) for v in vals] for k, vals in self.stderr.items()}
        return json.dumps(payload, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> "ProbeRecord":
        data = json.loads(line)
        return cls(
            step=int(data["step"]),
            time=float(data.get("time", math.nan)),
            wall_time_s=float(data.get("wall_time_s", math.nan)),
            layers=[int(layer) for layer in data["layers"]],
            metrics={k: [_from_json_number(v) for v in vals] for k, vals in data["metrics"].items()},
            per_prompt={
                k: [[_from_json_number(v) for v in row] for row in rows]
                for k, rows in data.get("per_prompt", {}).items()
            },
            alerts=_alerts_from_json(data, int(data["step"])),
            settings=dict(data.get("settings", {})),
            scalars={k: _from_json_number(v) for k, v in data.get("scalars", {}).items()},
            stderr={k: [_from_json_number(v) for v in vals] for k, vals in data.get("stderr", {}).items()},
        )


def _alerts_from_json(data: dict[str, Any], step: int) -> list[Alert]:
    """The typed alerts of a JSON record (``alert_details``), or its messages typed by their first word (records
    written before alerts were typed)."""
    details, messages = data.get("alert_details"), list(data.get("alerts", []))
    if isinstance(details, list) and len(details) == len(messages):
        return [Alert.from_dict(detail) for detail in details]
    return [Alert.from_message(message, step) for message in messages]
