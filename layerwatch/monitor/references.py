"""Reference embeddings of ``cka_to_previous`` and ``cka_to_first``, kept in the run directory (SPEC §7).

After each probe the monitor keeps the mean-pooled clean embeddings ``[layers, prompts, D]`` of the run's first
probe and of the latest one, in memory and (main process) as ``reference_first.safetensors`` and
``reference_previous.safetensors`` in the run directory, each tagged with the probe's content hash and its step.
A resumed run and ``layerwatch trajectory`` (which writes through the same monitor) read them back and continue the
comparison. A reference is not used, and the metric is NaN with the reason logged and raised as an alert, when it
was taken with a different probe (other prompts: comparing them would mean nothing), with a different number of
layers, or after the step a run resumed from.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from layerwatch.rundir.files import write_atomically

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
        self.reasons: list[str] = []  # why stored references were not used (reported once)
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
            self.reasons.append(f"cka_to_{which}: {path} is unreadable ({type(error).__name__}: {error}); NaN")
            return
        if metadata.get("probe_hash") != self.probe_hash:
            self.reasons.append(
                f"cka_to_{which} is NaN: the run's reference embeddings ({path.name}, step {step}) were taken with a "
                "different probe, and other prompts cannot be compared; it restarts from this probe"
            )
            return
        if resume_step is not None and step > resume_step:
            self.reasons.append(f"cka_to_{which}: the reference of step {step} is after resume step {resume_step}")
            return
        self.pooled[which], self.steps[which] = pooled, step

    def for_probe(self, pooled: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The references to compare ``pooled [layers, prompts, D]`` with (None where there is none or the layer
        count differs); a first probe is its own first reference (``cka_to_first`` = 1)."""
        out: dict[str, torch.Tensor | None] = {}
        for which, reference in self.pooled.items():
            if reference is not None and reference.shape[:2] != pooled.shape[:2]:
                self.reasons.append(
                    f"cka_to_{which} is NaN: the reference has {reference.shape[0]} layers x {reference.shape[1]} "
                    f"prompts, this probe {pooled.shape[0]} x {pooled.shape[1]}"
                )
                reference = None
            out[which] = None if reference is None else reference.to(pooled.device)
        if self.pooled["first"] is None:
            out["first"] = pooled
        return out

    def take_reasons(self) -> list[str]:
        """The reasons not yet reported (each reported once)."""
        reasons, self.reasons = self.reasons, []
        for reason in reasons:
            logger.warning("layerwatch: %s", reason)
        return reasons

    def update(self, pooled: torch.Tensor, step: int) -> None:
        """Keep ``pooled`` as the previous probe (and the first, if there is none yet) and write the files."""
        kept = pooled.detach().to("cpu", torch.float32).contiguous().clone()
        targets = ["previous"] + (["first"] if self.pooled["first"] is None else [])
        for which in targets:
            self.pooled[which], self.steps[which] = kept, int(step)
            if self.write:
                self._save(which)

    def _save(self, which: str) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save

        path = self.logdir / REFERENCE_FILES[which]
        metadata = {"probe_hash": self.probe_hash, "step": str(self.steps[which])}
        try:
            write_atomically(path, save({"pooled": self.pooled[which]}, metadata=metadata))
        except (OSError, SafetensorError) as error:  # a full or read-only disk is not a failed probe: the comparison goes on in memory
            if not self._save_failed:
                logger.warning("layerwatch: could not write %s (%s); CKA goes on in memory, but a resumed run "
                               "will not continue it", path, error)
            self._save_failed = True
