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
from layerwatch.rundir.files import ALL_LAYERS_RUN
from layerwatch.rundir.record import ProbeRecord
from layerwatch.rundir.writers import PICTURE_BACKLOG, PictureThread, WriterGroup, TensorBoardWriter

LAYERS = [0, 1, 2]


def record(step: int) -> ProbeRecord:
    values = [0.9 - 0.1 * layer + 0.01 * step for layer in LAYERS]
    return ProbeRecord(step=step, time=0.0, wall_time_s=0.1, layers=LAYERS, metrics={"prompt_entropy": values})


def image_steps(logdir, tag="layerwatch/heatmap/prompt_entropy") -> list[int]:
    accumulator = EventAccumulator(str(logdir / ALL_LAYERS_RUN), size_guidance={"images": 0})
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


@pytest.mark.slow  # a subprocess
def test_a_script_that_never_closes_still_gets_its_last_pictures(tmp_path):
    subprocess.run([sys.executable, "-c", _NEVER_CLOSED, str(tmp_path)], check=True, timeout=120)
    assert image_steps(tmp_path) == [1, 2, 3]


def test_pictures_show_the_history_as_it_was_at_their_step(tmp_path):
    """The drawing job works on copies: later probes growing the history do not leak into an earlier picture."""
    writer = TensorBoardWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(record(step))
    writer.close()
    accumulator = EventAccumulator(str(tmp_path / ALL_LAYERS_RUN), size_guidance={"images": 0})
    accumulator.Reload()
    for event in accumulator.Images("layerwatch/heatmap/prompt_entropy"):
        seen = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        steps = list(range(1, event.step + 1))
        matrix = np.array([record(s).metrics["prompt_entropy"] for s in steps]).T
        np.testing.assert_array_equal(seen, images.heatmap(matrix, steps, LAYERS, metric="prompt_entropy"))


# ------------------------------------------------------------------------------------- disk use, layout, alerts text


def _tiny_pictures(monkeypatch):
    """Stand-ins for the charts (what is drawn does not matter here, how often does)."""
    tiny = np.zeros((4, 4, 3), dtype=np.uint8)
    monkeypatch.setattr(images, "heatmap", lambda *args, **kwargs: tiny)
    monkeypatch.setattr(images, "depth_profile", lambda *args, **kwargs: tiny)


def test_pictures_are_drawn_on_a_bounded_schedule_while_scalars_stay_complete(tmp_path, monkeypatch):
    from layerwatch.rundir.pictures import PICTURES_ALWAYS, picture_due

    _tiny_pictures(monkeypatch)
    writer = TensorBoardWriter(tmp_path)
    steps = list(range(1, 201))
    for step in steps:
        writer.write(record(step))
    writer.close()
    drawn = image_steps(tmp_path)
    expected = [s for s in steps if picture_due(s)]
    assert drawn == (expected if expected[-1] == 200 else expected + [200])  # the last probe's pictures at close()
    assert drawn[:PICTURES_ALWAYS] == steps[:PICTURES_ALWAYS] and len(drawn) <= 26
    gaps = [later / earlier for earlier, later in zip(drawn, drawn[1:])]
    assert max(gaps[PICTURES_ALWAYS:]) < 1.3  # the newest picture is never more than about a quarter behind
    for layer in LAYERS:  # every probe's scalar, in every layer's run
        accumulator = EventAccumulator(str(tmp_path / f"layer_{layer:02d}"), size_guidance={"scalars": 0})
        accumulator.Reload()
        assert [e.step for e in accumulator.Scalars("layerwatch/prompt_entropy")] == steps
    every = TensorBoardWriter(tmp_path / "every", pictures="every")  # the earlier behaviour, for comparisons
    for step in steps[:30]:
        every.write(record(step))
    every.close()
    assert image_steps(tmp_path / "every") == steps[:30]


def test_the_run_level_events_are_in_a_named_run_not_the_run_folder_itself(tmp_path):
    from layerwatch.rundir.files import THRESHOLD_RUN
    from layerwatch.rundir.runs import find_runs, read_run

    writer = TensorBoardWriter(tmp_path)
    for step in (1, 2, 3):
        bimodal = ProbeRecord(step=step, time=0.0, wall_time_s=0.1, layers=LAYERS, scalars={"best_layer": 2.0},
                              metrics={"prompt_entropy": record(step).metrics["prompt_entropy"],
                                       "prompt_entropy_bimodality": [0.3, 0.6, 0.7]})
        writer.write(bimodal)
    writer.close()
    assert not list(tmp_path.glob("events.out.tfevents.*"))  # TensorBoard would list the folder itself as a run "."
    accumulator = EventAccumulator(str(tmp_path / ALL_LAYERS_RUN), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    assert {"layerwatch/errors", "layerwatch/probe_seconds", "layerwatch/best_layer"} <= set(accumulator.Tags()["scalars"])
    threshold = EventAccumulator(str(tmp_path / THRESHOLD_RUN), size_guidance={"scalars": 0})
    threshold.Reload()  # the 5/9 line, drawn in the bimodality chart beside the layers' lines
    points = threshold.Scalars("layerwatch/prompt_entropy_bimodality")
    assert [e.step for e in points] == [1, 2, 3] and all(abs(e.value - 5 / 9) < 1e-6 for e in points)
    assert find_runs(tmp_path) == [tmp_path]  # one run: its sub-folders belong to it
    run = read_run(tmp_path)  # read back from the events alone (no JSONL here)
    assert run.steps.tolist() == [1, 2, 3] and run.layers == LAYERS
    assert run.metric("prompt_entropy_bimodality")[:, 2].tolist() == pytest.approx([0.7] * 3)
    assert run.scalar("best_layer").tolist() == [2.0] * 3


def test_the_alerts_text_is_updated_at_every_probe(tmp_path):
    writer = TensorBoardWriter(tmp_path)
    alert = "collapse: dataset_entropy at layer 1 is 0.010 at step 2"
    for step in (1, 2, 3, 300):
        writer.write(ProbeRecord(step=step, time=0.0, wall_time_s=0.1, layers=LAYERS,
                                 metrics=record(step).metrics, alerts=[alert] if step == 2 else []))
    writer.close()
    accumulator = EventAccumulator(str(tmp_path / ALL_LAYERS_RUN), size_guidance={"tensors": 0})
    accumulator.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors("layerwatch/alerts/text_summary")}
    assert sorted(texts) == [1, 2, 3, 300]
    assert texts[1].startswith("No alerts (checked at step 1)")
    assert texts[2] == alert
    assert texts[300].startswith("No new alerts (checked at step 300); 1 earlier alert(s), the last at step 2")


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_prints_no_thread_traceback(tmp_path, caplog):
    """TensorBoard's writer thread dies on ENOSPC; its error reaches the writer group (one warning), never a
    thread traceback (the filter above turns one into a test error)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        writers = WriterGroup()
        writers.add(TensorBoardWriter(disk / "run"))
        try:
            with open(disk / "filler", "wb", buffering=0) as handle:
                while True:
                    handle.write(b"\0" * (1 << 16))
        except OSError:
            pass
        for step in range(1, 30):
            writers.write(record(step))
        writers.close()
        assert writers.error_count >= 1 and "No space left" in caplog.text
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_read_run_gives_the_probe_seconds_from_the_jsonl_and_from_the_events_alone(tmp_path):
    from layerwatch.rundir.files import JSONL_NAME
    from layerwatch.rundir.runs import read_run
    from layerwatch.rundir.writers import JsonlWriter

    seconds = {1: 0.25, 2: 1.5, 4: 0.75, 5: 0.5}  # distinct, so a mix-up of steps would show
    writers = [JsonlWriter(tmp_path / JSONL_NAME), TensorBoardWriter(tmp_path)]
    for step, wall in seconds.items():
        if step == 4:
            writers[1].write_errors(3, 1)  # the probe at step 3 failed: counted in TensorBoard only
        for writer in writers:
            writer.write(ProbeRecord(step=step, time=0.0, wall_time_s=wall, layers=LAYERS, metrics=record(step).metrics))
    for writer in writers:
        writer.close()
    from_jsonl = read_run(tmp_path)
    assert from_jsonl.scalar("probe_seconds").tolist() == list(seconds.values())
    assert [r.wall_time_s for r in from_jsonl.records] == list(seconds.values())
    (tmp_path / JSONL_NAME).unlink()
    from_events = read_run(tmp_path)
    assert from_events.steps.tolist() == [1, 2, 4, 5]
    assert from_events.scalar("probe_seconds").tolist() == pytest.approx(list(seconds.values()))
    assert from_events.scalar("errors").tolist() == [0.0, 0.0, 1.0, 1.0]  # the running count at each probe


def test_an_older_run_that_wrote_its_error_count_only_when_it_changed_reads_the_count_at_every_probe(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from layerwatch.rundir.runs import read_run

    for step in (1, 2, 4, 5):  # one layer's run, the layout read back from events alone
        with SummaryWriter(str(tmp_path / "layer_00")) as layer:
            layer.add_scalar("layerwatch/prompt_entropy", 0.5, step)
    with SummaryWriter(str(tmp_path / ALL_LAYERS_RUN)) as run_level:
        run_level.add_scalar("layerwatch/errors", 0, 1)  # at the first probe ...
        run_level.add_scalar("layerwatch/errors", 2, 3)  # ... and when it changed: 2 failures by step 3
    run = read_run(tmp_path)
    assert run.steps.tolist() == [1, 2, 4, 5]
    assert run.scalar("errors").tolist() == [0.0, 0.0, 2.0, 2.0]
