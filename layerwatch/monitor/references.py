"""Reference embeddings of ``cka_to_previous`` and ``cka_to_first``, kept in the run directory (SPEC §7).

After each probe the monitor keeps the mean-pooled clean embeddings ``[layers, prompts, D]`` of the run's first
probe and of the latest one, in memory and (main process) as ``reference_first.safetensors`` and
``reference_previous.safetensors`` in the run directory, each tagged with the probe's content hash and its step.
Each layer's ``cka_to_first`` reference is taken at that layer's first *finite* probe: a probe whose embeddings at
a layer hold NaN or inf (a transient blow-up) is not kept as that layer's reference (its ``cka_to_first`` is NaN
there, with a ``"cka"`` alert), and the next finite probe becomes it, so one bad probe never poisons the rest of
the run (nor, through the saved file, a resumed one).
A resumed run and ``layerwatch trajectory`` (which writes through the same monitor) read them back and continue the
comparison. A reference is not used, and the metric is NaN with the reason logged and raised as an alert, when it
was taken with a different probe (other prompts: comparing them would mean nothing), with a different number of
layers, or after the step a run resumed from.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from layerwatch.metrics import names
from layerwatch.rundir.files import write_atomically
from layerwatch.rundir.record import Alert

logger = logging.getLogger(__name__)

REFERENCE_FILES = {"first": "reference_first.safetensors", "previous": "reference_previous.safetensors"}


class References:
    """The first and previous probes' pooled embeddings of one run.

    Args:
        probe_hash: content hash of the run's probe; references of another probe are not used.
        logdir: the run directory to read and write (None: memory only).
        resume_step: references taken after this step (of an abandoned future) are not used.
        write: write the files (the main process only).
    """

    def __init__(self, probe_hash: str, logdir: str | os.PathLike | None, *, resume_step: int | None, write: bool):
        self.probe_hash = probe_hash
        self.logdir = Path(logdir) if logdir is not None else None
        self.write = write and self.logdir is not None
        self.pooled: dict[str, torch.Tensor | None] = {"first": None, "previous": None}
        self.steps: dict[str, int] = {}
        self.reasons: list[tuple[str, int | None, str]] = []  # (metric, layer, why): reported once
        self._deferred: set[int] = set()  # layers whose first probe was not finite (said once)
        self.layer_steps: list[int | None] = []  # the step of each layer's first reference (None: none yet)
        self._save_failed = False  # warned once that the files could not be written
        if self.logdir is not None:
            for which in REFERENCE_FILES:
                self._load(which, resume_step)

    def _load(self, which: str, resume_step: int | None) -> None:
        from safetensors import safe_open

        path = self.logdir / REFERENCE_FILES[which]
        if not path.is_file():
            return
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                pooled = file.get_tensor("pooled")
            step = int(metadata["step"])
        except Exception as error:  # noqa: BLE001 - a damaged file only loses the comparison
            self._reason(which, f"cka_to_{which}: {path} is unreadable ({type(error).__name__}: {error}); NaN")
            return
        if metadata.get("probe_hash") != self.probe_hash:
            self._reason(
                which,
                f"cka_to_{which} is NaN: the run's reference embeddings ({path.name}, step {step}) were taken with a "
                "different probe, and other prompts cannot be compared; it restarts from this probe",
            )
            return
        if resume_step is not None and step > resume_step:
            self._reason(which, f"cka_to_{which}: the reference of step {step} is after resume step {resume_step}")
            return
        if which == "first":
            pooled = self._first_layers(pooled, metadata, step, resume_step)
        self.pooled[which], self.steps[which] = pooled, step

    def _first_layers(
        self, pooled: torch.Tensor, metadata: dict, step: int, resume_step: int | None
    ) -> torch.Tensor:
        """A saved first reference without the layers taken after ``resume_step`` (they are taken again)."""
        try:
            layer_steps = [None if s is None else int(s) for s in json.loads(metadata.get("layer_steps", "null"))]
        except (ValueError, TypeError):
            layer_steps = None
        if layer_steps is None or len(layer_steps) != pooled.shape[0]:  # a file of an earlier version
            layer_steps = [step if bool(ok) else None for ok in _finite_layers(pooled).tolist()]
        pooled = pooled.clone()
        for layer, taken in enumerate(layer_steps):
            if taken is None or (resume_step is not None and taken > resume_step):
                pooled[layer] = float("nan")
                layer_steps[layer] = None
        self.layer_steps = layer_steps
        return pooled

    def _reason(self, which: str, message: str, layer: int | None = None) -> None:
        metric = names.CKA_TO_FIRST if which == "first" else names.CKA_TO_PREVIOUS
        self.reasons.append((metric, layer, message))

    def for_probe(self, pooled: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The references to compare ``pooled [layers, prompts, D]`` with (None where there is none or the layer
        count differs). A layer without a first reference yet (the run's first probe, or only non-finite probes
        so far) is its own first reference (``cka_to_first`` = 1 where finite)."""
        out: dict[str, torch.Tensor | None] = {}
        for which, reference in self.pooled.items():
            if reference is not None and reference.shape[:2] != pooled.shape[:2]:
                self._reason(
                    which,
                    f"cka_to_{which} is NaN: the reference has {reference.shape[0]} layers x {reference.shape[1]} "
                    f"prompts, this probe {pooled.shape[0]} x {pooled.shape[1]}",
                )
                reference = None
                if which == "first":
                    out[which] = None
                    continue
            out[which] = None if reference is None else reference.to(pooled.device)
        first = self.pooled["first"]
        if first is None:
            out["first"] = pooled
        elif out["first"] is not None and first.shape == pooled.shape:
            missing = ~_finite_layers(first).to(pooled.device)
            out["first"] = torch.where(missing[:, None, None], pooled, out["first"].to(pooled.dtype))
        return out

    def take_reasons(self, step: int | None = None) -> list[Alert]:
        """The reasons not yet reported (each reported once), as ``"cka"`` alerts of ``step``."""
        reasons, self.reasons = self.reasons, []
        for _, _, message in reasons:
            logger.warning("layerwatch: %s", message)
        return [Alert("cka", metric, layer, -1 if step is None else int(step), message) for metric, layer, message in reasons]

    def update(self, pooled: torch.Tensor, step: int) -> None:
        """Keep ``pooled`` as the previous probe, and as the first reference of each layer that has none yet and is
        finite in it; write the files."""
        kept = pooled.detach().to("cpu", torch.float32).contiguous().clone()
        self.pooled["previous"], self.steps["previous"] = kept, int(step)
        if self.write:
            self._save("previous")
        first = self.pooled["first"]
        if first is not None and first.shape != kept.shape:
            return  # a reference of another shape stays (reported by for_probe); nothing to fill in
        if first is None:
            first = torch.full_like(kept, float("nan"))
        missing, finite = ~_finite_layers(first), _finite_layers(kept)
        for layer in (missing & ~finite).nonzero().flatten().tolist():
            if layer not in self._deferred:
                self._deferred.add(layer)
                self._reason("first", (
                    f"cka_to_first at layer {layer}: the probe at step {step} has non-finite embeddings there, so it "
                    "is not the layer's reference; the reference is the layer's first finite probe"
                ), layer)
        take = missing & finite
        if self.pooled["first"] is None or bool(take.any()):
            first = first.clone()
            first[take] = kept[take]
            if len(self.layer_steps) != first.shape[0]:
                self.layer_steps = [None] * first.shape[0]
            for layer in take.nonzero().flatten().tolist():
                self.layer_steps[layer] = int(step)
            self.pooled["first"] = first
            self.steps.setdefault("first", int(step))
            if self.write:
                self._save("first")

    def _save(self, which: str) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save

        path = self.logdir / REFERENCE_FILES[which]
        metadata = {"probe_hash": self.probe_hash, "step": str(self.steps[which])}
        if which == "first":
            metadata["layer_steps"] = json.dumps(self.layer_steps)
        try:
            write_atomically(path, save({"pooled": self.pooled[which]}, metadata=metadata))
        except (OSError, SafetensorError) as error:  # a full or read-only disk is not a failed probe: the comparison goes on in memory
            if not self._save_failed:
                logger.warning("layerwatch: could not write %s (%s); CKA goes on in memory, but a resumed run "
                               "will not continue it", path, error)
            self._save_failed = True


def _finite_layers(pooled: torch.Tensor) -> torch.Tensor:
    """``[layers]`` bool: the layer's pooled rows are all finite."""
    return torch.isfinite(pooled).flatten(1).all(dim=1)
