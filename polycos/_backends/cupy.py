"""CuPy arrays: the hand-written CUDA kernels (``polycos/_kernels/cuda.cu``), one pass per row.

The launch logic (strided layouts, grid and block sizes, dtype dispatch) lives
in :mod:`polycos.cupy`; this class connects it to the route. Pairwise products
and outer-product broadcasts run the array-API core on CuPy (cuBLAS for the
product). CuPy is imported only when CuPy arrays show up.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from polycos._backends._base import Backend, dtype_name

if TYPE_CHECKING:
    from polycos._call import Call

__all__ = ["CupyBackend"]


class CupyBackend(Backend):
    """cupy.ndarray on a CUDA device: the CUDA kernels row-wise, the core for products."""

    eager = True

    @property
    def native(self) -> bool:
        return True

    def usable(self) -> bool:
        try:
            import cupy

            return cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:
            return False

    def quiet(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def value_plan(self, call: Call) -> tuple[Any, Any, Any]:
        """Stride-0 broadcast views that hide an outer product take the matrix path too."""
        from polycos import _outer

        if call.outer is not None or len(call.shape) < 3 or call.empty:
            return call.outer, call.x1, call.x2
        x1, x2 = _outer.collapse_stride0(call.x1, call.x2, len(call.shape))
        if x1 is call.x1 and x2 is call.x2:
            return None, x1, x2
        return _outer.plan(call.shape, call.axis, tuple(x1.shape), tuple(x2.shape)), x1, x2

    def rowwise_forward(self, call: Call) -> tuple[Any, Any]:
        from polycos.cupy import _kernels

        return _kernels.forward(call), None

    def rowwise_vjp(self, g: Any, call: Call, residuals: Any) -> tuple[Any, Any]:
        from polycos.cupy import _kernels

        return _kernels.vjp(g, call)

    def device(self, x: Any) -> Any:
        return x.device

    def to_numpy(self, x: Any) -> Any:
        a = x.get()
        return a.astype("float32") if dtype_name(a.dtype) == "bfloat16" else a

    def from_numpy(self, a: Any, dtype: str | None = None, *, xp: Any = None, device: Any = None) -> Any:
        import cupy

        from polycos._backends import get

        return cupy.asarray(get("numpy").from_numpy(a, dtype))
