"""Capturing per-layer hidden states with temporary forward hooks, without disturbing training.

Three jobs, each in one place:
- :func:`find_blocks` locates the decoder (or encoder) blocks of a model, through DDP, FSDP, DeepSpeed, PEFT and
  ``torch.compile`` wrappers.
- :func:`isolated` is the context a probe runs in: eval mode and no grad, every RNG forked, every module's
  ``.training`` flag restored, compiled code run eagerly, FSDP2 parameters resharded afterwards.
- :class:`LayerHooks` calls back with each layer's ``[B, T, D]`` output as soon as it is produced (index 0 is the
  input of the first block, i.e. the embedding output), and checks that every hook fired exactly once per forward.
  An error in the callback is kept, never raised inside the forward (see there: it would desynchronise sharded
  ranks). :func:`select_hidden` is the documented rule that finds the hidden state in a block's output (a tensor,
  tuple, dict or dataclass); ``block_output=`` replaces it.
- :class:`ForwardInputs` turns a probe micro-batch into the model's call: ``input_ids=`` for Hugging Face models,
  the first positional argument for a ``forward(idx)`` (nanoGPT), or the user's ``forward_inputs=`` adapter.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from layerwatch._compat import fsdp2_module_type

logger = logging.getLogger(__name__)

# Attribute names under which wrappers keep the module they wrap.
_WRAPPED_ATTRIBUTES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "module")
# Where blocks live in common architectures, tried when class-name matching finds nothing.
_KNOWN_BLOCK_PATHS = (
    "model.layers", "transformer.h", "gpt_neox.layers", "backbone.layers", "model.decoder.layers",
    "encoder.layer", "bert.encoder.layer", "transformer.layers", "layers", "h",
)


class CaptureError(RuntimeError):
    """The probe could not capture the model's layers as expected."""


def unwrap(module: nn.Module) -> nn.Module:
    """The innermost module under DDP / FSDP1 / checkpoint / compile / DeepSpeed wrappers."""
    seen = set()
    while id(module) not in seen:
        seen.add(id(module))
        for attribute in _WRAPPED_ATTRIBUTES:
            inner = getattr(module, attribute, None)
            if isinstance(inner, nn.Module) and inner is not module:
                module = inner
                break
        else:
            break
    return module


def find_pretrained(model: nn.Module) -> nn.Module | None:
    """The outermost ``transformers.PreTrainedModel`` inside ``model`` (through wrappers, PEFT included)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return None
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return None


def model_config(model: nn.Module) -> Any:
    pretrained = find_pretrained(model)
    return getattr(pretrained, "config", None) if pretrained is not None else getattr(unwrap(model), "config", None)


def _class_names(module: nn.Module) -> set[str]:
    # FSDP2 swaps a module's class for a dynamic subclass ("FSDPLlamaDecoderLayer"); match any class in the MRO.
    return {cls.__name__ for cls in type(module).__mro__}


def _block_class_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        no_split = getattr(type(module), "_no_split_modules", None) or getattr(module, "_no_split_modules", None)
        if isinstance(no_split, (list, tuple, set)):
            names.update(str(n) for n in no_split)
        recorded = getattr(module, "_can_record_outputs", None)
        if isinstance(recorded, dict):
            target = recorded.get("hidden_states")
            target = getattr(target, "target_class", target)
            if isinstance(target, type):
                names.add(target.__name__)
    return names


def _resolve_path(model: nn.Module, path: str) -> Any:
    for root in (model, unwrap(model), find_pretrained(model)):
        obj: Any = root
        for part in path.split("."):
            if obj is None:
                break
            obj = getattr(obj if hasattr(obj, part) else unwrap(obj), part, None)
        if obj is not None:
            return obj
    return None


def find_blocks(model: nn.Module, layers: str | Sequence[nn.Module] | None = None) -> list[nn.Module]:
    """The model's sequence of blocks (decoder layers, encoder layers, Mamba blocks), in forward order.

    Args:
        model: any ``nn.Module``, possibly wrapped (DDP, FSDP1/2, DeepSpeed, PEFT, ``torch.compile``).
        layers: override: a dotted path to a ``ModuleList`` (e.g. ``"model.layers"``) or a list of modules.

    The stored elements are returned (the wrapper, if a block is wrapped): their output is the block's output.
    """
    if layers is not None:
        if isinstance(layers, str):
            found = _resolve_path(model, layers)
            if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
                raise ValueError(
                    f"layers={layers!r} does not name a non-empty nn.ModuleList in {type(model).__name__}; "
                    "give the dotted path of the block list (e.g. 'model.layers') or a list of modules"
                )
            return list(found)
        blocks = list(layers)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise ValueError("layers= must be a dotted path string or a non-empty list of nn.Module blocks")
        return blocks

    targets = _block_class_names(model)
    config = model_config(model)
    expected = getattr(config, "num_hidden_layers", None)
    if expected is None and hasattr(config, "get_text_config"):
        expected = getattr(config.get_text_config(), "num_hidden_layers", None)

    candidates = []
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            inner = [unwrap(child) for child in module]
            if targets and all(_class_names(child) & targets for child in inner):
                candidates.append(module)
    if candidates:
        exact = [c for c in candidates if expected is not None and len(c) == expected]
        return list((exact or sorted(candidates, key=len, reverse=True))[0])

    for path in _KNOWN_BLOCK_PATHS:
        found = _resolve_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return list(found)

    homogeneous = [
        m for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(unwrap(c)) for c in m}) == 1
        and sum(p.numel() for p in m.parameters()) > 0
    ]
    if homogeneous:
        return list(max(homogeneous, key=len))
    raise ValueError(
        f"could not find the blocks of {type(model).__name__}: pass layers= with the dotted path of its block "
        "list (e.g. layers='model.layers') or a list of the block modules"
    )


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings take (``None`` when unbounded, e.g. Mamba)."""
    config = model_config(model)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        device = getattr(parameter, "device", None)
        if device is not None and device.type != "meta":
            return device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _forward_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter] | None:
    """The parameters of the (unwrapped) model's ``forward``; ``None`` when its signature cannot be read."""
    target = find_pretrained(model) or unwrap(model)
    try:
        return inspect.signature(target.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return None


def forward_options(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments that keep a probe forward cheap, passed only where the model's forward accepts them."""
    parameters = _forward_parameters(model)
    if parameters is None:  # pragma: no cover
        return {}
    options: dict[str, Any] = {}
    if "use_cache" in parameters:
        options["use_cache"] = False  # no KV / SSM cache is built
    if "logits_to_keep" in parameters:
        options["logits_to_keep"] = 1  # no full-vocabulary logits for every token
    elif "num_logits_to_keep" in parameters:
        options["num_logits_to_keep"] = 1
    if "return_dict" in parameters:
        options["return_dict"] = True
    return options


def accepts_attention_mask(model: nn.Module) -> bool:
    parameters = _forward_parameters(model)
    if parameters is None:  # pragma: no cover
        return True
    return "attention_mask" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def positional_input(model: nn.Module) -> bool:
    """Whether the probe's ids go in as the forward's first positional argument (no ``input_ids`` parameter)."""
    parameters = _forward_parameters(model)
    if parameters is None:  # pragma: no cover
        return False
    if "input_ids" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return any(p.kind in positional for p in parameters.values())


@dataclass(frozen=True)
class ForwardInputs:
    """How one probe micro-batch becomes the model's call: ``(args, kwargs) = inputs(ids, mask)``.

    By default the ids go in as ``input_ids=`` (with ``options``, and ``attention_mask=`` where the forward takes
    it); a forward without an ``input_ids`` parameter (nanoGPT's ``forward(idx, targets=None)``) gets them as its
    first positional argument. ``adapter``, the ``forward_inputs=`` option of :class:`layerwatch.LayerWatch`, replaces
    both: ``adapter(input_ids, attention_mask)`` returns the keyword arguments (a dict), the positional arguments
    (a tuple) or the one positional argument (a tensor).
    """

    options: Mapping[str, Any]
    pass_mask: bool
    positional: bool = False
    adapter: Callable[[torch.Tensor, torch.Tensor], Any] | None = None

    @classmethod
    def for_model(
        cls, options: Mapping[str, Any], pass_mask: bool, positional: bool, adapter: Any = None
    ) -> "ForwardInputs":
        """From a model's facts (:class:`~layerwatch.monitor.model_facts.ModelFacts`: its forward's options, whether
        it takes ``attention_mask``, whether the ids go in positionally) and the user's adapter, if any."""
        if adapter is not None and not callable(adapter):
            raise TypeError(
                f"forward_inputs must be a callable(input_ids, attention_mask) returning the forward's keyword "
                f"arguments (a dict) or positional arguments (a tuple), got {type(adapter).__name__}"
            )
        if adapter is not None or not positional:
            return cls(dict(options), pass_mask, False, adapter)
        # A positional forward has no **kwargs (else the ids would go in as input_ids=), so pass_mask is exactly
        # whether it names attention_mask; the cheap-forward options are keywords it may not take.
        return cls({}, pass_mask, True, None)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.adapter is not None:
            made = self.adapter(ids, mask.long())
            if isinstance(made, Mapping):
                return (), dict(made)
            if isinstance(made, torch.Tensor):
                return (made,), {}
            if isinstance(made, (tuple, list)):
                return tuple(made), {}
            raise TypeError(
                f"forward_inputs returned {type(made).__name__}; it must return a dict of keyword arguments, a tuple "
                "of positional arguments or one tensor"
            )
        kwargs = dict(self.options)
        if self.pass_mask:
            kwargs["attention_mask"] = mask.long()
        if self.positional:
            return (ids,), kwargs
        return (), {"input_ids": ids, **kwargs}


def explain_forward_error(error: BaseException) -> BaseException:
    """``error`` from the model's forward, wrapped with the option that helps when the call did not fit its signature."""
    if isinstance(error, TypeError) and "argument" in str(error):
        wrapped = TypeError(
            f"the model's forward did not take the probe's inputs ({error}); pass "
            "forward_inputs=callable(input_ids, attention_mask) returning its keyword arguments (a dict) or "
            "positional arguments (a tuple)"
        )
        wrapped.__cause__ = error
        return wrapped
    return error


def _reshard_fsdp2(model: nn.Module) -> None:
    # A no-grad forward leaves an FSDP2 root's parameters unsharded (pytorch/pytorch#131965); reshard() is local.
    fsdp2_module = fsdp2_module_type()
    if fsdp2_module is None:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, fsdp2_module):
            module.reshard()


@contextlib.contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """Run a probe without changing anything training depends on.

    eval() and no_grad for the probe; every module's ``.training`` flag restored exactly (submodules the user froze
    in eval included); torch CPU and accelerator, Python ``random`` and numpy RNG states restored; compiled code run
    eagerly (hooks fire, no recompiles); FSDP2 parameters resharded afterwards.
    """
    modes = [(module, module.training) for module in model.modules()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    stance = contextlib.nullcontext()
    if hasattr(torch, "compiler") and hasattr(torch.compiler, "set_stance"):
        stance = torch.compiler.set_stance("force_eager")
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), stance:
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        _reshard_fsdp2(model)


_HIDDEN_KEYS = ("hidden_states", "last_hidden_state", "hidden", "x", "h")


def select_hidden(value: Any) -> torch.Tensor | None:
    """The hidden state in a block's output, by the documented rule (``None`` when nothing fits).

    In order: a tensor is itself; a tuple or list gives its first element (looked into the same way); a mapping
    (a ``dict``, a ``transformers`` ``ModelOutput``) its ``hidden_states``, ``last_hidden_state``, ``hidden``, ``x``
    or ``h`` entry, else its only 3-D tensor value; any other object (a dataclass) its ``last_hidden_state`` or
    ``hidden_states`` attribute. Anything else needs ``block_output=``.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return select_hidden(value[0]) if value else None
    if isinstance(value, Mapping):
        for key in _HIDDEN_KEYS:
            if isinstance(value.get(key), torch.Tensor):
                return value[key]
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor) and v.dim() == 3]
        return tensors[0] if len(tensors) == 1 else None
    for attribute in ("last_hidden_state", "hidden_states"):
        inner = getattr(value, attribute, None)
        if isinstance(inner, torch.Tensor):
            return inner
    return None


class LayerHooks:
    """Temporary hooks delivering ``callback(layer_index, hidden[B, T, D])`` for layers 0..len(blocks).

    Use as a context manager; hooks are removed on exit, whatever happens. An exception in the callback (or in
    finding the hidden state) never leaves the hook: it would abort this rank's forward, and under FSDP or ZeRO-3
    leave the other ranks waiting in a parameter all-gather. It is kept in :attr:`error` (the first one), the
    rest of that forward only counts the hooks, and :meth:`check_and_reset`, after the forward, raises it.

    Args:
        blocks: the block modules, in forward order.
        callback: called with each layer's output.
        block_output: optional ``callable(output) -> [B, T, D] tensor`` choosing the hidden state in a block's
            output (default: :func:`select_hidden`).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        callback: Callable[[int, torch.Tensor], None],
        block_output: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.blocks = list(blocks)
        self.callback = callback
        self.select = block_output or select_hidden
        self.fired = [0] * (len(self.blocks) + 1)
        self.error: BaseException | None = None
        self._handles: list[Any] = []

    def _deliver(self, index: int, value: Any, *, is_input: bool = False) -> None:
        self.fired[index] += 1
        if self.error is not None:
            return
        try:
            hidden = select_hidden(value) if is_input else self.select(value)
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                what = "input" if is_input else "output"
                raise CaptureError(
                    f"the {what} of layer {index} is {type(value).__name__}, not a [batch, tokens, hidden] tensor "
                    "that layerwatch can find; pass block_output=callable(output) -> [batch, tokens, hidden] tensor "
                    "to choose it from the block's output, or layers= naming the model's block list"
                )
            self.callback(index, hidden)
        except Exception as error:  # noqa: BLE001 - kept, raised after the forward (see the class docstring)
            self.error = error

    def __enter__(self) -> "LayerHooks":
        def pre_hook(module, args, kwargs):
            first = args[0] if args else next((kwargs[k] for k in _HIDDEN_KEYS if k in kwargs), None)
            self._deliver(0, first, is_input=True)

        self._handles.append(self.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for i, block in enumerate(self.blocks, start=1):
            self._handles.append(block.register_forward_hook(lambda m, a, out, i=i: self._deliver(i, out)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.fired, self.error = [0] * len(self.fired), None

    def check_and_reset(self) -> None:
        """After a forward that finished: raise the hooks' error, or :class:`CaptureError` unless each fired once."""
        counts, error = self.fired, self.error
        self.reset()
        if error is not None:
            raise error
        wrong = {i: c for i, c in enumerate(counts) if c != 1}
        if wrong:
            raise CaptureError(
                f"layer hooks fired {wrong} times (layer: count) in one forward instead of once each; a compiled graph "
                "that skips hooks, an early exit or a block called twice. Pass layers= to choose the blocks"
            )
