"""Alerts: conditions worth a human's attention, each reported once per run (TensorBoard text + Python log).

Collapse means representations that lost their diversity and stay that way, not strong compression (the papers
show mid-depth compression while the loss falls). The rule: a collapse-watched metric of the registry (dataset
entropy, effective rank) at or below its floor at ``collapse_probes`` consecutive probes (default 2) at one layer.
A watched metric that was defined at a layer and becomes undefined while the activations stay finite (every
prompt's representation identical) is at its floor. A layer with an attention sink (``massive_activation`` at
least :data:`SINK_LAYER_RATIO` times the median token norm) is not judged: centering around the
sink token makes a healthy layer's entropies look collapsed. There is no relative-drop rule.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from layerwatch.metrics import names, registry
from layerwatch.rundir.record import Alert

logger = logging.getLogger(__name__)

BIMODALITY_THRESHOLD = 5 / 9  # Sarle's coefficient of a uniform distribution; above it suggests two modes
SINK_METRIC = names.MASSIVE_ACTIVATION
# A layer whose mean massive_activation reaches this carries a massive attention sink, which makes its centred
# entropies look collapsed; it is not judged. Higher than the per-token sink rule (SINK_NORM_RATIO = 3): a weak
# sink of 3-9x the median does not fake a collapse, and a real collapse onto one line can spread norms that far.
SINK_LAYER_RATIO = 10.0


def sink_layers(layers: list[int], metrics: dict[str, list[float]]) -> set[int]:
    """Layers carrying an attention sink: ``massive_activation`` (the largest token norm over the median one, per
    prompt, averaged over prompts) at least :data:`SINK_LAYER_RATIO`. Empty when the record has
    no such metric (a custom metric list without it: then no layer is excused)."""
    return {
        layer for layer, ratio in zip(layers, metrics.get(SINK_METRIC, []))
        if math.isfinite(ratio) and ratio >= SINK_LAYER_RATIO
    }


@dataclass
class AlertTracker:
    """Turns per-layer metrics into :class:`~layerwatch.rundir.record.Alert` values, remembering which conditions
    already fired.

    Args:
        collapse_threshold: the floor of collapse-watched metrics without their own ``collapse_floor`` in the
            registry (the normalized dataset entropy, in [0, 1]).
        collapse_probes: consecutive probes a layer must stay at the floor before the alert.
    """

    collapse_threshold: float = 0.05
    collapse_probes: int = 2
    fired: set[tuple[str, str, int]] = field(default_factory=set)
    at_floor: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # steps of the current streak
    defined: set[tuple[str, int]] = field(default_factory=set)  # (metric, layer) seen with a finite value

    @classmethod
    def from_rules(cls, rules: Any) -> "AlertTracker":
        """A tracker of :class:`layerwatch.monitor.options.AlertRules` (checked there)."""
        return cls(collapse_threshold=rules.collapse_threshold, collapse_probes=rules.collapse_probes)

    def _once(self, alert: Alert, out: list[Alert]) -> None:
        key = (alert.kind, alert.metric or "", -1 if alert.layer is None else alert.layer)
        if key not in self.fired:
            self.fired.add(key)
            out.append(alert)
            logger.warning("layerwatch alert: %s", alert.message)

    def check(self, step: int, layers: list[int], metrics: dict[str, list[float]]) -> list[Alert]:
        """The new alerts at this probe."""
        alerts: list[Alert] = []
        broken = set()
        for layer, count in zip(layers, metrics.get(names.NONFINITE, [])):
            if count and count > 0:
                broken.add(layer)
                message = f"nonfinite: layer {layer} has {int(count)} non-finite activation values at step {step}"
                self._once(Alert(names.NONFINITE, names.NONFINITE, layer, step, message), alerts)  # kind = the metric
        sinks = sink_layers(layers, metrics)
        for name in registry.collapse_metrics():
            floor = registry.spec(name).collapse_floor
            floor = self.collapse_threshold if floor is None else floor
            for layer, value in zip(layers, metrics.get(name, [])):
                self._collapse(step, name, layer, value, floor, layer in broken or layer in sinks, alerts)
        for layer, value in zip(layers, metrics.get(names.PROMPT_ENTROPY_BIMODALITY, [])):
            if math.isfinite(value) and value > BIMODALITY_THRESHOLD:
                message = (
                    f"bimodal: per-prompt prompt entropy at layer {layer} looks bimodal "
                    f"(coefficient {value:.3f} > 5/9) at step {step}"
                )
                self._once(Alert("bimodal", names.PROMPT_ENTROPY_BIMODALITY, layer, step, message), alerts)
        return alerts

    def _collapse(
        self, step: int, name: str, layer: int, value: float, floor: float, excused: bool, out: list[Alert]
    ) -> None:
        key = (name, layer)
        finite = math.isfinite(value)
        degenerate = not finite and key in self.defined  # defined before, undefined now: no diversity left
        if finite:
            self.defined.add(key)
        if excused or not (degenerate or (finite and value <= floor)):
            self.at_floor.pop(key, None)
            return
        streak = self.at_floor.setdefault(key, [])
        streak.append(step)
        if len(streak) < self.collapse_probes:
            return
        now = f"{value:.3g}" if finite else "undefined (every prompt's representation is the same)"
        message = (
            f"collapse: {name} at layer {layer} has stayed at or below its floor {floor:g} for {len(streak)} "
            f"consecutive probes (steps {streak[0]} to {streak[-1]}); now {now}"
        )
        self._once(Alert("collapse", name, layer, step, message), out)
