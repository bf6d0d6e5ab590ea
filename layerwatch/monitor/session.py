"""Policy the framework integrations share; each adapter in ``integrations/`` only translates its events.

What lives here, once:

* **The probe**: :func:`resolve_probe` turns a :class:`~layerwatch.Probe`, the path of a saved probe, a list of
  texts or an indexable dataset into a probe (:func:`as_probe` for the first two alone); a probe the adapter
  builds itself gets the longest prompt whose augmented views still fit the model (:func:`fitting_max_length`).
  When a run resumes, the run's saved probe is reused, and a different probe is reported.
* **The run directory**: :func:`default_logdir` is ``<base>/layerwatch``, a stable folder, so a resumed run
  continues the same series; :func:`resume_point` says which records of an older or interrupted run are dropped.
* **The final probe**: :func:`final_probe_due` says whether the last step still needs a probe.
* **Checks before training**: :func:`check_watch_options` refuses, when the adapter is built, options
  :class:`~layerwatch.LayerWatch` does not have or values it would refuse (with its own checks);
  :func:`check_model` refuses a model whose blocks cannot be found or that cannot take the probe.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerwatch.probe.augment import max_view_length
from layerwatch.monitor.model_facts import model_facts

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from layerwatch.probe import Probe

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "as_probe",
    "check_model",
    "check_probe_source",
    "check_watch_options",
    "default_logdir",
    "final_probe_due",
    "fitting_max_length",
    "resolve_probe",
    "resume_point",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 128
"""Longest prompt, in tokens, of a probe an integration builds (lowered to fit the model's positions)."""

_PROBE_FORMS = "a layerwatch.Probe, a saved probe path, a list of texts or an indexable dataset"


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


# --------------------------------------------------------------------------------------------------
# Checks when an adapter is built, and before training
# --------------------------------------------------------------------------------------------------


def check_watch_options(options: Mapping[str, Any], *, owner: str, reserved: Sequence[str] = ()) -> None:
    """Refuse options :class:`~layerwatch.LayerWatch` does not take or values it would refuse, before training.

    Names are checked against ``LayerWatch``'s signature (``reserved`` ones are set by the adapter itself);
    values go through the monitor's own checks (:func:`layerwatch.monitor.check_options`), so nothing is checked
    twice in different words. Errors name ``owner`` and the argument.
    """
    from layerwatch.monitor import LayerWatch, check_options

    taken = [name for name in options if name in reserved]
    if taken:
        raise TypeError(f"{owner} sets {', '.join(taken)} itself; pass them as its own arguments, not as options")
    parameters = inspect.signature(LayerWatch).parameters
    unknown = sorted(name for name in options if name not in parameters or name == "probe")
    if unknown:
        allowed = [name for name in parameters if name != "probe" and name not in reserved]
        raise TypeError(f"{owner} got unknown option(s) {', '.join(unknown)}; LayerWatch options are {allowed}")
    values = {name: options[name] for name in inspect.signature(check_options).parameters if name in options}
    try:
        check_options(**values)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{owner}: {error}") from None


def check_model(model: nn.Module, probe: Probe, layers: str | Sequence[nn.Module] | None = None) -> None:
    """Refuse, before training, a model whose blocks cannot be found or whose vocabulary or positions the probe's
    clean prompts exceed (the monitor checks the augmented views too, at its first probe)."""
    clean_longest = int(probe.attention_mask.sum(dim=1).max())
    facts = model_facts(model)
    facts.blocks(layers)
    facts.check_probe(probe, longest=clean_longest)


# --------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------


def is_text_list(value: object) -> bool:
    """A non-empty list (or tuple) of strings."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)


def check_probe_source(source: object, *, owner: str) -> None:
    """Refuse, when the adapter is built, a ``probe=`` that is none of the forms :func:`resolve_probe` takes."""
    from layerwatch.probe import Probe

    if source is None or isinstance(source, (str, os.PathLike, Probe)) or is_text_list(source):
        return
    if isinstance(source, (list, tuple)):
        raise TypeError(f"{owner}: probe= as a list must be a non-empty list of texts (str)")
    if isinstance(source, Mapping):
        raise TypeError(
            f"{owner}: probe= got a mapping; pass a dataset of rows (datasets.Dataset, a list of dicts), "
            "a list of texts, a layerwatch.Probe or a saved probe path"
        )
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(f"{owner}: probe= must be {_PROBE_FORMS}; got {type(source).__name__}")


def as_probe(source: object) -> Probe:
    """A :class:`~layerwatch.Probe` as it is, or loaded from the path of a saved one; ``TypeError`` otherwise."""
    from layerwatch.probe import Probe

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
    **build: Any,
) -> Probe:
    """The run's probe, from the first that applies:

    1. ``source``: a :class:`~layerwatch.Probe`, the path of a saved probe, a list of texts (tokenized with
       ``tokenizer``) or an indexable dataset;
    2. when ``resuming`` and ``saved`` (the run's ``probe.safetensors``) exists: that file, so the resumed series
       is measured on the same prompts;
    3. the dataset ``find_dataset()`` returns, with its description.

    ``build`` holds ``num_prompts``, ``max_length`` (``None``: :data:`DEFAULT_MAX_LENGTH`), ``seed`` and
    ``text_column`` for a probe built here; ``max_length`` is lowered to fit ``model`` (:func:`fitting_max_length`).
    ``views`` is the number of augmented views the run's metrics feed (0 for ``"light"``). When resuming with a
    ``source`` whose series (:meth:`~layerwatch.Probe.series_hash` with ``views``) differs from ``saved``'s, a
    warning says the series are not comparable (where ``warn_changed``: e.g. on the main process only).

    Raises:
        ValueError: texts without a tokenizer, a dataset that cannot give a probe, no source at all.
    """
    from layerwatch.probe import Probe

    saved_path = Path(saved) if saved is not None else None
    if isinstance(source, (str, os.PathLike, Probe)):
        probe = as_probe(source)
    elif is_text_list(source):
        if tokenizer is None:
            raise ValueError(
                f"{owner}(probe=<list of texts>) needs a tokenizer (for the Trainer: processing_class=tokenizer), "
                "or pass probe=layerwatch.Probe.from_texts(texts, tokenizer)"
            )
        probe = Probe.from_texts(
            list(source), tokenizer, max_length=fitting_max_length(model, build.get("max_length"), views > 0),
            num_prompts=build.get("num_prompts", 64), seed=build.get("seed", 0),
        )
    elif source is not None:
        probe = _dataset_probe(source, "the dataset passed as probe=", owner, model, tokenizer, views, build)
    elif resuming and saved_path is not None and saved_path.is_file():
        logger.info("layerwatch: resuming with the probe saved in %s", saved_path)
        return Probe.load(saved_path)
    else:
        dataset, origin = find_dataset() if find_dataset is not None else (None, "")
        if dataset is None:
            raise ValueError(f"{owner} found no dataset to build its probe from: pass probe= ({_PROBE_FORMS})")
        probe = _dataset_probe(dataset, origin, owner, model, tokenizer, views, build)
    if resuming and warn_changed and saved_path is not None:
        _warn_if_changed(probe, saved_path, views)
    return probe


def _warn_if_changed(probe: Probe, saved: Path, views: int) -> None:
    from layerwatch.probe import Probe

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
    dataset: Any, origin: str, owner: str, model: nn.Module | None, tokenizer: Any, views: int,
    build: Mapping[str, Any],
) -> Probe:
    """A probe from an indexable dataset; without a tokenizer the model gives the vocabulary (and pad id)."""
    from layerwatch.monitor.capture import model_config
    from layerwatch.probe import Probe

    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ValueError(
            f"{owner} cannot build a probe from {origin} ({type(dataset).__name__}): it is not indexable "
            f"(an IterableDataset?). Pass probe= ({_PROBE_FORMS})"
        )
    extra: dict[str, Any] = {}
    if tokenizer is None:  # a tokenized dataset and no tokenizer: the model knows the vocabulary
        vocab_size = model_facts(model).vocab_size if model is not None else None
        if vocab_size is None:
            raise ValueError(
                f"{owner} cannot build a probe from {origin} without a tokenizer and without the model's vocabulary "
                "size; pass a tokenizer (for the Trainer: processing_class=tokenizer), or pass probe="
            )
        extra["vocab_size"] = vocab_size
        pad = getattr(model_config(model), "pad_token_id", None)
        if isinstance(pad, int) and 0 <= pad < vocab_size:
            extra["pad_token_id"] = pad
    logger.info("layerwatch: building the probe from %s", origin)
    return Probe.from_dataset(
        dataset, tokenizer=tokenizer, text_column=build.get("text_column", "text"),
        num_prompts=build.get("num_prompts", 64),
        max_length=fitting_max_length(model, build.get("max_length"), views > 0),
        seed=build.get("seed", 0), **extra,
    )


def fitting_max_length(model: nn.Module | None, max_length: int | None, uses_views: bool = True) -> int:
    """``max_length`` (``None``: :data:`DEFAULT_MAX_LENGTH`), lowered so the prompt (and, when the metrics use them,
    its longest augmented view) fits the model's positions; a warning says so when an explicit ``max_length`` is
    lowered."""
    wanted = max_length if max_length is not None else DEFAULT_MAX_LENGTH
    positions = model_facts(model).max_positions if model is not None else None
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
