"""Pretrain a tiny GPT-2 with the Hugging Face Trainer while layerwatch watches every layer (a few minutes on CPU).

    python examples/trainer_pretraining.py --out runs/trainer-example --steps 200
    tensorboard --logdir runs/trainer-example/layerwatch

The only layerwatch line is the callback in ``Trainer(..., callbacks=[...])``. With no ``probe=`` it builds its probe
from the evaluation dataset (64 prompts, indexed, never touching the training data loader), saves it next to the logs
and probes at steps 1, 2, 4, 8, 16, then every ``every`` steps and at the last step. Runs offline: the text and the
tokenizer come from layerwatch's demo helpers; in your script use your own (e.g. ``AutoTokenizer.from_pretrained``).
"""

import argparse
import os

from transformers import DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import layerwatch
from layerwatch.cli.demo import load_corpus, train_tokenizer
from layerwatch.integrations.hf_trainer import LayerWatchCallback

BLOCK = 64  # tokens per training sequence


def blocks(tokenizer, texts: list[str]) -> list[dict]:
    """The texts' tokens, concatenated and cut into rows of BLOCK tokens."""
    ids = [token for row in tokenizer(texts)["input_ids"] for token in row]
    return [{"input_ids": ids[i : i + BLOCK]} for i in range(0, len(ids) - BLOCK + 1, BLOCK)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/trainer-example", help="Trainer output_dir")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    args = parser.parse_args()

    # Data: paragraphs of text -> tokens -> fixed blocks of BLOCK tokens (as in transformers' run_clm.py). Plain
    # lists of dicts work as Trainer datasets; a datasets.Dataset with an input_ids column works the same way.
    text = load_corpus()
    tokenizer = train_tokenizer(text, vocab_size=1024)
    paragraphs = [p + tokenizer.eos_token for p in text.split("\n\n") if p.strip()]
    cut = len(paragraphs) * 95 // 100  # the last 5% of the text is held out
    train_blocks, eval_blocks = blocks(tokenizer, paragraphs[:cut]), blocks(tokenizer, paragraphs[cut:])

    # A tiny GPT-2 from a config (about 1 million parameters).
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # the class name maps to no loss in transformers 5, which would warn

    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        logging_steps=max(1, args.steps // 10),
        save_steps=max(1, args.steps // 2),
        use_cpu=True,
        report_to="none",
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[LayerWatchCallback(every=25)],
    )
    trainer.train()

    # Read the run back: one row per probed step, one column per layer (0 = embeddings).
    logdir = os.path.join(args.out, "layerwatch")
    run = layerwatch.read_run(logdir)
    entropy = run.metric("prompt_entropy")
    print(f"\nprobed steps: {run.steps.tolist()}")
    for column, layer in enumerate(run.layers):
        print(f"layer {layer}: prompt entropy {entropy[0, column]:.3f} -> {entropy[-1, column]:.3f}")
    print(f"\ntensorboard --logdir {logdir}")


if __name__ == "__main__":
    main()
