"""The monitor: ``LayerWatch`` (``watch``) runs the probe through a model and turns the hooks' captures into a
record. Beside it: its options (``options``), model facts and hooks (``model_facts``, ``capture``), per-layer
reduction and the ranks' collectives (``collect``, ``distributed``), the schedule, the alerts, the CKA references,
the cost estimate, and the start-up policy the integrations share (``session``)."""

from layerwatch.monitor.watch import METRIC_PRESETS, LayerWatch, ProbeOutcome, ProbeRecord, all_ranks_max, check_options

__all__ = ["METRIC_PRESETS", "LayerWatch", "ProbeOutcome", "ProbeRecord", "all_ranks_max", "check_options"]
