"""The checkpoint replay engine behind ``layerwatch trajectory`` (its command line: :mod:`layerwatch.cli.trajectory`).

Every checkpoint is loaded with transformers (from safetensors), probed with one fixed probe by the same monitor that
runs during training (:class:`layerwatch.LayerWatch`: same capture, metrics and writers), and written as one run whose
step is the checkpoint's step. The run directory has the usual layout (``probe.safetensors``, ``layerwatch.jsonl``,
TensorBoard event files), so ``tensorboard --logdir``, :func:`layerwatch.read_run` and ``layerwatch report`` work on it.

Inputs are either a Trainer ``output_dir`` (its ``checkpoint-<step>`` folders, sorted by step) or checkpoint folders
named explicitly (the step comes from the folder name, else from ``trainer_state.json``, else from ``steps=``).

Running it again on the same output folder skips the checkpoints already in the run, so an interrupted analysis
resumes and a finished one picks up new checkpoints. Splitting a replay between processes or job-array shards is
:mod:`layerwatch.analysis.shards`. From Python::

    from layerwatch.analysis.trajectory import run_trajectory
    run = run_trajectory(["runs/my-model"], probe="probe.safetensors", out="runs/traj")
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from layerwatch.analysis.summary import summary_table
from layerwatch.metrics.registry import resolve_metrics
from layerwatch.monitor import LayerWatch
from layerwatch.probe import Probe
from layerwatch.rundir.files import JSONL_NAME, PROBE_FILENAME
from layerwatch.rundir.runs import Run, read_run

__all__ = [
    "Checkpoint", "TrajectoryError", "check_weights", "completed_steps", "discover_checkpoints", "free_memory",
    "load_checkpoint", "load_tokenizer", "pickle_weight_files", "read_texts", "run_trajectory", "safe_weight_files",
    "step_of", "summary_table", "texts_probe",
]

logger = logging.getLogger(__name__)

DEFAULT_OUT_NAME = "layerwatch-trajectory"

# Weight files transformers loads. Safetensors never execute code when read; the pickle formats can.
SAFE_WEIGHT_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
PICKLE_WEIGHT_PATTERNS = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model-*-of-*.bin",
    "model.pt",
    "model.pth",
    "model.bin",
)
# Files of a Trainer checkpoint that are pickles but not model weights (never loaded here).
_TRAINER_STATE_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")

_CHECKPOINT_CHILD = re.compile(r"^checkpoint-(\d+)$")
_STEP_FROM_NAME = re.compile(r"^(?:checkpoint|ckpt|step|global_step|iter|iteration)[-_]?(\d+)$", re.IGNORECASE)

DTYPES = ("float32", "bfloat16", "float16")


class TrajectoryError(Exception):
    """A problem the user can fix (bad input, refused weights, mismatched probe); the CLI prints it and exits 2."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder and the training step it was saved at."""

    path: Path
    step: int

    @property
    def name(self) -> str:
        """The folder name, for messages."""
        return self.path.name


# --------------------------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------------------------


def _matches(folder: Path, patterns: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        found.extend(p for p in sorted(folder.glob(pattern)) if p.is_file())
    return found


def index_points_at_pickle(index: Path) -> bool:
    """Whether a shard index (``*.index.json``) may make transformers unpickle something.

    True when its ``weight_map`` names a shard that is not a ``.safetensors`` file inside the index's folder, or
    when the index cannot be read (an unreadable index is not trusted). transformers loads the shards an index
    names whatever the index itself is called, so ``model.safetensors.index.json`` can point at ``.bin`` pickles.
    """
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        shards = {str(name) for name in weight_map.values()}
    except (OSError, ValueError, AttributeError, TypeError):
        return True
    folder = index.parent.resolve()
    return not shards or any(
        not name.endswith(".safetensors") or (folder / name).resolve().parent != folder for name in shards
    )


def safe_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors model weight files in ``folder`` (empty when there are none); a shard index counts only
    when every shard it names is a safetensors file next to it."""
    return [
        p for p in _matches(Path(folder), SAFE_WEIGHT_PATTERNS)
        if not p.name.endswith(".index.json") or not index_points_at_pickle(p)
    ]


def pickle_weight_files(folder: str | Path) -> list[Path]:
    """The pickle-based model weight files (``pytorch_model.bin`` and friends) in ``folder``, and any shard index
    (even one named ``model.safetensors.index.json``) that names a pickle shard.

    A Trainer checkpoint's ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and ``training_args.bin`` are
    pickles too, but they are not model weights and are never loaded, so they are not listed.
    """
    folder = Path(folder)
    pickled = [p for p in _matches(folder, PICKLE_WEIGHT_PATTERNS) if p.name not in _TRAINER_STATE_FILES]
    pickled += [p for p in _matches(folder, ("*.safetensors.index.json",)) if index_points_at_pickle(p)]
    return pickled


def _looks_like_checkpoint(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        or bool(safe_weight_files(folder))
        or bool(pickle_weight_files(folder))
    )


def _step_from_trainer_state(folder: Path) -> int | None:
    state = folder / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable (%s)", state, error)
        return None
    return int(step) if isinstance(step, (int, float)) else None


def step_of(folder: str | Path) -> int | None:
    """The step of a checkpoint folder: from its name (``checkpoint-500``, ``step500``, ...), else from
    ``trainer_state.json`` ``global_step``; ``None`` when neither says."""
    folder = Path(folder)
    match = _STEP_FROM_NAME.match(folder.name)
    if match:
        return int(match.group(1))
    return _step_from_trainer_state(folder)


def discover_checkpoints(paths: Sequence[str | Path], steps: Sequence[int] | None = None) -> list[Checkpoint]:
    """Resolve the command-line inputs into checkpoints sorted by step.

    Args:
        paths: Trainer output folders (their ``checkpoint-<step>`` sub-folders are used) and/or checkpoint folders.
        steps: one step per path, overriding what the folder names and ``trainer_state.json`` say (only for
            explicit checkpoint folders).

    Raises:
        TrajectoryError: a path does not exist, holds no checkpoint, a step cannot be determined, or two checkpoints
            have the same step.
    """
    if steps is not None and len(steps) != len(paths):
        raise TrajectoryError(
            f"--steps gives {len(steps)} step(s) for {len(paths)} checkpoint folder(s); give exactly one per folder"
        )
    found: list[Checkpoint] = []
    for index, raw in enumerate(paths):
        path = Path(raw)
        if not path.exists():
            raise TrajectoryError(f"{path} does not exist")
        if not path.is_dir():
            raise TrajectoryError(f"{path} is not a folder (give a Trainer output_dir or a checkpoint folder)")
        children = []
        for child in path.iterdir():
            match = _CHECKPOINT_CHILD.match(child.name)
            if match and child.is_dir():
                children.append(Checkpoint(child, int(match.group(1))))
        if children and not _looks_like_checkpoint(path):
            if steps is not None:
                raise TrajectoryError(
                    f"--steps applies to checkpoint folders, but {path} is an output folder holding "
                    f"{len(children)} checkpoint-<step> folders whose steps come from their names"
                )
            found.extend(children)
            continue
        if children:
            logger.info("%s holds both model files and checkpoint-* folders; using the checkpoint-* folders", path)
            found.extend(children)
            continue
        if not _looks_like_checkpoint(path):
            raise TrajectoryError(
                f"no checkpoints found in {path}: expected checkpoint-<step> folders (a Trainer output_dir) or a "
                f"checkpoint folder with config.json and model.safetensors"
            )
        step = steps[index] if steps is not None else step_of(path)
        if step is None:
            raise TrajectoryError(
                f"cannot tell the step of {path}: name the folder checkpoint-<step>, keep its trainer_state.json, "
                f"or pass --steps with one step per folder"
            )
        found.append(Checkpoint(path, int(step)))
    if not found:
        raise TrajectoryError("no checkpoints found in " + ", ".join(str(p) for p in paths))
    by_step: dict[int, Checkpoint] = {}
    for checkpoint in found:
        other = by_step.get(checkpoint.step)
        if other is not None and other.path.resolve() != checkpoint.path.resolve():
            raise TrajectoryError(f"{other.path} and {checkpoint.path} both have step {checkpoint.step}")
        by_step[checkpoint.step] = checkpoint
    return [by_step[step] for step in sorted(by_step)]


def check_weights(checkpoint: Checkpoint, *, allow_pickle: bool = False) -> None:
    """Check that a checkpoint has weights this tool will load.

    Raises:
        TrajectoryError: no model weights at all, or only pickle-based weights and ``allow_pickle`` is False.
    """
    pickled = pickle_weight_files(checkpoint.path)
    indexes = [p.name for p in pickled if p.name.endswith(".safetensors.index.json")]
    if indexes and not allow_pickle:  # transformers would follow the index to the pickles, safetensors or not
        raise TrajectoryError(
            f"{checkpoint.path}: {', '.join(indexes)} names shards that are not safetensors files in that folder "
            f"(or cannot be read). transformers would load them, and loading a pickle can run arbitrary code, so "
            f"it is refused. Convert the checkpoint to safetensors (model.save_pretrained(folder)), or pass "
            f"--allow-pickle if you trust where it came from."
        )
    if safe_weight_files(checkpoint.path):
        return
    if pickled:
        if allow_pickle:
            return
        raise TrajectoryError(
            f"{checkpoint.path} has only pickle-based weights ({', '.join(p.name for p in pickled)}). Loading a "
            f"pickle can run arbitrary code, so it is refused. Convert the checkpoint to safetensors "
            f"(model.save_pretrained(folder)), or pass --allow-pickle if you trust where it came from."
        )
    adapters = sorted(p.name for p in checkpoint.path.glob("adapter_model.*"))
    hint = (
        f" (it holds only adapter weights: {', '.join(adapters)}; merge the adapter into the base model first)"
        if adapters
        else ""
    )
    raise TrajectoryError(
        f"{checkpoint.path} holds no model weights (looked for model.safetensors or a sharded "
        f"model.safetensors.index.json){hint}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise TrajectoryError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def _is_causal_lm(config: Any) -> bool:
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        return True  # unknown: try the causal LM class first, fall back to the bare model
    return any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures)


def load_checkpoint(
    checkpoint: Checkpoint | str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    allow_pickle: bool = False,
    device_map: str | None = None,
) -> torch.nn.Module:
    """Load one checkpoint folder with transformers, in eval mode, on ``device``.

    Decoders load with ``AutoModelForCausalLM``; encoders (a config whose architectures are not causal LMs, or one
    the causal-LM auto class does not know) with ``AutoModel``. Safetensors weights are required unless
    ``allow_pickle`` is True. Remote code is never executed. ``device_map="auto"`` hands the placement to
    accelerate's big-model loading (``from_pretrained(device_map="auto")``: the model is spread over the visible
    devices, and ``device`` is not used).

    Raises:
        TrajectoryError: no weights, refused pickle weights, or transformers cannot load the folder.
    """
    if not isinstance(checkpoint, Checkpoint):
        path = Path(checkpoint)
        checkpoint = Checkpoint(path, step_of(path) or 0)
    check_weights(checkpoint, allow_pickle=allow_pickle)
    import transformers

    torch_dtype = _torch_dtype(dtype)
    # Refused pickles never reach here; with allow_pickle, transformers picks whichever weights it finds.
    kwargs: dict[str, Any] = {"use_safetensors": None if allow_pickle else True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        config = transformers.AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds; the message matters
        raise TrajectoryError(f"transformers cannot read the config of {checkpoint.path}: {error}") from error
    auto_classes = (
        [transformers.AutoModelForCausalLM, transformers.AutoModel]
        if _is_causal_lm(config)
        else [transformers.AutoModel]
    )
    model = _load_first(auto_classes, checkpoint.path, config, torch_dtype, kwargs)
    model.eval()
    if device_map is not None:
        return model
    try:
        model.to(device)
    except Exception as error:  # noqa: BLE001 - bad device names, CUDA not available, out of memory
        raise TrajectoryError(f"cannot move the model to --device {device!r}: {error}") from error
    return model


def _load_first(auto_classes: list[Any], path: Path, config: Any, torch_dtype: Any, kwargs: dict[str, Any]) -> Any:
    """The model from the first auto class that knows ``config``; TrajectoryError if none can load it."""
    for auto_class in auto_classes:
        try:
            return _from_pretrained(auto_class, path, config, torch_dtype, kwargs)
        except ValueError as error:
            # "Unrecognized configuration class ... for this kind of AutoModel": try the next (bare) class.
            if "Unrecognized configuration class" in str(error) and auto_class is not auto_classes[-1]:
                continue
            raise TrajectoryError(
                f"transformers cannot load the model in {path}: {type(error).__name__}: {error}"
            ) from error
        except ImportError as error:  # device_map needs accelerate
            raise TrajectoryError(f"transformers cannot load the model in {path}: {error}") from error
        except Exception as error:  # noqa: BLE001 - transformers raises many kinds; the message matters
            raise TrajectoryError(
                f"transformers cannot load the model in {path}: {type(error).__name__}: {error}"
            ) from error
    raise TrajectoryError(f"transformers cannot load the model in {path}")  # pragma: no cover - the loop returns


def _from_pretrained(auto_class: Any, path: Path, config: Any, torch_dtype: Any, kwargs: dict[str, Any]) -> Any:
    import transformers
    from packaging.version import Version

    # transformers >= 4.56 takes `dtype`; older versions `torch_dtype`.
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return auto_class.from_pretrained(
        path, config=config, trust_remote_code=False, **{dtype_key: torch_dtype}, **kwargs
    )


def free_memory() -> None:
    """Collect garbage and empty the CUDA cache, after the last reference to a model was dropped."""
    gc.collect()
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


# --------------------------------------------------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------------------------------------------------


def read_texts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one probe prompt each."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise TrajectoryError(f"cannot read --texts {path}: {error}") from error
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise TrajectoryError(f"--texts {path} has no non-empty lines")
    return texts


def texts_probe(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    labels: Sequence[int | str] | None = None,
    source: str = "--texts",
    **options: Any,
) -> Probe:
    """:meth:`layerwatch.Probe.from_texts` (``options``: ``max_length``, ``num_prompts``, ``seed``...), with its
    ValueError (too few usable texts, labels that cannot train a probe) as a TrajectoryError naming ``source``."""
    try:
        return Probe.from_texts(list(texts), tokenizer, labels=None if labels is None else list(labels), **options)
    except ValueError as error:
        raise TrajectoryError(f"cannot build a probe from {source}: {error}") from error


def load_tokenizer(candidates: Sequence[Path]) -> Any:
    """The first tokenizer that loads from one of ``candidates`` (local folders only)."""
    import transformers

    errors = []
    for folder in candidates:
        if not folder.is_dir():
            continue
        has_files = any(
            (folder / name).is_file()
            for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
        )
        if not has_files:
            continue
        try:
            return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except Exception as error:  # noqa: BLE001
            errors.append(f"{folder}: {error}")
    detail = ("; " + "; ".join(errors)) if errors else ""
    raise TrajectoryError(
        "no tokenizer found in " + ", ".join(str(c) for c in candidates) + f"{detail}. Pass --tokenizer PATH."
    )


def _views_used(metrics: str | Sequence[str]) -> int:
    """The augmented views the metrics feed (what, with the prompts, defines a series)."""
    try:
        return resolve_metrics(metrics)[2]
    except ValueError as error:
        raise TrajectoryError(f"--metrics: {error}") from error


def _load_probe_file(path: Path) -> Probe:
    try:
        return Probe.load(path)
    except (OSError, ValueError) as error:
        raise TrajectoryError(f"cannot load the probe {path}: {error}") from error


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------


def completed_steps(out: str | Path) -> set[int]:
    """Steps already recorded in the run at ``out`` (empty when there is no run yet)."""
    out = Path(out)
    if not (out / JSONL_NAME).is_file():
        return set()
    try:
        return {int(s) for s in read_run(out).steps}
    except (FileNotFoundError, ValueError) as error:  # an empty or unreadable run: nothing to skip
        logger.info("%s: no readable records (%s)", out, error)
        return set()


def run_trajectory(
    checkpoints: Sequence[str | Path] | Sequence[Checkpoint],
    *,
    probe: Probe | str | Path,
    out: str | Path,
    metrics: str | Sequence[str] = "standard",
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 16,
    alpha: float = 1.0,
    allow_pickle: bool = False,
    tensorboard: bool = True,
    steps: Sequence[int] | None = None,
    on_checkpoint: Callable[[Checkpoint, dict[str, float]], None] | None = None,
    progress: bool = False,
    device_map: str | None = None,
) -> Run:
    """Probe every checkpoint not yet in the run at ``out`` and return the whole run.

    Args:
        checkpoints: Trainer output folders and/or checkpoint folders (or already resolved :class:`Checkpoint` s).
        probe: a :class:`layerwatch.Probe` or the path of a saved one. It is saved as ``out/probe.safetensors``.
        out: the run directory (created; an existing run there is continued, its steps skipped).
        metrics: a preset (``"light"``, ``"standard"``, ``"paper"``) or a list of metric names.
        device: where each model is loaded and probed (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the loaded weights.
        batch_size: probe prompts per forward pass.
        alpha: Renyi order of the entropies.
        allow_pickle: load ``pytorch_model.bin`` weights (unpickling can run arbitrary code).
        tensorboard: also write TensorBoard event files (JSONL is always written).
        steps: explicit steps for explicit checkpoint folders (see :func:`discover_checkpoints`).
        on_checkpoint: called after each probed checkpoint with timings (``load_s``, ``probe_s``).
        progress: show a progress bar on stderr.
        device_map: ``"auto"``: load each model with accelerate's big-model placement (``device`` is not used).

    Raises:
        TrajectoryError: see the command's documentation; records written before the error are kept.
    """
    if checkpoints and isinstance(checkpoints[0], Checkpoint):
        resolved = sorted(checkpoints, key=lambda c: c.step)  # type: ignore[arg-type, union-attr]
    else:
        resolved = discover_checkpoints(checkpoints, steps=steps)  # type: ignore[arg-type]
    out = Path(out)
    probe_obj = probe if not isinstance(probe, (str, Path)) else _load_probe_file(Path(probe))

    done = completed_steps(out)
    pending = [c for c in resolved if c.step not in done]
    for checkpoint in resolved:
        if checkpoint.step in done:
            logger.debug("skipping %s (step %d is already in %s)", checkpoint.path, checkpoint.step, out)
    # Check every pending folder before creating or loading anything, so a refused or empty folder fails fast.
    for checkpoint in pending:
        check_weights(checkpoint, allow_pickle=allow_pickle)

    out.mkdir(parents=True, exist_ok=True)
    if done:
        _check_same_probe(out, probe_obj, _views_used(metrics))
    load = {"device": device, "dtype": dtype, "allow_pickle": allow_pickle, "device_map": device_map}
    if pending:
        try:
            watch = LayerWatch(
                probe_obj,
                logdir=str(out),
                metrics=metrics if isinstance(metrics, str) else list(metrics),
                alpha=alpha,
                batch_size=batch_size,
                tensorboard=tensorboard,
                jsonl=True,
                strict=True,  # a failed probe raises: it is reported with its checkpoint
            )
        except (ValueError, TypeError) as error:  # metrics this probe cannot take, a directory already written...
            raise TrajectoryError(f"cannot start the monitor on {out}: {error}") from error
        bar = _progress_bar(len(pending), enabled=progress)
        try:
            for checkpoint in pending:
                timings = _probe_checkpoint(watch, checkpoint, load=load)
                if on_checkpoint is not None:
                    on_checkpoint(checkpoint, timings)
                bar.update(1)
        finally:
            bar.close()
            watch.close()
    return read_run(out)


def _check_same_probe(out: Path, probe: Probe, views: int) -> None:
    """Refuse to add to a run measured with another probe: the prompts and the views these metrics use differ, not
    merely the file (its values would not be comparable)."""
    saved_probe = out / PROBE_FILENAME
    if saved_probe.is_file() and _load_probe_file(saved_probe).series_hash(views) != probe.series_hash(views):
        raise TrajectoryError(
            f"{out} already holds a run probed with a different probe ({saved_probe}): other prompts, or other "
            f"augmented views; its values would not be comparable. Use another --out, or reuse that probe "
            f"(--probe {saved_probe})."
        )


def _probe_checkpoint(watch: LayerWatch, checkpoint: Checkpoint, *, load: dict[str, Any]) -> dict[str, float]:
    """Load one checkpoint (``load``: :func:`load_checkpoint`'s options), probe it as its step (the model is
    released afterwards); returns the timings."""
    started = time.perf_counter()
    model = load_checkpoint(checkpoint, **load)
    loaded = time.perf_counter()
    try:  # the monitor refuses, before any forward, a probe this model cannot take
        watch.run(model, checkpoint.step)
    except Exception as error:  # noqa: BLE001 - report which checkpoint failed and why
        raise TrajectoryError(
            f"probing {checkpoint.path} (step {checkpoint.step}) failed: {type(error).__name__}: {error}"
        ) from error
    finally:
        del model  # release each model before the next one loads
        free_memory()
    return {"load_s": loaded - started, "probe_s": time.perf_counter() - loaded}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, *, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return _NoBar()
    return tqdm(total=total, unit="checkpoint", file=sys.stderr, dynamic_ncols=True, leave=False)
