"""The probe: a fixed batch of prompts and its augmented views (``core.Probe``), built from texts, datasets or
tensors (``sources``), with token-level augmentations (``augment``). Nothing here knows about models or runs."""

from layerwatch.probe.core import PROBE_FORMAT, Probe, take_rows

__all__ = ["PROBE_FORMAT", "Probe", "take_rows"]
