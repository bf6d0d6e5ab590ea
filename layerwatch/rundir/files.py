"""The run directory's file names, and the one way its files are written (atomically). The leaf of ``rundir``:
it imports nothing of layerwatch, so the probe, the writers and the references can all use it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

JSONL_NAME = "layerwatch.jsonl"
PROBE_FILENAME = "probe.safetensors"
LOCK_NAME = "layerwatch.lock"
# What a finished run consists of (moved aside, never deleted, when a fresh run starts in its directory).
RUN_FILE_PATTERNS = (JSONL_NAME, PROBE_FILENAME, "events.out.tfevents.*", "layer_[0-9]*", "reference*.safetensors")


def write_atomically(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file next to ``path``, flushed to disk, then rename it into place: readers
    and a crash see the old file or the new one, never a part. The run directory's files are written this way."""
    # Created like the run's other files (0666 less the umask), not 0600 as tempfile.mkstemp would.
    tmp_name = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    handle = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
