"""Policy the framework integrations share; each adapter in ``integrations/`` only translates its events.

What lives here, once:

* **The options**: :func:`adapter_options` checks, when an adapter is built, everything it was given
  (:func:`check_watch_options` for the :class:`~layerwatch.LayerWatch` options, the probe source and the
  probe-building options) and returns them as :class:`AdapterOptions`.
* **The probe**: :func:`resolve_probe` turns a :class:`~layerwatch.Probe`, the path of a saved probe, a list of
  texts or an indexable dataset into a probe (:func:`as_probe` for the first two alone); a probe the adapter
  builds itself gets the longest prompt whose augmented views still fit the model (:func:`fitting_max_length`).
  When a run resumes, the run's saved probe is reused, and a different probe is reported.
* **The run directory**: :func:`default_logdir` is ``<base>/layerwatch``, a stable folder, so a resumed run
  continues the same series; :func:`resume_point` says which records of an older or interrupted run are dropped.
* **The start**: :func:`start_watch` (an adapter that builds its probe at train start) and :func:`open_watch` (one
  given a probe) create the monitor with the right writers (:func:`writers_for`: only the main process writes;
  tracker writers, such as :class:`ScalarsWriter` for a framework's loggers, go beside layerwatch's own files)
  and log one start-up line (:func:`announce`) saying where the run is written and how to view it. The model's
  facts are resolved once (:func:`model_facts`) and handed along.
* **During and after training**: :func:`final_probe_due` says whether the last step still needs a probe;
  :func:`collapse_raised` reads a record's alerts; :func:`stop_requested` agrees on it across ranks.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerwatch.checks import check_int
from layerwatch.metrics.registry import resolve_metrics
from layerwatch.monitor.capture import model_config
from layerwatch.monitor.model_facts import ModelFacts, model_facts
from layerwatch.monitor.options import LayerWatchOptions, check_keywords
from layerwatch.monitor.watch import LayerWatch, all_ranks_max
from layerwatch.probe import Probe
from layerwatch.probe.augment import max_view_length
from layerwatch.rundir.files import PROBE_FILENAME
from layerwatch.rundir.record import SCALAR_PREFIX
from layerwatch.rundir.trackers import record_scalars
from layerwatch.rundir.writers import Writer

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from layerwatch.rundir.record import ProbeRecord

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "AdapterOptions",
    "ScalarsWriter",
    "adapter_options",
    "announce",
    "as_probe",
    "check_model",
    "check_probe_source",
    "check_watch_options",
    "collapse_raised",
    "default_logdir",
    "final_probe_due",
    "fitting_max_length",
    "open_watch",
    "resolve_probe",
    "resume_point",
    "start_watch",
    "stop_requested",
    "writers_for",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 128
"""Longest prompt, in tokens, of a probe an integration builds (lowered to fit the model's positions)."""

_PROBE_FORMS = "a layerwatch.Probe, a saved probe path, a list of texts or an indexable dataset"
_COLLAPSE = "collapse"


# --------------------------------------------------------------------------------------------------
# The run directory, resuming and the final probe
# --------------------------------------------------------------------------------------------------


def default_logdir(base: str | os.PathLike[str] | None) -> str:
    """``<base>/layerwatch`` (``runs/layerwatch`` without a base): a stable folder, so resumed runs append to it."""
    return os.path.join(os.fspath(base) if base else "runs", "layerwatch")


def resume_point(restored_step: int | None, first_step: int | None = None) -> int:
    """The ``resume_step`` of the monitor: records after it, left by an older or interrupted run, are dropped.

    Args:
        restored_step: the step a checkpoint restored (``None``: nothing was restored).
        first_step: the first step the loop reports, when it may start past 1 without a restore (an explicit
            step counter continuing a series); ``None``: unknown.

    A restored run keeps the records up to its step. Otherwise a run whose first step is 0 or 1 (or unknown) is
    a fresh run and replaces what an older run left in the folder (``-1``), and one starting at ``s > 1``
    continues a series up to ``s - 1``.
    """
    if restored_step is not None:
        return int(restored_step)
    if first_step is None or first_step <= 1:
        return -1
    return int(first_step) - 1


def final_probe_due(last_probed: int | None, step: int, start_step: int = 0) -> bool:
    """Whether the last step still needs a probe: training went past ``start_step`` and ``step`` was not probed."""
    return step > start_step and (last_probed is None or last_probed < step)


def collapse_raised(record: ProbeRecord | None) -> bool:
    """Whether ``record`` raised a collapse alert (by the alert's ``kind``; plain-text alerts by their prefix)."""
    if record is None:
        return False
    kinds = (getattr(alert, "kind", None) or str(alert).split(":", 1)[0].split(" ", 1)[0] for alert in record.alerts)
    return _COLLAPSE in kinds


def stop_requested(record: ProbeRecord | None, step: int) -> bool:
    """``stop_on_collapse``: whether any rank's probe raised a collapse alert (every rank calls this after the same
    probes: an OR over ranks, since a lone stop would leave the others waiting); logs a warning when so."""
    if all_ranks_max(float(collapse_raised(record))) <= 0:
        return False
    logger.warning("layerwatch: representation collapse at step %d; stopping training (stop_on_collapse)", step)
    return True


# --------------------------------------------------------------------------------------------------
# Checks when an adapter is built, and before training
# --------------------------------------------------------------------------------------------------


@dataclass
class AdapterOptions:
    """What an adapter that builds its own probe was given, checked once (:func:`adapter_options`)."""

    owner: str
    every: int
    probe: Any = None
    logdir: str | None = None
    watch: dict[str, Any] = field(default_factory=dict)  # the LayerWatch options
    num_prompts: int = 64
    max_length: int | None = None
    text_column: str = "text"
    label_column: str | None = None
    stop_on_collapse: bool = False

    views: int = 2  # the augmented views the metrics feed (0 for "light")
    seed: int = 0
    layers: Any = None  # the blocks override (probing group)


def adapter_options(
    owner: str, every: int, *, probe: Any = None, logdir: str | os.PathLike | None = None,
    watch: Mapping[str, Any] | None = None, reserved: Sequence[str] = ("probe", "logdir", "resume_step"),
    num_prompts: int = 64, max_length: int | None = None, text_column: str = "text",
    label_column: str | None = None, stop_on_collapse: bool = False,
) -> AdapterOptions:
    """Check, when the adapter is built, every option it was given (errors name ``owner`` and the argument)."""
    watch = check_watch_options(dict(watch or {}, every=every), owner=owner, reserved=reserved)
    checked = LayerWatchOptions.from_keywords(**watch)
    measurement = checked.measurement
    every = watch.pop("every")
    check_int(num_prompts, "num_prompts", minimum=1)
    if max_length is not None:
        check_int(max_length, "max_length", minimum=1)
    for name, value in (("text_column", text_column), ("label_column", label_column)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{owner}: {name} must be a column name (str), got {type(value).__name__}")
    check_probe_source(probe, owner=owner)
    return AdapterOptions(
        owner, every, probe, None if logdir is None else os.fspath(logdir), watch, num_prompts, max_length,
        text_column, label_column, bool(stop_on_collapse), resolve_metrics(measurement.metrics)[2],
        measurement.seed, checked.probing.layers,
    )


def check_watch_options(
    options: Mapping[str, Any], *, owner: str, reserved: Sequence[str] = ()
) -> dict[str, Any]:
    """Refuse options :class:`~layerwatch.LayerWatch` does not take or values it would refuse, before training,
    with the monitor's own checks (:func:`layerwatch.monitor.options.check_keywords`: each options group checks its
    values where it is made), so nothing is checked twice in different words. ``reserved`` names are set by the
    adapter itself. Errors name ``owner`` and the argument. Returns the options, deprecated names replaced."""
    return check_keywords(options, owner=owner, reserved=reserved)


def check_model(
    model: nn.Module, probe: Probe, layers: str | Sequence[nn.Module] | None = None, facts: ModelFacts | None = None
) -> None:
    """Refuse, before training, a model whose blocks cannot be found or whose vocabulary or positions the probe's
    clean prompts exceed (the monitor checks the augmented views too, at its first probe)."""
    clean_longest = int(probe.attention_mask.sum(dim=1).max())
    facts = facts if facts is not None else model_facts(model)
    facts.blocks(layers)
    facts.check_probe(probe, longest=clean_longest)


# --------------------------------------------------------------------------------------------------
# Starting the monitor
# --------------------------------------------------------------------------------------------------


def writers_for(user: Sequence[Writer] | None, is_main: bool, trackers: Sequence[Writer] = ()) -> list[Writer] | None:
    """The monitor's extra writers: none off the main process (the other ranks probe too but write nothing: guard the
    output, never the collective); on it, the user's ``writers=`` and then the trackers' writers."""
    return [*(user or []), *trackers] if is_main else None


class ScalarsWriter(Writer):
    """Sends each record's scalars (:func:`layerwatch.rundir.trackers.record_scalars`: the TensorBoard names) and the
    failed-probe count (``layerwatch/errors``) through ``send(values, step)``: the writer for a framework's own
    loggers (Accelerate's trackers, Lightning's loggers). A failing ``send`` warns once (the monitor's writer group)."""

    def __init__(self, send: Callable[[dict[str, float], int], None]) -> None:
        self.send = send

    def write(self, record: ProbeRecord) -> None:
        self.send(record_scalars(record), int(record.step))

    def write_errors(self, step: int, total_errors: int) -> None:
        self.send({f"{SCALAR_PREFIX}/errors": float(total_errors)}, int(step))

    def close(self) -> None:
        """Nothing to close: the loggers belong to the framework."""


def start_watch(
    options: AdapterOptions, *, model: nn.Module | None, base_dir: str | os.PathLike | None, start_step: int,
    is_main: bool, tokenizer: Any = None, find_dataset: Callable[[], tuple[Any, str]] | None = None,
    trackers: Sequence[Writer] = (), logdir: str | os.PathLike | None = None, unit: str = "steps",
) -> LayerWatch:
    """The monitor of an adapter that builds its probe at train start (the Trainer and Lightning callbacks).

    Resolves the model's facts once, gets the probe (:func:`resolve_probe`; resuming when ``start_step > 0``),
    checks the model can take it, and opens the monitor in ``logdir`` (default: ``options.logdir``, else
    :func:`default_logdir` of ``base_dir``), writing on the main process only, with ``trackers`` beside its own
    files. A run from step 0 is fresh (a finished run in the folder moves aside, never deleted); a resumed one keeps
    the records up to ``start_step``.
    """
    folder = Path(logdir or options.logdir or default_logdir(base_dir))
    facts = model_facts(model) if model is not None else None
    notes: list[str] = []
    probe = resolve_probe(
        options.probe, owner=options.owner, model=model, tokenizer=tokenizer, saved=folder / PROBE_FILENAME,
        resuming=start_step > 0, warn_changed=is_main, views=options.views, find_dataset=find_dataset,
        num_prompts=options.num_prompts, max_length=options.max_length, seed=options.seed,
        text_column=options.text_column, label_column=options.label_column, facts=facts, notes=notes,
    )
    if model is not None:
        check_model(model, probe, options.layers, facts)
    watch_options = dict(options.watch)
    watch_options["writers"] = writers_for(watch_options.get("writers"), is_main, trackers)
    return open_watch(
        probe, logdir=folder if is_main else None, every=options.every, resume_step=resume_point(start_step or None),
        announce_on=is_main, unit=unit, notes=notes, resumed_after=start_step, **watch_options,
    )


def open_watch(
    probe: Probe, *, logdir: str | os.PathLike | None, every: int, resume_step: int, announce_on: bool,
    unit: str = "steps", notes: Sequence[str] = (), resumed_after: int = 0, also: str = "", **watch_options: Any,
) -> LayerWatch:
    """Create the :class:`~layerwatch.LayerWatch` and, where ``announce_on`` (the main process), log the start-up
    line: what is probed, where it is written (``also``: other destinations) and how to view it."""
    watch = LayerWatch(probe, logdir=None if logdir is None else os.fspath(logdir), every=every,
                       resume_step=resume_step, **watch_options)
    if announce_on:
        where = os.fspath(logdir) if logdir is not None else "no run directory"
        why = f" ({'; '.join(notes)})" if notes else ""
        resumed = f", resuming after step {resumed_after}" if resumed_after else ""
        view = f"; view it with: tensorboard --logdir {where}" if logdir is not None else ""
        announce(f"layerwatch: probing {watch.probe.num_prompts} prompts{why} every {every} {unit}{resumed}; "
                 f"writing to {where}{also}{view}")
    return watch


def announce(message: str) -> None:
    """Log ``message`` at INFO, and show it even where logging was never configured (a plain ``python train.py``).

    Where no handler is set up anywhere on the way to the root logger, Python would drop an INFO line (its last
    resort handler shows warnings only), so the line goes to ``stderr`` then, as that handler would print it;
    setting the ``layerwatch`` logger above INFO silences it.
    """
    if logger.hasHandlers():
        logger.info(message)
    elif not _quieted():
        print(message, file=sys.stderr, flush=True)


def _quieted() -> bool:
    """Whether a ``layerwatch`` logger on the way up was explicitly set above INFO."""
    current: logging.Logger | None = logger
    while current is not None and current.name.startswith("layerwatch"):
        if current.level > logging.INFO:
            return True
        current = current.parent if isinstance(current.parent, logging.Logger) else None
    return False


# --------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------


def is_text_list(value: object) -> bool:
    """A non-empty list (or tuple) of strings."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)


def check_probe_source(source: object, *, owner: str) -> None:
    """Refuse, when the adapter is built, a ``probe=`` that is none of the forms :func:`resolve_probe` takes."""
    if source is None or isinstance(source, (str, os.PathLike, Probe)) or is_text_list(source):
        return
    if isinstance(source, (list, tuple)) and not (source and all(isinstance(row, Mapping) for row in source)):
        raise TypeError(f"{owner}: probe= as a list must be a non-empty list of texts (str) or of rows (dict)")
    if isinstance(source, Mapping):
        raise TypeError(
            f"{owner}: probe= got a mapping; pass a dataset of rows (datasets.Dataset, a list of dicts), "
            "a list of texts, a layerwatch.Probe or a saved probe path"
        )
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(f"{owner}: probe= must be {_PROBE_FORMS}; got {type(source).__name__}")


def as_probe(source: object) -> Probe:
    """A :class:`~layerwatch.Probe` as it is, or loaded from the path of a saved one; ``TypeError`` otherwise."""
    if isinstance(source, (str, os.PathLike)):
        return Probe.load(source)
    if not isinstance(source, Probe):
        raise TypeError(
            f"probe must be a layerwatch.Probe or the path of a saved one, got {type(source).__name__}; build it with "
            "Probe.from_texts(texts, tokenizer), Probe.from_tensors(...) or Probe.from_dataset(...)"
        )
    return source


def resolve_probe(
    source: object,
    *,
    owner: str,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    saved: str | os.PathLike[str] | None = None,
    resuming: bool = False,
    warn_changed: bool = True,
    views: int = 2,
    find_dataset: Callable[[], tuple[Any, str]] | None = None,
    facts: ModelFacts | None = None,
    notes: list[str] | None = None,
    **build: Any,
) -> Probe:
    """The run's probe, from the first that applies:

    1. ``source``: a :class:`~layerwatch.Probe`, the path of a saved probe, a list of texts (tokenized with
       ``tokenizer``) or an indexable dataset;
    2. when ``resuming`` and ``saved`` (the run's ``probe.safetensors``) exists: that file, so the resumed series
       is measured on the same prompts;
    3. the dataset ``find_dataset()`` returns, with its description.

    ``build`` holds ``num_prompts``, ``max_length`` (``None``: :data:`DEFAULT_MAX_LENGTH`), ``seed``,
    ``text_column`` and ``label_column`` for a probe built here; ``max_length`` is lowered to fit ``model``
    (:func:`fitting_max_length`; ``facts``: the model's facts, resolved once by the caller). ``views`` is the
    number of augmented views the run's metrics feed (0 for ``"light"``). When resuming with a ``source`` whose
    series (:meth:`~layerwatch.Probe.series_hash` with ``views``) differs from ``saved``'s, a warning says the
    series are not comparable (where ``warn_changed``: e.g. on the main process only). ``notes`` receives a line
    for the start-up message where the probe is not what was asked (a dataset with fewer rows than
    ``num_prompts``).

    Raises:
        ValueError: texts without a tokenizer, a dataset that cannot give a probe, no source at all.
    """
    saved_path = Path(saved) if saved is not None else None
    if facts is None and model is not None:
        facts = model_facts(model)
    notes = notes if notes is not None else []
    if isinstance(source, (str, os.PathLike, Probe)):
        probe = as_probe(source)
    elif is_text_list(source):
        if tokenizer is None:
            raise ValueError(
                f"{owner}(probe=<list of texts>) needs a tokenizer (for the Trainer: processing_class=tokenizer), "
                "or pass probe=layerwatch.Probe.from_texts(texts, tokenizer)"
            )
        probe = Probe.from_texts(
            list(source), tokenizer, max_length=fitting_max_length(facts, build.get("max_length"), views > 0),
            num_prompts=build.get("num_prompts", 64), seed=build.get("seed", 0),
        )
    elif source is not None:
        origin = "the dataset passed as probe="
        probe = _dataset_probe(source, origin, owner, model, facts, tokenizer, views, build, notes)
    elif resuming and saved_path is not None and saved_path.is_file():
        logger.info("layerwatch: resuming with the probe saved in %s", saved_path)
        return Probe.load(saved_path)
    else:
        dataset, origin = find_dataset() if find_dataset is not None else (None, "")
        if dataset is None:
            raise ValueError(f"{owner} found no dataset to build its probe from: pass probe= ({_PROBE_FORMS})")
        probe = _dataset_probe(dataset, origin, owner, model, facts, tokenizer, views, build, notes)
    if resuming and warn_changed and saved_path is not None:
        _warn_if_changed(probe, saved_path, views)
    return probe


def _warn_if_changed(probe: Probe, saved: Path, views: int) -> None:
    try:
        changed = saved.is_file() and Probe.load(saved).series_hash(views) != probe.series_hash(views)
    except Exception:  # noqa: BLE001 - only a comparison
        changed = False
    if changed:
        logger.warning(
            "layerwatch: resuming with a probe that differs from the one in %s; the metrics before and after the "
            "resume are not comparable", saved,
        )


def _dataset_probe(
    dataset: Any, origin: str, owner: str, model: nn.Module | None, facts: ModelFacts | None, tokenizer: Any,
    views: int, build: Mapping[str, Any], notes: list[str],
) -> Probe:
    """A probe from an indexable dataset; without a tokenizer the model gives the vocabulary (and pad id)."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ValueError(
            f"{owner} cannot build a probe from {origin} ({type(dataset).__name__}): it is not indexable "
            f"(an IterableDataset?). Pass probe= ({_PROBE_FORMS})"
        )
    extra: dict[str, Any] = {}
    if tokenizer is None:  # a tokenized dataset and no tokenizer: the model knows the vocabulary
        vocab_size = facts.vocab_size if facts is not None else None
        if vocab_size is None:
            raise ValueError(
                f"{owner} cannot build a probe from {origin} without a tokenizer and without the model's vocabulary "
                "size; pass a tokenizer (for the Trainer: processing_class=tokenizer), or pass probe="
            )
        extra["vocab_size"] = vocab_size
        pad = getattr(model_config(model), "pad_token_id", None) if model is not None else None
        if isinstance(pad, int) and 0 <= pad < vocab_size:
            extra["pad_token_id"] = pad
    wanted = build.get("num_prompts", 64)
    logger.info("layerwatch: building the probe from %s", origin)
    probe = Probe.from_dataset(
        dataset, tokenizer=tokenizer, text_column=build.get("text_column", "text"), num_prompts=wanted,
        max_length=fitting_max_length(facts, build.get("max_length"), views > 0),
        seed=build.get("seed", 0), label_column=build.get("label_column"), **extra,
    )
    if wanted is not None and probe.num_prompts < wanted:
        usable = "" if probe.num_prompts == len(dataset) else f", {probe.num_prompts} usable"
        notes.append(f"{origin} has {len(dataset)} rows{usable}; num_prompts={wanted}")
    return probe


def fitting_max_length(
    model: nn.Module | ModelFacts | None, max_length: int | None, uses_views: bool = True
) -> int:
    """``max_length`` (``None``: :data:`DEFAULT_MAX_LENGTH`), lowered so the prompt (and, when the metrics use them,
    its longest augmented view) fits the model's positions (``model``: the model or its :class:`ModelFacts`); a
    warning says so when an explicit ``max_length`` is lowered."""
    wanted = max_length if max_length is not None else DEFAULT_MAX_LENGTH
    facts = model if isinstance(model, ModelFacts) or model is None else model_facts(model)
    positions = facts.max_positions if facts is not None else None
    if positions is None:
        return wanted
    fitting = positions  # the longest prompt whose augmented views (which insert tokens) still fit
    while uses_views and fitting > 1 and max_view_length(fitting) > positions:
        fitting -= 1
    if fitting >= wanted:
        return wanted
    if max_length is not None:
        logger.warning(
            "layerwatch: max_length=%d lowered to %d: the model takes %d positions and augmented views are longer "
            "than their prompts", wanted, fitting, positions,
        )
    return max(1, fitting)
