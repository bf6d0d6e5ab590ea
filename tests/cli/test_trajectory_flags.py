"""``layerwatch trajectory``'s flags (issue 17 point 4, issue 21 point 4): one parser for the shared flags, and every
mistake exits 2 with ONE line on stderr naming the flag and the fix, no traceback, no empty output folder."""

from __future__ import annotations

import pytest

from layerwatch import read_run
from layerwatch.cli import main as layerwatch_main
from layerwatch.cli import options
from layerwatch.metrics import names, registry
from layerwatch.probe import Probe
from tests.analysis.checkpoint_suite import labelled_sentences, save_checkpoints, save_probe


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    save_checkpoints(root / "out", steps=(10, 20))
    return {"out": root / "out", "probe": save_probe(root / "probe.safetensors")}


def one_error_line(capsys, flag):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("layerwatch trajectory: error: ") and flag in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def trajectory(*argv):
    return layerwatch_main(["trajectory", *map(str, argv)])


# ------------------------------------------------------------------------------------------------------ --metrics
def test_parse_metrics_takes_a_preset_a_name_or_a_list():
    assert options.parse_metrics("standard") == "standard"
    assert options.parse_metrics(names.DIME) == [names.DIME]
    assert options.parse_metrics(f" {names.DIME} , {names.LIDAR},") == [names.DIME, names.LIDAR]
    assert options.parse_metrics("health") == ["health"]
    assert options.metric_names("light") == list(registry.preset("light"))
    assert options.parse_metrics("old_metric", known_only=False) == ["old_metric"]
    for bad, says in (("nonsense", "unknown metric 'nonsense'"), ("", "is empty"), (" , ", "is empty"),
                      (f"standard,{names.DIME}", "a preset cannot be part of a list")):
        with pytest.raises(options.FlagError, match=says) as caught:
            options.parse_metrics(bad)
        assert caught.value.flag == "--metrics" and "\n" not in str(caught.value)
    with pytest.raises(options.FlagError, match="is a preset"):
        options.parse_metrics("light", presets=False)


def test_a_single_metric_name_works(suite, tmp_path, capsys):
    out = tmp_path / "run"
    assert trajectory(suite["out"], "--probe", suite["probe"], "--metrics", names.DIME, "--out", out, "--quiet") == 0
    run = read_run(out)
    assert run.steps.tolist() == [10, 20]
    assert names.DIME in run.metrics and names.PROMPT_ENTROPY not in run.metrics


def test_a_bad_metrics_exits_2_with_one_line_and_no_folder(suite, tmp_path, capsys):
    out = tmp_path / "run"
    assert trajectory(suite["out"], "--probe", suite["probe"], "--metrics", "nonsense", "--out", out) == 2
    line = one_error_line(capsys, "--metrics")
    assert "nonsense" in line and "standard" in line and names.DIME in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------- --out
def test_an_out_that_is_a_file_exits_2(suite, tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("not a folder")
    assert trajectory(suite["out"], "--probe", suite["probe"], "--out", file) == 2
    assert "is a file" in one_error_line(capsys, "--out")
    assert trajectory(suite["out"], "--probe", suite["probe"], "--out", file / "below") == 2
    assert "which is a file" in one_error_line(capsys, "--out")
    assert file.read_text() == "not a folder"


def test_a_failure_after_the_folder_was_made_leaves_no_empty_folder(suite, tmp_path, capsys):
    """The probe's vocabulary does not fit the model: found only once the run folder exists; it is removed."""
    import torch

    big = tmp_path / "big.safetensors"
    Probe.from_tensors(torch.arange(900, 1000).reshape(4, 25), vocab_size=1000).save(big)
    out = tmp_path / "deep" / "run"
    assert trajectory(suite["out"], "--probe", big, "--out", out, "--metrics", "light") == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "deep").exists()


# -------------------------------------------------------------------------------------------- --texts, --labels
@pytest.mark.parametrize("case", ["missing", "folder", "latin-1", "empty"])
def test_a_bad_texts_file_exits_2(suite, tmp_path, capsys, case):
    texts = tmp_path / "texts.txt"
    if case == "folder":
        texts.mkdir()
    elif case == "latin-1":
        texts.write_bytes("le caf\xe9 est chaud\nune phrase\n".encode("latin-1"))
    elif case == "empty":
        texts.write_text("\n  \n")
    out = tmp_path / "run"
    assert trajectory(suite["out"], "--texts", texts, "--out", out) == 2
    line = one_error_line(capsys, "--texts")
    assert {"missing": "cannot read", "folder": "is a folder", "latin-1": "not UTF-8",
            "empty": "no non-empty lines"}[case] in line
    assert not out.exists()


def test_labels_from_a_file_or_a_tsv_enable_probe_accuracy(suite, tmp_path, capsys):
    texts, labels = labelled_sentences()
    plain, label_file, tsv = tmp_path / "texts.txt", tmp_path / "labels.txt", tmp_path / "texts.tsv"
    plain.write_text("\n".join(texts) + "\n")
    label_file.write_text("\n".join(labels) + "\n")
    tsv.write_text("".join(f"{label}\t{text}\n" for label, text in zip(labels, texts)))
    wanted = f"{names.PROBE_ACCURACY},{names.PROMPT_ENTROPY}"
    runs = {}
    for key, flags in (("labels", ["--texts", plain, "--labels", label_file]), ("tsv", ["--texts", tsv])):
        out = tmp_path / key
        assert trajectory(suite["out"], *flags, "--metrics", wanted, "--out", out, "--quiet") == 0, capsys.readouterr().err
        probe = Probe.load(out / "probe.safetensors")
        assert probe.labels == labels and probe.num_prompts == len(texts)
        runs[key] = read_run(out)
        accuracy = runs[key].metric(names.PROBE_ACCURACY)
        assert accuracy.shape == (2, 3) and ((accuracy >= 0) & (accuracy <= 1)).all()
        assert names.BEST_LAYER in runs[key].scalars  # computed whenever probe_accuracy is
    assert (runs["labels"].metric(names.PROBE_ACCURACY) == runs["tsv"].metric(names.PROBE_ACCURACY)).all()


def test_label_mistakes_exit_2(suite, tmp_path, capsys):
    texts, labels = labelled_sentences()
    plain, short, tsv = tmp_path / "texts.txt", tmp_path / "short.txt", tmp_path / "texts.tsv"
    plain.write_text("\n".join(texts))
    short.write_text("\n".join(labels[:-1]))
    tsv.write_text("animal\tthe cat\nno tab on this line\n")
    out = tmp_path / "run"
    assert trajectory(suite["out"], "--texts", plain, "--labels", short, "--out", out) == 2
    assert f"{len(labels) - 1} label(s) for {len(texts)} text(s)" in one_error_line(capsys, "--labels")
    assert trajectory(suite["out"], "--probe", suite["probe"], "--labels", short, "--out", out) == 2
    assert "add --texts" in one_error_line(capsys, "--labels")
    assert trajectory(suite["out"], "--texts", tsv, "--out", out) == 2
    assert "line 2" in one_error_line(capsys, "--texts")
    assert trajectory(suite["out"], "--texts", tsv, "--labels", short, "--out", out) == 2
    assert "already holds labels" in one_error_line(capsys, "--labels")
    assert not out.exists()


# -------------------------------------------------------------------------------------------------------- --shard
@pytest.mark.parametrize("value", ["3/2", "0/2", "1", "a/b", "1/0"])
def test_a_bad_shard_exits_2(suite, tmp_path, capsys, value):
    out = tmp_path / "run"
    assert trajectory(suite["out"], "--probe", suite["probe"], "--shard", value, "--out", out) == 2
    line = one_error_line(capsys, "--shard")
    assert "K/N" in line or "between 1 and N" in line
    assert not out.exists()


# --------------------------------------------------------------------------------------------------- --device-map
def test_device_map_auto_loads_through_accelerate(suite, tmp_path, capsys):
    """`--device-map auto` hands the placement to accelerate (from_pretrained(device_map="auto")); on a CPU-only
    machine everything lands on the CPU, so the values equal a plain load's."""
    pytest.importorskip("accelerate")
    import torch

    from layerwatch.analysis.trajectory import TrajectoryError, load_checkpoint

    model = load_checkpoint(suite["out"] / "checkpoint-10", device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    if not torch.cuda.is_available():  # the map reaches from_pretrained: one naming a missing GPU fails there
        with pytest.raises(TrajectoryError, match="cannot load the model"):
            load_checkpoint(suite["out"] / "checkpoint-10", device_map="cuda:7")
    runs = {}
    for key, extra in (("plain", []), ("auto", ["--device-map", "auto"])):
        out = tmp_path / key
        assert trajectory(suite["out"], "--probe", suite["probe"], "--metrics", "light", "--out", out, "--quiet",
                          "--no-tensorboard", *extra) == 0
        runs[key] = read_run(out)
    for metric in runs["plain"].metrics:
        assert runs["auto"].metric(metric) == pytest.approx(runs["plain"].metric(metric), rel=1e-6, nan_ok=True)
