"""The run directory: the names of its files, the writers that write into it, and the one-writer rule.

A run directory (``logdir``) holds ``probe.safetensors`` (the run's probe, for resume and ``layerwatch trajectory``),
``layerwatch.jsonl`` (one record per probe; what :func:`layerwatch.read_run` reads) and TensorBoard event files.
:func:`open_writers` is the one place that creates them for a monitor.

One live writer per directory, across processes and hosts that share the folder: the writer holds ``layerwatch.lock``
(an exclusive ``flock`` on it, and its host, pid and start time written inside) as long as its writers are open. A
newcomer is refused with a message naming the directory and the other writer. A lock whose writer is gone (crashed,
killed) is taken over: the kernel releases the ``flock`` of a dead process, and where ``flock`` is unavailable a lock
naming a dead pid on this host is stale.

A fresh run (``resume_step < 0``, e.g. the Trainer callback starting at step 0) over a finished run never deletes it:
the finished run's files move to ``<logdir>.previous-<time>`` next to it, and a warning says so.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from layerwatch.rundir.files import JSONL_NAME, LOCK_NAME, PROBE_FILENAME, RUN_FILE_PATTERNS
from layerwatch.rundir.writers import JsonlWriter, Writer, TensorBoardWriter, read_jsonl_records

try:  # POSIX; elsewhere only the lock file's pid is checked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # pragma: no cover
    from layerwatch.probe import Probe
    from layerwatch.rundir.record import ProbeRecord

logger = logging.getLogger(__name__)

_LIVE_WRITER_DIRS: set[str] = set()  # this process's claims (a clear message, and no flock needed between threads)
_LIVE_WRITER_LOCK = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: dict) -> str:
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{when}"


class WriterClaim(Writer):
    """This process's claim on a run directory: ``layerwatch.lock`` held as long as the run's other writers (a writer
    that writes nothing; :meth:`close` gives the claim back).

    Raises:
        ValueError: another live writer (this process, or another one on any host sharing the folder) holds the
            directory; the message names the directory and that writer.
    """

    def __init__(self, logdir: str | os.PathLike) -> None:
        self.logdir = Path(logdir)
        self.path = self.logdir / LOCK_NAME
        key = str(self.logdir.resolve())
        with _LIVE_WRITER_LOCK:
            if key in _LIVE_WRITER_DIRS:
                raise ValueError(
                    f"logdir={str(logdir)!r} already has a live layerwatch writer in this process (pid {os.getpid()}); "
                    "close() the other LayerWatch first or give this one another logdir"
                )
            _LIVE_WRITER_DIRS.add(key)
        self._key: str | None = key
        self._fd: int | None = None
        try:
            self._fd = self._acquire()
        except BaseException:
            self._release_key()
            raise

    def _acquire(self) -> int:
        for _ in range(10):  # the file can be unlinked by its last holder between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                holder = self._lock(fd)
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        else:  # pragma: no cover - ten races in a row
            raise ValueError(f"logdir={str(self.logdir)!r}: could not take {LOCK_NAME}; try again")
        if holder:
            logger.warning("%s: taking over the lock of a writer that is gone (%s)", self.logdir, _describe(holder))
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode())
        return fd

    def _lock(self, fd: int) -> dict:
        """Lock ``fd`` or raise ValueError naming the live holder; returns a stale holder's record (else {})."""
        holder = _read_holder(fd)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return holder  # whoever wrote it no longer holds it
            except BlockingIOError:
                self._refuse(holder)
            except OSError as error:  # a file system without flock: fall back to the pid
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        same_host = holder.get("host") == socket.gethostname()
        pid = holder.get("pid")
        if holder and (not same_host or (isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid))):
            self._refuse(holder)
        return holder

    def _refuse(self, holder: dict) -> None:
        raise ValueError(
            f"logdir={str(self.logdir)!r} is being written by another layerwatch process ({_describe(holder)}); two "
            f"writers would destroy each other's records. Give this run another logdir, or stop the other writer "
            f"first (a writer that crashed releases {LOCK_NAME} by itself)"
        )

    role = "claim"

    def write(self, record: ProbeRecord) -> None:
        """Nothing: the claim only lives as long as the run's other writers."""

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still holding it; a waiter that opened it retries on the new file
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        self._release_key()

    def _release_key(self) -> None:
        if self._key is not None:
            with _LIVE_WRITER_LOCK:
                _LIVE_WRITER_DIRS.discard(self._key)
            self._key = None


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def keep_finished_run(logdir: Path) -> Path | None:
    """Move a finished run's files (:data:`RUN_FILE_PATTERNS`) to ``<logdir>.previous-<time>`` and return that
    folder; None when ``logdir`` holds no records. Called when a fresh run starts where one already finished."""
    records = read_jsonl_records(logdir / JSONL_NAME)
    if not records:
        return None
    target = logdir.with_name(f"{logdir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = target.with_name(f"{logdir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
    target.mkdir(parents=True)
    for pattern in RUN_FILE_PATTERNS:
        for path in sorted(logdir.glob(pattern)):
            os.replace(path, target / path.name)
    logger.warning(
        "layerwatch: %s held a finished run (%d probes, steps %d to %d); a fresh run starts there, so that run was "
        "moved to %s (nothing was deleted)", logdir, len(records), min(r.step for r in records),
        max(r.step for r in records), target,
    )
    return target


def _not_writable(logdir: Path, error: OSError) -> ValueError:
    return ValueError(f"logdir={str(logdir)!r} is not writable ({error}); pass a directory you can write to")


def open_writers(
    logdir: str | os.PathLike, probe: Probe, *, tensorboard: bool, jsonl: bool, resume_step: int | None
) -> list[Writer]:
    """Create ``logdir``, claim it, save the run's probe there and open its writers (on the main process only).

    Args:
        logdir: the run directory (created if missing).
        probe: saved as ``probe.safetensors``.
        tensorboard, jsonl: which files to write.
        resume_step: the step a run resumed from: JSONL records after it are dropped and TensorBoard purges them.
            A negative value starts a fresh run: a finished run found there is moved aside
            (:func:`keep_finished_run`), never deleted.

    Raises:
        ValueError: ``logdir`` is not writable, or another live writer (in this process or another) writes there.
    """
    logdir = Path(logdir)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        claim = WriterClaim(logdir)  # before anything in the directory is touched
    except OSError as error:
        raise _not_writable(logdir, error) from error
    writers: list[Writer] = []
    try:
        try:
            if resume_step is not None and resume_step < 0:
                keep_finished_run(logdir)
            probe.save(logdir / PROBE_FILENAME)
        except OSError as error:
            raise _not_writable(logdir, error) from error
        history = [r for r in read_jsonl_records(logdir / JSONL_NAME) if resume_step is None or r.step <= resume_step]
        if history and resume_step is None:
            logger.info("%s already holds %d probe records; new records are appended", logdir, len(history))
        if jsonl:
            writers.append(JsonlWriter(logdir / JSONL_NAME, resume_step=resume_step))
        if tensorboard:
            purge = resume_step + 1 if resume_step is not None else None
            writers.append(TensorBoardWriter(logdir, purge_step=purge, history=history))
        writers.append(claim)
        return writers
    except BaseException:
        for writer in writers:
            writer.close()
        claim.close()  # safe twice
        raise
