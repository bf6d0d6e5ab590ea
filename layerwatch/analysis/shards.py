"""A checkpoint replay split between processes: ``torchrun``/``accelerate launch`` ranks or ``--shard K/N`` jobs (SPEC §8).

The checkpoints (or revisions), sorted by step, are cut into N contiguous blocks; shard K (1-based) replays block K.
No process group is created and no collective runs: each shard works alone, so shards may run one after the other,
at the same time, or on different machines that share the output folder.

Layout of the output folder ``OUT``::

    OUT/shards/shard-K-of-N/      shard K's own run directory (layerwatch.jsonl, probe, CKA references), no TensorBoard
    OUT/shards/shard-K-of-N/shard-done.json   written when shard K has replayed its whole block
    OUT/layerwatch.jsonl, OUT/probe.safetensors, OUT/layer_NN/ (TensorBoard), OUT/reference_*.safetensors
                                  the merged run, written by the shard that finishes last

A shard that finishes writes its ``shard-done.json``, then takes ``OUT/shards/merge.lock`` (a blocking ``flock``) and
looks at the others: when all N are done it appends every record not yet in ``OUT/layerwatch.jsonl`` (in step order,
through the usual writers, TensorBoard included), so ``read_run(OUT)`` and ``layerwatch report OUT`` see one run in
step order with no extra command. Whoever writes its marker last sees all N markers, so exactly one merge writes
what is missing. A killed shard leaves no marker; rerun, it skips the checkpoints its part (or the merged run)
already holds and replays only the missing ones.

``cka_to_previous`` and ``cka_to_first`` compare a probe with the previous and the first checkpoint of the whole
replay. A shard that starts after the first checkpoint therefore first probes, without recording them, the replay's
first checkpoint and the one just before its block, and takes their pooled embeddings as its references (at most two
extra probes per shard, only when a CKA metric is asked for): every value equals a one-process replay's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from layerwatch.analysis.revisions import Revision, RevisionUnavailable
from layerwatch.analysis.trajectory import (
    Checkpoint,
    TrajectoryError,
    completed_steps,
    load_checkpoint,
    free_memory,
    run_trajectory,
)
from layerwatch.metrics import names, registry
from layerwatch.monitor import LayerWatch
from layerwatch.monitor.references import REFERENCE_FILES
from layerwatch.probe import Probe
from layerwatch.rundir.claim import open_writers
from layerwatch.rundir.files import JSONL_NAME, PROBE_FILENAME, write_atomically
from layerwatch.rundir.runs import Run, read_run
from layerwatch.rundir.writers import read_jsonl_records

try:  # POSIX; elsewhere the merge relies on the markers alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
DONE_NAME = "shard-done.json"
MERGE_LOCK = "merge.lock"
_SHARD_VALUE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_PART_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")

#: What a shard replays: checkpoint folders, or revisions of one repository (resolved by ``checkpoint_of``).
Item = Union[Checkpoint, Revision]


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``; ``local_rank`` is set under a launcher (the device to use)."""

    index: int
    count: int
    local_rank: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count}: K must be between 1 and N")

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def take(self, items: Sequence[Any]) -> list[Any]:
        """This shard's contiguous block of ``items`` (blocks differ in length by at most one)."""
        start = (self.index - 1) * len(items) // self.count
        stop = self.index * len(items) // self.count
        return list(items[start:stop])


def parse_shard(value: str) -> Shard:
    """``"K/N"`` (1-based K) as a :class:`Shard`; ValueError naming the expected form otherwise."""
    match = _SHARD_VALUE.match(value or "")
    if not match:
        raise ValueError(f"{value!r} is not K/N; give the shard's number and the number of shards, e.g. 1/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f"{value!r}: K must be between 1 and N (1-based), e.g. 1/{max(count, 2)}")
    return Shard(index, count)


def launcher_shard(env: Mapping[str, str] | None = None) -> Shard | None:
    """The shard of this process under ``torchrun`` / ``accelerate launch`` (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``), or None outside a launcher or with one process."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return None
    if world <= 1:
        return None
    return Shard(rank + 1, world, local_rank)


def part_dir(out: str | Path, shard: Shard) -> Path:
    """Where ``shard`` writes its part of the run."""
    return Path(out) / SHARDS_DIR / shard.name


# ----------------------------------------------------------------------------------------------- the references
def _needs_references(metrics: str | Sequence[str]) -> bool:
    wanted = registry.resolve_metrics(metrics)[1]
    return any(registry.REFERENCE in registry.REGISTRY[name].needs for name in wanted)


def _reference_step(folder: Path, which: str) -> int | None:
    from safetensors import safe_open

    path = folder / REFERENCE_FILES[which]
    try:
        with safe_open(str(path), framework="pt") as file:
            return int((file.metadata() or {})["step"])
    except Exception:  # noqa: BLE001 - missing or unreadable: not a usable reference
        return None


def _available(items: Sequence[Item], checkpoint_of: Callable[[Item], Checkpoint]) -> Iterator[Checkpoint]:
    for item in items:
        try:
            yield checkpoint_of(item)
        except RevisionUnavailable:
            continue


def _reference_checkpoints(
    items: Sequence[Item], first_pending: Item, checkpoint_of: Callable[[Item], Checkpoint]
) -> tuple[Checkpoint, Checkpoint] | None:
    """The replay's first available checkpoint and the last available one before ``first_pending`` (None when
    ``first_pending`` is the first)."""
    before = [item for item in items if item.step < first_pending.step]
    previous = next(_available(list(reversed(before)), checkpoint_of), None)
    if previous is None:
        return None
    first = next(_available(before, checkpoint_of))
    return first, previous


def prime_references(
    part: Path,
    items: Sequence[Item],
    first_pending: Item,
    probe: Probe,
    *,
    checkpoint_of: Callable[[Item], Checkpoint],
    load: dict[str, Any],
    batch_size: int = 16,
) -> int:
    """Give ``part`` the CKA references a one-process replay would have before ``first_pending``: the pooled
    embeddings of the replay's first checkpoint and of the one just before. Probes them (unrecorded) only when the
    part's reference files are not already those; returns the number of extra probes."""
    wanted = _reference_checkpoints(items, first_pending, checkpoint_of)
    if wanted is None:
        return 0
    first, previous = wanted
    if _reference_step(part, "first") == first.step and _reference_step(part, "previous") == previous.step:
        return 0
    for stale in part.glob(".references-*"):  # left by a shard killed while it took its references
        shutil.rmtree(stale, ignore_errors=True)
    scratch = part / f".references-{os.getpid()}"
    order = [first] if first.step == previous.step else [first, previous]
    watch = LayerWatch(
        probe, logdir=str(scratch), metrics=[names.CKA_TO_PREVIOUS], batch_size=batch_size,
        tensorboard=False, jsonl=False, strict=True,
    )
    try:
        for checkpoint in order:
            model = load_checkpoint(checkpoint, **load)
            try:
                watch.run(model, checkpoint.step)
            finally:
                del model
                free_memory()
    finally:
        watch.close()
    for file_name in REFERENCE_FILES.values():
        os.replace(scratch / file_name, part / file_name)
    shutil.rmtree(scratch, ignore_errors=True)
    return len(order)


# ---------------------------------------------------------------------------------------------------- one shard
@dataclasses.dataclass
class ShardOutcome:
    """What one shard did: the steps it probed now, the ones it found done, the skipped revisions (name → reason),
    the extra (unrecorded) reference probes, and the merged run when this shard completed it (else None)."""

    shard: Shard
    probed: list[int]
    already: list[int]
    skipped: dict[str, str]
    reference_probes: int
    run: Run | None


def run_shard(
    items: Sequence[Item],
    shard: Shard,
    *,
    out: str | Path,
    probe: Probe,
    metrics: str | Sequence[str] = "standard",
    checkpoint_of: Callable[[Item], Checkpoint] | None = None,
    tensorboard: bool = True,
    on_checkpoint: Callable[[Checkpoint, dict[str, float]], None] | None = None,
    **options: Any,
) -> ShardOutcome:
    """Replay ``shard``'s block of ``items`` into its part of ``out``, then merge the run if every shard is done.

    Args:
        items: every checkpoint (or revision) of the replay; sorted by step here, the same list in every shard.
        shard: which block to replay.
        out: the run directory that the merge writes (the part goes to ``out/shards/shard-K-of-N``).
        probe: the replay's probe (the same in every shard: build it from the replay's first checkpoint).
        metrics: as for :func:`layerwatch.analysis.trajectory.run_trajectory`.
        checkpoint_of: resolves an item to its checkpoint (revisions: download or find it; RevisionUnavailable
            skips it). Default: the item is a :class:`Checkpoint`.
        tensorboard: the merged run's TensorBoard files (parts never write any).
        on_checkpoint: called after each probed checkpoint with its timings.
        options: ``device``, ``dtype``, ``batch_size``, ``alpha``, ``allow_pickle``, ``device_map``.
    """
    checkpoint_of = checkpoint_of or _as_checkpoint
    items = sorted(items, key=lambda item: item.step)
    block, part = shard.take(items), part_dir(out, shard)
    done = completed_steps(out) | completed_steps(part)
    pending = [item for item in block if item.step not in done]
    outcome = ShardOutcome(shard, [], [i.step for i in block if i.step in done], {}, 0, None)
    if pending:  # not done until this block is: a merge meanwhile must not take the part as finished
        (part / DONE_NAME).unlink(missing_ok=True)
    if pending and _needs_references(metrics):
        part.mkdir(parents=True, exist_ok=True)
        load = {k: options[k] for k in ("device", "dtype", "allow_pickle", "device_map") if k in options}
        outcome.reference_probes = prime_references(
            part, items, pending[0], probe, checkpoint_of=checkpoint_of, load=load,
            batch_size=options.get("batch_size", 16),
        )
    replay = {"probe": probe, "out": part, "metrics": metrics, "tensorboard": False, **options}
    if checkpoint_of is _as_checkpoint:  # plain folders: one monitor for the whole block
        if pending:
            run_trajectory(pending, on_checkpoint=on_checkpoint, **replay)
        outcome.probed = [item.step for item in pending]
    for item in pending if checkpoint_of is not _as_checkpoint else []:  # revisions: resolved one at a time
        try:
            checkpoint = checkpoint_of(item)
        except RevisionUnavailable as error:
            logger.warning("revision %s skipped: %s", getattr(item, "name", item), error)
            outcome.skipped[str(getattr(item, "name", item.step))] = str(error)
            continue
        report = None if on_checkpoint is None else (lambda _c, timings, item=item: on_checkpoint(item, timings))
        run_trajectory([checkpoint], on_checkpoint=report, **replay)
        outcome.probed.append(item.step)
    part.mkdir(parents=True, exist_ok=True)
    marker = {"index": shard.index, "count": shard.count, "steps": [i.step for i in block], "skipped": outcome.skipped}
    write_atomically(part / DONE_NAME, json.dumps(marker).encode("utf-8"))
    outcome.run = merge_if_complete(out, shard.count, probe, tensorboard=tensorboard)
    return outcome


def _as_checkpoint(item: Item) -> Checkpoint:
    if not isinstance(item, Checkpoint):
        raise TypeError(f"{item!r} is not a Checkpoint; pass checkpoint_of= to resolve it")
    return item


# ---------------------------------------------------------------------------------------------------- the merge
@contextlib.contextmanager
def _merge_lock(out: Path) -> Iterator[None]:
    """Hold ``out/shards/merge.lock`` (blocking): one merge at a time, across processes and hosts sharing ``out``."""
    folder = out / SHARDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder / MERGE_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without flock: the markers alone
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the flock


def _parts(out: Path) -> list[Path]:
    folder = out / SHARDS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _PART_DIR.match(p.name))


def shards_done(out: str | Path, count: int) -> list[int]:
    """The shards (1-based) of a ``count``-way replay into ``out`` that have finished their block."""
    return [k for k in range(1, count + 1) if (part_dir(out, Shard(k, count)) / DONE_NAME).is_file()]


def merge_if_complete(out: str | Path, count: int, probe: Probe, *, tensorboard: bool = True) -> Run | None:
    """When all ``count`` shards are done, add every part's records that ``out`` lacks to ``out`` (in step order)
    and return the merged run; None while a shard is missing. Safe to call from every shard at any time."""
    out = Path(out)
    with _merge_lock(out):
        if len(shards_done(out, count)) < count:
            return None
        merged = {record.step for record in read_jsonl_records(out / JSONL_NAME)}
        new: dict[int, Any] = {}
        for part in _parts(out):
            _check_part_probe(part, probe)
            for record in read_jsonl_records(part / JSONL_NAME):
                if record.step not in merged:
                    new.setdefault(record.step, record)
        if new or not (out / PROBE_FILENAME).is_file():
            _append(out, probe, [new[step] for step in sorted(new)], tensorboard=tensorboard)
        _copy_references(out)
    return read_run(out) if (out / JSONL_NAME).is_file() else None


def _check_part_probe(part: Path, probe: Probe) -> None:
    saved = part / PROBE_FILENAME
    if saved.is_file() and Probe.load(saved).series_hash(0) != probe.series_hash(0):
        raise TrajectoryError(
            f"{part} was probed with another probe than this shard's (other prompts); every shard of a replay must "
            f"use the same --probe or --texts. Remove {part} or give another --out"
        )


def _append(out: Path, probe: Probe, records: list[Any], *, tensorboard: bool) -> None:
    try:
        writers = open_writers(out, probe, tensorboard=tensorboard, jsonl=True, resume_step=None)
    except ValueError as error:
        raise TrajectoryError(f"cannot merge the shards into {out}: {error}") from error
    try:
        for record in records:
            for writer in writers:
                writer.write(record)
    finally:
        for writer in writers:
            writer.close()


def _copy_references(out: Path) -> None:
    """Give the merged run the CKA references of its first and last step, so an unsharded replay continues it."""
    parts = _parts(out)
    for which, file_name in REFERENCE_FILES.items():
        found = [(step, part) for part in parts if (step := _reference_step(part, which)) is not None]
        if not found:
            continue
        step, part = (min if which == "first" else max)(found)
        current = _reference_step(out, which)
        if current is None or (current > step if which == "first" else current < step):
            write_atomically(out / file_name, (part / file_name).read_bytes())
