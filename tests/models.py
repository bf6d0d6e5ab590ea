"""Tiny random-init models built from configs, one per architecture family the capture must support."""

import torch
import transformers
from packaging.version import Version

# fully_shard (FSDP2) needs CUDA streams before torch 2.6; from 2.6 on it also runs on a CPU mesh over gloo.
FSDP2_ON_CPU = Version(torch.__version__.split("+")[0]) >= Version("2.6")

TINY_VOCAB = 128
KINDS = ("gpt2", "llama", "gpt_neox", "mamba", "mamba2", "bert")


def tiny_config(kind: str, *, dropout: float = 0.0, layers: int = 2, hidden: int = 32):
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=TINY_VOCAB, n_positions=256, n_embd=hidden, n_layer=layers, n_head=4, bos_token_id=0, eos_token_id=0,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        )
    if kind == "llama":
        return transformers.LlamaConfig(
            vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, attention_dropout=dropout,
        )
    if kind == "gpt_neox":
        return transformers.GPTNeoXConfig(
            vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=256, hidden_dropout=dropout, attention_dropout=dropout,
        )
    if kind == "mamba":
        return transformers.MambaConfig(
            vocab_size=TINY_VOCAB, hidden_size=hidden, state_size=8, num_hidden_layers=layers, expand=2,
            conv_kernel=4,
        )
    if kind == "mamba2":
        return transformers.Mamba2Config(
            vocab_size=TINY_VOCAB, hidden_size=hidden, state_size=8, num_hidden_layers=layers, expand=2,
            num_heads=4, head_dim=16, n_groups=1, conv_kernel=4, chunk_size=32,
        )
    if kind == "bert":
        return transformers.BertConfig(
            vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=256, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def tiny_model(kind: str = "gpt2", seed: int = 0, **config_kwargs):
    """A tiny random-init model; decoders get their LM head, BERT the bare encoder."""
    config = tiny_config(kind, **config_kwargs)
    torch.manual_seed(seed)
    if kind == "bert":
        return transformers.BertModel(config).eval()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def block_hidden(output):
    """A decoder block's hidden states: blocks return a tensor (transformers 5) or a tuple led by it (4.x)."""
    return output[0] if isinstance(output, tuple) else output


def with_block_hidden(output, hidden):
    """``output`` with its hidden states replaced by ``hidden``, in the same form (tensor or tuple)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
