"""Run directory and writers: the file names, the one-writer rule, the Writer base class and the heatmap history."""

import random

import numpy as np
import pytest

from layerwatch.monitor import LayerWatch
from layerwatch.rundir.record import ProbeRecord
from layerwatch.rundir.claim import WriterClaim, open_writers
from layerwatch.rundir.files import JSONL_NAME, PROBE_FILENAME
from layerwatch.rundir.writers import HeatmapHistory, JsonlWriter, Writer, TensorBoardWriter
from helpers import random_probe


def _record(step, metrics, layers=3):
    return ProbeRecord(step=step, time=0.0, wall_time_s=0.0, layers=list(range(layers)), metrics=metrics)


def test_heatmap_history_equals_a_rebuild_from_all_records():
    """Grown column by column (with repeats, earlier steps and metrics that come and go) = rebuilt from scratch."""
    rng = random.Random(0)
    history, seen = HeatmapHistory(), {}
    for _ in range(60):
        step = rng.choice([rng.randrange(0, 200), max(seen, default=0) + rng.randrange(1, 5)])
        names = [n for n in ("a", "b", "c") if rng.random() < 0.7]
        metrics = {n: [rng.random() for _ in range(3)] for n in names}
        history.add(_record(step, metrics))
        seen[step] = metrics  # a step seen again: the later record wins
        steps = sorted(seen)
        assert history.steps == steps
        for name in {n for m in seen.values() for n in m}:
            expected = np.array([seen[s].get(name, [np.nan] * 3) for s in steps]).T
            np.testing.assert_array_equal(history.matrix(name), expected)


def test_writer_base_class_defaults():
    class Counting(Writer):
        def __init__(self):
            self.records = []

        def write(self, record):
            self.records.append(record.step)

    writer = Counting()
    writer.write(_record(3, {}))
    writer.write_errors(3, 1)  # no-op by default
    writer.close()
    writer.close()
    assert writer.records == [3]
    with pytest.raises(NotImplementedError, match="must implement write"):
        Writer().write(_record(1, {}))
    assert issubclass(JsonlWriter, Writer) and issubclass(TensorBoardWriter, Writer)


def test_writers_argument_without_write_is_refused_naming_it():
    with pytest.raises(TypeError, match="writers= holds"):
        LayerWatch(random_probe(prompts=6, length=10, views=0), logdir=None, writers=[object()])


def test_open_writers_writes_the_run_files_and_claims_the_directory(tmp_path):
    writers = open_writers(tmp_path, random_probe(prompts=6, length=10, views=0), tensorboard=True, jsonl=True, resume_step=None)
    assert [type(s) for s in writers] == [JsonlWriter, TensorBoardWriter, WriterClaim]
    assert (tmp_path / PROBE_FILENAME).is_file() and (tmp_path / JSONL_NAME).is_file()
    with pytest.raises(ValueError, match="already has a live layerwatch writer in this process"):
        open_writers(tmp_path, random_probe(prompts=6, length=10, views=0), tensorboard=True, jsonl=True, resume_step=None)
    for writer in writers:
        writer.close()
    second = open_writers(tmp_path, random_probe(prompts=6, length=10, views=0), tensorboard=True, jsonl=False, resume_step=None)  # released on close
    assert [type(s) for s in second] == [TensorBoardWriter, WriterClaim]
    for writer in second:
        writer.close()


def test_a_lock_file_that_cannot_be_opened_is_a_clear_logdir_error(tmp_path):
    (tmp_path / "layerwatch.lock").mkdir()  # os.open(O_RDWR) of a directory fails, as on a read-only folder
    with pytest.raises(ValueError, match=r"logdir=.* is not writable .*pass a directory you can write to"):
        open_writers(tmp_path, random_probe(prompts=6, length=10, views=0), tensorboard=True, jsonl=True, resume_step=None)
    (tmp_path / "layerwatch.lock").rmdir()
    for writer in open_writers(tmp_path, random_probe(prompts=6, length=10, views=0), tensorboard=False, jsonl=True, resume_step=None):  # the key was released
        writer.close()
