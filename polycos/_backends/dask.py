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


def _known_chunks(x: Any) -> bool:
    return all(not math.isnan(c) for cs in x.chunks for c in cs)


def _same_chunk_sizes(a: tuple, b: tuple) -> bool:
    """One chunk structure, unknown (NaN) sizes in the same places."""
    def key(chunks: tuple) -> tuple:
        return tuple(tuple("?" if math.isnan(c) else c for c in cs) for cs in chunks)

    return key(a) == key(b)


def _same_chunks(x1: Any, x2: Any) -> bool:
    """One chunk structure, unknown (NaN) sizes in the same places."""
    return _same_chunk_sizes(x1.chunks, x2.chunks)


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
        return _quiet_astype(grad, dtype)

    def _chunked(self, call: Call) -> tuple[Any, Any] | None:
        """Both inputs at the full shape with whole rows per chunk, or ``None``.

        Known sizes: broadcast (views) and rechunked. Unknown chunk sizes (after
        boolean indexing): only inputs of one shape and one chunk structure,
        which ``map_blocks`` pairs block by block without knowing the sizes.
        """
        import dask.array as da

        x1, x2 = call.x1, call.x2
        if not call.shape or not all(isinstance(x._meta, np.ndarray) for x in (x1, x2)):
            return None
        whole = {call.axis: -1}
        if _known(call.shape) and all(_known(tuple(x.shape)) and _known_chunks(x) for x in (x1, x2)):
            b1, b2 = da.broadcast_arrays(x1, x2)
            return b1.rechunk(whole), b2.rechunk(whole)
        if x1.ndim != x2.ndim or not _same_chunks(x1, x2):
            return None
        if _known((call.shape[call.axis],)):
            return x1.rechunk(whole), x2.rechunk(whole)
        if len(x1.chunks[call.axis]) == 1:  # whole rows already
            return x1, x2
        # dask cannot rechunk an axis of unknown length (nor can anything pair its pieces)
        raise ValueError(
            f"dim indexes axis {call.axis}, of unknown length and split into {len(x1.chunks[call.axis])} "
            f"chunks (x1.chunks[{call.axis}] = {x1.chunks[call.axis]}): polycos needs whole rows along "
            "dim; call x1.compute_chunk_sizes() and x2.compute_chunk_sizes() first"
        )

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
        gk = g[(slice(None),) * axis + (None,)]  # (indexing, not expand_dims: unknown sizes stay unknown)
        if _known_chunks(b1) and _known(tuple(gk.shape)):
            gk = da.broadcast_to(gk, tuple(1 if i == axis else d for i, d in enumerate(b1.shape)))
            gk = gk.rechunk(tuple(1 if i == axis else c for i, c in enumerate(b1.chunks)))
        # (unknown chunk sizes: g has the rows' chunks already, or one block that map_blocks broadcasts)

        def block(x1: Any, x2: Any, gb: Any, which: int) -> Any:
            # Full-shape gradients in the accumulation dtype: dask sums broadcast rows, then rounds once.
            return numpy.full_vjp(np.squeeze(gb, axis), x1, x2, axis, eps)[which]

        meta = np.empty((0,) * b1.ndim, dtype=acc)
        d1 = b1.map_blocks(block, b2, gk, 0, dtype=acc, meta=meta)
        d2 = b1.map_blocks(block, b2, gk, 1, dtype=acc, meta=meta)
        xp = call.xp
        d1 = _quiet_astype(_core.sum_to_shape(xp, d1, tuple(call.x1.shape)), call.dtype)
        d2 = _quiet_astype(_core.sum_to_shape(xp, d2, tuple(call.x2.shape)), call.dtype)
        return d1, d2

    # ------------------------------------------------------------------ pairwise: blockwise NumPy

    def _pairwise_blocks(self, x1: Any, x2: Any | None) -> tuple[Any, Any, tuple[tuple[int, ...], ...]] | None:
        """Rows whole along D, the same batch shape, NumPy chunks: the blockwise route (else ``None``).

        Returns both sides rechunked, and the blockwise indices of ``S``, ``x1``
        and ``x2`` (ints, not letters: any number of batch axes).

        The row axis may have unknown (NaN) chunk sizes (after boolean indexing):
        each block of ``S`` pairs whole row blocks, whatever their lengths.
        """
        pair = (x1,) if x2 is None else (x1, x2)

        def known_but_rows(x: Any) -> bool:
            return all(i == x.ndim - 2 or (_known((x.shape[i],)) and not any(map(math.isnan, cs)))
                       for i, cs in enumerate(x.chunks))

        if not all(isinstance(x._meta, np.ndarray) and known_but_rows(x) for x in pair):
            return None
        if any(0 in tuple(x.shape) for x in pair):  # an empty result: the core returns at once
            return None
        if x2 is not None and (x1.shape[:-2] != x2.shape[:-2] or x1.shape[-1] != x2.shape[-1]):
            return None
        b = tuple(range(x1.ndim - 2))
        n, m, d = len(b), len(b) + 1, len(b) + 2  # the rows, the columns, the features
        r1 = x1.rechunk({x1.ndim - 1: -1})
        r2 = r1 if x2 is None else x2.rechunk({x2.ndim - 1: -1, **{i: r1.chunks[i] for i in range(x1.ndim - 2)}})
        return r1, r2, ((*b, n, m), (*b, n, d), (*b, m, d))

    def pairwise_forward(self, x1: Any, x2: Any | None, eps: float) -> Any:
        blocks = self._pairwise_blocks(x1, x2)
        if blocks is None:
            return super().pairwise_forward(x1, x2, eps)
        import dask.array as da

        r1, r2, (i_s, i1, i2) = blocks
        numpy = get("numpy")

        def block(a: Any, c: Any) -> Any:  # one block of S from one row block of each side
            return numpy.pairwise_forward(a, c, eps)

        # align_arrays=False: _pairwise_blocks aligned the chunks already (D whole, the batch axes
        # as x1's), so dask's unify_chunks has nothing to do but warn (PerformanceWarning) that S
        # has more blocks than either input: n x m blocks from n and m, the product's very shape.
        return da.blockwise(block, i_s, r1, i1, r2, i2, dtype=x1.dtype, concatenate=True,
                            meta=np.empty((0,) * x1.ndim, dtype=x1.dtype), align_arrays=False)

    def pairwise_vjp(
        self, g: Any, x1: Any, x2: Any | None, eps: float, residuals: Any = None
    ) -> tuple[Any, Any | None]:
        blocks = self._pairwise_blocks(x1, x2)
        if blocks is None or not isinstance(g._meta, np.ndarray):
            return super().pairwise_vjp(g, x1, x2, eps)
        import dask.array as da

        r1, r2, (i_s, i1, i2) = blocks
        numpy = get("numpy")
        want = (*r1.chunks[:-1], r2.chunks[-2])
        if _same_chunk_sizes(g.chunks, want):
            gr = g
        elif all(not math.isnan(c) for cs in (*want, *g.chunks) for c in cs):
            gr = g.rechunk(want)
        else:
            raise ValueError(
                f"grad has chunks {g.chunks} and the similarity matrix {tuple(want)}: with unknown "
                "row counts, pass grad chunked as the result (e.g. made from it), or call "
                "compute_chunk_sizes() on the inputs first"
            )
        meta = np.empty((0,) * x1.ndim, dtype=x1.dtype)

        def side(which: int) -> Any:
            def block(gb: Any, a: Any, c: Any) -> Any:  # each side's gradient sums over the other side's blocks
                return numpy.pairwise_vjp(gb, a, c, eps)[which]

            return da.blockwise(block, (i1, i2)[which], gr, i_s, r1, i1, r2, i2, dtype=x1.dtype,
                                concatenate=True, meta=meta, align_arrays=False)  # aligned above

        if x2 is None:  # S(x, x): the row side and the column side, both on x
            return side(0) + side(1), None
        return side(0), side(1)

    def to_numpy(self, x: Any) -> Any:
        a = np.asarray(x.compute())
        return a.astype(np.float32) if dtype_name(a.dtype) == "bfloat16" else a.copy()

    def from_numpy(self, a: Any, dtype: str | None = None, *, xp: Any = None, device: Any = None) -> Any:
        import dask.array as da

        return da.from_array(get("numpy").from_numpy(a, dtype), chunks=-1)


def _quiet_astype(x: Any, dtype: Any) -> Any:
    """``astype`` chunk by chunk without NumPy's overflow warnings (a cast to a narrower dtype)."""

    def cast(block: Any) -> Any:
        with np.errstate(all="ignore"):
            return block.astype(dtype, copy=False)

    return x.map_blocks(cast, dtype=dtype, meta=np.empty((0,) * x.ndim, dtype=dtype))


def _numpy_call(x1: Any, x2: Any, axis: int, eps: float) -> Any:
    """A validated-by-construction call on one chunk pair (same shape, same dtype)."""
    from polycos._call import Call

    numpy = get("numpy")
    return Call(numpy, np, x1, x2, tuple(x1.shape), axis, eps, None)
