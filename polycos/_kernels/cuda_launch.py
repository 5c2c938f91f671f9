"""Host-side launch logic for the CUDA kernels, in pure Python (no GPU, no CuPy).

Everything that decides *how* ``polycos/_kernels/cuda.cu`` runs is here, so it
can be tested without a GPU: reducing a broadcast shape and the operands'
strides to rows of a strided layout (:func:`reduce_layout`), the number of
threads per row (:func:`choose_group`), grid and block sizes
(:func:`launch_config`), the template instantiation for a dtype
(:func:`forward_name`, :func:`backward_name`), and the range limits of the
per-row rescaling (:func:`range_limits`: the constants of
``polycos._core._suspect``, compiled into ``rows.h``; tested equal there).

Layout model. The inputs broadcast to ``shape``; ``axis`` holds the vectors.
Every operand (``x1``, ``x2``, the upstream gradient, the outputs) is described
by its strides *in elements* over the full broadcast shape, ``0`` along
broadcast dimensions. The kernels see ``rows`` rows of ``length`` elements; row
``r`` (a C-order flat index over the batch dimensions, i.e. every dimension but
``axis``) starts at ``sum(index_k(r) * stride_k)`` for each operand, its
elements ``axis_stride`` apart. Batch dimensions of size 1 are dropped and
adjacent ones merged where every operand allows it, leaving at most
:data:`MAX_BATCH_DIMS`; otherwise the caller makes the inputs contiguous first.

>>> lay = reduce_layout((4, 3, 5), 1, [(15, 5, 1), (0, 5, 1)])
>>> lay.rows, lay.length, lay.sizes, lay.axis_strides
(20, 3, (1, 1, 4, 5), (5, 5))
>>> lay.batch_strides
((0, 0, 15, 1), (0, 0, 0, 1))
>>> forward_name("float32", choose_group(lay.length, lay.rows, lay.axis_strides, lay.inner_strides))
'polycos_forward<float, 8>'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CTYPES",
    "DTYPES",
    "GROUPS",
    "MAX_BATCH_DIMS",
    "MAX_GRID",
    "Layout",
    "accumulation_dtype",
    "all_name_expressions",
    "backward_name",
    "broadcast_shape",
    "broadcast_strides",
    "c_strides",
    "choose_group",
    "element_strides",
    "forward_name",
    "launch_config",
    "range_limits",
    "reduce_layout",
    "row_offsets",
    "work_dtype",
]

#: Storage dtypes the kernels are instantiated for, and their CUDA type names.
CTYPES: dict[str, str] = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}
DTYPES: tuple[str, ...] = tuple(CTYPES)

#: Threads per row: a thread (dim != last), 8 lanes, a warp, a block of 256.
GROUPS: tuple[int, ...] = (1, 8, 32, 256)

#: Threads per block when a row takes at most a warp.
WARP_BLOCK = 256

#: Batch dimensions the kernels index (sizes ``z0..z3``, outermost first).
MAX_BATCH_DIMS = 4

#: Blocks per launch at most; the kernels loop over rows (grid-stride), and a
#: row's result does not depend on which block computes it.
MAX_GRID = 1 << 20

#: The kernel arguments are signed 64-bit integers.
INT64_MAX = (1 << 63) - 1


def accumulation_dtype(dtype: str) -> str:
    """Accumulation dtype of the reductions (as ``polycos._core.accumulation_dtype``).

    >>> accumulation_dtype("bfloat16"), accumulation_dtype("float32")
    ('float32', 'float64')
    """
    _check_dtype(dtype)
    return {"float16": "float32", "bfloat16": "float32", "float32": "float64"}.get(dtype, dtype)


def work_dtype(dtype: str) -> str:
    """Dtype of the gradient's elementwise pass: the accumulation dtype (as ``polycos._core``)."""
    return accumulation_dtype(dtype)


def _check_dtype(dtype: str) -> None:
    if dtype not in CTYPES:
        raise TypeError(
            f"polycos.cupy supports dtypes {', '.join(DTYPES)}; got {dtype!r}"
        )


def range_limits(acc: str) -> tuple[float, float]:
    """``(lo, hi)``: sums of squares outside ``[lo, hi]`` are rescaled.

    The constants of ``polycos._core._out_of_range`` for accumulation dtype
    ``acc``: ``sqrt(smallest_normal) / eps`` and ``sqrt(max) / 4``.

    >>> range_limits("float32")[0] == 2.0 ** -40
    True
    """
    import numpy as np

    info = np.finfo(np.dtype(acc))
    return float(info.smallest_normal) ** 0.5 / float(info.eps), float(info.max) ** 0.5 / 4


def forward_name(dtype: str, group: int) -> str:
    """The ``name_expressions`` entry of the forward kernel for ``dtype`` and ``group``."""
    _check_dtype(dtype)
    _check_group(group)
    return f"polycos_forward<{CTYPES[dtype]}, {group}>"


def backward_name(dtype: str, out_dtype: str, group: int) -> str:
    """The backward kernel reading ``dtype`` and writing gradients of ``out_dtype``.

    ``out_dtype`` is ``dtype``, or the accumulation dtype for gradients that
    are summed over broadcast rows afterwards.
    """
    _check_dtype(dtype)
    _check_group(group)
    if out_dtype not in (dtype, work_dtype(dtype)):
        raise TypeError(f"gradients of {dtype} inputs are written as {dtype} or {work_dtype(dtype)}")
    return f"polycos_backward<{CTYPES[dtype]}, {CTYPES[out_dtype]}, {group}>"


def all_name_expressions() -> tuple[str, ...]:
    """Every kernel instantiation the host may launch (compiled together)."""
    names = []
    for dtype in DTYPES:
        outs = dict.fromkeys((dtype, work_dtype(dtype)))
        for group in GROUPS:
            names.append(forward_name(dtype, group))
            names.extend(backward_name(dtype, out, group) for out in outs)
    return tuple(names)


def _check_group(group: int) -> None:
    if group not in GROUPS:
        raise ValueError(f"threads per row must be one of {GROUPS}, got {group}")


# --------------------------------------------------------------------------- layout


def element_strides(strides: Sequence[int], itemsize: int) -> tuple[int, ...] | None:
    """Byte strides in elements; ``None`` if one is not a multiple of ``itemsize``."""
    if any(s % itemsize for s in strides):
        return None
    return tuple(s // itemsize for s in strides)


def c_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Element strides of a C-contiguous array of ``shape``.

    >>> c_strides((2, 3, 4))
    (12, 4, 1)
    """
    out, step = [], 1
    for d in reversed(tuple(shape)):
        out.append(step)
        step *= max(int(d), 1)
    return tuple(reversed(out))


def broadcast_shape(shape1: Sequence[int], shape2: Sequence[int]) -> tuple[int, ...]:
    """The broadcast shape of two (validated) shapes, right-aligned.

    >>> broadcast_shape((3, 1, 5), (4, 1))
    (3, 4, 5)
    """
    n = max(len(shape1), len(shape2))
    a = (1,) * (n - len(shape1)) + tuple(int(d) for d in shape1)
    b = (1,) * (n - len(shape2)) + tuple(int(d) for d in shape2)
    return tuple(y if x == 1 else x for x, y in zip(a, b, strict=True))


def broadcast_strides(
    shape: Sequence[int], strides: Sequence[int], full: Sequence[int]
) -> tuple[int, ...]:
    """Strides of an operand of ``shape`` broadcast to ``full`` (right-aligned; 0 where broadcast).

    >>> broadcast_strides((3, 1), (1, 1), (2, 3, 4))
    (0, 1, 0)
    """
    shape, strides, full = tuple(shape), tuple(strides), tuple(full)
    if len(shape) != len(strides) or len(shape) > len(full):
        raise ValueError(f"shape {shape} with strides {strides} does not broadcast to {full}")
    lead = len(full) - len(shape)
    out = [0] * lead
    for d, s, f in zip(shape, strides, full[lead:], strict=True):
        if d == f and d != 1:
            out.append(int(s))
        elif d == 1:
            out.append(0)
        else:
            raise ValueError(f"shape {shape} does not broadcast to {full}")
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    """Rows of a strided layout, as the kernels index them.

    ``sizes`` are the batch dimensions, outermost first, padded in front with 1
    to :data:`MAX_BATCH_DIMS`; ``batch_strides[i]`` and ``axis_strides[i]`` are
    operand ``i``'s strides over them and along the row (elements).
    """

    rows: int
    length: int
    sizes: tuple[int, ...]
    batch_strides: tuple[tuple[int, ...], ...]
    axis_strides: tuple[int, ...]

    @property
    def inner_strides(self) -> tuple[int, ...]:
        """Each operand's stride along the innermost batch dimension (0 if none)."""
        return tuple(s[-1] for s in self.batch_strides)


def reduce_layout(
    shape: Sequence[int], axis: int, operands: Sequence[Sequence[int]]
) -> Layout | None:
    """Rows of ``shape`` along ``axis`` for operands with the given element strides.

    Each entry of ``operands`` has one stride per dimension of ``shape`` (use
    :func:`broadcast_strides`; operands without the axis, like the result, put
    any value there). Returns ``None`` when more than :data:`MAX_BATCH_DIMS`
    batch dimensions remain after dropping size-1 dimensions and merging
    adjacent ones that every operand walks contiguously.
    """
    shape = tuple(int(d) for d in shape)
    if not 0 <= axis < len(shape):
        raise IndexError(f"axis {axis} out of range for shape {shape}")
    ops = [tuple(int(s) for s in op) for op in operands]
    for op in ops:
        if len(op) != len(shape):
            raise ValueError(f"strides {op} do not match shape {shape}")
    batch = [k for k in range(len(shape)) if k != axis]
    rows = math.prod(shape[k] for k in batch)
    dims: list[tuple[int, list[int]]] = []  # (size, strides per operand), outermost first
    for k in batch:
        if shape[k] == 1:
            continue
        size, strides = shape[k], [op[k] if shape[k] != 1 else 0 for op in ops]
        if dims:
            psize, pstrides = dims[-1]
            if all(ps == s * size for ps, s in zip(pstrides, strides, strict=True)):
                dims[-1] = (psize * size, strides)
                continue
        dims.append((size, strides))
    if len(dims) > MAX_BATCH_DIMS:
        return None
    pad = MAX_BATCH_DIMS - len(dims)
    sizes = (1,) * pad + tuple(d for d, _ in dims)
    batch_strides = tuple(
        (0,) * pad + tuple(s[i] for _, s in dims) for i in range(len(ops))
    )
    axis_strides = tuple(op[axis] if shape[axis] != 1 else 0 for op in ops)
    return Layout(rows, shape[axis], sizes, batch_strides, axis_strides)


def row_offsets(row: int, layout: Layout) -> tuple[int, ...]:
    """Each operand's element offset of row ``row``: the kernels' ``unravel`` + ``offset``.

    A model of the device code (C-order over ``layout.sizes``), used by the tests.
    """
    if not 0 <= row < max(layout.rows, 1):
        raise IndexError(f"row {row} out of range for {layout.rows} rows")
    idx = []
    r = row
    for z in reversed(layout.sizes[1:]):
        idx.append(r % z)
        r //= z
    idx.append(r)
    idx.reverse()
    return tuple(sum(i * s for i, s in zip(idx, st, strict=True)) for st in layout.batch_strides)


# --------------------------------------------------------------------------- launch


def choose_group(
    length: int,
    rows: int,
    axis_strides: Sequence[int] = (1,),
    inner_strides: Sequence[int] = (),
) -> int:
    """Threads per row: the launch heuristic.

    * 1 (a thread per row) when the vectors are strided in memory but
      neighbouring rows are adjacent (``dim`` is not the last axis), so that a
      warp's loads coalesce across rows, and there are enough rows to fill a GPU;
    * 8 lanes for short rows (``length <= 16``);
    * a warp for rows up to 4096 elements, or up to 1024 with few rows;
    * a block of 256 threads beyond.

    Depends only on shapes and strides, so results are bitwise repeatable (G8).

    >>> choose_group(4, 10**6), choose_group(128, 10**6), choose_group(65536, 100)
    (8, 32, 256)
    >>> choose_group(64, 10**6, axis_strides=(4096, 4096), inner_strides=(1, 1))
    1
    """
    strided = all(s not in (1, -1) for s in axis_strides if s != 0) and any(
        s != 0 for s in axis_strides
    )
    adjacent = bool(inner_strides) and all(s in (0, 1) for s in inner_strides) and any(
        s == 1 for s in inner_strides
    )
    if strided and adjacent and rows >= 4096 and length <= 4096:
        return 1
    if length <= 16:
        return 8
    if length <= 1024 or (length <= 4096 and rows >= 4096):
        return 32
    return 256


def launch_config(rows: int, group: int) -> tuple[int, int]:
    """``(grid, block)`` for ``rows`` rows at ``group`` threads per row (``grid`` 0: nothing to do).

    >>> launch_config(1000, 32), launch_config(5, 256), launch_config(0, 8)
    ((125, 256), (5, 256), (0, 256))
    """
    _check_group(group)
    if rows < 0 or rows > INT64_MAX:
        raise ValueError(f"rows={rows} out of range")
    block = group if group > 32 else WARP_BLOCK
    per_block = block // group
    return min(-(-rows // per_block), MAX_GRID), block
