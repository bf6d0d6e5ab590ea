"""The command line's shared flags, parsed in one place (``--metrics``, ``--out``, ``--texts``, ``--labels``).

Every front end (``layerwatch trajectory``, ``layerwatch report``) adds its shared flags with :func:`add_common_flags`
and parses their values with the functions here. A mistake raises :class:`FlagError` naming the flag and the fix;
:func:`exit_code` (or the :func:`front_end` decorator) prints it as ONE line on stderr and gives exit code 2, with no
traceback. Nothing here creates a folder: :func:`check_out_dir` only checks, and :func:`removing_if_left_empty`
removes an output folder that a failed command created and left empty.

API (stable; the report front end uses it too):

- ``parse_metrics(value) -> str | list[str]``: a preset name (``"standard"``), one metric name (``"dime"``), or a
  comma list (``"dime,lidar"``; ``"health"`` expands to the activation-health metrics);
- ``metric_names(value) -> list[str]``: the same, with a preset expanded to its metric names;
- ``check_out_dir(path) -> Path``; ``removing_if_left_empty(path)``; ``read_lines(path, flag)``;
  ``read_texts_file(path) -> list[str]``;
  ``read_labelled_texts(path, labels_path) -> (texts, labels | None)``;
- ``add_common_flags(parser)``; ``FlagError(flag, fix)``; ``exit_code(prog, error) -> 2``; ``@front_end(prog)``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from layerwatch.metrics import names, registry
from layerwatch.rundir.files import JSONL_NAME

TSV_SUFFIXES = (".tsv",)


class FlagError(Exception):
    """A command-line flag with a bad value: ``flag`` (e.g. ``"--metrics"``) and ``fix`` (what to give instead)."""

    def __init__(self, flag: str, fix: str) -> None:
        self.flag = flag
        self.fix = " ".join(str(fix).split())  # one line, always
        super().__init__(f"{flag}: {self.fix}")


def exit_code(prog: str, error: BaseException) -> int:
    """Print ``error`` as one line ``<prog>: error: <message>`` on stderr and return 2 (the user-error exit code)."""
    message = " ".join(str(error).split())
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def run_alone(
    prog: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    main: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    description: str | None = None,
) -> int:
    """Run one front end without the ``layerwatch`` dispatcher (``python -m layerwatch.cli.<subcommand> ...``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return main(parser.parse_args(argv))


def front_end(prog: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Decorate a front end's ``main(args) -> int`` so that a :class:`FlagError` exits 2 with one line."""

    def decorate(main: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(main)
        def wrapper(args: argparse.Namespace) -> int:
            try:
                return main(args)
            except FlagError as error:
                return exit_code(prog, error)

        return wrapper

    return decorate


# ------------------------------------------------------------------------------------------------------- --metrics
def _known_metrics() -> str:
    return ", ".join(registry.all_metrics())


def parse_metrics(
    value: str | None, *, flag: str = "--metrics", presets: bool = True, known_only: bool = True
) -> str | list[str]:
    """The ``metrics=`` value of a ``--metrics`` flag: a preset name as a string, else a list of metric names.

    Accepts a preset (``light``, ``standard``, ``paper``; only when ``presets``), one metric name, or a comma list
    of metric names (``health`` stands for the activation-health metrics). Names are checked against the registry
    unless ``known_only`` is False (e.g. to draw a metric an older run recorded), then returned as given.

    Raises:
        FlagError: empty, an unknown name, or a preset where presets are not allowed.
    """
    parts = [part.strip() for part in (value or "").split(",") if part.strip()]
    choices = f"a preset ({', '.join(registry.PRESETS)}), " if presets else ""
    if not parts:
        raise FlagError(flag, f"is empty; give {choices}a metric name or a comma list of metric names")
    if len(parts) == 1 and parts[0] in registry.PRESETS:
        if not presets:
            raise FlagError(flag, f"{parts[0]!r} is a preset; give metric names here (known: {_known_metrics()})")
        return parts[0]
    unknown = [p for p in parts if p not in registry.REGISTRY and p != "health"]
    if not known_only:
        return parts
    if unknown:
        preset_note = " (a preset cannot be part of a list)" if set(unknown) & set(registry.PRESETS) else ""
        raise FlagError(
            flag,
            f"unknown metric {', '.join(repr(u) for u in unknown)}{preset_note}; give {choices}a metric name or a "
            f"comma list of: {_known_metrics()}",
        )
    try:
        registry.resolve_metrics(parts)
    except ValueError as error:  # pragma: no cover - the names were checked above
        raise FlagError(flag, str(error)) from error
    return parts


def metric_names(value: str | None, *, flag: str = "--metrics") -> list[str]:
    """:func:`parse_metrics`, with a preset expanded into its metric names (and ``health`` into its metrics)."""
    return list(registry.resolve_metrics(parse_metrics(value, flag=flag))[1])


# ----------------------------------------------------------------------------------------------------------- --out
def check_out_dir(path: str | Path, *, flag: str = "--out") -> Path:
    """Check that ``path`` can be an output folder (an existing folder, or a path whose existing ancestors are
    folders); nothing is created. Raises :class:`FlagError` when it, or an ancestor, is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FlagError(flag, f"{path} is a file, not a folder; give a folder (it is created if missing)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FlagError(flag, f"{path} is inside {parent}, which is a file; give a folder path")
            break
    return path


def _holds_records(folder: Path) -> bool:
    return any(path.is_file() and path.stat().st_size > 0 for path in folder.rglob(JSONL_NAME))


@contextlib.contextmanager
def removing_if_left_empty(path: str | Path) -> Iterator[Path]:
    """Run the block; if it raises and ``path`` did not exist before, remove it unless it holds probe records (a
    ``layerwatch.jsonl`` with content, kept for a resume): everything else in it (the probe file, a lock, empty
    folders) was written by this command. Missing parents it created are removed when left empty."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        yield path
    except BaseException:
        if missing and path.is_dir() and not _holds_records(path):
            shutil.rmtree(path, ignore_errors=True)
        for folder in missing[1:]:  # the parents, deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise


# --------------------------------------------------------------------------------------------- --texts, --labels
def read_lines(path: str | Path, flag: str) -> list[str]:
    """The lines of a UTF-8 text file given as ``flag``; :class:`FlagError` if it is missing, unreadable, a folder
    or not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise FlagError(flag, f"{path} is a folder; give a UTF-8 text file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FlagError(flag, f"cannot read {path} ({error.strerror or error}); give a readable UTF-8 file") from error
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise FlagError(
            flag, f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); convert it to UTF-8"
        ) from error
    return text.splitlines()


def read_texts_file(path: str | Path, *, flag: str = "--texts") -> list[str]:
    """The non-empty lines of a UTF-8 text file (stripped), one probe prompt each.

    Raises:
        FlagError: the file is missing, unreadable, a folder, not UTF-8, or has no non-empty line.
    """
    texts = [line.strip() for line in read_lines(path, flag) if line.strip()]
    if not texts:
        raise FlagError(flag, f"{path} has no non-empty lines; give one prompt per line")
    return texts


def _split_tsv(lines: Sequence[str], path: str | Path, flag: str) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab or not label.strip() or not text.strip():
            raise FlagError(flag, f"{path} line {number} is not 'label<TAB>text'; give one such line per prompt")
        labels.append(label.strip())
        texts.append(text.strip())
    if not texts:
        raise FlagError(flag, f"{path} has no non-empty lines; give one 'label<TAB>text' line per prompt")
    return texts, labels


def is_tsv(path: str | Path, lines: Sequence[str]) -> bool:
    """A texts file is a TSV (``label<TAB>text``) when its name ends in ``.tsv`` or every non-empty line has a tab."""
    filled = [line for line in lines if line.strip()]
    return Path(path).suffix.lower() in TSV_SUFFIXES or (bool(filled) and all("\t" in line for line in filled))


def read_labelled_texts(
    path: str | Path, labels_path: str | Path | None = None, *, flag: str = "--texts", labels_flag: str = "--labels"
) -> tuple[list[str], list[str] | None]:
    """The prompts of a ``--texts`` file and their labels (``None`` when unlabelled).

    Labels come from ``labels_path`` (one label per line, aligned with the texts' non-empty lines; blank lines of
    both files are skipped), or from a TSV texts file (``label<TAB>text``, see :func:`is_tsv`), not both.

    Raises:
        FlagError: an unreadable or non-UTF-8 file, a malformed TSV line, or as many labels as texts not given.
    """
    lines = read_lines(path, flag)
    if is_tsv(path, lines):
        if labels_path is not None:
            raise FlagError(labels_flag, f"{path} already holds labels (label<TAB>text); drop {labels_flag}")
        return _split_tsv(lines, path, flag)
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise FlagError(flag, f"{path} has no non-empty lines; give one prompt per line")
    if labels_path is None:
        return texts, None
    labels = [line.strip() for line in read_lines(labels_path, labels_flag) if line.strip()]
    if len(labels) != len(texts):
        raise FlagError(
            labels_flag,
            f"{labels_path} has {len(labels)} label(s) for {len(texts)} text(s) in {path}; give one label per "
            f"non-empty text line",
        )
    return texts, labels


# ---------------------------------------------------------------------------------------------------- the flags
def add_common_flags(
    parser: argparse.ArgumentParser,
    *,
    out_help: str = "output folder",
    metrics_default: str | None = "standard",
    metrics_help: str | None = None,
    texts: bool = False,
) -> None:
    """Add ``--out`` and ``--metrics`` (and, with ``texts``, ``--labels``; ``--texts`` itself belongs to the front
    end, which may put it in a mutually exclusive group). Values are parsed later by this module's functions, so
    a mistake is one line naming the flag rather than argparse's usage block."""
    parser.add_argument("--out", metavar="DIR", help=out_help)
    parser.add_argument(
        "--metrics",
        default=metrics_default,
        metavar="METRICS",
        help=metrics_help
        or f"a preset ({', '.join(registry.PRESETS)}), one metric name, or a comma list of metric names"
        + (f" (default {metrics_default})" if metrics_default else ""),
    )
    if texts:
        parser.add_argument(
            "--labels",
            metavar="FILE",
            help="one class label per line, aligned with the --texts lines (or give --texts as a label<TAB>text "
            "TSV file); enables " + f"{names.PROBE_ACCURACY} and {names.BEST_LAYER}",
        )
