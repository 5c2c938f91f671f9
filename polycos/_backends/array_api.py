"""The array-API core, as written, on any namespace (array-api-strict and every other library).

Nothing here restates math: the leaves of :class:`~polycos._backends._base.Backend`
run :mod:`polycos._core` on the namespace ``array-api-compat`` finds. Concrete
array-api-strict arrays are ``eager`` (the range rescue runs only where a row
needs it); other libraries might be lazy, so they take the branch-free path.
"""

from __future__ import annotations

import contextlib
from typing import Any

import array_api_compat

from polycos._backends._base import Backend, dtype_name

__all__ = ["ArrayAPIBackend"]


class ArrayAPIBackend(Backend):
    """The generic backend: :mod:`polycos._core` on the arrays' own namespace."""

    @property
    def eager(self) -> bool:  # type: ignore[override]
        return self.name == "array_api_strict"

    def quiet(self) -> contextlib.AbstractContextManager:
        if self.name == "array_api_strict":  # NumPy underneath warns on inf/NaN arithmetic
            import numpy as np

            return np.errstate(all="ignore")
        return contextlib.nullcontext()

    def from_numpy(self, a: Any, dtype: str | None = None, *, xp: Any = None, device: Any = None) -> Any:
        if xp is None and self.name == "array_api_strict":
            import array_api_strict as xp
        return super().from_numpy(a, dtype, xp=xp, device=device)

    def to_numpy(self, x: Any) -> Any:
        import numpy as np

        if self.name == "array_api_strict":  # DLPack export is refused on its non-default devices
            xp = array_api_compat.array_namespace(x)
            x = xp.asarray(x, device=xp.__array_namespace_info__().default_device())
            if dtype_name(x.dtype) == "bfloat16":
                x = xp.astype(x, xp.float32)
            return np.array(np.from_dlpack(x), copy=True)
        return super().to_numpy(x)
