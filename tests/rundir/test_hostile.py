"""Hostile run directories (issue 18, points 4, 7 and 8): a deleted lock file lets no second writer in and closing
never removes another's lock; nothing is written outside the run directory through planted links; damaged JSONL
files are read within bounds (a line-size cap, one summarised warning, a bad byte skips only its line)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tracemalloc

import pytest

import layerwatch
from layerwatch.cli import report
from layerwatch.monitor import LayerWatch
from layerwatch.rundir import jsonl
from layerwatch.rundir.claim import WriterClaim, open_writers
from layerwatch.rundir.files import ALL_LAYERS_RUN, JSONL_NAME, LOCK_NAME, PROBE_FILENAME, write_atomically
from layerwatch.rundir.jsonl import read_jsonl_records
from layerwatch.rundir.record import ProbeRecord
from layerwatch.rundir.writers import JsonlWriter
from helpers import random_probe
from models import tiny_model


def _record(step: int, **extra) -> ProbeRecord:
    return ProbeRecord(step=step, time=0.0, wall_time_s=0.0, layers=[0, 1], metrics={"prompt_entropy": [0.5, 0.4]},
                       **extra)


# ---------------------------------------------------------------------------------------------- the lock (point 4)

_HOLDER = r"""
import sys
from layerwatch.rundir.claim import WriterClaim
claim = WriterClaim(sys.argv[1])
print("READY", flush=True)
for line in sys.stdin:
    if line.strip() == "probe":
        claim.write(None)  # what every probe does: check the lock file
        print("PROBED", flush=True)
    elif line.strip() == "close":
        claim.close()
        print("CLOSED", flush=True)
"""


class _Holder:
    """Another process holding a run directory, as a live writer does."""

    def __init__(self, logdir):
        self.child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(logdir)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self.expect("READY")

    def expect(self, word):
        line = self.child.stdout.readline()
        assert line.startswith(word), line

    def send(self, command, answer):
        self.child.stdin.write(command + "\n")
        self.child.stdin.flush()
        self.expect(answer)

    def stop(self):
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait()


@pytest.mark.slow
def test_a_deleted_lock_file_lets_no_second_writer_in_and_close_removes_only_its_own(tmp_path, caplog):
    logdir = tmp_path / "run"
    logdir.mkdir()
    holder = _Holder(logdir)
    try:
        (logdir / LOCK_NAME).unlink()  # rm layerwatch.lock on a live run
        with pytest.raises(ValueError, match=f"being written by another layerwatch process.*{LOCK_NAME} was deleted"):
            WriterClaim(logdir)
        with pytest.raises(ValueError, match="being written by another"):
            open_writers(logdir, random_probe(prompts=6, length=10, views=0), tensorboard=False, jsonl=True, resume_step=None)
        assert not (logdir / LOCK_NAME).exists()  # the refused newcomers left nothing behind
        holder.send("probe", "PROBED")  # the live writer puts its lock file back at its next probe
        written = json.loads((logdir / LOCK_NAME).read_text())
        assert written["pid"] == holder.child.pid
        with pytest.raises(ValueError, match=f"pid {holder.child.pid}"):
            WriterClaim(logdir)
        # Somebody else's lock file in its place (another tool, an older layerwatch): closing must not remove it.
        (logdir / LOCK_NAME).unlink()
        foreign = json.dumps({"host": "elsewhere", "pid": 1, "token": "not-yours"})
        (logdir / LOCK_NAME).write_text(foreign)
        holder.send("close", "CLOSED")
        assert (logdir / LOCK_NAME).read_text() == foreign
    finally:
        holder.stop()
    (logdir / LOCK_NAME).unlink()
    claim = WriterClaim(logdir)  # the holder is gone: the directory is free
    claim.close()
    assert not (logdir / LOCK_NAME).exists()


def test_a_claim_closing_after_its_lock_file_was_replaced_leaves_the_new_one(tmp_path):
    claim = WriterClaim(tmp_path)
    (tmp_path / LOCK_NAME).unlink()
    (tmp_path / LOCK_NAME).write_text("{}")
    claim.close()
    assert (tmp_path / LOCK_NAME).read_text() == "{}"


# ------------------------------------------------------------------------------------------ links (point 7)


def _plant(tmp_path):
    """Links in a fresh run directory to files and folders outside it; returns (run, outside, snapshot())."""
    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir()
    outside.mkdir()
    for name in (LOCK_NAME, JSONL_NAME, PROBE_FILENAME, "reference_first.safetensors",
                 "reference_previous.safetensors"):
        (outside / name).write_text(f"precious {name}\n")
        (run / name).symlink_to(outside / name)
    for name in ("layer_00", ALL_LAYERS_RUN):
        (outside / name).mkdir()
        (run / name).symlink_to(outside / name, target_is_directory=True)

    def snapshot():
        return {str(p.relative_to(outside)): (p.read_bytes() if p.is_file() else None) for p in outside.rglob("*")}

    return run, outside, snapshot


def test_nothing_is_written_outside_the_run_through_planted_links(tmp_path, caplog):
    run, outside, snapshot = _plant(tmp_path)
    before = snapshot()
    model = tiny_model("gpt2")
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        watch = LayerWatch(random_probe(prompts=6, length=10, views=0), logdir=run, metrics="light")
        (run / "layer_01").symlink_to(outside / "layer_00", target_is_directory=True)  # planted after the start
        for step in (1, 2):
            assert watch.run(model, step) is not None
        watch.close()
    assert snapshot() == before  # not a byte written outside
    for name in (JSONL_NAME, PROBE_FILENAME, "reference_first.safetensors", "layer_00", "layer_01", ALL_LAYERS_RUN):
        assert not (run / name).is_symlink() and (run / name).exists(), name
    assert layerwatch.read_run(run).steps.tolist() == [1, 2]
    assert any("symbolic link" in r.getMessage() for r in caplog.records)


def test_write_atomically_replaces_a_link_and_never_writes_its_target(tmp_path):
    target = tmp_path / "outside.bin"
    target.write_bytes(b"keep")
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "reference_first.safetensors"
    link.symlink_to(target)
    write_atomically(link, b"new")
    assert target.read_bytes() == b"keep" and not link.is_symlink() and link.read_bytes() == b"new"


def test_a_linked_lock_file_is_replaced_not_written_through(tmp_path):
    target = tmp_path / "outside.lock"
    target.write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).symlink_to(target)
    claim = WriterClaim(tmp_path / "run")
    assert target.read_text() == "keep" and not (tmp_path / "run" / LOCK_NAME).is_symlink()
    claim.close()
    assert target.read_text() == "keep"


# ------------------------------------------------------------------------------------ damaged JSONL (point 8)


def _good_lines(*steps) -> str:
    return "".join(_record(step).to_json() + "\n" for step in steps)


def test_a_million_junk_lines_give_one_summarised_warning(tmp_path, caplog):
    path = tmp_path / JSONL_NAME
    path.write_text(_good_lines(1) + "junk\n" * 1_000_000 + _good_lines(2))
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        records = read_jsonl_records(path)
    assert [r.step for r in records] == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "skipped 1000000 line(s)" in warnings[0] and "at line 2" in warnings[0]


def test_an_overlong_line_is_skipped_without_being_held(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / JSONL_NAME
    with open(path, "w") as handle:  # a 20 MB line (a valid JSON record would parse to a GiB-sized object)
        handle.write(_good_lines(1))
        handle.write('{"step": 9, "layers": [0], "metrics": {"x": [' + "1.0, " * 4_000_000 + "1.0]}}\n")
        handle.write(_good_lines(2))
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, logger="layerwatch"):
            records = read_jsonl_records(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.step for r in records] == [1, 2]
    assert peak < 6 << 20, peak  # bounded by the 1 MiB cap, not the 20 MB line
    assert "longer than the 1 MiB line cap" in caplog.text


def test_a_record_over_the_cap_is_written_without_its_per_prompt_values(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 4096)
    writer = JsonlWriter(tmp_path / JSONL_NAME)
    big = _record(1, per_prompt={"prompt_entropy": [[0.123456789] * 400, [0.5] * 400]})
    writer.write(big)
    writer.write(_record(2))
    writer.close()
    records = read_jsonl_records(tmp_path / JSONL_NAME)
    assert [r.step for r in records] == [1, 2] and records[0].per_prompt == {}
    assert records[0].metrics == big.metrics and "per-prompt values" in caplog.text


@pytest.mark.slow
def test_a_non_utf8_byte_skips_only_its_line_training_starts_and_report_draws(tmp_path, caplog):
    run = tmp_path / "run"
    model = tiny_model("gpt2")
    with LayerWatch(random_probe(prompts=6, length=10, views=0), logdir=run, metrics="light") as watch:
        for step in (1, 2):
            watch.run(model, step)
    lines = (run / JSONL_NAME).read_bytes().splitlines(keepends=True)
    (run / JSONL_NAME).write_bytes(lines[0] + lines[1][:40] + b"\xff\xfe" + lines[1][40:] + b'{"step": 3}\n')
    assert layerwatch.read_run(run).steps.tolist() == [1]
    for resume_step in (None, 5):  # LayerWatch() over it starts, appending or resuming
        with caplog.at_level(logging.WARNING, logger="layerwatch"):
            with LayerWatch(random_probe(prompts=6, length=10, views=0), logdir=run, metrics="light", resume_step=resume_step) as watch:
                assert watch.run(model, 4 + (resume_step or 0)) is not None
    assert layerwatch.read_run(run).steps.tolist() == [1, 4, 9]
    assert b"\xff\xfe" in (run / JSONL_NAME).read_bytes()  # the damaged line is skipped, never destroyed
    parser = __import__("argparse").ArgumentParser()
    report.add_arguments(parser)
    assert report.main(parser.parse_args([str(run)])) == 0
    assert (run / "report.html").is_file() and any(p.suffix == ".png" for p in run.rglob("*"))


def test_resume_drops_later_records_and_a_cut_last_line_keeping_junk_lines(tmp_path):
    path = tmp_path / JSONL_NAME
    path.write_text(_good_lines(1) + "junk\n" + _good_lines(2, 3) + '{"step": 4, "lay')
    JsonlWriter(path, resume_step=2).close()
    assert path.read_text() == _good_lines(1) + "junk\n" + _good_lines(2)
