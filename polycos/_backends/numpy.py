"""NumPy arrays: the fused CPU kernel when it is built, the array-API core otherwise.

The kernel (:mod:`polycos._kernels`, the C++ mirror of the core) reads every
row once for the forward and once more for the gradient, at any strides
(stride-0 broadcasts and negative strides included) and without copies. Where
it is not built (a machine without a compiler) the core runs on NumPy, with the
same guarantees and more memory traffic.

Input policy (docs/semantics.md): ``numpy.ndarray`` and views of it; NumPy
scalars; subclasses other than masked arrays and ``numpy.matrix`` are computed
as plain ``ndarray`` views (the result is a plain ``ndarray``); masked arrays,
``numpy.matrix``, and object, string, bytes, structured, datetime and
timedelta dtypes are rejected; ``ml_dtypes.bfloat16`` is a floating dtype,
other ``ml_dtypes`` types (float8, int4, ...) are rejected.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from polycos import _core, _outer, _validate
from polycos._backends._base import Backend, dtype_name

if TYPE_CHECKING:
    from polycos._call import Call

__all__ = ["NumPyBackend"]

#: A float64 product matrix up to this many elements is formed in one BLAS
#: call; larger ones in blocks of rows, each clamped and cast into the result at
#: once (no float64 copy of the whole matrix).
PRODUCT_ELEMENTS = 1 << 23
#: Elements of one float64 block of the product matrix (large inputs).
BLOCK_ELEMENTS = 1 << 20


def _kernels() -> Any:
    """The compiled CPU kernel module, or ``None`` when it is not built here."""
    if not _KERNELS:  # looked up once (an import statement per call costs about 1 us)
        try:
            from polycos import _kernels as k
        except ImportError:  # pragma: no cover - the package always has the loader
            k = None
        _KERNELS.append(k)
    k = _KERNELS[0]
    return k if k is not None and k.available() else None


_KERNELS: list[Any] = []


class NumPyBackend(Backend):
    """NumPy: the CPU kernel, else the core; eager (values may be inspected)."""

    eager = True
    strided_views = True

    @property
    def native(self) -> bool:
        return _kernels() is not None

    # ------------------------------------------------------------------ policy

    def accept(self, xp: Any, arrays: tuple[tuple[str, Any], ...]) -> tuple[Any, ...]:
        out = []
        for name, x in arrays:
            if isinstance(x, np.ma.MaskedArray):
                raise TypeError(
                    f"{name} is a numpy masked array; polycos does not apply masks: pass "
                    f"{name}.filled(value) or {name}.data explicitly"
                )
            if isinstance(x, np.matrix):
                raise TypeError(
                    f"{name} is a numpy.matrix, whose reductions keep two dimensions; pass "
                    f"np.asarray({name})"
                )
            if type(x) is not np.ndarray:  # other subclasses and NumPy scalars: a plain view
                x = np.asarray(x)
            self.check_dtype(xp, name, x)
            out.append(x)
        return tuple(out)

    def dtype_kind(self, xp: Any, dtype: Any) -> str | None:
        dtype = np.dtype(dtype)
        if _ml_dtype(dtype):  # kinds "V", "f" or "W": NumPy's own kinds do not describe them
            if dtype.name == "bfloat16":
                return "float"
            return "complex" if "complex" in dtype.name else None
        if dtype.kind == "f":
            return "float"
        if dtype.kind == "c":
            return "complex"
        if dtype.kind in "iub":
            return "integral"
        return None

    def check_dtype(self, xp: Any, name: str, x: Any) -> None:
        dtype = np.dtype(x.dtype)
        if _ml_dtype(dtype) and self.dtype_kind(xp, dtype) is None:
            raise TypeError(
                f"{name} has dtype {dtype.name} (ml_dtypes), which polycos does not support on NumPy "
                f"arrays (of ml_dtypes' types only bfloat16 is; NumPy's integer, bool and float16/32/64 "
                f"dtypes are too): cast it first, e.g. {name}.astype(np.float32)"
            )
        super().check_dtype(xp, name, x)

    def default_float(self, xp: Any, like: Any) -> Any:
        return np.float64

    def plain_arrays(self) -> tuple[type, tuple[Any, ...]]:
        return np.ndarray, (_F32, _F64)

    def result_type(self, xp: Any, x1: Any, x2: Any) -> Any:
        return np.result_type(x1.dtype, x2.dtype)

    def device(self, x: Any) -> Any:
        return "cpu"

    def quiet(self) -> contextlib.AbstractContextManager:
        return np.errstate(all="ignore")

    # ------------------------------------------------------------------ route

    def rowwise_forward(self, call: Call) -> tuple[Any, Any]:
        k = _kernels()
        if k is None or not call.shape:
            return super().rowwise_forward(call)
        return k.forward(call.x1, call.x2, call.axis, call.eps)

    def rowwise_value(self, call: Call) -> Any:
        k = _kernels()
        if k is None or not call.shape:
            return super().rowwise_value(call)
        return k.forward(call.x1, call.x2, call.axis, call.eps, want_res=False)[0]

    def rowwise_vjp(self, g: Any, call: Call, residuals: Any) -> tuple[Any, Any]:
        k = _kernels()
        if k is None or not call.shape or isinstance(residuals, _core.Residuals):
            return super().rowwise_vjp(g, call, residuals)
        shape1, shape2 = tuple(call.x1.shape), tuple(call.x2.shape)
        if shape1 == shape2 == tuple(call.shape):  # nothing to sum: the kernel rounds to T itself
            return k.backward(g, call.x1, call.x2, call.axis, call.eps, residuals)
        d1, d2 = self.full_vjp(g, call.x1, call.x2, call.axis, call.eps, residuals)
        with self.quiet():  # broadcast rows summed in the accumulation dtype, then rounded once
            d1 = _core.sum_to_shape(np, d1, shape1).astype(call.dtype, copy=False)
            d2 = _core.sum_to_shape(np, d2, shape2).astype(call.dtype, copy=False)
        return d1, d2

    def full_vjp(self, g: Any, x1: Any, x2: Any, axis: int, eps: float, residuals: Any = None) -> tuple[Any, Any]:
        """Gradients of the full broadcast shape, in the accumulation dtype (nothing summed yet)."""
        acc = _core.accumulation_dtype(np, x1.dtype)
        k = _kernels()
        if k is not None:
            return k.backward(g, x1, x2, axis, eps, residuals, out_dtype=acc)
        shape = _validate.broadcast_shapes(x1.shape, x2.shape)
        b1, b2 = (np.broadcast_to(x, shape).astype(acc) for x in (x1, x2))
        with self.quiet():
            return _core.vjp(np, g, b1, b2, axis, eps, eager=True)

    def pairwise_forward(self, x1: Any, x2: Any | None, eps: float) -> Any:
        k = _kernels()
        with self.quiet():  # (BLAS products of subnormal rows underflow: not an error here)
            if k is not None and _plain(x1, x2):
                return _forward_2d(k, x1, x2, eps)
            return _core.pairwise_forward(
                np, x1, x2, eps, native_product=_product, native_normalize=_normalize()
            )[0]

    def pairwise_forward_with_residuals(self, x1: Any, x2: Any | None, eps: float) -> tuple[Any, Any]:
        k = _kernels()
        if k is None or not _plain(x1, x2):
            return super().pairwise_forward_with_residuals(x1, x2, eps)
        with self.quiet():
            return _forward_2d(k, x1, x2, eps, keep=True)

    def pairwise_vjp(
        self, g: Any, x1: Any, x2: Any | None, eps: float, residuals: Any = None
    ) -> tuple[Any, Any | None]:
        k = _kernels()
        lean = g.shape == (x1.shape[0], (x1 if x2 is None else x2).shape[0])
        # residuals come only from the lean forward (kernel loaded, _plain inputs): not checked again
        lean = lean and (residuals is not None or (k is not None and _plain(x1, x2)))
        with self.quiet():
            if lean:
                return _vjp_2d(k, g, x1, x2, eps, residuals)
            return _core.pairwise_vjp(np, g, x1, x2, eps, native_normalize=_normalize())

    def pairwise_call_vjp(self, grad: Any, call: Any, residuals: Any = None) -> tuple[Any, Any | None]:
        g = grad if grad.shape == call.shape else np.broadcast_to(grad, call.shape)
        return self.pairwise_vjp(g, call.x1, call.x2, call.eps, residuals)

    # ------------------------------------------------------------------ conversions

    def to_numpy(self, x: Any) -> Any:
        x = np.array(x, copy=True)
        return x.astype(np.float32) if dtype_name(x.dtype) == "bfloat16" else x

    def from_numpy(self, a: Any, dtype: str | None = None, *, xp: Any = None, device: Any = None) -> Any:
        if dtype == "bfloat16":
            import ml_dtypes

            return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16)
        return np.array(a, dtype=dtype, copy=True)


def _ml_dtype(dtype: Any) -> bool:
    """A dtype from ``ml_dtypes`` (bfloat16, float8_*, int4, complex32, ...)."""
    return dtype.names is None and dtype.type.__module__.startswith("ml_dtypes")


def _normalize() -> Any:
    """:func:`polycos._core.normalize_rows` by the kernel (one pass per row), when built."""
    k = _kernels()
    if k is None:
        return None

    def normalize(x: Any, eps: float) -> _core.RowNorms:
        xhat, cs, ns, m = k.normalize_rows(x, eps)
        acc = _core.accumulation_dtype(np, x.dtype)
        return _core.RowNorms(xhat, cs, ns, m if _core.is_rescaled(x.dtype, acc) else None)

    return normalize


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
# ndarray.reshape is np.reshape without its Python wrapper (0.3 against 1.0 us, six per outer product)
_outer.register_reshape_method(np.ndarray)
#: Scratch memory a thread keeps for the lean pairwise path's temporaries (the
#: normalised rows, the float64 product of float32 inputs), at most this many
#: bytes. Allocating and freeing such blocks call after call makes the C library
#: hand pages back to the system and fault them in again (about 5 us a page on
#: the 2-core benchmark machine: +0.8 ms at 256 x 256); above this size the
#: matrix products dominate and temporaries are allocated as usual.
SCRATCH_BYTES = 1 << 22
#: Below this, temporaries are allocated as usual (glibc's default mmap threshold).
SCRATCH_MIN_BYTES = 1 << 17
_SCRATCH = threading.local()


def _scratch(*specs: tuple[tuple[int, ...], Any]) -> list[Any] | None:
    """Temporaries of the given ``(shape, dtype)`` in this thread's scratch memory.

    ``None`` when they are small (below :data:`SCRATCH_MIN_BYTES` the C library
    serves them from its pool at no cost) or too large. Never returned to a
    caller: the next call on this thread overwrites them.
    """
    sizes = [-(-math.prod(shape) * dt.itemsize // 64) * 64 for shape, dt in specs]
    total = sum(sizes)
    if not SCRATCH_MIN_BYTES <= total <= SCRATCH_BYTES:
        return None
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < total:
        buf = _SCRATCH.buf = np.empty(max(total, 1 << 16), np.uint8)
    out, at = [], 0
    for (shape, dt), size in zip(specs, sizes, strict=True):
        out.append(buf[at : at + math.prod(shape) * dt.itemsize].view(dt).reshape(shape))
        at += size
    return out


def _plain(x1: Any, x2: Any | None) -> bool:
    """The lean path's inputs: C-contiguous, aligned ``(N, D)`` float32/float64 of one dtype, no size 0.

    (``x2`` ``(M, D)`` or ``None``.) This is the common call, and the one whose
    fixed cost per call matters (small matrices); anything else takes the core
    with the kernel's hooks, with the same values.
    """
    dt = x1.dtype
    if x1.ndim != 2 or dt not in (_F32, _F64):
        return False
    f = x1.flags
    if not (f.c_contiguous and f.aligned) or 0 in x1.shape:
        return False
    if x2 is None:
        return True
    f = x2.flags
    return (
        x2.ndim == 2 and x2.dtype == dt and f.c_contiguous and f.aligned
        and x2.shape[1] == x1.shape[1] and x2.shape[0] > 0
    )


def _forward_2d(k: Any, x1: Any, x2: Any | None, eps: float, keep: bool = False) -> Any:
    """:func:`polycos._core.pairwise_forward` for :func:`_plain` inputs: one kernel call, one product.

    The same operations as the general path (the kernel's normalisation, the
    float64 product, the clamp, one rounding to float32), so the same bits. A
    float32 result is formed in blocks (:func:`polycos._kernels.product_blocks`):
    each float64 block stays in this thread's scratch memory and is clamped and
    rounded into the result in one pass (no float64 copy of the whole matrix,
    no page faults for it). With
    ``keep``, returns ``(S, (xhat, stats))``: the normalised rows (float64) and
    their statistics, which :func:`_vjp_2d` reuses.
    """
    n, d = x1.shape
    m = n if x2 is None else x2.shape[0]
    f32 = x1.dtype == _F32
    rows = n if x2 is None else n + m
    # a float32 product in blocks of (bn, bm); a small one (the C library's
    # pool serves it at no cost) in one block outside the scratch memory
    tiled = f32 and 8 * n * m >= SCRATCH_MIN_BYTES
    bn, bm = k.product_blocks(n, m) if tiled else (n, m)
    # scratch: the normalised rows (not when kept), their transposed copy for
    # self-similarity, the float64 block
    specs = ([] if keep else [((rows, d), _F64)]) + ([((d, n), _F64)] if x2 is None else [])
    if tiled:
        specs.append(((bn * bm,), _F64))
    tmp = _scratch(*specs) if specs else []
    if tmp is None:  # small, or too large together: then the tile alone in scratch memory
        in_scratch = _scratch(specs[-1]) if tiled else None
        tmp = [np.empty(shape, dt) for shape, dt in (specs[:-1] if in_scratch else specs)] + (in_scratch or [])
    if keep:
        xh, st = k.normalize_pair(x1, x2, eps, stats=True)
    else:
        xh, st = k.normalize_pair(x1, x2, eps, out=tmp.pop(0))[0], None
    if x2 is None:  # (self-similarity: gemm on a transposed copy, not syrk; see _product)
        h2t = tmp.pop(0)
        np.copyto(h2t, xh.T)
    else:
        h2t = xh[n:].T
    h1 = xh[:n]
    if not f32:
        s = np.matmul(h1, h2t)
        np.maximum(s, -1.0, out=s)  # clip keeping NaN, as np.clip (whose wrapper costs more)
        np.minimum(s, 1.0, out=s)
    elif not tiled:
        s, p = np.empty((n, m), _F32), np.matmul(h1, h2t)  # (p stays referenced while the kernel reads it)
        k.clamp_round_ptr(k.address(p), n * m, k.address(s))
    else:
        s, block = np.empty((n, m), _F32), tmp.pop(0)
        at, bt = k.address(s), k.address(block)
        for lo in range(0, n, bn):  # each block clamped and rounded into the result in one pass, in cache
            hi = min(n, lo + bn)
            a = h1[lo:hi]
            for c0 in range(0, m, bm):
                c1 = min(m, c0 + bm)
                np.matmul(a, h2t[:, c0:c1], out=block[: (hi - lo) * (c1 - c0)].reshape(hi - lo, c1 - c0))
                k.clamp_round_rows_ptr(bt, hi - lo, c1 - c0, at + 4 * (lo * m + c0), m)
    return (s, (xh, st)) if keep else s



def _vjp_2d(
    k: Any, g: Any, x1: Any, x2: Any | None, eps: float, residuals: tuple | None = None
) -> tuple[Any, Any | None]:
    """:func:`polycos._core.pairwise_vjp` for :func:`_plain` inputs and ``g`` of ``S``'s shape.

    One kernel call normalises the rows of both inputs straight into the
    product dtype (the input dtype, float32 or float64), two matrix products
    run in it, and one more kernel call applies the normalisation's VJP to
    every row (:func:`polycos._kernels.normalize_vjp`, the mirror of
    :func:`polycos._core.row_normalize_vjp`). ``residuals``: the forward's
    ``(xhat, stats)`` (:func:`_forward_2d` with ``keep``), rounded once to the
    product dtype instead of normalising again (the same bits).
    """
    if g.dtype != x1.dtype:
        g = g.astype(x1.dtype)
    rescaled = x1.dtype == _F64
    if residuals is not None:
        xh, st = residuals
        xh = xh.astype(x1.dtype, copy=False)
    else:
        rows = x1.shape[0] + (0 if x2 is None else x2.shape[0])
        tmp = _scratch(((rows, x1.shape[1]), x1.dtype))
        xh, st = k.normalize_pair(x1, x2, eps, work=True, stats=True, out=None if tmp is None else tmp[0])
    if x2 is None:
        v = np.matmul(g, xh)
        v += np.matmul(g.T, xh)
        return k.normalize_vjp(xh, v, st, eps, rescaled=rescaled), None
    n = x1.shape[0]
    v = np.empty_like(xh)
    np.matmul(g, xh[n:], out=v[:n])
    np.matmul(g.T, xh[:n], out=v[n:])
    d = k.normalize_vjp(xh, v, st, eps, rescaled=rescaled)
    return d[:n], d[n:]


def _product(h1: Any, h2: Any | None, dtype: Any) -> Any:
    """:func:`polycos._core.pairwise_product` without a float64 ``N·M`` copy when large."""
    # For self-similarity ``h1 @ h1.T`` NumPy would call syrk, which OpenBLAS runs
    # slower than gemm on a transposed copy (measured: 1.5-2x); the copy is O(N D).
    h2t = np.ascontiguousarray(np.swapaxes(h1, -1, -2)) if h2 is None else np.swapaxes(h2, -1, -2)
    n = h1.shape[-2]
    shape = (*_validate.broadcast_shapes(h1.shape[:-2], h2t.shape[:-2]), n, h2t.shape[-1])  # (np: 32 dims at most)
    out = np.empty(shape, dtype=dtype)
    per_row = max(math.prod(shape) // max(n, 1), 1)
    rows = max(256, BLOCK_ELEMENTS // per_row)
    if math.prod(shape) <= PRODUCT_ELEMENTS or rows >= n:
        np.clip(np.matmul(h1, h2t), -1.0, 1.0, out=out)
        return out
    for lo in range(0, n, rows):
        block = (..., slice(lo, lo + rows), slice(None))
        np.clip(np.matmul(h1[block], h2t), -1.0, 1.0, out=out[block])
    return out
