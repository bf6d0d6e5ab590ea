"""The run directory's file names, and the one way its files are written (atomically) or opened: never through a
symbolic link planted in the run directory. The leaf of ``rundir``: it imports nothing of layerwatch, so the probe,
the writers and the references can all use it."""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

JSONL_NAME = "layerwatch.jsonl"
PROBE_FILENAME = "probe.safetensors"
LOCK_NAME = "layerwatch.lock"
#: The TensorBoard run (sub-folder of the run directory) holding what concerns all layers at once: the heatmaps and
#: depth profiles, the alerts text, the custom-scalars layout, ``probe_seconds``, ``errors`` and ``best_layer``.
#: (Earlier versions wrote these in the run directory itself, which TensorBoard lists as a run named ``.``.)
ALL_LAYERS_RUN = "all_layers"
#: The TensorBoard run holding the constant 5/9 line drawn in the bimodality chart (Sarle's threshold).
THRESHOLD_RUN = "bimodality_threshold_5_9"
#: Sub-folders of a run directory that belong to it (TensorBoard runs): one per layer, and the two above.
RUN_SUBFOLDER = re.compile(rf"^(layer_\d+|{ALL_LAYERS_RUN}|{THRESHOLD_RUN})$")
# What a finished run consists of (moved aside, never deleted, when a fresh run starts in its directory).
RUN_FILE_PATTERNS = (
    JSONL_NAME, PROBE_FILENAME, "events.out.tfevents.*", "layer_[0-9]*", ALL_LAYERS_RUN, THRESHOLD_RUN,
    "reference*.safetensors",
)


def write_atomically(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file next to ``path``, flushed to disk, then rename it into place: readers
    and a crash see the old file or the new one, never a part. The run directory's files are written this way.

    A symbolic link at ``path`` is replaced by the new file (the rename replaces the link itself), so nothing is
    ever written to where a link points; the temporary file is created exclusively (``O_EXCL``), never through a
    link either."""
    # Created like the run's other files (0666 less the umask), not 0600 as tempfile.mkstemp would.
    tmp_name = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    handle = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
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


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def remove_link(path: Path) -> bool:
    """If ``path`` is a symbolic link, remove the link (its target is left untouched) with a warning, and return
    True: layerwatch never writes through a link in the run directory (it could point anywhere)."""
    if not path.is_symlink():
        return False
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    os.unlink(path)
    logger.warning(
        "layerwatch: %s was a symbolic link (to %s); layerwatch never writes through links in a run directory, so "
        "the link was removed and a real one is written in its place (the link's target is untouched)", path, target,
    )
    return True


def open_run_file(path: Path, flags: int, mode: int = 0o666) -> int:
    """``os.open(path, flags)`` for one of the run directory's files, never through a symbolic link: a link found
    there is removed first (:func:`remove_link`), and ``O_NOFOLLOW`` refuses one planted in between."""
    remove_link(path)
    return os.open(path, flags | _NOFOLLOW, mode)


def real_folder(path: Path) -> Path:
    """Create the sub-folder ``path`` of a run directory (a TensorBoard run such as ``layer_03``) as a real folder:
    a symbolic link there is removed first, so events are never written where it points. Returns ``path``."""
    remove_link(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
