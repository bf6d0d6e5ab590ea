"""The run directory: the names of its files, the writers that write into it, and the one-writer rule.

A run directory (``logdir``) holds ``probe.safetensors`` (the run's probe, for resume and ``layerwatch trajectory``),
``layerwatch.jsonl`` (one record per probe; what :func:`layerwatch.read_run` reads) and TensorBoard event files.
:func:`open_writers` is the one place that creates them for a monitor.

One live writer per directory, across processes and hosts that share the folder. The writer holds, as long as its
writers are open, an exclusive ``flock`` on the directory itself and one on ``layerwatch.lock`` (its host, pid, start
time and a random token written inside). The directory's lock cannot be deleted: after an ``rm layerwatch.lock`` on a
live run a newcomer is still refused, and the live writer puts its lock file back at its next probe. Where a file
system refuses ``flock`` on a directory, the lock file's ``flock`` alone excludes (plus that re-creation). A newcomer
is refused with a message naming the directory and the other writer. A lock whose writer is gone (crashed, killed) is
taken over: the kernel releases the ``flock`` of a dead process, and where ``flock`` is unavailable a lock naming a
dead pid on this host is stale. Closing removes ``layerwatch.lock`` only while it is still this writer's own (same
file, same token), never another writer's.

Nothing is written through a symbolic link planted in the run directory: the lock file, the JSONL, the TensorBoard
runs (``layer_NN/``, ``all_layers/``), the probe and the reference files are real files in the directory (a link found
at their place is removed with a warning; its target is untouched).

A fresh run (``resume_step < 0``, e.g. the Trainer callback starting at step 0) over a finished run never deletes it:
the finished run's files move to ``<logdir>.previous-<time>`` next to it, and a warning says so.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from layerwatch.rundir.files import (
    ALL_LAYERS_RUN, JSONL_NAME, LOCK_NAME, PROBE_FILENAME, RUN_FILE_PATTERNS, THRESHOLD_RUN, open_run_file, remove_link,
)
from layerwatch.rundir.jsonl import read_jsonl_records
from layerwatch.rundir.writers import JsonlWriter, Writer, TensorBoardWriter

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
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.EINVAL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return f"its {LOCK_NAME} was deleted, but that writer still holds the directory"
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{when}"


class WriterClaim(Writer):
    """This process's claim on a run directory: the directory's ``flock`` and ``layerwatch.lock`` held as long as the
    run's other writers (a writer that writes nothing but checks its lock file at every probe; :meth:`close` gives
    the claim back).

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
        self._token = secrets.token_hex(8)
        self._warned = False
        self._fd: int | None = None
        self._dir_fd: int | None = None
        try:
            self._dir_fd = self._lock_directory()
            self._fd = self._acquire()
        except BaseException:
            self._close_fds()
            self._release_key()
            raise

    def _lock_directory(self) -> int | None:
        """An exclusive ``flock`` on the directory itself (None where the file system has none for directories)."""
        if fcntl is None:  # pragma: no cover - Windows
            return None
        fd = os.open(self.logdir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._refuse(self._holder_on_disk())
        except OSError as error:
            os.close(fd)
            if error.errno in _NO_FLOCK:
                return None
            raise
        return fd

    def _acquire(self) -> int:
        for _ in range(10):  # the file can be unlinked by its last holder between our open and our flock
            fd = open_run_file(self.path, os.O_RDWR | os.O_CREAT)
            try:
                holder = self._lock(fd)
                if os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino:
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
        self._write_holder(fd)
        return fd

    def _write_holder(self, fd: int) -> None:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "token": self._token}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)

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
                if error.errno not in _NO_FLOCK:
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

    def _holder_on_disk(self) -> dict:
        """The holder written in ``layerwatch.lock`` now ({} when it is missing, a link or unreadable)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return {}
        try:
            return _read_holder(fd)
        finally:
            os.close(fd)

    def _owns_lock_file(self) -> bool:
        """Whether ``layerwatch.lock`` is still this claim's file (same inode, same token)."""
        if self._fd is None:
            return False
        try:
            mine, there = os.fstat(self._fd), os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        same_file = (mine.st_ino, mine.st_dev) == (there.st_ino, there.st_dev)
        return same_file and self._holder_on_disk().get("token") == self._token

    def check(self) -> None:
        """Put ``layerwatch.lock`` back if it was deleted or replaced while this claim holds the directory."""
        if self._fd is None or self._owns_lock_file():
            return
        try:
            fd = open_run_file(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as error:
            logger.warning("%s: %s is gone and cannot be re-created (%s)", self.logdir, LOCK_NAME, error)
            return
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in _NO_FLOCK:
                return
            if not self._warned:
                self._warned = True
                logger.warning("%s: %s was replaced and is held by another writer (%s); two writers now write this "
                               "directory", self.logdir, LOCK_NAME, _describe(self._holder_on_disk()))
            return
        self._write_holder(fd)
        os.close(self._fd)
        self._fd = fd
        logger.warning("%s: %s was deleted or replaced while this run writes there; it was put back (the directory "
                       "stayed locked, no other writer got in)", self.logdir, LOCK_NAME)

    role = "claim"

    def write(self, record: ProbeRecord) -> None:
        """Check the lock file (the claim only lives as long as the run's other writers)."""
        self.check()

    def close(self) -> None:
        if self._fd is not None and self._owns_lock_file():
            try:
                os.unlink(self.path)  # while still holding it; a waiter that opened it retries on the new file
            except OSError:
                pass
        self._close_fds()
        self._release_key()

    def _close_fds(self) -> None:
        for name in ("_fd", "_dir_fd"):  # the lock file first, then the directory
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

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
    records = read_jsonl_records(logdir / JSONL_NAME, quiet=True)  # (the lines it skips move with it)
    if not records:
        return None
    target = logdir.with_name(f"{logdir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while os.path.lexists(target):
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


def remove_planted_links(logdir: Path) -> list[Path]:
    """Remove the symbolic links found where the run's files and TensorBoard runs go (each with a warning; their
    targets are untouched), so that nothing is written outside ``logdir`` through them. Returns the links removed."""
    names = [JSONL_NAME, PROBE_FILENAME, ALL_LAYERS_RUN, THRESHOLD_RUN]
    candidates = [logdir / name for name in names] + sorted(logdir.glob("layer_[0-9]*"))
    candidates += sorted(logdir.glob("reference*.safetensors"))
    return [path for path in candidates if remove_link(path)]


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
            remove_planted_links(logdir)
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
