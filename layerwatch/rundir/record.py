"""The result of one probe, as a plain dataclass, and its JSON form (one line of ``layerwatch.jsonl``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

SCALAR_PREFIX = "layerwatch"


def scalar_tag(metric: str, layer: int) -> str:
    """The flat key of one metric at one layer, e.g. ``layerwatch/prompt_entropy/layer_03``.

    Trackers without runs-within-runs (``accelerator.log``) get these keys; layerwatch's own TensorBoard writer uses
    :func:`layer_run` and :func:`metric_tag` instead (earlier versions wrote these tags in the run itself).
    """
    return f"{SCALAR_PREFIX}/{metric}/{layer_run(layer)}"


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
        alerts: the alerts this probe raised (each reported once per run).
        settings: the metric settings (preset, alpha, views, ...), so runs can be compared honestly.
        scalars: metric name -> one value for the whole probe (e.g. ``best_layer``), logged as ``layerwatch/<name>``.
    """

    step: int
    time: float
    wall_time_s: float
    layers: list[int]
    metrics: dict[str, list[float]]
    per_prompt: dict[str, list[list[float]]] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)

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
            "alerts": list(self.alerts),
            "settings": self.settings,
        }
        if self.scalars:
            payload["scalars"] = {k: _to_json_number(v) for k, v in self.scalars.items()}
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
            alerts=list(data.get("alerts", [])),
            settings=dict(data.get("settings", {})),
            scalars={k: _from_json_number(v) for k, v in data.get("scalars", {}).items()},
        )
