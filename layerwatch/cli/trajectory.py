"""``layerwatch trajectory``: probe saved checkpoints (or Hub revisions) and write them as one run.

The command line only: flags, messages and exit codes. The work is done by the engines in :mod:`layerwatch.analysis`:
:mod:`~layerwatch.analysis.trajectory` (checkpoints), :mod:`~layerwatch.analysis.revisions` (``--revisions``) and
:mod:`~layerwatch.analysis.shards` (``--shard K/N``, ``torchrun``/``accelerate launch``). Examples::

    layerwatch trajectory runs/my-model --probe runs/my-model/layerwatch/probe.safetensors
    layerwatch trajectory runs/my-model --texts prompts.tsv --metrics probe_accuracy,best_layer   # label<TAB>text
    torchrun --nproc_per_node 8 --no-python layerwatch trajectory runs/my-model --texts prompts.txt --out runs/traj
    layerwatch trajectory runs/my-model --texts prompts.txt --out runs/traj --shard $((SLURM_ARRAY_TASK_ID+1))/8

Exit codes: 0 done, 2 a mistake in the command (one line on stderr naming the flag or the input and the fix),
3 (:data:`layerwatch.analysis.revisions.EXIT_SKIPPED`) some revisions were skipped, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from layerwatch.analysis import revisions, shards
from layerwatch.analysis.summary import summary_table
from layerwatch.analysis.trajectory import (
    DEFAULT_OUT_NAME,
    DTYPES,
    Checkpoint,
    TrajectoryError,
    completed_steps,
    discover_checkpoints,
    load_tokenizer,
    run_trajectory,
    texts_probe,
)
from layerwatch.cli import options
from layerwatch.probe import Probe
from layerwatch.rundir.files import PROBE_FILENAME
from layerwatch.rundir.runs import Run

PROG = "layerwatch trajectory"
DEVICE_MAPS = ("auto",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``layerwatch trajectory`` arguments to ``parser``."""
    parser.description = (
        "Probe saved checkpoints with one fixed probe and write them as one layerwatch run (step = checkpoint step)."
    )
    parser.add_argument(
        "checkpoints", nargs="+", metavar="CHECKPOINT_DIR",
        help="a Trainer output_dir (its checkpoint-<step> folders are used) or checkpoint folders; with --revisions, "
        "one Hub repository ORG/NAME (or a local folder in the Hugging Face cache layout)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--revisions", metavar="R1,R2,...",
        help="probe these revisions of the Hub repository ORG/NAME given as the one input (e.g. step1000,step2000); "
        "the step comes from the name (step<N>) or --steps",
    )
    group.add_argument("--revisions-file", metavar="FILE", help="like --revisions, one revision per line")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--probe", metavar="PROBE",
        help="a saved probe (.safetensors), e.g. <output_dir>/layerwatch/probe.safetensors from the training run. "
        "Default: the probe of an existing run in --out, else <input>/layerwatch/probe.safetensors",
    )
    source.add_argument(
        "--texts", metavar="FILE",
        help="build the probe from this UTF-8 text file (one prompt per line, or label<TAB>text lines) with the "
        "checkpoint's tokenizer",
    )
    options.add_common_flags(
        parser, out_help=f"run directory (default: <first input>/{DEFAULT_OUT_NAME})", texts=True
    )
    _add_probe_flags(parser)
    _add_load_flags(parser)
    parser.add_argument("--no-tensorboard", action="store_true", help="write only layerwatch.jsonl")
    parser.add_argument("--quiet", action="store_true", help="print only errors")


def _add_probe_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder for --texts (default: the checkpoint's)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per prompt for --texts (default 128)")
    parser.add_argument("--num-prompts", type=int, default=64, help="prompts taken from --texts (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe's augmented views (default 0)")
    parser.add_argument(
        "--steps", type=int, nargs="+", metavar="STEP",
        help="the step of each explicit checkpoint folder (or revision), in the order given",
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="Renyi order of the entropies (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="probe prompts per forward pass (default 16)")


def _add_load_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=None,
        help="cpu (default), cuda, cuda:N; under torchrun/accelerate launch each process uses cuda:LOCAL_RANK when "
        "CUDA is available",
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
    parser.add_argument(
        "--device-map", choices=DEVICE_MAPS, default=None,
        help="auto: spread each model over this machine's devices (accelerate's big-model loading), for a model "
        "larger than one device",
    )
    parser.add_argument(
        "--shard", metavar="K/N",
        help="replay only the K-th (1-based) of N contiguous parts of the checkpoints, for job arrays; shards may run "
        "at the same time into one --out, and the last to finish merges them into one run",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="also load pickle-based weights (pytorch_model.bin). Unpickling can run arbitrary code: only for "
        "checkpoints you trust",
    )


# -------------------------------------------------------------------------------------------- checking the flags
def _shard(args: argparse.Namespace) -> shards.Shard | None:
    launched = shards.launcher_shard()
    if args.shard is None:
        return launched
    if launched is not None:
        raise options.FlagError(
            "--shard", f"this process runs under a launcher (WORLD_SIZE={launched.count}), which already splits the "
            "checkpoints; drop --shard, or run one process per shard"
        )
    try:
        return shards.parse_shard(args.shard)
    except ValueError as error:
        raise options.FlagError("--shard", str(error)) from error


def _device(args: argparse.Namespace, shard: shards.Shard | None) -> str:
    """``--device``; under a launcher, ``cuda`` (or no --device with CUDA available) is ``cuda:LOCAL_RANK``."""
    device = args.device
    if shard is not None and shard.local_rank is not None and torch.cuda.is_available():
        if device in (None, "cuda"):
            return f"cuda:{shard.local_rank}"
    return device or "cpu"


def _checked(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag checked before anything is loaded or created; FlagError on the first mistake."""
    metrics = options.parse_metrics(args.metrics)
    if args.labels and not args.texts:
        raise options.FlagError("--labels", "labels go with --texts FILE (one label per text line); add --texts")
    texts, labels = (None, None)
    if args.texts:
        texts, labels = options.read_labelled_texts(args.texts, args.labels)
    if args.tokenizer and not Path(args.tokenizer).exists() and not args.revisions and not args.revisions_file:
        raise options.FlagError("--tokenizer", f"{args.tokenizer} does not exist; give a tokenizer folder")
    shard = _shard(args)
    return {
        "metrics": metrics, "texts": texts, "labels": labels, "shard": shard,
        "device": _device(args, shard), "device_map": args.device_map,
    }


def _run_options(args: argparse.Namespace, checked: dict[str, Any]) -> dict[str, Any]:
    """The engine's options (:func:`layerwatch.analysis.trajectory.run_trajectory`'s keywords)."""
    return {
        "metrics": checked["metrics"], "device": checked["device"], "dtype": args.dtype,
        "batch_size": args.batch_size, "alpha": args.alpha, "tensorboard": not args.no_tensorboard,
        "device_map": checked["device_map"],
    }


# ------------------------------------------------------------------------------------------------------ the probe
def _probe_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_length": args.max_length, "num_prompts": args.num_prompts, "seed": args.seed}


def _saved_probe(inputs: Sequence[str], out: Path, shard: shards.Shard | None) -> Path | None:
    """An existing probe to reuse: the run's in --out (or this shard's part), else <input>/layerwatch/'s."""
    candidates = [out / PROBE_FILENAME]
    if shard is not None:
        candidates.append(shards.part_dir(out, shard) / PROBE_FILENAME)
    candidates += [Path(raw) / "layerwatch" / PROBE_FILENAME for raw in inputs]
    return next((path for path in candidates if path.is_file()), None)


def _load_probe(path: str | Path) -> Probe:
    try:
        return Probe.load(path)
    except (OSError, ValueError) as error:
        raise TrajectoryError(f"cannot load the probe {path}: {error}") from error


def _checkpoint_probe(args: argparse.Namespace, checked: dict[str, Any], resolved: list[Checkpoint], out: Path) -> Probe:
    if args.probe:
        return _load_probe(args.probe)
    if checked["texts"] is not None:
        if args.tokenizer:
            candidates = [Path(args.tokenizer)]
        else:
            candidates = [resolved[0].path, resolved[0].path.parent] + [c.path for c in resolved[1:]]
        return texts_probe(
            checked["texts"], load_tokenizer(candidates), labels=checked["labels"], **_probe_options(args)
        )
    saved = _saved_probe(args.checkpoints, out, checked["shard"])
    if saved is None:
        raise TrajectoryError(
            "no probe: pass --probe PROBE (a saved probe, such as <output_dir>/layerwatch/probe.safetensors) or "
            "--texts FILE (one prompt per line)"
        )
    return _load_probe(saved)


def _revision_probe(
    args: argparse.Namespace, checked: dict[str, Any], out: Path
) -> Probe | Path | Callable[[Path], Probe]:
    if args.probe:
        return Path(args.probe)
    if checked["texts"] is not None:
        return revisions.probe_builder(
            checked["texts"], args.tokenizer, labels=checked["labels"], **_probe_options(args)
        )
    saved = _saved_probe([], out, checked["shard"])
    if saved is None:
        raise TrajectoryError("no probe: pass --probe PROBE (a saved probe) or --texts FILE (one prompt per line)")
    return saved


# -------------------------------------------------------------------------------------------------------- output
def _say(args: argparse.Namespace) -> Callable[..., None]:
    return (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, file=sys.stderr))


def _reporter(args: argparse.Namespace, total: int, already: int, bar: bool) -> Callable[[Any, dict[str, float]], None]:
    """The per-checkpoint line: ``[i/total] step S (where): load x s, probe y s``."""
    say, position = _say(args), [already]

    def report(item: Any, timings: dict[str, float]) -> None:
        position[0] += 1
        what = f"revision {item.name} (step {item.step})" if isinstance(item, revisions.Revision) else (
            f"step {item.step} ({item.path})"
        )
        line = f"[{position[0]}/{total}] {what}: load {timings['load_s']:.1f} s, probe {timings['probe_s']:.1f} s"
        if bar:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            say(line)

    return report


def _print_run(run: Run | None, out: Path, quiet: bool) -> None:
    if run is None or quiet:
        return
    print(summary_table(run))
    print()
    print(f"run written to {out} ({len(run.steps)} step(s)); view it with:")
    print(f"  tensorboard --logdir {out}")
    print(f"  layerwatch report {out}")


def _print_shard(outcome: shards.ShardOutcome, out: Path, quiet: bool) -> None:
    shard = outcome.shard
    if outcome.run is not None:
        _print_run(outcome.run, out, quiet)
        return
    if not quiet:
        done = shards.shards_done(out, shard.count)
        extra = f" (+{outcome.reference_probes} unrecorded for the CKA references)" if outcome.reference_probes else ""
        print(
            f"shard {shard.index}/{shard.count} done: {len(outcome.probed)} checkpoint(s) probed{extra}, "
            f"{len(outcome.already)} already there; shards done so far: {done}. The last shard to finish merges "
            f"them into {out}"
        )


# ------------------------------------------------------------------------------------------------------ the runs
def _run_checkpoints(args: argparse.Namespace, checked: dict[str, Any]) -> int:
    resolved = discover_checkpoints(args.checkpoints, steps=args.steps)
    out = options.check_out_dir(args.out or Path(args.checkpoints[0]) / DEFAULT_OUT_NAME)
    probe = _checkpoint_probe(args, checked, resolved, out)
    shard, run_options = checked["shard"], _run_options(args, checked)
    todo = resolved if shard is None else shard.take(resolved)
    done = completed_steps(out) | (completed_steps(shards.part_dir(out, shard)) if shard else set())
    left = [c for c in todo if c.step not in done]
    part = "" if shard is None else f" (shard {shard.index}/{shard.count}: {len(todo)} of them)"
    _say(args)(
        f"{PROG}: {len(resolved)} checkpoint(s), steps {', '.join(str(c.step) for c in resolved)}{part}; "
        f"{len(todo) - len(left)} already in {out}, {len(left)} to probe"
    )
    bar = not args.quiet and sys.stderr.isatty() and shard is None
    report = _reporter(args, len(todo), len(todo) - len(left), bar)
    with options.removing_if_left_empty(out):
        if shard is None:
            run = run_trajectory(
                resolved, probe=probe, out=out, allow_pickle=args.allow_pickle, on_checkpoint=report, progress=bar,
                **run_options,
            )
            _print_run(run, out, args.quiet)
            return 0
        outcome = shards.run_shard(
            resolved, shard, out=out, probe=probe, allow_pickle=args.allow_pickle, on_checkpoint=report,
            **run_options,
        )
    _print_shard(outcome, out, args.quiet)
    return 0


def _run_revisions(args: argparse.Namespace, checked: dict[str, Any]) -> int:
    if len(args.checkpoints) != 1:
        raise TrajectoryError(f"--revisions takes one repository (ORG/NAME), got {len(args.checkpoints)} inputs")
    if args.allow_pickle:
        raise options.FlagError("--allow-pickle", "does not apply to --revisions (Hub revisions load from safetensors only); drop it")
    repo = str(args.checkpoints[0])
    names = args.revisions.split(",") if args.revisions else revisions.read_revisions(args.revisions_file)
    plan = revisions.plan_revisions(names, args.steps)
    out = options.check_out_dir(args.out or revisions.default_out(repo))
    probe, shard = _revision_probe(args, checked, out), checked["shard"]
    todo = plan if shard is None else shard.take(plan)
    done = completed_steps(out) | (completed_steps(shards.part_dir(out, shard)) if shard else set())
    _say(args)(f"{PROG}: {len(plan)} revision(s) of {repo}; {sum(r.step in done for r in todo)} already in {out}")
    report = _reporter(args, len(todo), sum(r.step in done for r in todo), False)
    with options.removing_if_left_empty(out):
        if shard is None:
            run, skipped = revisions.run_revisions(
                repo, plan, out=out, probe=probe, on_revision=report, **_run_options(args, checked)
            )
        else:
            if callable(probe):
                probe = probe(revisions.first_available(repo, plan).path)
            outcome = shards.run_shard(
                plan, shard, out=out, probe=probe if isinstance(probe, Probe) else _load_probe(probe),
                checkpoint_of=lambda revision: revisions.revision_checkpoint(repo, revision),
                on_checkpoint=report, **_run_options(args, checked),
            )
            run, skipped = outcome.run, outcome.skipped
    _print_run(run, out, args.quiet)
    for name, reason in skipped.items():
        print(f"{PROG}: skipped revision {name}: {reason}", file=sys.stderr)
    return revisions.EXIT_SKIPPED if skipped else 0


def _quiet_transformers() -> None:
    # One line per checkpoint is ours; transformers' per-file "Loading weights" bars only add noise (CLI only).
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic
        pass


def main(args: argparse.Namespace) -> int:
    """Run ``layerwatch trajectory``; returns the exit code (0 ok, 2 a mistake, 3 revisions skipped, 130 interrupted)."""
    _quiet_transformers()
    try:
        checked = _checked(args)
        if args.out:
            options.check_out_dir(args.out)
        if args.revisions or args.revisions_file:
            return _run_revisions(args, checked)
        return _run_checkpoints(args, checked)
    except (options.FlagError, TrajectoryError) as error:
        return options.exit_code(PROG, error)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the checkpoints probed so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(options.run_alone(PROG, add_arguments, main))
