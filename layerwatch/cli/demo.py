"""``layerwatch demo``: pretrain a small GPT-2-style model on CPU and watch its layers with the Trainer callback.

Everything is offline: the corpus ships with the package (``layerwatch/data/tinyshakespeare.txt``, public-domain
Shakespeare), the byte-level BPE tokenizer is trained on it in about a second, and the model is initialised from a
config. The run uses the real :class:`transformers.Trainer` with
:class:`layerwatch.integrations.hf_trainer.LayerWatchCallback` and no other change, so the demo is also the
reference for how the callback is meant to be used::

    layerwatch demo                      # about 3 minutes on 2 idle CPU cores, longer on a busy machine
    layerwatch demo --steps 60 --out /tmp/lw-demo
    tensorboard --logdir layerwatch-demo/layerwatch

The output directory holds the Trainer's checkpoints (``checkpoint-*``, safetensors weights plus the tokenizer, for
``layerwatch trajectory``), the layerwatch run (``layerwatch/``: TensorBoard events, ``layerwatch.jsonl`` and
``probe.safetensors``) and ``layerwatch-demo.json`` (the settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from layerwatch.analysis.summary import summary_table
from layerwatch.cli.options import run_alone
from layerwatch.rundir.claim import WriterClaim
from layerwatch.rundir.files import PROBE_FILENAME

logger = logging.getLogger(__name__)

CORPUS_FILE = "tinyshakespeare.txt"
MARKER_FILE = "layerwatch-demo.json"
DEFAULT_OUT = "layerwatch-demo"
DEFAULT_STEPS = 300
END_OF_TEXT = "<|endoftext|>"



@dataclasses.dataclass
class DemoConfig:
    """The demo's model and training settings (``layerwatch demo`` exposes the common ones as flags)."""

    steps: int = DEFAULT_STEPS
    every: int = 25
    batch_size: int = 16
    block_size: int = 128
    vocab_size: int = 2048
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    dropout: float = 0.0
    learning_rate: float = 1e-3
    eval_fraction: float = 0.05
    eval_blocks: int = 96
    num_checkpoints: int = 4
    probe_prompts: int = 64
    seed: int = 0


def load_corpus() -> str:
    """The demo corpus as one string: the packaged text, without its licence header, with normalised newlines."""
    text = resources.files("layerwatch.data").joinpath(CORPUS_FILE).read_text(encoding="utf-8")
    lines = text.replace("\r\n", "\n").split("\n")
    start = 0
    while start < len(lines) and lines[start].startswith("# "):
        start += 1
    while start < len(lines) and not lines[start].strip():
        start += 1
    return "\n".join(line.rstrip() for line in lines[start:]).strip() + "\n"


def train_tokenizer(text: str, vocab_size: int = 2048) -> Any:
    """A byte-level BPE tokenizer trained on ``text`` (about a second on a megabyte), wrapped for transformers.

    Byte-level means every input encodes (no unknown token). The only special token, ``<|endoftext|>``, serves
    as end-of-text and padding token, as in GPT-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_paragraphs(text), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.name_or_path = "layerwatch-demo-bpe"
    return tokenizer


def _paragraphs(text: str) -> list[str]:
    # Training the BPE on paragraphs rather than one huge string is faster and gives the same merges.
    return [p + "\n\n" for p in text.split("\n\n") if p.strip()]


class TokenBlocks:
    """A map-style dataset of fixed-length blocks of a token stream, for causal language modelling.

    Item ``i`` is ``{"input_ids": LongTensor[block_size], "labels": same}`` (the model shifts the labels). Any
    ``torch.utils.data.Dataset``-like object with ``__len__``/``__getitem__`` works with the Trainer and with
    ``Probe.from_dataset``; this one avoids a dependency on the ``datasets`` library.
    """

    def __init__(self, token_ids: Any, block_size: int) -> None:
        import torch

        ids = torch.as_tensor(token_ids, dtype=torch.long)
        count = ids.numel() // block_size
        if count < 1:
            raise ValueError(f"block_size={block_size} is longer than the token stream ({ids.numel()} tokens)")
        self.blocks = ids[: count * block_size].view(count, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone()}


def build_datasets(text: str, tokenizer: Any, block_size: int, eval_fraction: float) -> tuple[TokenBlocks, TokenBlocks]:
    """Split the text at a blank line near ``1 - eval_fraction`` of its length, tokenize, and cut into blocks."""
    cut = int(len(text) * (1.0 - eval_fraction))
    boundary = text.rfind("\n\n", 0, cut)
    cut = boundary + 2 if boundary > 0 else cut
    return TokenBlocks(_token_stream(tokenizer, text[:cut]), block_size), TokenBlocks(
        _token_stream(tokenizer, text[cut:]), block_size
    )


def _token_stream(tokenizer: Any, text: str) -> list[int]:
    # Paragraph by paragraph (as the BPE was trained), concatenated into one stream.
    encoded = tokenizer(_paragraphs(text))["input_ids"]
    return [token for paragraph in encoded for token in paragraph]


def build_model(config: DemoConfig, tokenizer: Any) -> Any:
    """A GPT-2-style causal LM initialised from a config (about 3.7 million parameters with the defaults)."""
    import transformers

    model_config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.block_size,
        n_embd=config.hidden,
        n_layer=config.layers,
        n_head=config.heads,
        n_inner=4 * config.hidden,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.set_seed(config.seed)
    model = transformers.GPT2LMHeadModel(model_config)
    model.loss_type = "ForCausalLM"  # the class name maps to no loss in transformers 5, which would warn
    return model


def training_arguments(output_dir: str, **kwargs: Any) -> Any:
    """``TrainingArguments`` for a CPU run without trackers, portable across transformers 4.46+ and 5.x.

    Options this version of transformers does not know are dropped (with a debug log), and the few renamed ones
    are translated, so the same call works on every supported version.
    """
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    options: dict[str, Any] = {"report_to": "none", "dataloader_num_workers": 0, "use_cpu": True}
    options.update(kwargs)
    renames = {"use_cpu": "no_cuda", "eval_strategy": "evaluation_strategy"}
    for new, old in renames.items():
        if new in options and new not in fields and old in fields:
            options[old] = options.pop(new)
    for name in [n for n in options if n not in fields]:
        logger.debug("TrainingArguments has no %r in this version of transformers; ignoring it", name)
        options.pop(name)
    return TrainingArguments(output_dir=output_dir, **options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``layerwatch demo`` flags."""
    defaults = DemoConfig()
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: ./{DEFAULT_OUT})")
    parser.add_argument(
        "--steps", type=int, default=defaults.steps,
        help=f"optimizer steps (default {defaults.steps}: about 3 minutes on 2 idle CPU cores, several times longer "
        "on a busy machine)",
    )
    parser.add_argument(
        "--every", type=int, default=None,
        help=f"probe every N steps (default: {defaults.every}, or less for short runs so there are about 10 probes)",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per step")
    parser.add_argument(
        "--prompts", type=int, default=defaults.probe_prompts,
        help=f"probe prompts, taken from the held-out text (default {defaults.probe_prompts})",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace --out even if it is not a previous demo's output directory",
    )


def _config(args: argparse.Namespace) -> DemoConfig | None:
    """The demo's settings from its flags, or ``None`` after saying which flag is wrong."""
    config = DemoConfig(steps=args.steps, batch_size=args.batch_size, probe_prompts=args.prompts, seed=args.seed)
    flags = (("--steps", config.steps), ("--batch-size", config.batch_size), ("--prompts", config.probe_prompts),
             ("--every", 1 if args.every is None else args.every))
    for flag, value in flags:
        if value < 1:
            print(f"layerwatch demo: {flag} must be a positive integer, got {value}", file=sys.stderr)
            return None
    config.every = args.every if args.every is not None else max(1, min(config.every, config.steps // 10))
    return config


def main(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    config = _config(args)
    if config is None:
        return 2
    out = Path(args.out).expanduser().resolve()
    if not _prepare_output_dir(out, overwrite=bool(getattr(args, "overwrite", False))):
        return 2
    started = time.perf_counter()
    trainer, tokenizer = _train(config, out)
    _print_closing(trainer, tokenizer, out, time.perf_counter() - started)
    return 0


def _train(config: DemoConfig, out: Path) -> tuple[Any, Any]:
    """Train the demo model with the Trainer callback watching; returns the trainer and the tokenizer."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import Trainer, default_data_collator

    from layerwatch.integrations.hf_trainer import LayerWatchCallback

    text = load_corpus()
    tokenizer = train_tokenizer(text, config.vocab_size)
    train_dataset, eval_dataset = build_datasets(text, tokenizer, config.block_size, config.eval_fraction)
    # Enough held-out blocks for a steady evaluation loss and the probe's prompts.
    eval_dataset.blocks = eval_dataset.blocks[: max(config.eval_blocks, config.probe_prompts)]
    model = build_model(config, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"layerwatch demo: GPT-2-style model, {config.layers} layers x {config.hidden}, {parameters / 1e6:.1f}M "
        f"parameters; {len(train_dataset)} training blocks of {config.block_size} tokens of Shakespeare "
        f"(BPE vocabulary {len(tokenizer)}); {config.steps} steps, probing every {config.every}."
    )
    (out / MARKER_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n", encoding="utf-8")
    save_steps = max(1, math.ceil(config.steps / config.num_checkpoints))
    arguments = training_arguments(
        str(out), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=2 * config.batch_size, learning_rate=config.learning_rate, weight_decay=0.1,
        lr_scheduler_type="cosine", warmup_steps=max(1, config.steps // 10), max_grad_norm=1.0,
        logging_steps=max(1, config.steps // 15), logging_first_step=True, eval_strategy="steps",
        eval_steps=save_steps, eval_on_start=True, save_strategy="steps", save_steps=save_steps, save_only_model=True,
        seed=config.seed, data_seed=config.seed,
        disable_tqdm=True,  # one progress line of our own instead of the Trainer's nested bars
    )
    callback = LayerWatchCallback(every=config.every, num_prompts=config.probe_prompts)
    trainer = Trainer(
        model=model, args=arguments, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=default_data_collator, processing_class=tokenizer, callbacks=[callback],
    )
    _show_progress(trainer)
    tokenizer.save_pretrained(str(out))
    return trainer, tokenizer


def _print_closing(trainer: Any, tokenizer: Any, out: Path, elapsed: float) -> None:
    """Losses, where everything is, how to view it, and the per-layer table."""
    import transformers

    import layerwatch

    logdir = out / "layerwatch"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    print()
    print(f"Done in {elapsed:.0f} s (transformers {transformers.__version__}).")
    if losses:
        line = f"Training loss {losses[0]:.2f} -> {losses[-1]:.2f}"
        if eval_losses:
            line += f"; held-out loss {eval_losses[0]:.2f} -> {eval_losses[-1]:.2f}"
        print(line + f" (uniform guess: {math.log(len(tokenizer)):.2f}).")
    print(f"Checkpoints:      {', '.join(p.name for p in checkpoints) or 'none'} in {out}")
    print(f"layerwatch run:   {logdir} (layerwatch.jsonl, probe.safetensors, TensorBoard events)")
    print(f"View it:          tensorboard --logdir {_shell_path(logdir)}")
    print(f"Report:           layerwatch report {_shell_path(logdir)}")
    print(f"After training:   layerwatch trajectory {_shell_path(out)} --probe {_shell_path(logdir / PROBE_FILENAME)}")
    print()
    try:
        run = layerwatch.read_run(logdir)
    except Exception as error:  # noqa: BLE001 - the table is a courtesy; the run itself is on disk
        print(f"(could not read the run back for the summary table: {error})")
        return
    steps = run.steps.tolist()
    print(f"Per-layer metrics, first probe (step {steps[0]}) -> last probe (step {steps[-1]}); layer 0 = embeddings:")
    print(summary_table(run))


def _shell_path(path: Path) -> str:
    """``path`` made absolute (a command that works from any folder), quoted for the shell if needed."""
    return shlex.quote(str(Path(path).resolve()))


def _show_progress(trainer: Any) -> None:
    """``trainer.train()`` with one progress bar (step, loss, held-out loss) instead of the Trainer's own bars.

    Log lines (layerwatch's alerts, for instance) are printed above the bar, not into it.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as transformers_logging

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.shown: dict[str, str] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = tqdm(total=state.max_steps, unit="step", desc="training", dynamic_ncols=True)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            for key, name in (("loss", "loss"), ("eval_loss", "held-out")):
                if isinstance((logs or {}).get(key), (int, float)):
                    self.shown[name] = f"{logs[key]:.2f}"
            ordered = {name: self.shown[name] for name in ("loss", "held-out") if name in self.shown}
            self.bar.set_postfix(ordered, refresh=True)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.close()

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the bar shows the losses instead
    trainer.add_callback(Progress())
    transformers_logging.disable_progress_bar()  # no checkpoint-writing bars under ours
    with logging_redirect_tqdm():
        trainer.train()


def _prepare_output_dir(out: Path, *, overwrite: bool) -> bool:
    """Create ``out``; replace it if it holds a previous demo (or ``overwrite``); refuse other non-empty folders."""
    if out.exists() and not out.is_dir():
        print(f"layerwatch demo: --out {out} exists and is not a directory", file=sys.stderr)
        return False
    if out.is_dir() and any(out.iterdir()):
        if not (overwrite or (out / MARKER_FILE).exists()):
            print(
                f"layerwatch demo: {out} exists and is not a previous demo's output; "
                "choose another --out, or pass --overwrite to replace it",
                file=sys.stderr,
            )
            return False
        if (out / "layerwatch").is_dir():  # never delete a demo that is still running
            try:
                WriterClaim(out / "layerwatch").close()
            except ValueError as error:
                print(f"layerwatch demo: {error}", file=sys.stderr)
                return False
        print(f"layerwatch demo: replacing the previous output in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return True


if __name__ == "__main__":  # pragma: no cover - `python -m layerwatch.cli.demo`
    raise SystemExit(run_alone("layerwatch demo", add_arguments, main, description=__doc__.splitlines()[0]))
