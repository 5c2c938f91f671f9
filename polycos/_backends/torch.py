r"""PyTorch tensors: ``torch.library`` operators over the native kernels, under an ``autograd.Function``.

Two layers, the pattern of PyTorch's custom-operator tutorial:

* **Operators** (``torch.ops.polycos.*``, registered with :mod:`torch.library`):
  ``cosine_forward(x1, x2, axis, eps) -> (s, res)``,
  ``cosine_backward(g, x1, x2, res, axis, eps) -> (d1, d2)`` and
  ``normalize_rows(x, eps) -> (xhat, stats)``. Their fake implementations give
  shapes, dtypes and devices without computing, so FakeTensor, meta tensors,
  ``torch.compile`` (dynamic shapes too), ``torch.export`` and
  ``torch.jit.trace`` see them as native ops. Their implementations call the
  fused CPU kernel (:mod:`polycos._kernels`) on CPU and the CUDA kernels
  (:mod:`polycos.cupy`, zero-copy through DLPack on torch's current stream) on
  CUDA; where a kernel is not available they run the array-API core in torch ops.
  ``res`` is the core's packed residuals (:func:`polycos._core.pack_residuals`).
  The forward operators have autograd formulas of their own (``register_autograd``),
  so a graph that holds them (``torch.export``, ``torch.jit.trace``) stays
  differentiable; eager calls skip that layer (:func:`_below_autograd`), and those
  on plain CPU tensors that no mode, profiler or tracer observes skip the
  dispatcher too (:func:`_run`).
* **Autograd** (:class:`CosineFunction`, :class:`PairwiseFunction`): forward
  calls the operator for plain tensors and the core in torch ops for everything
  else (tensor subclasses such as DTensor, :mod:`torch.func`-wrapped tensors,
  tensors with the conjugate or negative bit, devices without a kernel); backward
  calls the backward operator, or the core's VJP in differentiable torch ops
  when the backward is itself differentiated (``create_graph``); ``jvp`` is the
  core's JVP; ``generate_vmap_rule`` gives every :mod:`torch.func` transform.

No path reads a value back to the host, calls NumPy, or writes into a
preallocated buffer that autograd or vmap can see; every helper tensor is made
on the inputs' device.
"""

from __future__ import annotations

import contextlib
import threading
import types
from typing import TYPE_CHECKING, Any

import array_api_compat.torch as _compat
import torch

# torch._dynamo is imported now, under the registry's catch_warnings: the first operator
# call would import it (and sympy with it, which adds a warning filter) in the user's code.
import torch._dynamo
from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd import forward_ad

from polycos import _core, _outer
from polycos._backends._base import Backend, dtype_name

if TYPE_CHECKING:
    from polycos._call import Call

__all__ = ["CosineFunction", "PairwiseFunction", "TorchBackend", "xp"]


# --------------------------------------------------------------------------- namespace


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt`` whose derivative at 0 is 0 (not inf): second derivatives stay finite at zero rows."""
    zero = x == 0
    return torch.where(zero, torch.zeros_like(x), torch.sqrt(torch.where(zero, torch.ones_like(x), x)))


def _maximum(x1: Any, x2: Any) -> torch.Tensor:
    """``maximum`` with a Python-scalar bound as ``clamp_min`` (traceable by Dynamo)."""
    if isinstance(x2, (int, float)) and isinstance(x1, torch.Tensor):
        return torch.clamp_min(x1, x2)
    return torch.maximum(x1, x2)


def _vecdot(x1: torch.Tensor, x2: torch.Tensor, /, *, axis: int = -1) -> torch.Tensor:
    return torch.linalg.vecdot(x1, x2, dim=axis)


def _namespace() -> types.ModuleType:
    ns = types.ModuleType("polycos.torch.xp", "array_api_compat.torch as the core runs on it")
    ns.__dict__.update({k: v for k, v in vars(_compat).items() if k not in ("__name__", "__doc__")})
    ns.sqrt = _sqrt
    ns.moveaxis = torch.movedim  # same op; aten::moveaxis has no vmap batching rule
    ns.vecdot = _vecdot  # array-api-compat's version calls moveaxis
    ns.maximum = _maximum
    # The legacy vmap of gradcheck's batched checks has rules for these, not for
    # aten::broadcast_to and aten::swapaxes.
    ns.broadcast_to = lambda x, /, shape: x.expand(tuple(shape))
    ns.unstack = lambda x, /, *, axis=0: torch.unbind(x, dim=axis)  # compat's calls aten::moveaxis
    ns.matrix_transpose = lambda x, /: torch.transpose(x, -1, -2)
    return ns


#: The namespace the core runs on.
xp = _namespace()

# An outer product whose broadcast axes interleave permutes the product's result back: a
# contiguous copy, the layout F.cosine_similarity returns (FakeTensor and Dynamo's tensors too).
_outer.register_c_order(torch.Tensor, torch.Tensor.contiguous)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def _no_autocast(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The core's accumulation must never be demoted to an autocast dtype."""
    device = t.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device_type=device, enabled=False)
    return contextlib.nullcontext()


def _broadcast_shape(x1: torch.Tensor, x2: torch.Tensor) -> tuple:
    """``torch.broadcast_shapes`` of the two tensors' shapes, which equal integer shapes skip.

    (It costs about 12 us an eager call; symbolic sizes go to it unread, so no
    guard is added here.)
    """
    s1, s2 = x1.shape, x2.shape
    same = all(type(d) is int for d in (*s1, *s2)) and s1 == s2
    return tuple(s1 if same else torch.broadcast_shapes(s1, s2))


def _out_shape(x1: torch.Tensor, x2: torch.Tensor, axis: int) -> tuple:
    shape = _broadcast_shape(x1, x2)
    return (*shape[:axis], *shape[axis + 1 :])


# --------------------------------------------------------------------------- the core in torch ops


def core_forward(x1: torch.Tensor, x2: torch.Tensor, axis: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`polycos._core.forward` in torch ops: ``(s, packed residuals)``."""
    with _no_autocast(x1):
        out, res = _core.forward(xp, x1, x2, axis, eps)
        return out, _core.pack_residuals(xp, res, axis)


def core_backward(
    g: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, res: torch.Tensor | None, axis: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`polycos._core.vjp` in (differentiable) torch ops; ``res=None`` recomputes the residuals."""
    with _no_autocast(x1):
        residuals = None if res is None else _core.unpack_residuals(xp, res, axis)
        return _core.vjp(xp, g, x1, x2, axis, eps, residuals)


def core_normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`polycos._core.normalize_rows` in torch ops: ``(xhat, stats)``, stats = ``(cs, ns, m)``."""
    with _no_autocast(x):
        r = _core.normalize_rows(xp, x, eps)
        m = torch.ones_like(r.cs) if r.m is None else r.m
        return r.xhat, torch.cat([r.cs, r.ns, m], dim=-1)


# --------------------------------------------------------------------------- native kernels


def _cpu_kernels() -> Any:
    from polycos._backends.numpy import _kernels

    return _kernels()


def _operand(t: torch.Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """``(pointer, shape, element strides)``: how the kernels take a strided tensor, zero-copy."""
    return t.data_ptr(), tuple(t.shape), tuple(t.stride())


def _name(dtype: torch.dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _dense(x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as dense tensors of the broadcast shape (the kernels' fallback layout)."""
    shape = torch.broadcast_shapes(x1.shape, x2.shape)
    return x1.expand(shape).contiguous(), x2.expand(shape).contiguous()


class _CpuKernels:
    """The fused CPU kernel on tensors' memory (pointers and strides; no copies, no NumPy)."""

    def __init__(self, k: Any) -> None:
        self.k = k

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, axis: int, eps: float, out: torch.Tensor,
                res: torch.Tensor | None) -> None:
        """``res=None``: the value only (the kernel writes no residuals)."""
        k, dtype, acc = self.k, _name(x1.dtype), _name(_acc(x1.dtype))
        try:
            k.forward_ptr(dtype, acc, _operand(x1), _operand(x2), axis, eps, _operand(out), _ptr(res),
                          torch.get_num_threads())
        except k.NeedContiguous:  # a layout too fragmented to describe: dense copies of the broadcast
            b1, b2 = _dense(x1, x2)
            k.forward_ptr(dtype, acc, _operand(b1), _operand(b2), axis, eps,
                          _operand(out), _ptr(res), torch.get_num_threads())

    def backward(self, g: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, res: torch.Tensor, axis: int,
                 eps: float, d1: torch.Tensor, d2: torch.Tensor) -> None:
        k, dtype, acc = self.k, _name(x1.dtype), _name(res.dtype)
        args = (dtype, acc, _name(d1.dtype))
        try:
            k.backward_ptr(*args, _operand(g), _operand(x1), _operand(x2), axis, eps, res.data_ptr(),
                           _operand(d1), _operand(d2), torch.get_num_threads(), g_dtype=_name(g.dtype))
        except k.NeedContiguous:
            b1, b2 = _dense(x1, x2)
            gd = g.expand(_out_shape(x1, x2, axis)).contiguous()
            k.backward_ptr(*args, _operand(gd), _operand(b1), _operand(b2),
                           axis, eps, res.data_ptr(), _operand(d1), _operand(d2), torch.get_num_threads(),
                           g_dtype=_name(g.dtype))

    def normalize_vjp(self, h: torch.Tensor, v: torch.Tensor, stats: torch.Tensor, eps: float, rescaled: bool) -> None:
        """:func:`polycos._kernels.normalize_vjp` on C-contiguous ``(R, D)`` tensors, written over ``v``."""
        rows, d = h.shape
        self.k.normalize_vjp_ptr(_LEAN_CODES[h.dtype], _LEAN_CODES[stats.dtype], rows, d, h.data_ptr(), v.data_ptr(),
                                 stats.data_ptr(), eps, rescaled, None, torch.get_num_threads())

    def clamp_round(self, p: torch.Tensor, out: torch.Tensor) -> None:
        """``out = float32(clip(p, -1, 1))`` for C-contiguous float64 ``p`` and float32 ``out`` of one size."""
        self.k.clamp_round_ptr(p.data_ptr(), p.numel(), out.data_ptr())

    def advise_huge_pages(self, t: torch.Tensor) -> None:
        """Ask for huge pages on a new C-contiguous tensor's memory before it is first written."""
        self.k.advise_huge_pages_ptr(t.data_ptr(), t.numel() * t.element_size())

    def clamp_round_rows(self, p: torch.Tensor, out: torch.Tensor) -> None:
        """:meth:`clamp_round` of a C-contiguous ``(R, C)`` block into ``out``, a ``(R, C)`` view with unit column stride."""
        rows, cols = p.shape
        self.k.clamp_round_rows_ptr(p.data_ptr(), rows, cols, out.data_ptr(), out.stride(0))

    def normalize_rows(self, x: torch.Tensor, eps: float, xhat: torch.Tensor, stats: torch.Tensor) -> None:
        """``stats`` is ``(3, rows...)`` C-contiguous: ``cs``, ``ns``, ``m``."""
        k = self.k
        if x.dtype in _LEAN_CODES and x.ndim == 2 and x.is_contiguous() and xhat.dtype == torch.float64:
            # The C ABI's lean entry for a C-contiguous matrix (scalar arguments, no shape arrays)
            rows, d = x.shape
            k.normalize_pair_ptr(_LEAN_CODES[x.dtype], 3, x.data_ptr(), rows, None, 0, d, xhat.data_ptr(),
                                 stats.data_ptr(), eps, None, torch.get_num_threads())
            return
        ptrs = [stats[i].data_ptr() for i in range(3)]
        try:
            k.normalize_rows_ptr(_name(x.dtype), _name(xhat.dtype), _operand(x), eps, _operand(xhat), *ptrs,
                                 torch.get_num_threads())
        except k.NeedContiguous:
            k.normalize_rows_ptr(_name(x.dtype), _name(xhat.dtype), _operand(x.contiguous()), eps,
                                 _operand(xhat), *ptrs, torch.get_num_threads())


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


#: The kernel's dtype codes of the dtypes its lean matrix entries take (accumulation: float64).
_LEAN_CODES = {torch.float32: 2, torch.float64: 3}


def _cuda_kernels() -> Any:
    """The CUDA kernels for CUDA tensors when CuPy can launch them (else the core in torch ops)."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return None
    from polycos._backends.cupy import TorchCuda

    return TorchCuda() if TorchCuda.available() else None


_CPU_NATIVE: list = []  # the CPU kernels' wrapper, made once


def _native(device: torch.device) -> Any:
    """The kernels for tensors on ``device`` (``None``: run the core in torch ops)."""
    if device.type == "cpu":
        if not _CPU_NATIVE:
            k = _cpu_kernels()
            _CPU_NATIVE.append(None if k is None else _CpuKernels(k))
        return _CPU_NATIVE[0]
    if device.type == "cuda":
        return _cuda_kernels()
    return None


# --------------------------------------------------------------------------- operators


#: The operators' library. Registered with the low-level :class:`torch.library.Library`
#: API rather than ``torch.library.custom_op``: the same dispatcher entries and fake
#: kernels, without custom_op's Python autograd and Dynamo-disable layers around every
#: call (measured: 163 us against 51 us per call on a 32 x 128 tensor). Autograd is
#: :class:`CosineFunction`'s and :class:`PairwiseFunction`'s; called directly on
#: tensors that require grad, the operators are not differentiable (PyTorch warns).
_LIB = torch.library.Library("polycos", "DEF")


#: Each operator's implementation and its ``torch.ops`` handle, by name (:func:`_run`).
_IMPLS: dict[str, tuple[Any, Any]] = {}


def _operator(schema: str, fake: Any) -> Any:
    """Define ``polycos::<schema>``, implemented by the decorated function on every device; ``fake`` for tracing."""

    def register(impl: Any) -> Any:
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        _LIB.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"polycos::{name}", fake, lib=_LIB)
        _IMPLS[name] = (impl, getattr(torch.ops.polycos, name))
        return impl

    return register


def _run(name: str, *args: Any) -> Any:
    """``torch.ops.polycos.<name>(*args)`` below autograd, or the same implementation called directly.

    The dispatcher's call of a Python kernel (boxing the arguments, then the
    Python call) costs about 15 us, as much as the whole kernel on a 32 x 128
    input. An eager call on plain CPU tensors that nothing observes -- no
    dispatch or function mode (FakeTensor, ``make_fx``, ``FlopCounterMode``,
    ``torch.device``), no profiler, no Dynamo or JIT trace -- reaches exactly that
    implementation below autograd, so it is called without the dispatcher.
    Everything else goes through the operator, where modes and tracers see it.
    """
    impl, op = _IMPLS[name]
    if _unobserved(args):
        return impl(*args)
    with _below_autograd():
        return op(*args)


def _unobserved(args: tuple) -> bool:
    """No mode, profiler or tracer is active, and every tensor in ``args`` is a plain CPU tensor."""
    if (
        torch.compiler.is_compiling()  # (first: Dynamo traces this function, and reads no further)
        or torch.jit.is_tracing()
        or torch._C._len_torch_dispatch_stack()  # (FakeTensorMode and make_fx's modes included)
        or torch._C._is_torch_function_mode_enabled()
        or torch.autograd._profiler_enabled()
    ):
        return False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _EAGER_TYPES:
                return False
            keys = torch._C._dispatch_keys(a)  # a CPU tensor and nothing else: not batched (legacy
            if keys != _CPU_KEYS[0] and keys != _CPU_KEYS[1]:  # vmap's either), wrapped, conjugate...
                return False
    return True


_EAGER_TYPES = (torch.Tensor, torch.nn.Parameter)


def _cpu_keys() -> tuple[Any, Any]:
    with torch.inference_mode():
        inference = torch.empty(0)
    return torch._C._dispatch_keys(torch.empty(0)), torch._C._dispatch_keys(inference)


#: The dispatch keys of a plain CPU tensor, and of one made under ``torch.inference_mode``.
_CPU_KEYS = _cpu_keys()


def _cosine_forward_fake(x1: torch.Tensor, x2: torch.Tensor, axis: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    shape = _out_shape(x1, x2, axis)
    return x1.new_empty(shape), x1.new_empty((*shape, 5), dtype=_acc(x1.dtype))


@_operator("cosine_forward(Tensor x1, Tensor x2, int axis, float eps) -> (Tensor, Tensor)", _cosine_forward_fake)
def cosine_forward(x1: torch.Tensor, x2: torch.Tensor, axis: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on plain tensors (one dtype, broadcastable, ``axis`` into the broadcast shape)."""
    native = _native(x1.device)
    if native is None:
        return core_forward(x1, x2, axis, eps)
    shape = _out_shape(x1, x2, axis)
    out = torch.empty(shape, dtype=x1.dtype, device=x1.device)
    res = torch.empty((*shape, 5), dtype=_acc(x1.dtype), device=x1.device)
    native.forward(x1, x2, axis, eps, out, res)
    return out, res


def _cosine_value_fake(x1: torch.Tensor, x2: torch.Tensor, axis: int, eps: float) -> torch.Tensor:
    return x1.new_empty(_out_shape(x1, x2, axis))


@_operator("cosine_value(Tensor x1, Tensor x2, int axis, float eps) -> Tensor", _cosine_value_fake)
def cosine_value(x1: torch.Tensor, x2: torch.Tensor, axis: int, eps: float) -> torch.Tensor:
    """The forward's value alone (no residuals written): calls that no gradient will follow."""
    native = _native(x1.device)
    if not isinstance(native, _CpuKernels):  # the core, and the CUDA kernels, write the residuals anyway
        return cosine_forward(x1, x2, axis, eps)[0]
    out = torch.empty(_out_shape(x1, x2, axis), dtype=x1.dtype, device=x1.device)
    native.forward(x1, x2, axis, eps, out, None)
    return out


def _cosine_backward_fake(
    g: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, res: torch.Tensor, axis: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return x1.new_empty(x1.shape), x2.new_empty(x2.shape)


@_operator("cosine_backward(Tensor g, Tensor x1, Tensor x2, Tensor res, int axis, float eps) -> (Tensor, Tensor)",
           _cosine_backward_fake)
def cosine_backward(
    g: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, res: torch.Tensor, axis: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """VJP on plain tensors from the forward's residuals; gradients in the inputs' shapes."""
    native = _native(x1.device)
    if native is None or g.numel() == 0:  # an empty result: the core's zeros, in the inputs' dtypes
        return core_backward(g, x1, x2, res, axis, eps)
    shape = _broadcast_shape(x1, x2)
    full = tuple(x1.shape) == shape and tuple(x2.shape) == shape
    dtype = x1.dtype if full else _acc(x1.dtype)  # broadcast rows are summed in the accumulation dtype
    d1 = torch.empty(shape, dtype=dtype, device=x1.device)
    d2 = torch.empty(shape, dtype=dtype, device=x1.device)
    native.backward(g, x1, x2, res, axis, eps, d1, d2)
    if full:
        return d1, d2
    return (
        _core.sum_to_shape(xp, d1, tuple(x1.shape)).to(x1.dtype),
        _core.sum_to_shape(xp, d2, tuple(x2.shape)).to(x2.dtype),
    )


def _normalize_rows_fake(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    acc = _acc(x.dtype)
    return x.new_empty(x.shape, dtype=acc), x.new_empty((*x.shape[:-1], 3), dtype=acc)


@_operator("normalize_rows(Tensor x, float eps) -> (Tensor, Tensor)", _normalize_rows_fake)
def normalize_rows(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows along the last axis over ``max(||x||, eps)``, in the accumulation dtype, and ``(cs, ns, m)``."""
    native = _native(x.device)
    if native is None or not hasattr(native, "normalize_rows"):
        return core_normalize(x, eps)
    xhat = torch.empty(x.shape, dtype=_acc(x.dtype), device=x.device)
    stats = torch.empty((3, *x.shape[:-1]), dtype=_acc(x.dtype), device=x.device)
    native.normalize_rows(x, eps, xhat, stats)
    return xhat, stats.movedim(0, -1).contiguous()


def _pairwise_forward_fake(
    x1: torch.Tensor, x2: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, ...]:
    acc = _acc(x1.dtype)
    if _core._has_no_rows(_pairwise_shape(x1, x2)):
        return _empty_pairwise(x1, x2)
    if x2 is None:
        shape, h1 = _core._pairwise_shape(x1, None), tuple(x1.shape)
        return (x1.new_empty(shape), x1.new_empty(h1, dtype=acc), _stats_like(x1, h1, acc),
                x1.new_empty((0,), dtype=acc), x1.new_empty((0,), dtype=acc))
    a1, a2 = _core._align_last(xp, x1, x2)
    h1, h2 = tuple(a1.shape), tuple(a2.shape)
    return (x1.new_empty(_core._pairwise_shape(a1, a2)), x1.new_empty(h1, dtype=acc), _stats_like(x1, h1, acc),
            x1.new_empty(h2, dtype=acc), _stats_like(x1, h2, acc))


def _pairwise_shape(x1: torch.Tensor, x2: torch.Tensor | None) -> tuple:
    return _core._pairwise_shape(x1, x2) if x2 is None else _core._pairwise_shape(*_core._align_last(xp, x1, x2))


def _empty_pairwise(x1: torch.Tensor, x2: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """No pairs: an empty ``S`` and empty residuals (nothing normalised, however large a partner)."""
    acc = _acc(x1.dtype)
    return (x1.new_empty(_pairwise_shape(x1, x2)),
            *(x1.new_empty((0,), dtype=acc) for _ in range(4)))


def _stats_like(x: torch.Tensor, rows: tuple, acc: torch.dtype) -> torch.Tensor:
    return x.new_empty((3, *rows[:-1], 1), dtype=acc)


@_operator("pairwise_forward(Tensor x1, Tensor? x2, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
           _pairwise_forward_fake)
def pairwise_forward(x1: torch.Tensor, x2: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, ...]:
    """``(S, xhat1, stats1, xhat2, stats2)`` in one call: rows normalised once, one product.

    ``stats`` is ``(3, ..., N, 1)``: ``cs``, ``ns``, ``m`` (:class:`polycos._core.RowNorms`;
    ``m = 1`` where the dtype needs no rescaling). ``x2 = None`` (self-similarity):
    the last two are empty. One operator for the whole forward: at 32 x 32 a
    dispatch costs as much as the arithmetic.
    """
    native = _native(x1.device)
    if native is not None and hasattr(native, "normalize_rows") and _nonempty_matrices(x1, x2):
        h1, st1 = _kernel_rows(native, x1, eps)
        if x2 is None:
            empty = x1.new_empty((0,), dtype=h1.dtype)
            return _clamped_product(native, h1, h1.transpose(0, 1), x1.dtype), h1, st1, empty, empty.clone()
        h2, st2 = _kernel_rows(native, x2, eps)
        return _clamped_product(native, h1, h2.transpose(0, 1), x1.dtype), h1, st1, h2, st2
    if _core._has_no_rows(_pairwise_shape(x1, x2)):
        return _empty_pairwise(x1, x2)
    normalize = None if native is None or not hasattr(native, "normalize_rows") else _kernel_normalize(native)
    with _no_autocast(x1):
        s, (r1, r2) = _core.pairwise_forward(xp, x1, x2, eps, native_normalize=normalize, native_product=_product)
    if r2 is None:
        empty = x1.new_empty((0,), dtype=r1.xhat.dtype)
        return s, r1.xhat, _stats(r1), empty, empty.clone()
    return s, r1.xhat, _stats(r1), r2.xhat, _stats(r2)


def _pairwise_backward_fake(
    g: torch.Tensor, h1: torch.Tensor, st1: torch.Tensor, h2: torch.Tensor | None, st2: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    second = (0,) if h2 is None else tuple(h2.shape)
    return g.new_empty(tuple(h1.shape)), g.new_empty(second)


@_operator("pairwise_backward(Tensor g, Tensor h1, Tensor st1, Tensor? h2, Tensor? st2, float eps) -> (Tensor, Tensor)",
           _pairwise_backward_fake)
def pairwise_backward(
    g: torch.Tensor, h1: torch.Tensor, st1: torch.Tensor, h2: torch.Tensor | None, st2: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VJP of a 2-D ``pairwise_forward`` from its residuals, in ``g``'s dtype (``h2 = None``: self-similarity).

    :func:`polycos._core.pairwise_vjp`: two products in the product dtype, then
    the row normalisation's VJP by the kernel (``normalize_vjp``: one pass per
    row, ``<h, v>`` summed in the accumulation dtype). The second gradient is
    empty for self-similarity.
    """
    work, _, rescaled = _PAIRWISE_DTYPES[g.dtype]
    native = _native(g.device)
    gw = g if g.dtype == work else g.to(work)  # (a no-op .to() still costs a dispatch)
    h1w = h1.to(work)
    if h2 is None:
        v1 = torch.matmul(gw, h1w)
        v1 += torch.matmul(gw.transpose(0, 1), h1w)
        pairs = ((h1w, v1, st1),)
    else:
        h2w = h2.to(work)
        pairs = ((h1w, torch.matmul(gw, h2w), st1), (h2w, torch.matmul(gw.transpose(0, 1), h1w), st2))
    out = []
    for h, v, st in pairs:
        if isinstance(native, _CpuKernels):
            native.normalize_vjp(h.contiguous(), v, st.contiguous(), eps, rescaled)
            out.append(v if v.dtype == g.dtype else v.to(g.dtype))
        else:
            e = _core._eps_for(xp, st.dtype, eps)
            out.append(_row_normalize_vjp(v, h, st, e, rescaled).to(g.dtype))
    return out[0], (g.new_empty((0,)) if h2 is None else out[1])


#: The float64 block a thread keeps for float32 products (``polycos._kernels.product_blocks``).
_TILE = threading.local()


def _clamped_product(native: Any, h1: torch.Tensor, h2t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(h1 @ h2t, -1, 1)`` rounded to ``dtype``: the kernel path's product (2-D).

    A float32 result of float64 rows (float32 inputs) is formed on the CPU in
    blocks (``polycos._kernels.product_blocks``), each clamped and rounded into
    the result by the kernel in one pass while in cache: no float64 ``N x M``
    matrix, whose fresh pages cost as much as the rounding. A float64 result
    is the product itself, written into the result and clamped in place.
    (Elsewhere rounding first and then clamping gives the same values:
    rounding is monotone and keeps +-1.)
    """
    same = h1.dtype == dtype  # float64 inputs
    if not isinstance(native, _CpuKernels) or not (same or (h1.dtype == torch.float64 and dtype == torch.float32)):
        return torch.matmul(h1, h2t).to(dtype).clamp_(-1.0, 1.0)
    n, m = h1.shape[0], h2t.shape[1]
    (bn, bm), cap = native.k.product_blocks(n, m), native.k.PRODUCT_TILE_BYTES
    out = torch.empty((n, m), dtype=dtype)
    one_block = bn >= n and bm >= m
    if not one_block:  # a large result: huge pages, not 4 KiB ones first-touched one fault at a time
        native.advise_huge_pages(out)
    if same:
        return torch.matmul(h1, h2t, out=out).clamp_(-1.0, 1.0)
    if one_block:  # a fresh small block costs less than the cached one's bookkeeping
        native.clamp_round(torch.matmul(h1, h2t), out)
        return out
    tile = getattr(_TILE, "buf", None)
    if tile is None:  # (a block is at most `cap` bytes)
        with torch.inference_mode(False):  # a normal tensor: later calls outside inference mode write it
            tile = _TILE.buf = torch.empty(cap // 8, dtype=torch.float64)
    for lo in range(0, n, bn):  # each block clamped and rounded into the result in one pass, in cache
        hi = min(n, lo + bn)
        a = h1[lo:hi]
        for c0 in range(0, m, bm):
            c1 = min(m, c0 + bm)
            block = torch.matmul(a, h2t[:, c0:c1], out=tile[: (hi - lo) * (c1 - c0)].view(hi - lo, c1 - c0))
            native.clamp_round_rows(block, out[lo:hi, c0:c1])
    return out


def _nonempty_matrices(x1: torch.Tensor, x2: torch.Tensor | None) -> bool:
    """Two (or one) non-empty 2-D inputs of one row length: no broadcasting, no placeholders."""
    if x1.ndim != 2 or x1.numel() == 0:
        return False
    return x2 is None or (x2.ndim == 2 and x2.numel() != 0 and x2.shape[1] == x1.shape[1])


def _kernel_rows(native: Any, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xhat, stats)`` by the kernel, ``stats`` ``(3, ..., N, 1)`` as it writes them (``m = 1`` unscaled)."""
    acc = _acc(x.dtype)
    xhat = torch.empty(x.shape, dtype=acc, device=x.device)
    stats = torch.empty((3, *x.shape[:-1], 1), dtype=acc, device=x.device)
    native.normalize_rows(x, eps, xhat, stats)
    return xhat, stats


def _kernel_normalize(native: Any) -> Any:
    def normalize(x: torch.Tensor, eps: float) -> _core.RowNorms:
        return _row_norms(x, *_kernel_rows(native, x, eps))

    return normalize


# --------------------------------------------------------------------------- which tensors the operators take


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, FakeTensor)
_KERNEL_DEVICES = ("cpu", "cuda", "meta")


def _plain_type(t: torch.Tensor) -> bool:
    return type(t) in _PLAIN_TYPES


def _wrapped(t: torch.Tensor) -> bool:
    """A :mod:`torch.func` wrapper (batched, grad or dual tensor)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def kernel_ok(*ts: torch.Tensor) -> bool:
    """Plain strided tensors of a kernel dtype on CPU, CUDA or meta: the operators take them."""
    if torch.compiler.is_compiling():  # Dynamo and export trace plain (or fake) tensors; the fakes serve them
        return all(_plain_type(t) and t.dtype in _FLOATS for t in ts)
    for t in ts:  # cheapest tests first: this runs on every eager call
        if (
            type(t) not in _PLAIN_TYPES
            or t.dtype not in _FLOATS
            or t.layout != torch.strided
            or t.device.type not in _KERNEL_DEVICES
            or t.is_conj()
            or t.is_neg()
            or (_wrapped(t) and not torch._C._functorch.is_functionaltensor(t))  # (functionalize: the
        ):  # operators are functional, and run on the tensors it unwraps)
            return False
    return True


# --------------------------------------------------------------------------- operators' autograd


def _below_autograd() -> contextlib.AbstractContextManager:
    """Eager calls of a forward operator skip its Python autograd layer (8-14 us a call).

    They are made where no gradient follows, or inside a Function's ``forward``,
    whose own node records the call. While Dynamo traces, nothing is skipped:
    it traces below autograd anyway.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # (a trace's inputs may require grad)
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def _save_forward_inputs(ctx: Any, inputs: tuple, output: Any) -> None:
    x1, x2, axis, eps = inputs
    ctx.axis, ctx.eps = axis, eps
    if isinstance(output, tuple):  # cosine_forward: (s, res)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(_savable(x1), _savable(x2), output[1])
    else:  # cosine_value: no residuals, the backward recomputes them
        ctx.save_for_backward(_savable(x1), _savable(x2), None)


def _cosine_operator_backward(ctx: Any, g: torch.Tensor, *_: Any) -> tuple:
    """The VJP of ``cosine_forward`` and ``cosine_value`` called in a graph (as :class:`_Cosine`'s)."""
    if g is None:
        return None, None, None, None
    x1, x2, res = ctx.saved_tensors
    d1, d2 = _cosine_grads(g, x1, x2, res, ctx.axis, ctx.eps)
    need1, need2 = ctx.needs_input_grad[:2]
    return (d1 if need1 else None), (d2 if need2 else None), None, None


def _save_pairwise(ctx: Any, inputs: tuple, output: tuple) -> None:
    x1, x2, eps = inputs
    _, h1, st1, h2, st2 = output
    ctx.mark_non_differentiable(h1, st1, h2, st2)
    ctx.set_materialize_grads(False)
    ctx.eps = eps
    ctx.save_for_backward(_savable(x1), _savable(x2), h1, st1, h2, st2)


def _pairwise_operator_backward(ctx: Any, g: torch.Tensor, *_: Any) -> tuple:
    """The VJP of ``pairwise_forward`` called in a graph (as :class:`_Pairwise`'s)."""
    if g is None:
        return None, None, None
    x1, x2, h1, st1, h2, st2 = ctx.saved_tensors
    d1, d2 = _Pairwise._matrix_backward(ctx, g, x1, x2, h1, st1, h2, st2)
    need1, need2 = ctx.needs_input_grad[:2]
    return (d1 if need1 else None), (d2 if need2 else None), None


def _register_operator_autograd() -> None:
    """Autograd formulas for the forward operators, where a graph calls them directly.

    ``torch.export`` and ``torch.jit.trace`` record the operators, not the
    Functions around them: without these, ``ep.module()(x, y).sum().backward()``
    left every gradient ``None``.
    """
    for name in ("cosine_forward", "cosine_value"):
        torch.library.register_autograd(
            f"polycos::{name}", _cosine_operator_backward, setup_context=_save_forward_inputs, lib=_LIB
        )
    torch.library.register_autograd(
        "polycos::pairwise_forward", _pairwise_operator_backward, setup_context=_save_pairwise, lib=_LIB
    )


# --------------------------------------------------------------------------- autograd


def _savable(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` as autograd may save it: a tensor made under ``torch.inference_mode`` is copied.

    (Autograd refuses to save inference tensors; a frozen encoder's embeddings
    compared with trainable ones need the frozen side for the other's gradient.)
    """
    if x is None or torch.compiler.is_compiling():  # (Dynamo cannot trace is_inference)
        return x
    return x.clone() if x.is_inference() else x


class _Cosine(torch.autograd.Function):
    """Forward, setup_context and backward: what Dynamo can trace (it refuses a custom ``jvp``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x1: torch.Tensor, x2: torch.Tensor, axis: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if kernel_ok(x1, x2):
            return _run("cosine_forward", x1, x2, axis, eps)
        return core_forward(x1, x2, axis, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x1, x2, axis, eps = inputs
        _, res = output
        ctx.mark_non_differentiable(res)
        ctx.set_materialize_grads(False)  # no zeros made for res's gradient, which backward ignores
        ctx.axis, ctx.eps = axis, eps
        x1, x2 = _savable(x1), _savable(x2)
        ctx.save_for_backward(x1, x2, res)
        ctx.save_for_forward(x1, x2, res)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None, _: Any) -> tuple:  # type: ignore[override]
        if g is None:  # s has no gradient (grads are not materialised): neither have the inputs
            return None, None, None, None
        x1, x2, res = ctx.saved_tensors
        need1, need2 = ctx.needs_input_grad[:2]
        d1, d2 = _cosine_grads(g, x1, x2, res, ctx.axis, ctx.eps)
        return (d1 if need1 else None), (d2 if need2 else None), None, None


def _cosine_grads(
    g: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, res: torch.Tensor | None, axis: int, eps: float,
    *, differentiable: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gradients from the forward's residuals (``None``: recomputed).

    ``differentiable`` (default: grad mode is on, as in a backward with ``create_graph``):
    the gradients will be differentiated themselves.
    """
    if torch.is_grad_enabled() if differentiable is None else differentiable:
        # Differentiated itself (create_graph, torch.func): the core in differentiable
        # ops, the residuals recomputed from x1 and x2 so the second derivative sees them.
        return core_backward(g, x1, x2, None, axis, eps)
    if kernel_ok(g, x1, x2) and (res is None or kernel_ok(res)):
        if res is None:
            _, res = _run("cosine_forward", x1, x2, axis, eps)
        return _run("cosine_backward", g, x1, x2, res, axis, eps)
    return core_backward(g, x1, x2, res, axis, eps)


class CosineFunction(_Cosine):
    r"""Row-wise cosine similarity as an ``autograd.Function``, with forward mode.

    ``CosineFunction.apply(x1, x2, axis, eps)`` takes validated tensors (one
    floating dtype, broadcastable, ``axis`` a non-negative index into the
    broadcast shape of at least one dimension) and returns ``(s, res)``: the
    similarity and the packed residuals (non-differentiable). ``jvp`` is the
    core's tangent rule (:func:`polycos._core.jvp`), written directly so that
    batched forward-mode gradients work.
    """

    @staticmethod
    def jvp(ctx: Any, t1: Any, t2: Any, *_: Any) -> tuple:  # type: ignore[override]
        x1, x2, res = ctx.saved_tensors
        # The forward's residuals are constants to every other level of differentiation; where
        # one may be active (reverse mode on the inputs, a torch.func transform), the tangent is
        # computed from the inputs alone so that those levels see all of its dependence on them.
        reuse = not (_wrapped(x1) or _wrapped(x2) or x1.requires_grad or x2.requires_grad)
        x1, x2 = _primal(x1), _primal(x2)
        with _no_autocast(x1), _outer_levels():
            residuals = _core.unpack_residuals(xp, res, ctx.axis) if reuse else None
            out = _core.jvp(xp, t1, t2, x1, x2, ctx.axis, ctx.eps, residuals)
        return out, _no_tangent(res, out)


def _primal(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` without its tangent at the level whose ``jvp`` runs (other levels' tangents kept)."""
    if x is None:
        return None
    f = torch._C._functorch
    if f.is_batchedtensor(x):  # (vmap has no rule for aten::_unpack_dual: the batch dim taken off and put back)
        level, bdim = f.maybe_get_level(x), f.maybe_get_bdim(x)
        return f._add_batch_dim(_primal(f.get_unwrapped(x)), bdim, level)
    return forward_ad.unpack_dual(x).primal


def _no_tangent(output: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor | None:
    """The tangent ``jvp`` returns for a non-differentiable output: ``None``, or zeros under vmap.

    (``torch.func``'s generated vmap rule fails on ``None`` for an output inside
    ``jacfwd(vmap(f))``: an internal assertion of PyTorch 2.13.)
    """
    return torch.zeros_like(output) if torch._C._functorch.is_batchedtensor(tangent) else None


def _outer_levels() -> contextlib.AbstractContextManager:
    """Forward AD on again inside a Function's ``jvp``, for the levels outside it.

    PyTorch calls ``jvp`` with forward-mode AD off, so that the tangent it returns
    has no tangent at its own level; under nested :mod:`torch.func` transforms
    (``jacfwd(jacfwd(f))``) that switch turns the outer forward levels off too,
    and second derivatives come out zero. ``jvp`` computes from :func:`_primal`
    inputs (nothing to differentiate at its own level) with forward AD on, so each
    outer level sees the tangent's dependence on its inputs.
    """
    if torch._C._is_fwd_grad_enabled():
        return contextlib.nullcontext()
    return forward_ad._set_fwd_grad_enabled(True)


def _normalized(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xhat, stats)`` by the ``normalize_rows`` operator, ``stats`` as ``(3, ..., N, 1)``."""
    xhat, stats = _run("normalize_rows", x, eps)
    return xhat, stats.movedim(-1, 0).unsqueeze(-1)


def _pairwise_normalize(x: torch.Tensor, eps: float) -> _core.RowNorms:
    """The rows normalised by the ``normalize_rows`` operator for plain tensors outside autograd."""
    if kernel_ok(x) and not torch.is_grad_enabled():
        return _row_norms(x, *_normalized(x, eps))
    return _core.normalize_rows(xp, x, eps)


def _product(h1: torch.Tensor, h2: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """:func:`polycos._core.pairwise_product` in two passes: one matmul, one cast-and-clamp.

    (The core's portable clamp, two ``where`` over fresh ``N x M`` arrays, cost four
    times the product here; ``clamp`` keeps NaN.)
    """
    s = torch.matmul(h1, (h1 if h2 is None else h2).transpose(-1, -2)).to(dtype)
    return s.clamp_(-1.0, 1.0) if kernel_ok(s) else s.clamp(-1.0, 1.0)


class _Pairwise(torch.autograd.Function):
    """The similarity matrix :func:`polycos._core.pairwise_forward` and its VJP (``x2=None``: self).

    Returns ``(S, xhat1, stats1, xhat2, stats2)``: the matrix and the normalised
    rows with their ``(cs, ns, m)`` stacked first (non-differentiable; for
    self-similarity the second pair is two empty tensors: an output that repeats
    another, or an input, breaks ``torch.compile``'s tracing of the Function),
    which backward reuses unless it is itself differentiated: then the rows are
    normalised again, differentiably.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x1: torch.Tensor, x2: torch.Tensor | None, eps: float, direct: _Direct | None = None
    ) -> tuple[torch.Tensor, ...]:
        shapes = None if direct is None else direct.shapes
        if shapes is not None:  # an outer-product broadcast: the matrices by reshapes no autograd node records
            x1, x2 = x1.reshape(shapes[0]), x2.reshape(shapes[1])  # type: ignore[union-attr]
        if kernel_ok(x1) if x2 is None else kernel_ok(x1, x2):
            s, h1, st1, h2, st2 = _run("pairwise_forward", x1, x2, eps)  # self: h2, st2 empty
        else:
            with _no_autocast(x1):
                s, (r1, r2) = _core.pairwise_forward(xp, x1, x2, eps, native_product=_product)
            h1, st1 = r1.xhat, _stats(r1)
            if r2 is None:  # two new empty tensors, as the operator returns: no output repeats another
                h2, st2 = h1.new_empty((0,)), h1.new_empty((0,))
            else:
                h2, st2 = r2.xhat, _stats(r2)
        return (s if shapes is None else s.reshape(shapes[2])), h1, st1, h2, st2

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x1, x2, eps, *rest = inputs
        _, h1, st1, h2, st2 = output
        ctx.mark_non_differentiable(h1, st1, h2, st2)
        ctx.set_materialize_grads(False)  # no zeros made for them (an N x D float64 block each)
        ctx.eps = eps
        ctx.shapes = rest[0].shapes if rest and rest[0] is not None else None
        saved = (_savable(x1), _savable(x2), h1, st1, h2, st2)
        ctx.save_for_backward(*saved)
        # The same tensors for jvp: under vmap each call records the batch dims of its list for
        # both backward and jvp, so two different lists would misalign one of them.
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None, *_: Any) -> tuple:  # type: ignore[override]
        if g is None:  # S has no gradient (grads are not materialised): neither have the inputs
            return None, None, None, None
        x1, x2, h1, st1, h2, st2 = ctx.saved_tensors
        shapes = ctx.shapes
        if shapes is None:
            d1, d2 = _Pairwise._matrix_backward(ctx, g, x1, x2, h1, st1, h2, st2)
        else:  # the outer-product route: the matrices' gradients, reshaped back
            d1, d2 = _Pairwise._matrix_backward(ctx, g.reshape(shapes[3]), x1.reshape(shapes[0]),
                                                x2.reshape(shapes[1]), h1, st1, h2, st2)
            d1, d2 = d1.reshape(x1.shape), d2.reshape(x2.shape)
        need1, need2 = ctx.needs_input_grad[:2]
        return (d1 if need1 else None), (d2 if need2 else None), None, None

    @staticmethod
    def _matrix_backward(
        ctx: Any, g: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor | None, h1: torch.Tensor,
        st1: torch.Tensor, h2: torch.Tensor, st2: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.is_grad_enabled() or g.numel() == 0:
            # Differentiated itself: normalise again, differentiably. No pairs: the core's zeros
            # (the operator kept no residuals).
            with _no_autocast(x1):
                d1, d2 = _core.pairwise_vjp(xp, g, x1, x2, ctx.eps)
        elif _plain_matrices(g, x1, x2) and g.dtype == x1.dtype:
            d1, d2 = _run("pairwise_backward", g, h1, st1, None if x2 is None else h2, None if x2 is None else st2,
                          ctx.eps)
            d2 = None if x2 is None else d2
        else:
            r1 = _row_norms(x1, h1, st1)
            residuals = (r1, None if x2 is None else _row_norms(x2, h2, st2))
            with _no_autocast(x1):
                d1, d2 = _core.pairwise_vjp(xp, g, x1, x2, ctx.eps, residuals)
        return d1, d2


def _stats(r: _core.RowNorms) -> torch.Tensor:
    """``(cs, ns, m)`` stacked first: ``(3, ..., N, 1)`` (``m = 1`` where the dtype needs no rescaling)."""
    m = torch.ones_like(r.cs) if r.m is None else r.m
    return torch.stack([r.cs, r.ns, m])


def _row_norms(x: torch.Tensor, xhat: torch.Tensor, stats: torch.Tensor) -> _core.RowNorms:
    m = stats[2] if _core.is_rescaled(x.dtype, xhat.dtype) else None
    return _core.RowNorms(xhat, stats[0], stats[1], m)


def _plain_matrices(g: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor | None) -> bool:
    """2-D plain tensors of one row length, no autocast: :func:`_pairwise_vjp_matrices` applies."""
    if x1.ndim != 2 or g.ndim != 2 or (x2 is not None and (x2.ndim != 2 or x2.shape[1] != x1.shape[1])):
        return False
    if g.numel() == 0:  # no pairs: the core's zero gradients (NaN rows included)
        return False
    if not (kernel_ok(g, x1) if x2 is None else kernel_ok(g, x1, x2)):
        return False
    device = x1.device.type
    return not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device))


#: Per input dtype: (product dtype, accumulation dtype, rescaled), as the core derives them
#: (:func:`polycos._core.product_dtype`, :func:`polycos._core.accumulation_dtype`,
#: :func:`polycos._core.is_rescaled`); checked against the core in tests/test_torch.py.
_PAIRWISE_DTYPES = {
    torch.float16: (torch.float32, torch.float32, False),
    torch.bfloat16: (torch.float32, torch.float32, True),
    torch.float32: (torch.float32, torch.float64, False),
    torch.float64: (torch.float64, torch.float64, True),
}


def _row_normalize_vjp(v: torch.Tensor, h: torch.Tensor, stats: torch.Tensor, eps: float, rescaled: bool) -> torch.Tensor:
    """:func:`polycos._core.row_normalize_vjp` op for op, in direct torch calls (same bits; ``stats``: ``(3, N, 1)``).

    ``pairwise_backward`` where the kernel is not available. ``eps`` already clamped
    (:func:`polycos._core._eps_for`).
    """
    cs, ns = stats[0], stats[1]
    above = ns > (eps / stats[2] if rescaled else eps)
    proj = torch.linalg.vecdot(h, v).unsqueeze(-1).masked_fill_(above.logical_not_(), 0.0)  # 0 at or below eps
    inv = cs.reciprocal().masked_fill_(cs == 0, 0.0)  # 1 / c, 0 where c = 0 (eps = 0, zero row)
    if not rescaled and inv.dtype != h.dtype:  # (_core._reciprocal_shift: 1 / c a normal float32)
        fi = torch.finfo(h.dtype)
        low, high = inv < fi.tiny, inv > fi.max
        pre = torch.where(low, 2.0**64, torch.where(high, 2.0**-64, 1.0)).to(inv.dtype)
        post = torch.where(low, 2.0**-64, torch.where(high, 2.0**64, 1.0)).to(h.dtype)
        return ((v - proj * h) * (inv * pre).to(h.dtype)) * post
    d = (v - proj * h) * inv.to(h.dtype)
    if not rescaled:
        return d
    d = d / stats[2].to(h.dtype)
    if eps == 0:
        return d
    # at or below eps: v / eps (no underflow through m; a NaN row stays NaN); a tensor divisor, so
    # torch divides (no reciprocal)
    return torch.where(ns <= eps / stats[2], v / v.new_full((1,), eps), d)


def _cache_signature(fn: Any) -> None:
    """Precompute ``inspect.signature(fn)``: ``Function.apply`` binds ``forward``'s signature on every call.

    (``inspect.signature`` returns ``__signature__`` when set: 60 us less per call.)
    """
    import inspect

    fn.__signature__ = inspect.signature(fn)


_cache_signature(_Cosine.forward)
_cache_signature(_Pairwise.forward)


class PairwiseFunction(_Pairwise):
    """:class:`_Pairwise` with forward mode (:func:`polycos._core.pairwise_jvp`)."""

    @staticmethod
    def jvp(ctx: Any, t1: Any, t2: Any, *_: Any) -> tuple:  # type: ignore[override]
        # (the tensors saved for backward: one list keeps vmap's record of their batch dims right)
        x1, x2 = _primal(ctx.saved_tensors[0]), _primal(ctx.saved_tensors[1])
        shapes = ctx.shapes
        if shapes is not None:
            x1, x2 = x1.reshape(shapes[0]), x2.reshape(shapes[1])  # type: ignore[union-attr]
            t1 = None if t1 is None else t1.reshape(shapes[0])
            t2 = None if t2 is None else t2.reshape(shapes[1])
        with _no_autocast(x1), _outer_levels():  # type: ignore[arg-type]
            ds = _core.pairwise_jvp(xp, t1, t2, x1, x2, ctx.eps)
        ds = ds if shapes is None else ds.reshape(shapes[2])
        return (ds, *(_no_tangent(r, ds) for r in ctx.saved_tensors[2:]))


_register_operator_autograd()


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _differentiated(*ts: torch.Tensor) -> bool:
    """Whether the Functions must record the call: autograd may differentiate through the inputs
    (reverse mode, or a forward-mode dual level), and ``torch.jit.trace`` is not recording it.

    (A trace records the operators, which carry their own reverse-mode formulas: the same
    graph whether the example inputs require grad or not, as its check demands.)
    """
    if forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts) and not torch.jit.is_tracing()


def _base_apply() -> Any:
    """``torch._C._FunctionBase.apply``, the C-level ``apply`` every Function ends in, or ``None``."""
    base = getattr(torch._C, "_FunctionBase", None)
    return None if base is None else base.__dict__.get("apply")


def _apply(fn: type, *args: Any) -> Any:
    """``fn.apply(*args)``; eagerly, with every argument positional, without its per-call binding.

    ``Function.apply`` binds the arguments to ``forward``'s signature with
    :func:`inspect.signature` on every call (about 10 us: a fifth of a 32 x 128
    forward on inputs that require grad), then, with no ``torch.func``
    transform active, drops dead functorch wrappers and calls the C-level
    ``apply``. Every argument here is positional and present, so the binding is
    the identity and is skipped; under a transform, or while Dynamo traces (it
    recognises ``Function.apply`` itself), the public ``apply`` runs
    (``torch.autograd.Function.apply``, also for a subclass that overrides it,
    such as :class:`polycos.torch.CosineSimilarityFunction`).
    """
    if _compiling():
        return fn.apply(*args)
    if _BASE_APPLY is None or torch._C._are_functorch_transforms_active():
        return _FUNCTION_APPLY(fn, *args)
    return _BASE_APPLY.__get__(None, fn)(*_unwrap_dead_wrappers(args))


#: The C-level ``apply`` (:func:`_apply`); ``None`` where torch has none.
_BASE_APPLY = _base_apply()
#: ``torch.autograd.Function.apply`` as a plain function of the class.
_FUNCTION_APPLY = torch.autograd.Function.apply.__func__


def apply_cosine(x1: torch.Tensor, x2: torch.Tensor, axis: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-wise Function (without ``jvp`` while Dynamo traces); 0-d inputs as 1-vectors."""
    fn = _Cosine if _compiling() else CosineFunction
    if x1.ndim == 0 and x2.ndim == 0:
        s, res = _apply(fn, x1.reshape(1), x2.reshape(1), 0, eps)
        return s.reshape(()), res
    return _apply(fn, x1, x2, axis, eps)


class _Direct:
    """An outer-product plan's ``direct`` shapes as one opaque argument of the pairwise Function.

    (A tuple of tuples would be flattened by ``torch.func``'s generated vmap rule into
    one input per size, which its ``jvp`` then fails to match with the tangents.)
    """

    __slots__ = ("shapes",)

    def __init__(self, shapes: tuple) -> None:
        self.shapes = shapes


def apply_pairwise(x1: torch.Tensor, x2: torch.Tensor | None, eps: float, shapes: tuple | None = None) -> torch.Tensor:
    """The pairwise Function; ``shapes``: an outer-product plan's ``direct`` shapes (inputs of any shape)."""
    fn = _Pairwise if _compiling() else PairwiseFunction
    return _apply(fn, x1, x2, eps, None if shapes is None else _Direct(shapes))[0]


# --------------------------------------------------------------------------- the backend


def _autocast_inputs(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PyTorch's CUDA autocast runs ``cosine_similarity`` in float32; mirror it."""
    device = xs[0].device.type
    if device == "cuda" and torch.is_autocast_enabled(device):
        half = (torch.float16, torch.bfloat16)
        xs = tuple(x.float() if x.dtype in half else x for x in xs)
    return xs


#: Integer types torch converts to floating types (bool included); sub-byte and bits types are not.
_INTEGRAL = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
             *(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)))


class TorchBackend(Backend):
    """torch.Tensor on any device: operators for plain tensors, the core in torch ops otherwise."""

    autodiff = True

    @property
    def native(self) -> bool:
        return _cpu_kernels() is not None

    def namespace(self, arrays: tuple[tuple[str, Any], ...]) -> Any:
        return xp

    def accept(self, xp_: Any, arrays: tuple[tuple[str, Any], ...]) -> tuple[Any, ...]:
        for name, x in arrays:
            if type(x).__module__.startswith("torch.masked"):
                raise TypeError(
                    f"{name} is a torch.masked.MaskedTensor; polycos does not apply masks: pass "
                    f"{name}.to_tensor(value) (masked entries filled) or {name}.get_data() explicitly"
                )
            if x.is_nested:  # before the layout: jagged nested tensors have layout torch.jagged
                raise TypeError(
                    f"{name} is a nested tensor (layout {x.layout}); polycos needs regular strided tensors "
                    f"(e.g. {name}.to_padded_tensor(0.0), or loop over its components)"
                )
            if x.layout != torch.strided:
                raise TypeError(
                    f"{name} is a sparse tensor (layout {x.layout}); polycos needs strided tensors: "
                    f"pass {name}.to_dense()"
                )
            if x.is_quantized:
                raise TypeError(f"{name} is a quantized tensor (dtype {x.dtype}); pass {name}.dequantize()")
            if self.dtype_kind(xp_, x.dtype) is None:
                raise TypeError(
                    f"{name} has dtype {x.dtype}, which torch cannot convert to a floating dtype; "
                    "expected a real floating (float16, bfloat16, float32, float64), integer or bool dtype"
                )
        return super().accept(xp_, arrays)

    def dtype_kind(self, xp_: Any, dtype: Any) -> str | None:
        if dtype.is_complex:
            return "complex"
        if dtype.is_floating_point:
            return "float"
        if dtype in _INTEGRAL:
            return "integral"
        return None  # quantized, bits*, sub-byte integers (uint1-7, int1-7): no conversion to float

    def device(self, x: Any) -> Any:
        return x.device

    def same_device(self, a: Any, b: Any) -> bool:
        return a == b

    def plain_arrays(self) -> tuple[type, tuple[Any, ...]]:
        return torch.Tensor, (torch.float32, torch.float64)

    def plain_now(self, x1: Any, x2: Any | None) -> bool:
        """Strided, not nested, one device, and not traced (Dynamo's shapes may be symbolic)."""
        if torch.compiler.is_compiling() or x1.layout != torch.strided or x1.is_nested:
            return False
        return x2 is None or (x2.layout == torch.strided and not x2.is_nested and x2.device == x1.device)

    def default_float(self, xp_: Any, like: Any) -> Any:
        return torch.get_default_dtype()

    def result_type(self, xp_: Any, x1: Any, x2: Any) -> Any:
        """As ``F.cosine_similarity`` promotes: ``torch.promote_types`` (0-d tensors count fully)."""
        return x1.dtype if x1.dtype == x2.dtype else torch.promote_types(x1.dtype, x2.dtype)

    def cast_grad(self, xp_: Any, grad: Any, dtype: Any) -> Any:
        return grad if grad.dtype == dtype else grad.to(dtype)

    # ------------------------------------------------------------------ route and leaves

    def forward(self, call: Call) -> Any:
        """An outer product whose moves are all reshapes (``plan.direct``), differentiated eagerly:
        the reshapes run inside the Function, where autograd records none of them (three view nodes
        fewer, forward and backward); every other call takes the common route."""
        plan = call.outer
        if plan is None or plan.direct is None or _compiling():
            return super().forward(call)
        x1, x2 = _autocast_inputs(call.x1, call.x2)
        first, second = (x2, x1) if plan.swap else (x1, x2)
        if not _differentiated(first, second):
            return super().forward(call)
        return apply_pairwise(first, second, call.eps, plan.direct)

    def rowwise_forward(self, call: Call) -> tuple[Any, Any]:
        x1, x2 = _autocast_inputs(call.x1, call.x2)
        return apply_cosine(x1, x2, call.axis, call.eps)

    def rowwise_value(self, call: Call) -> Any:
        x1, x2 = _autocast_inputs(call.x1, call.x2)
        if _compiling() or _differentiated(x1, x2) or not kernel_ok(x1, x2):
            return apply_cosine(x1, x2, call.axis, call.eps)[0]
        if not call.shape:
            return _run("cosine_value", x1.reshape(1), x2.reshape(1), 0, call.eps).reshape(())
        return _run("cosine_value", x1, x2, call.axis, call.eps)

    def rowwise_vjp(self, g: Any, call: Call, residuals: Any) -> tuple[Any, Any]:
        x1, x2 = call.x1, call.x2
        if not call.shape:
            x1, x2, g = x1.reshape(1), x2.reshape(1), g.reshape(())
        d1, d2 = _cosine_grads(g, x1, x2, residuals, call.axis, call.eps, differentiable=_differentiated(g, x1, x2))
        return d1.reshape(call.x1.shape), d2.reshape(call.x2.shape)

    def pairwise_forward(self, x1: Any, x2: Any | None, eps: float) -> Any:
        if x2 is None:
            (x1,) = _autocast_inputs(x1)
        else:
            x1, x2 = _autocast_inputs(x1, x2)
        if _compiling() or _differentiated(x1, x1 if x2 is None else x2) or not kernel_ok(x1):
            return apply_pairwise(x1, x2, eps)
        if x2 is not None and not kernel_ok(x2):
            return apply_pairwise(x1, x2, eps)
        return _run("pairwise_forward", x1, x2, eps)[0]  # no gradient follows: no autograd node

    def pairwise_vjp(
        self, g: Any, x1: Any, x2: Any | None, eps: float, residuals: Any = None
    ) -> tuple[Any, Any | None]:
        if not torch.is_grad_enabled() and _plain_matrices(g, x1, x2) and g.dtype == x1.dtype:
            h1, st1 = _normalized(x1, eps)
            h2, st2 = (None, None) if x2 is None else _normalized(x2, eps)
            d1, d2 = _run("pairwise_backward", g, h1, st1, h2, st2, eps)
            return d1, None if x2 is None else d2
        with _no_autocast(x1):
            return _core.pairwise_vjp(xp, g, x1, x2, eps, native_normalize=_pairwise_normalize)

    # ------------------------------------------------------------------ conversions

    def to_numpy(self, x: Any) -> Any:
        x = x.detach().cpu().resolve_conj().resolve_neg()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy().copy()

    def from_numpy(self, a: Any, dtype: str | None = None, *, xp: Any = None, device: Any = None) -> Any:
        import numpy as np

        dtype = dtype or a.dtype.name
        t = torch.from_numpy(np.array(a, dtype=np.float64 if dtype == "bfloat16" else None, copy=True))
        return t.to(dtype=getattr(torch, dtype), device=device or "cpu")


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


__all__ += ["apply_cosine", "apply_pairwise", "core_backward", "core_forward", "dtype_name", "dtype_of", "kernel_ok"]
