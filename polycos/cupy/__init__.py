r"""CuPy backend: cosine similarity and its VJP as hand-written CUDA kernels.

The formulas are those of :mod:`polycos._core`, restated in
``polycos/_kernels/rows.h`` (shared with the CPU kernel) and run by the kernels
of ``polycos/_kernels/cuda.cu`` (one fused pass per row for the forward, one
for the VJP; see
``docs/backends/cupy.md``). This module holds only the glue: argument checks
(shared with every backend), the strided layout and launch configuration
(:mod:`polycos.cupy._launch`, pure Python), and the lazily compiled
:class:`cupy.RawModule`. CuPy itself is imported on the first call, so
``import polycos.cupy`` works without CuPy or a GPU; a call without a usable
GPU raises :class:`RuntimeError`.

>>> import polycos.cupy
>>> sorted(polycos.cupy.__all__)
['cosine_similarity', 'cosine_similarity_vjp', 'forward', 'vjp']
>>> import cupy  # doctest: +SKIP
>>> x = cupy.asarray([[1.0, 2.0], [3.0, 4.0]])  # doctest: +SKIP
>>> polycos.cupy.cosine_similarity(x, x[::-1])  # doctest: +SKIP
array([0.98386991, 0.98386991])
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import Any

from polycos import _core
from polycos._validate import Call, validate
from polycos.cupy import _launch

__all__ = ["cosine_similarity", "cosine_similarity_vjp", "forward", "vjp"]

#: NVRTC options: IEEE division and square root are NVRTC's defaults; no FMA
#: contraction, so the per-row formulas round as in polycos._core.
OPTIONS: tuple[str, ...] = ("--std=c++17", "--fmad=false")


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - cupy is installed wherever cupy arrays exist
        raise RuntimeError("polycos.cupy needs CuPy: pip install 'polycos[cupy]'") from e
    return cupy


def kernel_source() -> tuple[str, str]:
    """``(code, include_dir)``: ``cuda.cu`` and the directory holding it and ``rows.h``."""
    src = importlib.resources.files("polycos._kernels") / "cuda.cu"
    return src.read_text(encoding="utf-8"), str(Path(str(src)).parent)


@functools.cache
def _module(device_id: int) -> Any:
    """The compiled kernels for one device (NVRTC, on first use)."""
    cupy = _cupy()
    code, include = kernel_source()
    module = cupy.RawModule(
        code=code,
        options=(*OPTIONS, f"-I{include}"),
        name_expressions=list(_launch.all_name_expressions()),
    )
    module.compile()
    return module


def _kernel(name: str) -> Any:
    cupy = _cupy()
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
        device = cupy.cuda.Device().id
    except Exception as e:
        raise RuntimeError(
            f"polycos.cupy needs a working CUDA GPU and driver, and none is usable here ({e}). "
            "Use NumPy arrays (polycos.cosine_similarity) on machines without a GPU."
        ) from e
    return _module(device).get_function(name)


def _i64(values: Any) -> list:
    import numpy as np

    return [np.int64(v) for v in values]


def _vectors(call: Call) -> tuple[Any, Any, tuple[int, ...], int]:
    """Inputs, broadcast shape and axis; 0-d inputs become 1-vectors."""
    if call.shape:
        return call.x1, call.x2, tuple(call.shape), call.axis
    return call.x1.reshape(1), call.x2.reshape(1), (1,), 0


def _strides(x: Any, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    s = _launch.element_strides(x.strides, x.itemsize)
    return None if s is None else _launch.broadcast_strides(x.shape, s, shape)


def _plan(
    shape: tuple[int, ...], axis: int, arrays: list[Any], fixed: list[tuple[int, ...]]
) -> tuple[_launch.Layout, list[Any]]:
    """The layout of ``arrays`` (broadcast to ``shape``) and ``fixed`` operand strides.

    Where the strides cannot be expressed (more than four unmergeable batch
    dimensions, or strides that are not whole elements), the inputs are copied
    to C-contiguous broadcast arrays: the one case with a copy.
    """
    cupy = _cupy()
    strides = [_strides(a, shape) for a in arrays]
    lay = None
    if all(s is not None for s in strides):
        lay = _launch.reduce_layout(shape, axis, [*strides, *fixed])
    if lay is None:
        arrays = [cupy.ascontiguousarray(cupy.broadcast_to(a, shape)) for a in arrays]
        strides = [_launch.c_strides(shape)] * len(arrays)
        lay = _launch.reduce_layout(shape, axis, [*strides, *fixed])
        assert lay is not None
    return lay, arrays


def _full_strides(out_shape: tuple[int, ...], axis: int, strides: tuple[int, ...]) -> tuple[int, ...]:
    """Strides over the result's shape as strides over the full shape (0 along ``axis``)."""
    s = list(strides)
    s.insert(axis, 0)
    return tuple(s)


def forward(call: Call) -> Any:
    """Forward on a validated call of cupy arrays (the adapter contract of ``polycos._dispatch``)."""
    cupy = _cupy()
    x1, x2, shape, axis = _vectors(call)
    dtype = _launch_dtype(x1)
    out_shape = tuple(d for i, d in enumerate(shape) if i != axis)
    out = cupy.empty(out_shape, dtype=x1.dtype)
    out_full = _full_strides(out_shape, axis, _launch.c_strides(out_shape))
    lay, (x1, x2) = _plan(shape, axis, [x1, x2], [out_full])
    group = _launch.choose_group(lay.length, lay.rows, lay.axis_strides[:2], lay.inner_strides[:2])
    grid, block = _launch.launch_config(lay.rows, group)
    if grid:
        a, b, o = lay.batch_strides
        _kernel(_launch.forward_name(dtype, group))(
            (grid,), (block,),
            (x1, x2, out, out, _np().int32(0),
             *_i64((lay.rows, lay.length, *lay.axis_strides[:2], *lay.sizes[1:], *a, *b, *o)),
             *_f64((call.eps,))),
        )
    return out.reshape(()) if not call.shape else out


def vjp(grad: Any, call: Call) -> tuple[Any, Any]:
    """VJP on a validated call; ``grad`` broadcasts to the forward result's shape."""
    cupy = _cupy()
    x1, x2, shape, axis = _vectors(call)
    dtype = _launch_dtype(x1)
    out_shape = tuple(d for i, d in enumerate(shape) if i != axis)
    gs = _launch.element_strides(grad.strides, grad.itemsize)
    if gs is None:
        grad = cupy.ascontiguousarray(grad)
        gs = _launch.c_strides(grad.shape)
    g_full = _full_strides(out_shape, axis, _launch.broadcast_strides(grad.shape, gs, out_shape))
    shape1, shape2 = tuple(call.x1.shape), tuple(call.x2.shape)
    reduce1 = (1,) * (len(shape) - len(x1.shape)) + tuple(x1.shape) != shape
    reduce2 = (1,) * (len(shape) - len(x2.shape)) + tuple(x2.shape) != shape
    # Gradients summed over broadcast rows are written in the accumulation dtype first (as the core).
    out_dtype = _launch.accumulation_dtype(dtype) if (reduce1 or reduce2) else dtype
    d1 = cupy.empty(shape, dtype=out_dtype)
    d2 = cupy.empty(shape, dtype=out_dtype)
    d_full = _launch.c_strides(shape)
    lay, (x1, x2) = _plan(shape, axis, [x1, x2], [g_full, d_full])
    group = _launch.choose_group(lay.length, lay.rows, lay.axis_strides[:2], lay.inner_strides[:2])
    grid, block = _launch.launch_config(lay.rows, group)
    if grid:
        a, b, c, d = lay.batch_strides
        _kernel(_launch.backward_name(dtype, out_dtype, group))(
            (grid,), (block,),
            (x1, x2, grad, d1, _np().int32(0), d1, d2,
             *_i64((lay.rows, lay.length, *lay.axis_strides[:2], lay.axis_strides[3],
                    *lay.sizes[1:], *a, *b, *c, *d)),
             *_f64((call.eps,))),
        )
    g1 = _core.sum_to_shape(cupy, d1, shape1 or (1,)) if reduce1 else d1
    g2 = _core.sum_to_shape(cupy, d2, shape2 or (1,)) if reduce2 else d2
    return g1.astype(call.dtype, copy=False).reshape(shape1), g2.astype(call.dtype, copy=False).reshape(shape2)


def _np() -> Any:
    import numpy as np

    return np


def _f64(values: Any) -> list:
    return [_np().float64(v) for v in values]


def _launch_dtype(x: Any) -> str:
    name = str(x.dtype)
    if name not in _launch.CTYPES:
        raise TypeError(f"polycos.cupy supports dtypes {', '.join(_launch.DTYPES)}; got {name}")
    return name


def _check_cupy(**arrays: Any) -> None:
    import array_api_compat

    for name, x in arrays.items():
        if not array_api_compat.is_cupy_array(x):
            raise TypeError(f"{name} must be a cupy.ndarray, got {type(x).__module__}.{type(x).__qualname__}")


def cosine_similarity(x1: Any, x2: Any, dim: int = 1, eps: float = 1e-8) -> Any:
    r"""Cosine similarity of CuPy arrays along ``dim``, by the CUDA kernels.

    .. math::

        s = \operatorname{clip}\Big(\frac{\langle x_1, x_2 \rangle}
            {\max(\lVert x_1\rVert, \varepsilon)\,\max(\lVert x_2\rVert, \varepsilon)}, -1, 1\Big)

    with the semantics of :func:`polycos.cosine_similarity` (which routes CuPy
    arrays here).

    Parameters
    ----------
    x1, x2 : cupy.ndarray
        Arrays that broadcast together, any strides (stride 0 included).
        float16, bfloat16, float32 and float64 run natively; integer and bool
        inputs are promoted to float64.
    dim : int, optional
        Axis of the broadcast shape holding the vectors (default 1).
    eps : float, optional
        Lower bound on each norm, ``>= 0`` (default ``1e-8``).

    Returns
    -------
    cupy.ndarray
        The broadcast shape without ``dim``, on the inputs' device, in their
        (promoted) dtype; ``|s| <= 1``.

    Raises
    ------
    TypeError
        Inputs that are not cupy arrays, unsupported dtypes.
    ValueError, IndexError
        As :func:`polycos.cosine_similarity`.
    RuntimeError
        No usable CUDA GPU.

    Examples
    --------
    >>> import cupy  # doctest: +SKIP
    >>> from polycos.cupy import cosine_similarity
    >>> cosine_similarity(cupy.ones((2, 3)), cupy.ones(3))  # doctest: +SKIP
    array([1., 1.])
    """
    _check_cupy(x1=x1, x2=x2)
    return forward(validate(x1, x2, dim, eps))


def cosine_similarity_vjp(
    grad: Any, x1: Any, x2: Any, dim: int = 1, eps: float = 1e-8
) -> tuple[Any, Any]:
    r"""Vector-Jacobian product of :func:`cosine_similarity` on CuPy arrays: ``(dL/dx1, dL/dx2)``.

    .. math::

        \frac{\partial L}{\partial x_1} = \frac{g}{c_1}\Big(\frac{x_2}{c_2}
            - [n_1 > \varepsilon]\,\frac{s}{n_1}\,x_1\Big)

    and symmetrically for ``x2`` (see :func:`polycos.cosine_similarity_vjp`).
    One kernel recomputes each row's scalars and writes both gradient rows;
    gradients of broadcast inputs are summed back to the inputs' shapes.

    Parameters
    ----------
    grad : cupy.ndarray
        Upstream gradient, broadcastable to the result's shape.
    x1, x2, dim, eps
        As for :func:`cosine_similarity`.

    Returns
    -------
    (cupy.ndarray, cupy.ndarray)
        Gradients with the shapes and dtypes of ``x1`` and ``x2``.

    Examples
    --------
    >>> import cupy  # doctest: +SKIP
    >>> from polycos.cupy import cosine_similarity_vjp
    >>> g1, g2 = cosine_similarity_vjp(cupy.ones(1), cupy.asarray([[1.0, 0.0]]),
    ...                                cupy.asarray([[1.0, 1.0]]))  # doctest: +SKIP
    >>> g1  # doctest: +SKIP
    array([[0.        , 0.70710678]])
    """
    _check_cupy(grad=grad, x1=x1, x2=x2)
    import polycos

    return polycos.cosine_similarity_vjp(grad, x1, x2, dim, eps)
