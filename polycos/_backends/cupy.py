"""CUDA arrays: the hand-written kernels of ``polycos/_kernels/cuda.cu``, one pass per row.

The launches here serve CuPy arrays and, through the ``torch.library``
operators, torch CUDA tensors: zero-copy, the tensors' own device pointers and
strides, launched on torch's current stream (DLPack would refuse stride-0
broadcasts, and CuPy has no bfloat16 dtype; the kernels need neither). Operands are described as
for the CPU kernel, ``(pointer, shape, element strides)``, so any strides work
(stride 0 for broadcasts) without copies; the launch arithmetic (layouts,
threads per row, grid) is :mod:`polycos._kernels.cuda_launch`, pure Python and
tested without a GPU. Pairwise products and outer-product broadcasts run the
array-API core on CuPy (cuBLAS for the product). CuPy is imported only when
CuPy arrays (or CUDA tensors) show up.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polycos import _core
from polycos._backends._base import Backend, dtype_name
from polycos._kernels import cuda_launch as launch

if TYPE_CHECKING:
    from polycos._call import Call

__all__ = ["CupyBackend", "NeedContiguous", "Operand", "launch_backward", "launch_forward"]

#: ``(device pointer, shape, strides in elements)``.
Operand = tuple[int, tuple[int, ...], tuple[int, ...]]

#: NVRTC options: IEEE division and square root are NVRTC's defaults; no FMA
#: contraction, so the per-row formulas round as in polycos._core.
OPTIONS: tuple[str, ...] = ("--std=c++17", "--fmad=false")


class NeedContiguous(ValueError):
    """More batch dimensions than the kernels index remain: pass dense copies of the inputs."""


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - cupy is installed wherever cupy arrays exist
        raise RuntimeError("polycos needs CuPy for CUDA kernels: pip install 'polycos[cupy]'") from e
    return cupy


def kernel_source() -> tuple[str, str]:
    """``(code, include_dir)``: ``cuda.cu`` and the directory holding it and ``rows.h``."""
    src = importlib.resources.files("polycos._kernels") / "cuda.cu"
    return src.read_text(encoding="utf-8"), str(Path(str(src)).parent)


@functools.cache
def _module(device_id: int) -> Any:
    """The compiled kernels for one device (NVRTC, on first use; cached per device)."""
    code, include = kernel_source()
    module = _cupy().RawModule(
        code=code, options=(*OPTIONS, f"-I{include}"), name_expressions=list(launch.all_name_expressions())
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
            f"polycos needs a working CUDA GPU and driver for CuPy arrays, and none is usable here ({e}). "
            "Use NumPy arrays (polycos.cosine_similarity) on machines without a GPU."
        ) from e
    return _module(device).get_function(name)


def _ptr(value: int) -> Any:
    import numpy as np

    return np.uint64(value)  # a device pointer, passed by value


def _i64(values: Any) -> list:
    import numpy as np

    return [np.int64(v) for v in values]


def _full_strides(op: Operand, shape: tuple[int, ...]) -> tuple[int, ...]:
    """An operand's strides over the broadcast ``shape`` (0 along broadcast dimensions)."""
    return launch.broadcast_strides(op[1], op[2], shape)


def _result_strides(out: Operand, axis: int) -> tuple[int, ...]:
    """A result's strides over the full shape: 0 along the reduced ``axis``."""
    s = list(out[2])
    s.insert(axis, 0)
    return tuple(s)


def _launch_plan(shape: tuple, axis: int, strides: list) -> tuple[Any, int, int, int]:
    """``(layout, group, grid, block)`` of a launch over ``shape`` reducing ``axis`` (operands' ``strides``)."""
    lay = launch.reduce_layout(shape, axis, strides)
    if lay is None:
        raise NeedContiguous(f"too many batch dimensions for the CUDA kernels in {shape}")
    group = launch.choose_group(lay.length, lay.rows, lay.axis_strides[:2], lay.inner_strides[:2])
    grid, block = launch.launch_config(lay.rows, group)
    return lay, group, grid, block


def launch_forward(dtype: str, x1: Operand, x2: Operand, axis: int, eps: float, out: Operand,
                   res_ptr: int = 0) -> None:
    """Forward into ``out`` (the result, any strides) and, with ``res_ptr``, the packed residuals.

    ``x1``, ``x2`` broadcast to a shape of at least one dimension; ``res_ptr``
    points to a C-contiguous ``(*result, 5)`` array of the accumulation dtype.
    Launched on CuPy's current stream. Raises :class:`NeedContiguous`.
    """
    shape = tuple(launch.broadcast_shape(x1[1], x2[1]))
    lay, group, grid, block = _launch_plan(shape, axis, [_full_strides(x1, shape), _full_strides(x2, shape),
                                                         _result_strides(out, axis)])
    if not grid:
        return
    a, b, o = lay.batch_strides
    _kernel(launch.forward_name(dtype, group))(
        (grid,), (block,),
        (_ptr(x1[0]), _ptr(x2[0]), _ptr(out[0]), _ptr(res_ptr), _i32(1 if res_ptr else 0),
         *_i64((lay.rows, lay.length, *lay.axis_strides[:2], *lay.sizes[1:], *a, *b, *o)), _f64(eps)),
    )


def launch_backward(dtype: str, out_dtype: str, g: Operand, x1: Operand, x2: Operand, axis: int, eps: float,
                    res_ptr: int, d1: Operand, d2: Operand) -> None:
    """VJP into ``d1``, ``d2`` (C-contiguous, the full broadcast shape, ``out_dtype``).

    ``g`` broadcasts to the result; ``res_ptr`` is 0 (the kernel recomputes the
    row statistics) or the forward's packed residuals. Raises :class:`NeedContiguous`.
    """
    shape = tuple(launch.broadcast_shape(x1[1], x2[1]))
    out_shape = tuple(d for i, d in enumerate(shape) if i != axis)
    g_full = launch.broadcast_strides(g[1], g[2], out_shape)
    g_full = (*g_full[:axis], 0, *g_full[axis:])
    lay, group, grid, block = _launch_plan(shape, axis, [_full_strides(x1, shape), _full_strides(x2, shape),
                                                         g_full, launch.c_strides(shape)])
    if not grid:
        return
    a, b, c, d = lay.batch_strides
    _kernel(launch.backward_name(dtype, out_dtype, group))(
        (grid,), (block,),
        (_ptr(x1[0]), _ptr(x2[0]), _ptr(g[0]), _ptr(res_ptr), _i32(1 if res_ptr else 0),
         _ptr(d1[0]), _ptr(d2[0]),
         *_i64((lay.rows, lay.length, *lay.axis_strides[:2], lay.axis_strides[3], *lay.sizes[1:],
                *a, *b, *c, *d)),
         _f64(eps)),
    )


def _i32(v: int) -> Any:
    import numpy as np

    return np.int32(v)


def _f64(v: float) -> Any:
    import numpy as np

    return np.float64(v)


def _operand(x: Any) -> Operand:
    """A CuPy array as an operand (its strides in elements)."""
    strides = launch.element_strides(x.strides, x.itemsize)
    if strides is None:  # a stride that is not a whole number of elements
        raise NeedContiguous("strides are not whole elements")
    return x.data.ptr, tuple(x.shape), strides


class CupyBackend(Backend):
    """cupy.ndarray on a CUDA device: the CUDA kernels row-wise, the core for products."""

    eager = True
    strided_views = True

    @property
    def native(self) -> bool:
        return True

    def usable(self) -> bool:
        try:
            return _cupy().cuda.runtime.getDeviceCount() > 0
        except Exception:
            return False

    def quiet(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def dtype_kind(self, xp: Any, dtype: Any) -> str | None:
        from polycos._backends import get

        return get("numpy").dtype_kind(xp, dtype)  # CuPy dtypes are NumPy dtypes

    def device(self, x: Any) -> Any:
        return x.device

    def _inputs(self, call: Call) -> tuple[Any, Any, int]:
        cupy = _cupy()
        x1, x2 = call.x1, call.x2
        if not call.shape:
            return x1.reshape(1), x2.reshape(1), 0
        for x in (x1, x2):
            if launch.element_strides(x.strides, x.itemsize) is None:
                shape = call.shape
                return (cupy.ascontiguousarray(cupy.broadcast_to(x1, shape)),
                        cupy.ascontiguousarray(cupy.broadcast_to(x2, shape)), call.axis)
        return x1, x2, call.axis

    def rowwise_forward(self, call: Call) -> tuple[Any, Any]:
        cupy = _cupy()
        x1, x2, axis = self._inputs(call)
        dtype = dtype_name(x1.dtype)
        shape = tuple(launch.broadcast_shape(x1.shape, x2.shape))
        out_shape = tuple(d for i, d in enumerate(shape) if i != axis)
        out = cupy.empty(out_shape, dtype=x1.dtype)
        res = cupy.empty((*out_shape, 5), dtype=launch.accumulation_dtype(dtype))
        try:
            launch_forward(dtype, _operand(x1), _operand(x2), axis, call.eps, _operand(out), res.data.ptr)
        except NeedContiguous:
            b1, b2 = (cupy.ascontiguousarray(cupy.broadcast_to(x, shape)) for x in (x1, x2))
            launch_forward(dtype, _operand(b1), _operand(b2), axis, call.eps, _operand(out), res.data.ptr)
        return (out.reshape(()) if not call.shape else out), res

    def rowwise_vjp(self, g: Any, call: Call, residuals: Any) -> tuple[Any, Any]:
        cupy = _cupy()
        x1, x2, axis = self._inputs(call)
        dtype = dtype_name(x1.dtype)
        shape = tuple(launch.broadcast_shape(x1.shape, x2.shape))
        full = tuple(x1.shape) == shape and tuple(x2.shape) == shape
        # Broadcast rows are summed in the accumulation dtype, then rounded once (as the core).
        out_dtype = dtype if full else launch.accumulation_dtype(dtype)
        d1, d2 = cupy.empty(shape, dtype=out_dtype), cupy.empty(shape, dtype=out_dtype)
        g = cupy.ascontiguousarray(g.reshape(()) if not call.shape else g)
        res_ptr = residuals.data.ptr if residuals is not None else 0
        try:
            launch_backward(dtype, out_dtype, _operand(g), _operand(x1), _operand(x2), axis, call.eps, res_ptr,
                            _operand(d1), _operand(d2))
        except NeedContiguous:
            b1, b2 = (cupy.ascontiguousarray(cupy.broadcast_to(x, shape)) for x in (x1, x2))
            launch_backward(dtype, out_dtype, _operand(g), _operand(b1), _operand(b2), axis, call.eps, res_ptr,
                            _operand(d1), _operand(d2))
        shape1, shape2 = tuple(call.x1.shape), tuple(call.x2.shape)
        g1 = _core.sum_to_shape(cupy, d1, shape1 or (1,)).astype(call.dtype, copy=False)
        g2 = _core.sum_to_shape(cupy, d2, shape2 or (1,)).astype(call.dtype, copy=False)
        return g1.reshape(shape1), g2.reshape(shape2)

    def to_numpy(self, x: Any) -> Any:
        a = x.get()
        return a.astype("float32") if dtype_name(a.dtype) == "bfloat16" else a

    def from_numpy(self, a: Any, dtype: str | None = None, *, xp: Any = None, device: Any = None) -> Any:
        from polycos._backends import get

        return _cupy().asarray(get("numpy").from_numpy(a, dtype))


class TorchCuda:
    """The CUDA kernels on torch CUDA tensors: the operators' CUDA implementation.

    Tensors are passed by device pointer and strides (zero-copy, any layout,
    bfloat16 too) and the kernels run on torch's current CUDA stream.
    """

    @staticmethod
    def available() -> bool:
        try:
            return _cupy().cuda.runtime.getDeviceCount() > 0
        except Exception:
            return False

    @staticmethod
    def _operand(t: Any) -> Operand:
        return t.data_ptr(), tuple(t.shape), tuple(t.stride())

    @staticmethod
    def _stream(t: Any) -> Any:
        import torch

        return _cupy().cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream, t.device.index)

    @staticmethod
    def _name(t: Any) -> str:
        return str(t.dtype).rsplit(".", 1)[-1]

    def forward(self, x1: Any, x2: Any, axis: int, eps: float, out: Any, res: Any) -> None:
        with _cupy().cuda.Device(x1.device.index), self._stream(x1):
            try:
                launch_forward(self._name(x1), self._operand(x1), self._operand(x2), axis, eps,
                               self._operand(out), res.data_ptr())
            except NeedContiguous:
                shape = tuple(launch.broadcast_shape(x1.shape, x2.shape))
                b1, b2 = x1.expand(shape).contiguous(), x2.expand(shape).contiguous()
                launch_forward(self._name(x1), self._operand(b1), self._operand(b2), axis, eps,
                               self._operand(out), res.data_ptr())

    def backward(self, g: Any, x1: Any, x2: Any, res: Any, axis: int, eps: float, d1: Any, d2: Any) -> None:
        g = g.to(x1.dtype).contiguous()
        with _cupy().cuda.Device(x1.device.index), self._stream(x1):
            args = (self._name(x1), self._name(d1), self._operand(g))
            try:
                launch_backward(*args, self._operand(x1), self._operand(x2), axis, eps, res.data_ptr(),
                                self._operand(d1), self._operand(d2))
            except NeedContiguous:
                shape = tuple(launch.broadcast_shape(x1.shape, x2.shape))
                b1, b2 = x1.expand(shape).contiguous(), x2.expand(shape).contiguous()
                launch_backward(*args, self._operand(b1), self._operand(b2), axis, eps, res.data_ptr(),
                                self._operand(d1), self._operand(d2))
