"""What the probe needs to know about a model, resolved once per model object (:class:`ModelFacts`).

Finding the blocks, reading the forward signature and the config each walk the model (``model.modules()``);
:func:`model_facts` does it the first time it sees a model and then answers from a cache. The cache holds the
model weakly: it is forgotten when the model is freed (``trajectory`` loads one model per checkpoint). Facts are
read once, so a model changed in place afterwards (blocks replaced, embeddings resized) keeps its old facts; call
:func:`forget_model_facts` after such a change.

Used by :class:`layerwatch.LayerWatch` (blocks and their paths, forward options, mask, the probe-fits check before
the first forward, and the cost estimate's width and parameter count), by ``layerwatch trajectory`` (the same check,
per checkpoint) and by the integrations (positions, vocabulary and pad id when they build a probe, and an early
check at construction): one model is resolved once on the Trainer's and Accelerate's start-up paths.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Hashable

from torch import nn

from layerwatch.monitor.capture import (
    accepts_attention_mask,
    positional_input,
    find_blocks,
    find_pretrained,
    forward_options,
    max_positions,
    model_config,
    unwrap,
)

if TYPE_CHECKING:  # pragma: no cover
    from layerwatch.probe import Probe

__all__ = ["ModelFacts", "forget_model_facts", "model_facts"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ModelFacts:
    """Facts about one model that do not change while it trains.

    Attributes:
        forward_options: keyword arguments that keep a probe forward cheap (``use_cache=False``, ...).
        accepts_attention_mask: whether ``forward`` takes ``attention_mask``.
        positional_input: whether the probe's ids go in as ``forward``'s first positional argument (a forward with
            no ``input_ids`` parameter, e.g. nanoGPT's ``forward(idx)``).
        max_positions: the longest sequence it takes (``None``: unbounded).
        vocab_size: ``config.vocab_size``, else the rows of the input embedding (``None``: unknown).
        width: the hidden size (``config.hidden_size``/``n_embd``/``d_model``, else the input embedding's width;
            ``None``: unknown).
        parameters: the parameter count (DeepSpeed ZeRO-3's full sizes, not the local partitions).
        pad_token_id: ``config.pad_token_id`` when it is a valid id (``None`` otherwise).
    """

    forward_options: Mapping[str, Any]
    accepts_attention_mask: bool
    max_positions: int | None
    vocab_size: int | None
    _model: weakref.ref[nn.Module] = field(repr=False)
    width: int | None = None
    parameters: int = 0
    pad_token_id: int | None = None
    positional_input: bool = False
    _blocks: dict[Hashable, tuple[nn.Module, ...]] = field(default_factory=dict, repr=False)
    _paths: dict[Hashable, tuple[str, ...]] = field(default_factory=dict, repr=False)

    @property
    def model(self) -> nn.Module | None:
        """The model these facts are about (``None`` once it was freed)."""
        return self._model()

    def blocks(self, layers: str | Sequence[nn.Module] | None = None) -> tuple[nn.Module, ...]:
        """The blocks the hooks watch, in forward order (:func:`layerwatch.monitor.capture.find_blocks`), found once per
        ``layers`` override (a dotted path or a list of modules; ``None``: discovered).

        Raises:
            ValueError: the blocks cannot be found (or ``layers`` names none).
        """
        key: Hashable = layers if layers is None or isinstance(layers, str) else ("modules", *map(id, layers))
        found = self._blocks.get(key)
        if found is None:
            model = self._model()
            if model is None:  # pragma: no cover - facts outliving their model
                raise ReferenceError("the model of these facts was freed")
            found = self._blocks[key] = tuple(find_blocks(model, layers))
        return found

    def block_paths(self, layers: str | Sequence[nn.Module] | None = None) -> tuple[str, ...]:
        """The dotted paths of :meth:`blocks` inside the model (``"transformer.h.0"``, ...), without the wrappers'
        own names (DDP's ``module.``, FSDP's ``_fsdp_wrapped_module.``, ``torch.compile``'s ``_orig_mod.``, ...), so
        that the same selection has the same paths wrapped or not. A block outside the model is ``"?"``."""
        key: Hashable = layers if layers is None or isinstance(layers, str) else ("modules", *map(id, layers))
        found = self._paths.get(key)
        if found is None:
            blocks, model = self.blocks(layers), self._model()
            named = {id(module): name for name, module in model.named_modules()} if model is not None else {}
            found = self._paths[key] = tuple(_without_wrappers(named.get(id(block), "?")) for block in blocks)
        return found

    def check_probe(self, probe: Probe, longest: int | None = None) -> None:
        """Refuse a probe this model cannot take: a token id past the vocabulary, or prompts past the positions.

        Args:
            probe: the probe.
            longest: the longest sequence that will be fed (default: the probe's longest prompt or view).

        Raises:
            ValueError: naming the probe's ids (or lengths), the model's limit and the fix.
        """
        vocab, top = self.vocab_size, probe.max_token_id()
        if vocab is not None and top >= vocab:
            raise ValueError(
                f"the probe has token id {top} (it was built for a vocabulary of {probe.vocab_size} tokens) but the "
                f"model's vocabulary has {vocab} entries (ids 0..{vocab - 1}); build the probe with this model's "
                "tokenizer (or Probe.from_tensors(..., vocab_size=...))"
            )
        if vocab is not None and probe.vocab_size > vocab:
            logger.warning(
                "the probe was built for a vocabulary of %d tokens but the model has %d; its ids fit, but check the "
                "tokenizer", probe.vocab_size, vocab,
            )
        longest = probe.max_length() if longest is None else longest
        if self.max_positions is not None and longest > self.max_positions:
            raise ValueError(
                f"the probe has prompts (or augmented views) of {longest} tokens but the model takes at most "
                f"{self.max_positions} positions; build the probe with a smaller max_length (or use metrics='light', "
                "which feeds no augmented views)"
            )


_CACHE: weakref.WeakKeyDictionary[nn.Module, ModelFacts] = weakref.WeakKeyDictionary()


def model_facts(model: nn.Module) -> ModelFacts:
    """The :class:`ModelFacts` of ``model`` (resolved on the first call, then cached while the model lives).

    Args:
        model: any ``nn.Module``, possibly wrapped (DDP, FSDP, DeepSpeed, PEFT, ``torch.compile``).
    """
    facts = _CACHE.get(model)
    if facts is None:
        config = model_config(model)
        vocab_size = _vocab_size(model, config)
        pad = getattr(config, "pad_token_id", None)
        facts = _CACHE[model] = ModelFacts(
            forward_options=MappingProxyType(forward_options(model)),
            accepts_attention_mask=accepts_attention_mask(model),
            max_positions=max_positions(model),
            vocab_size=vocab_size,
            _model=weakref.ref(model),
            width=_width(model, config),
            parameters=sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()),
            pad_token_id=pad if isinstance(pad, int) and 0 <= pad < (vocab_size or pad + 1) else None,
            positional_input=positional_input(model),
        )
    return facts


def forget_model_facts(model: nn.Module) -> None:
    """Drop the cached facts of ``model`` (after changing its blocks or embeddings in place)."""
    _CACHE.pop(model, None)


_WRAPPER_NAMES = frozenset({"module", "_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module", "_forward_module"})


def _without_wrappers(path: str) -> str:
    return ".".join(part for part in path.split(".") if part not in _WRAPPER_NAMES) or path


def _width(model: nn.Module, config: Any) -> int | None:
    width = next((getattr(config, key) for key in ("hidden_size", "n_embd", "d_model") if hasattr(config, key)), None)
    if not isinstance(width, int):
        inner = find_pretrained(model) or unwrap(model)
        try:
            width = getattr(inner.get_input_embeddings(), "embedding_dim", None)
        except (AttributeError, NotImplementedError):
            width = None
    return width if isinstance(width, int) and width > 0 else None


def _vocab_size(model: nn.Module, config: Any) -> int | None:
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    inner = find_pretrained(model) or unwrap(model)
    try:
        embeddings = inner.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(embeddings, "num_embeddings", None)
    return int(rows) if isinstance(rows, int) else None
