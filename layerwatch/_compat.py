"""Version shims: the few places where the supported torch / transformers / accelerate releases differ.

pyproject.toml declares the oldest releases layerwatch supports; ``.ci/run`` runs the test suite against exactly
those (``.ci/floor-constraints.txt``) as well as against current releases. Every difference between them that our
code meets is bridged here and nowhere else, so the floors can be raised later by deleting shims.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


def unwrap_model(accelerator: Any, model: Any) -> Any:
    """``accelerator.unwrap_model(model, keep_torch_compile=False)``.

    ``keep_torch_compile`` exists from accelerate 1.3 on; older releases keep a ``torch.compile`` wrapper around
    the unwrapped module, so callers that need the eager module still strip it (idempotent on newer releases).
    """
    unwrap = accelerator.unwrap_model
    try:
        accepts = "keep_torch_compile" in inspect.signature(unwrap).parameters
    except (TypeError, ValueError):  # a builtin or an object without a signature
        accepts = False
    return unwrap(model, keep_torch_compile=False) if accepts else unwrap(model)


def is_fsdp2(accelerator: Any) -> bool:
    """``accelerator.is_fsdp2``; before accelerate 1.3 there is no such attribute, and no FSDP2 support either."""
    flag = getattr(accelerator, "is_fsdp2", None)
    if flag is not None:
        return bool(flag)
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    return getattr(plugin, "fsdp_version", 1) == 2


@functools.cache  # looked up after every probe (FSDP2 resharding)
def fsdp2_module_type() -> type | None:
    """``FSDPModule``, the class ``fully_shard`` gives its modules: public in ``torch.distributed.fsdp`` from torch
    2.6 on, in the private ``torch.distributed._composable.fsdp`` in 2.4 and 2.5; None where neither imports."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:  # pragma: no cover - a torch built without distributed
            return None
    return FSDPModule
