"""TensorBoard pictures are drawn off the training thread: write() returns before they are drawn, nothing is lost at
close() or at exit, a drawing error is handled like any writer failure, and a full backlog makes the probe wait."""

from __future__ import annotations

import io
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from layerwatch.rundir import images
from layerwatch.rundir.record import ProbeRecord
from layerwatch.rundir.writers import PICTURE_BACKLOG, PictureThread, WriterGroup, TensorBoardWriter

LAYERS = [0, 1, 2]


def record(step: int) -> ProbeRecord:
    values = [0.9 - 0.1 * layer + 0.01 * step for layer in LAYERS]
    return ProbeRecord(step=step, time=0.0, wall_time_s=0.1, layers=LAYERS, metrics={"prompt_entropy": values})


def image_steps(logdir, tag="layerwatch/heatmap/prompt_entropy") -> list[int]:
    accumulator = EventAccumulator(str(logdir), size_guidance={"images": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Images(tag)] if tag in accumulator.Tags()["images"] else []


def test_write_returns_before_the_pictures_are_drawn_and_close_waits_for_them(tmp_path, monkeypatch):
    release = threading.Event()
    drawn_on: list[str] = []
    real_heatmap = images.heatmap

    def slow_heatmap(*args, **kwargs):
        drawn_on.append(threading.current_thread().name)
        assert release.wait(30), "the test never released the drawing"
        return real_heatmap(*args, **kwargs)

    monkeypatch.setattr(images, "heatmap", slow_heatmap)
    writer = TensorBoardWriter(tmp_path)
    for step in (1, 2):  # within the backlog: neither write waits for the blocked drawing
        writer.write(record(step))
    assert image_steps(tmp_path) == []  # not drawn yet, but the scalars are written
    assert (tmp_path / "layer_00").is_dir()
    release.set()
    writer.close()
    assert image_steps(tmp_path) == [1, 2]
    assert image_steps(tmp_path, "layerwatch/depth_profile/prompt_entropy") == [1, 2]
    assert drawn_on and all(name.startswith("layerwatch-pictures") for name in drawn_on)
    assert not any(t.name.startswith("layerwatch-pictures") for t in threading.enumerate())  # the thread ended


def test_a_full_backlog_makes_the_next_submit_wait():
    release = threading.Event()
    pictures = PictureThread("layerwatch-pictures-test")
    started = threading.Event()

    def blocked():
        started.set()
        release.wait(30)

    pictures.submit(blocked)
    assert started.wait(10)
    for _ in range(PICTURE_BACKLOG):  # queued behind the job being drawn
        pictures.submit(lambda: None)
    extra = threading.Thread(target=pictures.submit, args=(lambda: None,))
    extra.start()
    extra.join(0.5)
    assert extra.is_alive()  # waiting for room
    release.set()
    extra.join(10)
    assert not extra.is_alive()
    pictures.close()


def test_a_drawing_error_drops_the_writer_like_any_writer_failure(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(images, "heatmap", broken)
    writers = WriterGroup()
    writers.add(TensorBoardWriter(tmp_path))
    writers.write(record(1))
    writers.close()  # the error surfaces here, counted and warned about; nothing reaches the caller
    assert writers.error_count == 1 and "no fonts" in caplog.text

    strict = WriterGroup(strict=True)
    strict.add(TensorBoardWriter(tmp_path / "strict"))
    strict.write(record(1))
    with pytest.raises(RuntimeError, match="no fonts"):
        strict.close()


_NEVER_CLOSED = r"""
import sys
from layerwatch.rundir.record import ProbeRecord
from layerwatch.rundir.writers import TensorBoardWriter
writer = TensorBoardWriter(sys.argv[1])
for step in (1, 2, 3):
    writer.write(ProbeRecord(step=step, time=0.0, wall_time_s=0.1, layers=[0, 1], metrics={"prompt_entropy": [0.5, 0.4]}))
# no close(): the script ends here
"""


def test_a_script_that_never_closes_still_gets_its_last_pictures(tmp_path):
    subprocess.run([sys.executable, "-c", _NEVER_CLOSED, str(tmp_path)], check=True, timeout=120)
    assert image_steps(tmp_path) == [1, 2, 3]


def test_pictures_show_the_history_as_it_was_at_their_step(tmp_path):
    """The drawing job works on copies: later probes growing the history do not leak into an earlier picture."""
    writer = TensorBoardWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(record(step))
    writer.close()
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    accumulator.Reload()
    for event in accumulator.Images("layerwatch/heatmap/prompt_entropy"):
        seen = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        steps = list(range(1, event.step + 1))
        matrix = np.array([record(s).metrics["prompt_entropy"] for s in steps]).T
        np.testing.assert_array_equal(seen, images.heatmap(matrix, steps, LAYERS, metric="prompt_entropy"))
