"""The registry: the one place that names array libraries.

Each :class:`Entry` says which arrays a backend owns (a cheap predicate that
never imports the library: ``array-api-compat`` checks ``sys.modules``), where
its :class:`~polycos._backends._base.Backend` class lives, and what must be
importable for it to count as installed. A backend is imported and created the
first time one of its arrays shows up (the einops ``_backends`` pattern), once
per process, under a lock, so ``import polycos`` stays light and concurrent
first calls from many threads are safe.

Adding a backend (say MLX) is one new module ``polycos/_backends/mlx.py`` with
a :class:`Backend` subclass, and one :class:`Entry` below; dispatch, the
public API, ``polycos.testing`` and ``polycos bench`` pick it up from here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import array_api_compat

if TYPE_CHECKING:
    from polycos._backends._base import Backend

__all__ = ["ENTRIES", "Entry", "backend_for", "get", "installed"]


@dataclass(frozen=True)
class Entry:
    """One array library polycos serves."""

    name: str
    owns: Callable[[Any], bool]  #: is this array one of the library's?
    module: str  #: module holding the backend class
    cls: str  #: backend class name
    requires: tuple[str, ...]  #: importable modules that make the backend installed


def _instance_of(module: str, *names: str) -> Callable[[Any], bool]:
    """``isinstance(x, module.name)``, False while ``module`` is not imported (so never imports it).

    Plain ``isinstance`` on ``sys.modules``, which ``torch.compile`` traces without warnings.
    """

    def owns(x: Any) -> bool:
        mod = sys.modules.get(module)
        if mod is None:
            return False
        return isinstance(x, tuple(getattr(mod, n) for n in names))

    return owns


def _is_array_api_strict(x: Any) -> bool:
    return type(x).__module__.startswith("array_api_strict")


def _any_array_api(x: Any) -> bool:
    return array_api_compat.is_array_api_obj(x)


#: Tried in order; the first whose predicate accepts an array serves it.
ENTRIES: tuple[Entry, ...] = (
    Entry("torch", _instance_of("torch", "Tensor"), "polycos._backends.torch", "TorchBackend", ("torch",)),
    Entry("numpy", _instance_of("numpy", "ndarray", "generic"), "polycos._backends.numpy", "NumPyBackend",
          ("numpy",)),
    Entry("jax", _instance_of("jax", "Array"), "polycos._backends.jax", "JaxBackend", ("jax",)),
    Entry("cupy", _instance_of("cupy", "ndarray"), "polycos._backends.cupy", "CupyBackend", ("cupy",)),
    Entry("dask", _instance_of("dask.array", "Array"), "polycos._backends.dask", "DaskBackend", ("dask",)),
    Entry(
        "array_api_strict", _is_array_api_strict, "polycos._backends.array_api", "ArrayAPIBackend",
        ("array_api_strict",),
    ),
    # Any other library implementing the array API standard: the core, as written.
    Entry("array_api", _any_array_api, "polycos._backends.array_api", "ArrayAPIBackend", ()),
)

_instances: dict[str, Backend] = {}
_lock = threading.RLock()


def get(name: str) -> Backend:
    """The backend called ``name``, created on first use (thread-safe)."""
    backend = _instances.get(name)
    if backend is not None:
        return backend
    return _create(name)


def _create(name: str) -> Backend:
    entry = next((e for e in ENTRIES if e.name == name), None)
    if entry is None:
        raise KeyError(f"no backend called {name!r}; known: {', '.join(e.name for e in ENTRIES)}")
    if _dynamo_tracing():
        # torch.compile traces a first call: single-threaded, and Dynamo cannot trace a lock.
        return _instances.setdefault(name, getattr(_import(entry), entry.cls)(entry))
    with _lock:  # one import and one instance, even if many threads ask at once
        backend = _instances.get(name)
        if backend is None:
            # A library's lazy imports may add warning filters (torch._dynamo imports sympy,
            # which adds one): the user's filters are restored, nothing of ours stays behind.
            with warnings.catch_warnings():
                backend = getattr(_import(entry), entry.cls)(entry)
            _instances[name] = backend
    return backend


def _import(entry: Entry) -> Any:
    if entry.name == "torch":
        # An import statement, not importlib: Dynamo runs the former while tracing.
        import polycos._backends.torch as module

        return module
    return importlib.import_module(entry.module)


def _dynamo_tracing() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.compiler.is_compiling())


def _owner(x: Any) -> Entry | None:
    for entry in ENTRIES:
        if entry.owns(x):
            return entry
    return None


def _type_name(x: object) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def backend_for(arrays: Iterable[tuple[str, Any]]) -> Backend:
    """The backend serving every one of the named ``arrays`` (``TypeError`` otherwise)."""
    arrays = tuple(arrays)
    owners = []
    for name, x in arrays:
        entry = _owner(x)
        if entry is None:
            raise TypeError(
                f"{name} must be an array (NumPy, PyTorch, JAX, CuPy, dask or another array-API "
                f"library), got {_type_name(x)}"
            )
        owners.append(entry)
    first = owners[0]
    for (name, x), entry in zip(arrays[1:], owners[1:], strict=True):
        if entry is not first:
            raise TypeError(
                f"{arrays[0][0]} and {name} must come from the same array library, got "
                f"{_type_name(arrays[0][1])} and {_type_name(x)}"
            )
    return get(first.name)


def installed() -> list[str]:
    """Names of the backends whose libraries can be imported here (``array_api`` excluded)."""
    return [
        e.name for e in ENTRIES
        if e.requires and all(importlib.util.find_spec(m) is not None for m in e.requires)
    ]
