"""dask arrays: the NumPy backend chunk by chunk, lazily.

Row-wise calls on arrays of known chunk sizes are one ``map_blocks`` over the
inputs broadcast together (views: stride-0 chunks, nothing materialised) and
rechunked so that each chunk holds whole rows; every chunk then runs the NumPy
backend (the CPU kernel where it is built). Nothing is computed until the
caller asks. Arrays with unknown chunk sizes (e.g. after boolean indexing),
and pairwise products, run the array-API core on dask's own namespace, which
dask evaluates chunk-wise too.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from polycos import _core
from polycos._backends import get
from polycos._backends._base import Backend, dtype_name

if TYPE_CHECKING:
    from polycos._call import Call

__all__ = ["DaskBackend"]


def _known(shape: tuple) -> bool:
    return all(isinstance(d, int) for d in shape)


class DaskBackend(Backend):
    """dask.array: chunk-wise NumPy backend, lazy."""

    lazy = True

    def quiet(self) -> contextlib.AbstractContextManager:
        return np.errstate(all="ignore")

    def accept(self, xp: Any, arrays: tuple[tuple[str, Any], ...]) -> tuple[Any, ...]:
        """NumPy's policy for the chunks: masked chunks are rejected (their masks would be ignored)."""
        for name, x in arrays:
            if isinstance(getattr(x, "_meta", None), np.ma.MaskedArray):
                raise TypeError(
                    f"{name} is a dask array of numpy masked arrays; polycos does not apply masks: pass "
                    f"{name}.map_blocks(np.ma.filled, value) or the unmasked data explicitly"
                )
        return super().accept(xp, arrays)

    # dask arrays hold NumPy dtypes (ml_dtypes' bfloat16 too): NumPy's dtype policy.

    def dtype_kind(self, xp: Any, dtype: Any) -> str | None:
        return get("numpy").dtype_kind(xp, dtype)

    def check_dtype(self, xp: Any, name: str, x: Any) -> None:
        get("numpy").check_dtype(xp, name, x)

    def default_float(self, xp: Any, like: Any) -> Any:
        return np.float64

    def result_type(self, xp: Any, x1: Any, x2: Any) -> Any:
        return np.result_type(x1.dtype, x2.dtype)

    def device(self, x: Any) -> Any:
        return "cpu"

    def cast_grad(self, xp: Any, grad: Any, dtype: Any) -> Any:
        """As the base class, with the cast's chunks run quietly when they are computed (G13)."""
        if grad.dtype == dtype:
            return grad
        return grad.map_blocks(_quiet_astype, dtype=dtype, target=np.dtype(dtype), meta=np.empty((0,) * grad.ndim, dtype=dtype))

    def _chunked(self, call: Call) -> tuple[Any, Any] | None:
        """Both inputs broadcast to the full shape with whole rows per chunk, or ``None``."""
        import dask.array as da

        if not call.shape or not _known(call.shape) or not all(
            _known(tuple(x.shape)) and all(not math.isnan(c) for cs in x.chunks for c in cs)
            for x in (call.x1, call.x2)
        ):
            return None
        if not all(isinstance(x._meta, np.ndarray) for x in (call.x1, call.x2)):
            return None
        b1, b2 = da.broadcast_arrays(call.x1, call.x2)
        whole = {call.axis: -1}
        return b1.rechunk(whole), b2.rechunk(whole)

    def rowwise_forward(self, call: Call) -> tuple[Any, Any]:
        chunked = self._chunked(call)
        if chunked is None or call.empty:
            return super().rowwise_forward(call)
        b1, b2 = chunked
        numpy = get("numpy")
        axis, eps = call.axis, call.eps

        def block(x1: Any, x2: Any) -> Any:
            return numpy.forward(_numpy_call(x1, x2, axis, eps))

        meta = np.empty((0,) * (len(call.shape) - 1), dtype=call.dtype)
        out = b1.map_blocks(block, b2, drop_axis=axis, dtype=call.dtype, meta=meta)
        return out, None

    def rowwise_vjp(self, g: Any, call: Call, residuals: Any) -> tuple[Any, Any]:
        chunked = self._chunked(call)
        if chunked is None or call.empty:
            return super().rowwise_vjp(g, call, None)
        import dask.array as da

        b1, b2 = chunked
        numpy = get("numpy")
        axis, eps = call.axis, call.eps
        acc = _core.accumulation_dtype(np, call.dtype)
        gk = da.expand_dims(g, axis).rechunk(tuple(
            1 if i == axis else c for i, c in enumerate(b1.chunks)
        ))

        def block(x1: Any, x2: Any, gb: Any, which: int) -> Any:
            # Full-shape gradients in the accumulation dtype: dask sums broadcast rows, then rounds once.
            return numpy.full_vjp(np.squeeze(gb, axis), x1, x2, axis, eps)[which]

        meta = np.empty((0,) * b1.ndim, dtype=acc)
        d1 = b1.map_blocks(block, b2, gk, 0, dtype=acc, meta=meta)
        d2 = b1.map_blocks(block, b2, gk, 1, dtype=acc, meta=meta)
        xp = call.xp
        d1 = xp.astype(_core.sum_to_shape(xp, d1, tuple(call.x1.shape)), call.dtype)
        d2 = xp.astype(_core.sum_to_shape(xp, d2, tuple(call.x2.shape)), call.dtype)
        return d1, d2

    def to_numpy(self, x: Any) -> Any:
        a = np.asarray(x.compute())
        return a.astype(np.float32) if dtype_name(a.dtype) == "bfloat16" else a.copy()

    def from_numpy(self, a: Any, dtype: str | None = None, *, xp: Any = None, device: Any = None) -> Any:
        import dask.array as da

        return da.from_array(get("numpy").from_numpy(a, dtype), chunks=-1)


def _quiet_astype(block: Any, target: Any) -> Any:
    with np.errstate(all="ignore"):
        return block.astype(target)


def _numpy_call(x1: Any, x2: Any, axis: int, eps: float) -> Any:
    """A validated-by-construction call on one chunk pair (same shape, same dtype)."""
    from polycos._call import Call

    numpy = get("numpy")
    return Call(numpy, np, x1, x2, tuple(x1.shape), axis, eps, None)
