"""Public checkpoint suites: ``layerwatch trajectory ORG/NAME --revisions step1000,step2000,...`` (SPEC §7); the
engine (its command line is :mod:`layerwatch.cli.trajectory`).

Suites such as Pythia, OLMo and LLM360 publish one model per training step as revisions (branches) of one Hub
repository. Each revision is resolved to its snapshot folder through ``huggingface_hub`` (the normal cache,
``HF_HUB_CACHE``/``HF_HOME``, and ``HF_HUB_OFFLINE=1`` for an air-gapped cluster with a pre-filled cache) and
loaded from there exactly as ``from_pretrained(ORG/NAME, revision=...)`` would, with safetensors only. Only
config, tokenizer and safetensors files are downloaded; pickle weights never are. ``ORG/NAME`` may also be a
local folder in the Hugging Face cache layout (``models--ORG--NAME`` with ``refs/`` and ``snapshots/``).

A revision's step comes from its name (``step1000``, ``step1000-tokens4B``, ``ckpt_100``...) or from ``--steps``.
The probe is ``--probe``, or built from ``--texts`` with the tokenizer of the first revision (``--tokenizer`` to
choose another), or the probe of an existing run in ``--out``. Every revision is probed by
:func:`layerwatch.analysis.trajectory.run_trajectory`, so the run is resumable (revisions whose step is already in the
run are not even resolved), each model is freed before the next one loads, and ``--device``/``--dtype`` apply.

A revision that is missing (not on the Hub, or not in the cache when offline) or that has only pickle weights is
reported by name and skipped; the command then exits with :data:`EXIT_SKIPPED` instead of 0. A revision name is a
branch, tag or commit, never a path: a name with a ``..`` part or an absolute path is refused, and in a local cache
folder the snapshot it names must lie inside that folder. Example::

    HF_HUB_OFFLINE=1 layerwatch trajectory EleutherAI/pythia-160m --revisions step1000,step2000 \\
        --texts prompts.txt --out runs/pythia-160m
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from layerwatch.analysis.trajectory import (
    Checkpoint,
    TrajectoryError,
    check_weights,
    completed_steps,
    load_tokenizer,
    run_trajectory,
    texts_probe,
)
from layerwatch.probe import Probe
from layerwatch.rundir.runs import Run, read_run

logger = logging.getLogger(__name__)

#: Exit code of ``layerwatch trajectory --revisions`` when one or more revisions were skipped (named on stderr).
EXIT_SKIPPED = 3

# Files fetched per revision: config, tokenizer and safetensors weights (never pickles).
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*")

_REVISION_STEP = re.compile(r"^(?:step|global_step|ckpt|checkpoint|iter|iteration)[-_]?(\d+)(?:$|[-_.])", re.IGNORECASE)


class RevisionUnavailable(Exception):
    """A revision that cannot be probed (missing, or without safetensors weights): reported and skipped."""


@dataclasses.dataclass(frozen=True)
class Revision:
    """One revision of a repository and the training step it holds."""

    name: str
    step: int


def revision_step(name: str) -> int | None:
    """The step in a revision name (``step1000``, ``step1000-tokens4B``, ``ckpt_100``...), or None.

    Example:
        >>> from layerwatch.analysis.revisions import revision_step
        >>> revision_step("step143000"), revision_step("step1000-tokens4B"), revision_step("main")
        (143000, 1000, None)
    """
    match = _REVISION_STEP.match(name)
    return int(match.group(1)) if match else None


def read_revisions(path: str | Path) -> list[str]:
    """Revision names from a file: one per line; blank lines and ``#`` comments are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TrajectoryError(f"cannot read --revisions-file {path}: {error}; give a readable UTF-8 file") from error
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def plan_revisions(names: Sequence[str], steps: Sequence[int] | None = None) -> list[Revision]:
    """Pair revision names with steps (from ``steps`` or the names), sorted by step.

    Raises:
        TrajectoryError: no revisions, a step that cannot be told, a wrong number of ``steps``, or a repeated step.
    """
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise TrajectoryError("no revisions given: pass --revisions step1000,step2000,... or --revisions-file FILE")
    if steps is not None and len(steps) != len(names):
        raise TrajectoryError(f"--steps gives {len(steps)} step(s) for {len(names)} revision(s); give one per revision")
    revisions = []
    for index, name in enumerate(names):
        step = steps[index] if steps is not None else revision_step(name)
        if step is None:
            raise TrajectoryError(
                f"cannot tell the step of revision {name!r}: name it step<N> (as Pythia, OLMo and LLM360 do) or pass "
                "--steps with one step per revision"
            )
        revisions.append(Revision(check_revision_name(name), int(step)))
    by_step: dict[int, Revision] = {}
    for revision in revisions:
        other = by_step.setdefault(revision.step, revision)
        if other.name != revision.name:
            raise TrajectoryError(f"revisions {other.name!r} and {revision.name!r} both have step {revision.step}")
    return [by_step[s] for s in sorted(by_step)]


def check_revision_name(name: str) -> str:
    """``name`` if it can be a revision (a branch, tag or commit such as ``step1000`` or ``refs/pr/1``).

    Raises:
        TrajectoryError: a name with a ``..`` part, an absolute path (``/x``, ``C:\\x``), a backslash or a NUL:
            a revision never walks out of the model's cache folder.
    """
    if not name or "\x00" in name or "\\" in name:
        raise TrajectoryError(f"revision {name!r} is not a branch, tag or commit name; give one such as step1000")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts:
        raise TrajectoryError(
            f"revision {name!r} is a path, not a branch, tag or commit name (no '..' parts, no absolute paths); "
            "give a name such as step1000"
        )
    return name


def _is_cache_folder(repo: str) -> bool:
    path = Path(repo)
    return path.is_dir() and (path / "snapshots").is_dir()


def _cache_snapshot(root: Path, revision: str) -> Path:
    """The snapshot folder of ``revision`` in the local cache folder ``root``, which it must not leave."""
    ref = root / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    snapshots = (root / "snapshots").resolve()
    folder = root / "snapshots" / commit
    if ".." in PurePosixPath(commit).parts or folder.resolve().parent != snapshots:
        raise TrajectoryError(
            f"revision {revision!r} of {root} points outside its snapshots/ folder ({folder}); a revision must "
            f"resolve inside the model's cache folder"
        )
    if not folder.is_dir():
        raise RevisionUnavailable(f"not in {root} (no refs/{revision} and no snapshots/{revision})")
    return folder


def resolve_revision(repo: str, revision: str) -> Path:
    """The local snapshot folder of ``revision`` of ``repo`` (a Hub id, or a folder in the cache layout).

    A Hub id goes through ``huggingface_hub.snapshot_download`` (which honours ``HF_HUB_OFFLINE`` and the cache),
    fetching only :data:`ALLOW_PATTERNS`.

    Raises:
        RevisionUnavailable: the revision is not in the repository or, offline, not in the cache.
        TrajectoryError: the name is a path (:func:`check_revision_name`), or it resolves outside the cache folder.
    """
    check_revision_name(revision)
    if _is_cache_folder(repo):
        return _cache_snapshot(Path(repo), revision)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=list(ALLOW_PATTERNS)))
    except Exception as error:  # noqa: BLE001 - not found, offline and not cached, gated, Hub down: all skip it
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RevisionUnavailable(f"cannot be fetched ({type(error).__name__}: {first_line})") from error
    if folder.parent.name != "snapshots":
        raise TrajectoryError(f"revision {revision!r} of {repo} resolved to {folder}, outside the cache's snapshots/")
    return folder


def revision_checkpoint(repo: str, revision: Revision) -> Checkpoint:
    """Resolve one revision and check it has safetensors weights; RevisionUnavailable otherwise."""
    folder = resolve_revision(repo, revision.name)
    checkpoint = Checkpoint(folder, revision.step)
    try:
        check_weights(checkpoint)
    except TrajectoryError as error:
        raise RevisionUnavailable(str(error).replace(str(folder), "its snapshot")) from error
    return checkpoint


def probe_builder(
    texts: Sequence[str], tokenizer: str | None, *, labels: Sequence[str] | None = None, **options: Any
) -> Callable[[Path], Probe]:
    """A function building the probe from ``texts`` (and ``labels``) with ``tokenizer`` (a folder or Hub id), or
    with the tokenizer of the snapshot folder it is given; ``options`` go to :meth:`layerwatch.Probe.from_texts`."""

    def build(folder: Path) -> Probe:
        if tokenizer is None:
            tok = load_tokenizer([folder])
        else:
            import transformers

            try:
                tok = transformers.AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
            except Exception as error:  # noqa: BLE001 - the message matters
                raise TrajectoryError(f"cannot load --tokenizer {tokenizer}: {error}") from error
        return texts_probe(texts, tok, labels=labels, **options)

    return build


def run_revisions(
    repo: str,
    revisions: Sequence[Revision],
    *,
    out: str | Path,
    probe: Probe | str | Path | Callable[[Path], Probe],
    on_revision: Callable[[Revision, dict[str, float]], None] | None = None,
    **options: Any,
) -> tuple[Run | None, dict[str, str]]:
    """Probe every revision not yet in the run at ``out``; return the run (None if nothing was ever probed) and
    the skipped revisions (name → reason).

    Args:
        repo: a Hub id ``ORG/NAME`` or a local folder in the Hugging Face cache layout.
        revisions: from :func:`plan_revisions`.
        out: the run directory (an existing run there is continued).
        probe: a probe, its path, or a function building it from the first probed revision's snapshot folder.
        on_revision: called after each probed revision with its timings (``load_s``, ``probe_s``).
        options: passed to :func:`layerwatch.analysis.trajectory.run_trajectory` (metrics, device, dtype, batch_size...).
    """
    done = completed_steps(out)
    skipped: dict[str, str] = {}
    run = None
    for revision in revisions:
        if revision.step in done:
            logger.debug("revision %s (step %d) is already in %s", revision.name, revision.step, out)
            continue
        try:
            checkpoint = revision_checkpoint(repo, revision)
        except RevisionUnavailable as error:
            logger.warning("revision %s of %s skipped: %s", revision.name, repo, error)
            skipped[revision.name] = str(error)
            continue
        if callable(probe):
            probe = probe(checkpoint.path)
        report = None if on_revision is None else (lambda _c, timings, r=revision: on_revision(r, timings))
        run = run_trajectory([checkpoint], probe=probe, out=out, on_checkpoint=report, **options)
    if run is None and done:
        run = read_run(out)
    return run, skipped


def default_out(repo: str) -> Path:
    """The run directory of a revisions replay when ``--out`` is not given: ``layerwatch-trajectory-<NAME>``."""
    name = Path(repo).name if _is_cache_folder(repo) else repo.replace("/", "--")
    return Path(f"layerwatch-trajectory-{name.removeprefix('models--')}")


def first_available(repo: str, plan: Sequence[Revision]) -> Checkpoint:
    """The checkpoint of the first revision of ``plan`` that can be probed (what a one-process replay builds its
    probe from); TrajectoryError when none can."""
    reasons = []
    for revision in plan:
        try:
            return revision_checkpoint(repo, revision)
        except RevisionUnavailable as error:
            reasons.append(f"{revision.name}: {error}")
    raise TrajectoryError(f"no revision of {repo} can be probed ({'; '.join(reasons)})")
