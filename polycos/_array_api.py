"""The generic backend: NumPy, array-api-strict, dask and any array-API namespace.

It runs the core (:mod:`polycos._core`) on the namespace that
``array-api-compat`` finds. One native touch for NumPy, which restates no math:
the core's two heavy passes (the three row reductions, and the gradient's
elementwise pass) run over blocks of rows, so the float64 accumulation copies
and the gradient's temporaries stay in cache and the inputs stream from memory
about once. Lazy arrays (dask) never have their values inspected, so they stay
lazy and chunk-wise.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import array_api_compat

from polycos import _core
from polycos._validate import Call

__all__ = ["forward", "forward_with_residuals", "row_dots", "vjp"]

#: Elements of one input per block on NumPy (256 Ki: 2 MB in float64, L2/L3-resident).
BLOCK_ELEMENTS = 1 << 18


def _is_eager(xp: Any) -> bool:
    """Concrete arrays whose values may be inspected cheaply (no device sync, no graph)."""
    return array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_array_api_strict_namespace(
        xp
    )


def _quiet(xp: Any) -> contextlib.AbstractContextManager:
    """NumPy warns on inf/NaN arithmetic that the definition handles on purpose (G6)."""
    if array_api_compat.is_numpy_namespace(xp):
        import numpy as np

        return np.errstate(all="ignore")
    return contextlib.nullcontext()


def _as_vectors(call: Call) -> tuple[Any, Any]:
    """0-d inputs become 1-vectors (the core needs an axis to reduce)."""
    if call.shape:
        return call.x1, call.x2
    xp = call.xp
    return xp.reshape(call.x1, (1,)), xp.reshape(call.x2, (1,))


class _Blocks:
    """Row blocks along the longest non-reduced axis of the broadcast shape (NumPy only)."""

    def __init__(self, xp: Any, shape: tuple[int, ...], axis: int, k: int, rows: int) -> None:
        self.xp, self.shape, self.axis, self.k, self.rows = xp, shape, axis, k, rows

    @classmethod
    def plan(cls, call: Call) -> _Blocks | None:
        if not array_api_compat.is_numpy_namespace(call.xp):
            return None
        shape = call.shape
        if math.prod(shape) == 0:
            return None
        others = [k for k in range(len(shape)) if k != call.axis]
        if not others:
            return None
        k = max(others, key=lambda k: shape[k])
        rows = max(1, BLOCK_ELEMENTS // max(math.prod(shape) // max(shape[k], 1), 1))
        return None if rows >= shape[k] else cls(call.xp, shape, call.axis, k, rows)

    def __iter__(self):  # type: ignore[no-untyped-def]
        n = self.shape[self.k]
        return ((lo, min(lo + self.rows, n)) for lo in range(0, n, self.rows))

    def take(self, x: Any, lo: int, hi: int) -> Any:
        """Rows ``lo:hi`` of ``x``, or ``x`` itself where it is broadcast along the block axis."""
        k = self.k - (len(self.shape) - x.ndim)
        if k < 0 or x.shape[k] == 1:
            return x
        return x[(slice(None),) * k + (slice(lo, hi),)]

    def put(self, out: Any, lo: int, hi: int, value: Any) -> None:
        """Store a block's gradient: its rows, or add it where ``out`` is broadcast along ``k``."""
        k = self.k - (len(self.shape) - out.ndim)
        if k < 0 or out.shape[k] == 1:
            out += _core.sum_to_shape(self.xp, value, out.shape)
        else:
            rows = (slice(None),) * k + (slice(lo, hi),)
            out[rows] = _core.sum_to_shape(self.xp, value, out[rows].shape)

    def dots(self, x1: Any, x2: Any, axis: int, compensated: bool) -> tuple[Any, ...]:
        """:func:`polycos._core.dots` block by block, in the accumulation dtype."""
        xp = self.xp
        acc = _core.accumulation_dtype(xp, x1.dtype, x1)
        upcast1, upcast2 = self._upcaster(x1, acc), self._upcaster(x2, acc)
        parts = []
        for lo, hi in self:
            a1, a2 = upcast1(lo, hi), upcast2(lo, hi)
            parts.append(_core.dots(xp, a1, a2, axis, compensated=compensated))
        # <x1,x2> has a row per block row; <x1,x1> only if x1 is not broadcast along k.
        along = [True, x1.shape[self.k] != 1, x2.shape[self.k] != 1] * 2
        return tuple(
            xp.concat(ws, axis=self.k) if full else ws[0]
            for ws, full in zip(zip(*parts, strict=True), along, strict=False)
        )

    def _upcaster(self, x: Any, acc: Any) -> Any:
        """``(lo, hi) -> rows lo:hi of x in acc``, converted into one reused buffer.

        A fresh accumulation-dtype block per iteration costs an allocation (and,
        above the allocator's mmap threshold, page faults) each time; one buffer
        stays in cache.
        """
        if x.dtype == acc:
            return lambda lo, hi: self.take(x, lo, hi)
        k = self.k - (len(self.shape) - x.ndim)
        if k < 0 or x.shape[k] == 1:  # broadcast along the blocks: convert once
            whole = self.xp.astype(x, acc)
            return lambda lo, hi: whole
        shape = list(x.shape)
        shape[k] = min(self.rows, shape[k])
        buf = self.xp.empty(tuple(shape), dtype=acc)

        def upcast(lo: int, hi: int) -> Any:
            out = buf[(slice(None),) * k + (slice(0, hi - lo),)]
            out[...] = self.take(x, lo, hi)
            return out

        return upcast

    def elementwise(self, x1: Any, x2: Any, coefs: _core.GradCoefficients) -> tuple[Any, Any]:
        """:func:`polycos._core.grad_elementwise` block by block, in place where possible."""
        xp = self.xp
        work = coefs.u1.dtype
        shape = tuple(self.shape)
        direct = tuple(x.shape == shape and x.dtype == work for x in (x1, x2))
        g1 = xp.empty(x1.shape, dtype=work) if direct[0] else xp.zeros(x1.shape, dtype=work)
        g2 = xp.empty(x2.shape, dtype=work) if direct[1] else xp.zeros(x2.shape, dtype=work)
        for lo, hi in self:
            k = coefs._replace(**{f: self.take(getattr(coefs, f), lo, hi) for f in coefs._fields[:-1]})
            w1 = xp.astype(self.take(x1, lo, hi), work, copy=False)
            w2 = xp.astype(self.take(x2, lo, hi), work, copy=False)
            if all(direct):  # both inputs have the full shape: write the rows in place
                _core.grad_elementwise(xp, w1, w2, k, out=(self.take(g1, lo, hi), self.take(g2, lo, hi)))
                continue
            b1, b2 = _core.grad_elementwise(xp, w1, w2, k)
            self.put(g1, lo, hi, b1)
            self.put(g2, lo, hi, b2)
        return g1, g2


def row_dots(r1: Any, r2: Any) -> tuple[Any, Any, Any]:
    """:func:`polycos._core.dots` of non-empty NumPy ``(rows, d)`` arrays, without keepdims.

    The blocked evaluation of the NumPy backend (cache-sized blocks of rows
    upcast into reused buffers), for the PyTorch adapter's CPU fast path on
    the tensors' shared memory.
    """
    import numpy as np

    n, d = r1.shape
    rows = max(1, min(n, BLOCK_ELEMENTS // max(d, 1)))
    w12, w11, w22 = _Blocks(np, (n, d), 1, 0, rows).dots(r1, r2, 1, compensated=False)
    return w12[:, 0], w11[:, 0], w22[:, 0]


def forward(call: Call) -> Any:
    """Forward on a validated call."""
    return forward_with_residuals(call)[0]


def forward_with_residuals(call: Call) -> tuple[Any, _core.Residuals]:
    """Forward on a validated call, with what :func:`vjp` needs to skip recomputing it."""
    xp = call.xp
    x1, x2 = _as_vectors(call)
    blocks = _Blocks.plan(call)
    with _quiet(xp):
        out, residuals = _core.forward(
            xp, x1, x2, call.axis, call.eps, eager=_is_eager(xp),
            native_dots=blocks.dots if blocks else None,
        )
    return (xp.reshape(out, ()) if not call.shape else out), residuals


def vjp(grad: Any, call: Call, residuals: _core.Residuals | None = None) -> tuple[Any, Any]:
    """VJP on a validated call; ``grad`` broadcasts to the forward result's shape."""
    xp = call.xp
    x1, x2 = _as_vectors(call)
    out_shape = tuple(d for i, d in enumerate(call.shape) if i != call.axis)
    blocks = _Blocks.plan(call)
    with _quiet(xp):
        g1, g2 = _core.vjp(
            xp, xp.broadcast_to(grad, out_shape), x1, x2, call.axis, call.eps, residuals,
            eager=_is_eager(xp),
            native_dots=blocks.dots if blocks else None,
            native_elementwise=blocks.elementwise if blocks else None,
        )
    return xp.reshape(g1, tuple(call.x1.shape)), xp.reshape(g2, tuple(call.x2.shape))
