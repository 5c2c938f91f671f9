"""Which adapter serves which array type.

Modelled on einops' ``_backends``: an adapter module is imported only when an
array of its framework shows up, and the test is a ``sys.modules`` look-up
(through ``array-api-compat``), so ``import polycos`` stays light and a NumPy
user never pays for importing torch, jax or cupy.

Each adapter module provides ``forward(call)`` and ``vjp(grad, call)``, taking
a validated :class:`polycos._validate.Call` (and, for ``vjp``, an upstream
gradient of the result's dtype that broadcasts to the result's shape).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import array_api_compat

__all__ = ["adapter_for"]

#: (predicate on an array, adapter module), tried in order; the generic array-API
#: adapter serves everything else.
_ROUTES: tuple[tuple[str, str], ...] = (
    ("is_torch_array", "polycos.torch"),
    ("is_jax_array", "polycos.jax"),
    ("is_cupy_array", "polycos.cupy"),
)
_GENERIC = "polycos._array_api"


def adapter_for(x: Any) -> ModuleType:
    """The adapter module for arrays like ``x`` (imported on first use)."""
    name = _GENERIC
    for predicate, module in _ROUTES:
        if getattr(array_api_compat, predicate)(x):
            name = module
            break
    # Already imported: a dict look-up, which torch.compile can trace (import_module it cannot).
    loaded = sys.modules.get(name)
    return loaded if loaded is not None else _import(name)


def _import(name: str) -> ModuleType:
    if name == "polycos.torch":
        # An import statement, not importlib: torch.compile traces the first
        # call of a compiled function through here, and Dynamo runs import
        # statements but refuses importlib.import_module.
        import polycos.torch as module

        return module
    return importlib.import_module(name)
