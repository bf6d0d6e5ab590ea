"""Public checkpoint suites: ``layerwatch trajectory ORG/NAME --revisions step1000,step2000,...`` (SPEC §7).

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
reported by name and skipped; the command then exits with :data:`EXIT_SKIPPED` instead of 0. Example::

    HF_HUB_OFFLINE=1 layerwatch trajectory EleutherAI/pythia-160m --revisions step1000,step2000 \\
        --texts prompts.txt --out runs/pythia-160m
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerwatch.analysis.trajectory import (
    Checkpoint,
    TrajectoryError,
    _parse_metrics,
    check_weights,
    completed_steps,
    load_tokenizer,
    read_texts,
    run_trajectory,
    summary_table,
)

if TYPE_CHECKING:  # pragma: no cover
    from layerwatch.probe import Probe
    from layerwatch.rundir.runs import Run

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
    except OSError as error:
        raise TrajectoryError(f"cannot read --revisions-file {path}: {error}") from error
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
        revisions.append(Revision(name, int(step)))
    by_step: dict[int, Revision] = {}
    for revision in revisions:
        other = by_step.setdefault(revision.step, revision)
        if other.name != revision.name:
            raise TrajectoryError(f"revisions {other.name!r} and {revision.name!r} both have step {revision.step}")
    return [by_step[s] for s in sorted(by_step)]


def _is_cache_folder(repo: str) -> bool:
    path = Path(repo)
    return path.is_dir() and (path / "snapshots").is_dir()


def resolve_revision(repo: str, revision: str) -> Path:
    """The local snapshot folder of ``revision`` of ``repo`` (a Hub id, or a folder in the cache layout).

    A Hub id goes through ``huggingface_hub.snapshot_download`` (which honours ``HF_HUB_OFFLINE`` and the cache),
    fetching only :data:`ALLOW_PATTERNS`.

    Raises:
        RevisionUnavailable: the revision is not in the repository or, offline, not in the cache.
    """
    if _is_cache_folder(repo):
        root = Path(repo)
        ref = root / "refs" / revision
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
        folder = root / "snapshots" / commit
        if not folder.is_dir():
            raise RevisionUnavailable(f"not in {root} (no refs/{revision} and no snapshots/{revision})")
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(ALLOW_PATTERNS)))
    except Exception as error:  # noqa: BLE001 - not found, offline and not cached, gated, Hub down: all skip it
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RevisionUnavailable(f"cannot be fetched ({type(error).__name__}: {first_line})") from error


def _revision_checkpoint(repo: str, revision: Revision) -> Checkpoint:
    """Resolve one revision and check it has safetensors weights; RevisionUnavailable otherwise."""
    folder = resolve_revision(repo, revision.name)
    checkpoint = Checkpoint(folder, revision.step)
    try:
        check_weights(checkpoint)
    except TrajectoryError as error:
        raise RevisionUnavailable(str(error).replace(str(folder), "its snapshot")) from error
    return checkpoint


def _texts_probe(texts: str, tokenizer: str | None, folder: Path, options: dict[str, Any]) -> "Probe":
    """A probe from a text file, tokenized with ``tokenizer`` (a folder or Hub id) or the revision's own."""
    from layerwatch.probe import Probe

    if tokenizer is None:
        tok = load_tokenizer([folder])
    else:
        import transformers

        try:
            tok = transformers.AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
        except Exception as error:  # noqa: BLE001 - the message matters
            raise TrajectoryError(f"cannot load --tokenizer {tokenizer}: {error}") from error
    try:
        return Probe.from_texts(read_texts(texts), tok, **options)
    except ValueError as error:
        raise TrajectoryError(f"cannot build a probe from --texts {texts}: {error}") from error


def run_revisions(
    repo: str,
    revisions: Sequence[Revision],
    *,
    out: str | Path,
    probe: "Probe | str | Path | Callable[[Path], Probe]",
    on_revision: Callable[[Revision, dict[str, float]], None] | None = None,
    **options: Any,
) -> tuple["Run | None", dict[str, str]]:
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
            checkpoint = _revision_checkpoint(repo, revision)
        except RevisionUnavailable as error:
            logger.warning("revision %s of %s skipped: %s", revision.name, repo, error)
            skipped[revision.name] = str(error)
            continue
        if callable(probe):
            probe = probe(checkpoint.path)
        report = None if on_revision is None else (lambda _c, timings, r=revision: on_revision(r, timings))
        run = run_trajectory([checkpoint], probe=probe, out=out, on_checkpoint=report, **options)
    if run is None and done:
        from layerwatch.rundir.runs import read_run

        run = read_run(out)
    return run, skipped


# --------------------------------------------------------------------------------------------------------------------
# Command line (a branch of `layerwatch trajectory`)
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--revisions`` and ``--revisions-file`` to the ``layerwatch trajectory`` parser."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--revisions",
        metavar="R1,R2,...",
        help="probe these revisions of the Hub repository ORG/NAME given as the one input (e.g. step1000,step2000); "
        "the step comes from the name (step<N>) or --steps",
    )
    group.add_argument("--revisions-file", metavar="FILE", help="like --revisions, one revision per line")


def wants_revisions(args: argparse.Namespace) -> bool:
    """Whether the parsed ``layerwatch trajectory`` arguments ask for Hub revisions."""
    return bool(getattr(args, "revisions", None) or getattr(args, "revisions_file", None))


def _default_out(repo: str) -> Path:
    name = Path(repo).name if _is_cache_folder(repo) else repo.replace("/", "--")
    return Path(f"layerwatch-trajectory-{name.removeprefix('models--')}")


def _probe_source(args: argparse.Namespace, out: Path) -> "Probe | Path | Callable[[Path], Probe]":
    if args.probe:
        return Path(args.probe)
    if args.texts:
        options = {"max_length": args.max_length, "num_prompts": args.num_prompts, "seed": args.seed}
        return lambda folder: _texts_probe(args.texts, args.tokenizer, folder, options)
    from layerwatch.rundir.files import PROBE_FILENAME

    if (out / PROBE_FILENAME).is_file():
        return out / PROBE_FILENAME
    raise TrajectoryError("no probe: pass --probe PROBE (a saved probe) or --texts FILE (one prompt per line)")


def main(args: argparse.Namespace) -> int:
    """``layerwatch trajectory ORG/NAME --revisions ...``: 0 when all were probed, :data:`EXIT_SKIPPED` when some
    were skipped, 2 on a user error."""
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    try:
        if len(args.checkpoints) != 1:
            raise TrajectoryError(f"--revisions takes one repository (ORG/NAME), got {len(args.checkpoints)} inputs")
        if args.allow_pickle:
            raise TrajectoryError("--allow-pickle does not apply to --revisions: Hub revisions load from safetensors only")
        repo = str(args.checkpoints[0])
        names = args.revisions.split(",") if args.revisions else read_revisions(args.revisions_file)
        revisions = plan_revisions(names, args.steps)
        out = Path(args.out) if args.out else _default_out(repo)
        done = completed_steps(out)
        say(f"layerwatch trajectory: {len(revisions)} revision(s) of {repo}; "
            f"{sum(r.step in done for r in revisions)} already in {out}")
        position = [0]

        def progress(revision: Revision, timings: dict[str, float]) -> None:
            position[0] += 1
            say(f"[{position[0]}] revision {revision.name} (step {revision.step}): "
                f"load {timings['load_s']:.1f} s, probe {timings['probe_s']:.1f} s")

        started = time.perf_counter()
        run, skipped = run_revisions(
            repo, revisions, out=out, probe=_probe_source(args, out), on_revision=progress,
            metrics=_parse_metrics(args.metrics), device=args.device, dtype=args.dtype, batch_size=args.batch_size,
            alpha=args.alpha, tensorboard=not args.no_tensorboard,
        )
    except TrajectoryError as error:
        print(f"layerwatch trajectory: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerwatch trajectory: interrupted; the revisions probed so far are kept", file=sys.stderr)
        return 130
    if run is not None and not args.quiet:
        print(summary_table(run))
        print(f"\nrun written to {out} ({len(run.steps)} step(s), {time.perf_counter() - started:.0f} s); view it with:")
        print(f"  tensorboard --logdir {out}\n  layerwatch report {out}")
    for name, reason in skipped.items():
        print(f"layerwatch trajectory: skipped revision {name}: {reason}", file=sys.stderr)
    return EXIT_SKIPPED if skipped else 0
