"""Alerts: conditions worth a human's attention, each reported once per run (TensorBoard text + Python log)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from layerwatch import registry

logger = logging.getLogger(__name__)

BIMODALITY_THRESHOLD = 5 / 9  # Sarle's coefficient of a uniform distribution; above it suggests two modes


@dataclass
class AlertTracker:
    """Turns per-layer metrics into alerts, remembering which conditions already fired.

    Args:
        collapse_threshold: a value of a collapse-watched metric (the registry's ``collapse_watched``: the normalized
            prompt and dataset entropies) below this is a collapse.
        collapse_drop: a relative drop larger than this fraction since the previous probe is a collapse.
    """

    collapse_threshold: float = 0.1
    collapse_drop: float = 0.5
    fired: set[tuple[str, str, int]] = field(default_factory=set)
    previous: dict[str, list[float]] = field(default_factory=dict)

    def _once(self, key: tuple[str, str, int], message: str, out: list[str]) -> None:
        if key not in self.fired:
            self.fired.add(key)
            out.append(message)
            logger.warning("layerwatch alert: %s", message)

    def check(
        self, step: int, layers: list[int], metrics: dict[str, list[float]], *, check_drops: bool = True
    ) -> list[str]:
        """The new alerts at this probe; ``check_drops=False`` skips the relative-drop rule (threshold still applies)."""
        alerts: list[str] = []
        for layer, count in zip(layers, metrics.get("nonfinite", [])):
            if count and count > 0:
                self._once(
                    ("nonfinite", "activations", layer),
                    f"nonfinite: layer {layer} has {int(count)} non-finite activation values at step {step}",
                    alerts,
                )
        for name in registry.collapse_metrics():
            values = metrics.get(name)
            if values is None:
                continue
            before = self.previous.get(name)
            for j, (layer, value) in enumerate(zip(layers, values)):
                if not math.isfinite(value):
                    continue
                if value < self.collapse_threshold:
                    self._once(
                        ("collapse", name, layer),
                        f"collapse: {name} at layer {layer} is {value:.3g} at step {step}, "
                        f"below the threshold {self.collapse_threshold:g}",
                        alerts,
                    )
                elif check_drops and before is not None and j < len(before) and math.isfinite(before[j]) and before[j] > 0:
                    drop = (before[j] - value) / before[j]
                    if drop > self.collapse_drop:
                        self._once(
                            ("collapse", name, layer),
                            f"collapse: {name} at layer {layer} fell by {100 * drop:.0f}% since the previous probe "
                            f"({before[j]:.3g} -> {value:.3g}) at step {step}",
                            alerts,
                        )
            self.previous[name] = list(values)
        for layer, value in zip(layers, metrics.get("prompt_entropy_bimodality", [])):
            if math.isfinite(value) and value > BIMODALITY_THRESHOLD:
                self._once(
                    ("bimodal", "prompt_entropy", layer),
                    f"bimodal: per-prompt prompt entropy at layer {layer} looks bimodal "
                    f"(coefficient {value:.3f} > 5/9) at step {step}",
                    alerts,
                )
        return alerts
