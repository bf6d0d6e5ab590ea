"""When to probe: every N optimizer steps, denser early in training, stretched when probes cost too much.

:class:`ProbeSchedule` decides (its state is checkpointed); :class:`TrainingPace` measures the training time per step
that the stretching compares probe time with.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from layerwatch.monitor.options import Schedule


@dataclass
class ProbeSchedule:
    """Decides at which optimizer steps the monitor probes.

    Args:
        every: probe every ``every`` optimizer steps.
        log_spaced_start: also probe at steps 1, 2, 4, 8, ... below ``every``; representations change fastest early
            in training, so a linear cadence would miss most of the early dynamics.
        at_start: also probe at step 0 (before the first optimizer step).
        max_overhead: if set, the largest fraction of training wall time probes may take. After each probe the
            minimum gap between probes is stretched so that ``probe time <= max_overhead * training time``.

    The decision depends only on the step and on ``min_gap``; in multi-process runs the monitor makes every rank
    agree on ``min_gap`` (a maximum over ranks) so all ranks probe at the same steps.
    """

    every: int = 100
    log_spaced_start: bool = True
    at_start: bool = False
    max_overhead: float | None = None
    min_gap: int = 1
    last_step: int | None = None

    def __post_init__(self) -> None:  # checked in one place: the options' Schedule
        Schedule(self.every, self.log_spaced_start, self.at_start, self.max_overhead)

    @classmethod
    def from_options(cls, options: Schedule) -> "ProbeSchedule":
        """The schedule of :class:`layerwatch.monitor.options.Schedule` options."""
        return cls(options.every, options.log_spaced_start, options.probe_at_start, options.max_overhead)

    def is_scheduled(self, step: int) -> bool:
        """Whether ``step`` is on the nominal cadence, ignoring what was already probed."""
        if step == 0:
            return self.at_start
        if step % self.every == 0:
            return True
        return self.log_spaced_start and step < self.every and (step & (step - 1)) == 0

    def is_due(self, step: int) -> bool:
        """Whether to probe at ``step``: scheduled, not probed yet, and far enough from the last probe."""
        if step < 0:
            return False
        if self.last_step is not None:
            if step <= self.last_step:
                return False
            if step - self.last_step < self.min_gap:
                return False
        return self.is_scheduled(step)

    def mark_probed(self, step: int) -> None:
        self.last_step = step if self.last_step is None else max(self.last_step, step)

    def required_gap(self, probe_seconds: float, train_seconds_per_step: float) -> int:
        """The smallest gap (in steps) that keeps probing within ``max_overhead`` of training time."""
        if self.max_overhead is None or train_seconds_per_step <= 0:
            return 1
        return max(1, math.ceil(probe_seconds / (self.max_overhead * train_seconds_per_step)))

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("min_gap", "last_step"):
            if key in state:
                setattr(self, key, state[key])


class TrainingPace:
    """Seconds per optimizer step of training (an exponential average), probe time left out; feeds ``max_overhead``."""

    def __init__(self) -> None:
        self.seconds_per_step: float | None = None
        self._last: tuple[int, float] | None = None

    def observe(self, step: int) -> int | None:
        """Note a call at ``step``; returns the previous call's step (None at the first call). A repeat of the same
        step (gradient accumulation calling once per micro-batch) keeps the time of that step's first call."""
        now = time.perf_counter()
        previous = self._last
        if previous is not None and step == previous[0]:
            return step
        if previous is not None and step > previous[0]:
            per_step = (now - previous[1]) / (step - previous[0])
            average = self.seconds_per_step
            self.seconds_per_step = per_step if average is None else 0.7 * average + 0.3 * per_step
        self._last = (step, now)
        return None if previous is None else previous[0]

    def restart(self, step: int) -> None:
        """Start timing again after a probe at ``step`` (probe time is not training time)."""
        self._last = (step, time.perf_counter())
