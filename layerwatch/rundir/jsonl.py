"""Reading ``layerwatch.jsonl`` within bounds, whatever the file holds.

The file is read as bytes, one line at a time, each line at most :data:`MAX_LINE_BYTES` long: a longer line is
skipped without ever being held whole (memory stays bounded by the cap, not by the file). A line that is not a probe
record (junk, a crafted object, a byte that is not UTF-8, a line cut short by a crash mid-write) skips only that
line. However many lines are skipped, one read logs one warning that counts them and names the first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from layerwatch.rundir.record import ProbeRecord

logger = logging.getLogger(__name__)

#: The longest line read from a JSONL file (16 MiB; a probe record of 64 layers x 4096 prompts is about 5 MiB).
#: A longer line is skipped with a warning, read past in small pieces; :class:`JsonlWriter` never writes one.
MAX_LINE_BYTES = 16 << 20
_SKIP_CHUNK = 1 << 20


def iter_lines(path: Path) -> Iterator[tuple[int, bytes | None, bool]]:
    """``(line number, bytes, ended)`` for each line of ``path``: the bytes without the newline (None for a line
    longer than :data:`MAX_LINE_BYTES`, which is read past, never held), and whether a newline ended it (only the
    last line of a file cut short by a crash has none)."""
    limit = MAX_LINE_BYTES
    with open(path, "rb") as handle:
        number = 0
        while True:
            line = handle.readline(limit + 1)
            if not line:
                return
            number += 1
            if line.endswith(b"\n"):
                yield number, line[:-1], True
            elif len(line) <= limit:
                yield number, line, False
            else:  # too long: read past it in pieces
                del line
                ended = False
                while not ended:
                    piece = handle.readline(_SKIP_CHUNK)
                    ended = piece.endswith(b"\n")
                    if not piece:
                        break
                yield number, None, ended


def parse_record(raw: bytes) -> ProbeRecord | None:
    """The record on one line, or None when the line is not one (bad JSON, not UTF-8, wrong fields)."""
    try:
        return ProbeRecord.from_json(raw.decode("utf-8"))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


@dataclass
class SkippedLines:
    """What a read skipped: how many lines, how many of them over the length cap, and the first one."""

    count: int = 0
    too_long: int = 0
    first: int | None = None

    def add(self, number: int, too_long: bool = False) -> None:
        self.count += 1
        self.too_long += int(too_long)
        if self.first is None:
            self.first = number

    def warn(self, path: Path) -> None:
        """One warning for the whole read (nothing when no line was skipped)."""
        if not self.count:
            return
        long_part = (
            f", {self.too_long} of them longer than the {MAX_LINE_BYTES >> 20} MiB line cap (skipped unread)"
            if self.too_long else ""
        )
        logger.warning(
            "%s: skipped %d line(s) that are not probe records (the first at line %d%s); the other records are read. "
            "A run interrupted mid-write leaves one such line at the end; more mean the file was damaged or edited",
            path, self.count, self.first, long_part,
        )


def read_jsonl_records(path: str | os.PathLike, *, quiet: bool = False) -> list[ProbeRecord]:
    """Records of a JSONL file in file order, skipping (and counting in one warning, unless ``quiet``) the lines
    that are not records: see the module docstring. A missing file has no records."""
    path = Path(path)
    records: list[ProbeRecord] = []
    if not path.is_file():
        return records
    skipped = SkippedLines()
    for number, raw, _ in iter_lines(path):
        if raw is None:
            skipped.add(number, too_long=True)
            continue
        if not raw.strip():
            continue
        record = parse_record(raw)
        if record is None:
            skipped.add(number)
        else:
            records.append(record)
    if not quiet:
        skipped.warn(path)
    return records


def kept_lines(path: Path, resume_step: int | None) -> tuple[list[bytes], int, bool]:
    """For a writer opening ``path`` to append: the lines to keep, the number of records dropped (after
    ``resume_step``), and whether the file must be rewritten (records dropped, or a last line cut short). Lines that
    are not records are kept as they are (readers skip them); only an over-long line is lost when rewriting."""
    lines: list[bytes] = []
    dropped, rewrite = 0, False
    for _, raw, ended in iter_lines(path):
        if raw is None or not raw.strip():
            continue
        record = parse_record(raw)
        if record is not None and resume_step is not None and record.step > resume_step:
            dropped, rewrite = dropped + 1, True
            continue
        if not ended:  # the last line, cut short: kept only if it is a whole record
            rewrite = True
            if record is None:
                continue
        lines.append(raw)
    return lines, dropped, rewrite
