"""The backend contract: what every array library's backend provides, and the route of a call.

A :class:`Backend` receives calls that :mod:`polycos._validate` has already
checked and planned (:class:`~polycos._validate.Call`,
:class:`~polycos._validate.PairwiseCall`) and never re-validates them. The
route is written once, here:

* :meth:`Backend.forward` / :meth:`Backend.vjp`: an outer-product broadcast
  (``call.outer``) becomes one batched pairwise product
  (:meth:`pairwise_forward`, :meth:`pairwise_vjp`); everything else is row-wise
  (:meth:`rowwise_forward`, :meth:`rowwise_vjp`).
* The leaves default to the array-API core (:mod:`polycos._core`) on the call's
  namespace; a backend overrides a leaf where it has a native kernel or its own
  autodiff (torch's ``autograd.Function``, JAX's custom rules).

Besides computing, a backend states its input policy (:meth:`accept`,
:meth:`promote`, :meth:`check_same_device`) and converts to and from NumPy for
``polycos.testing`` and ``polycos bench`` (:meth:`to_numpy`, :meth:`from_numpy`).
Capability flags (class attributes) let the test suite and the benchmarks
treat every backend from one table.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import array_api_compat

from polycos import _core

if TYPE_CHECKING:
    from polycos._backends import Entry
    from polycos._call import Call, PairwiseCall

__all__ = ["Backend", "OuterResiduals", "Widened", "dtype_name"]

Array = Any


class OuterResiduals(NamedTuple):
    """What the forward of an outer-product broadcast leaves for its VJP."""

    a1: Any  #: the canonical inputs the product took (:meth:`polycos._outer.OuterPlan.inputs`)
    a2: Any
    pairwise: Any  #: :meth:`Backend.pairwise_forward_with_residuals`' residuals


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for any library's dtype object."""
    return _core._dtype_name(dtype)


def _type_name(x: object) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


class Backend:
    """The array-API core on any namespace: the default for every leaf."""

    #: Gradients flow through the library's own autodiff (torch autograd, JAX).
    autodiff: ClassVar[bool] = False
    #: Arrays are lazy: values are never inspected (dask).
    lazy: ClassVar[bool] = False
    #: Concrete arrays whose values may be inspected cheaply (the range rescue runs only when needed).
    eager: ClassVar[bool] = False
    #: Arrays expose element strides, stride 0 for broadcast views (NumPy, CuPy).
    strided_views: ClassVar[bool] = False
    #: Dtypes the backend runs (by name); others are rejected by :meth:`accept`.
    dtypes: ClassVar[tuple[str, ...]] = ("float16", "bfloat16", "float32", "float64")

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.name = entry.name

    def __repr__(self) -> str:
        return f"<polycos backend {self.name!r}>"

    # ------------------------------------------------------------------ capabilities

    @property
    def native(self) -> bool:
        """Whether a compiled kernel serves plain arrays on this machine."""
        return False

    def usable(self) -> bool:
        """Whether arrays of this library can be computed on here (CuPy: a working GPU)."""
        return True

    def owns(self, x: Any) -> bool:
        """Whether ``x`` is an array of this backend's library."""
        return bool(self.entry.owns(x))

    def plain_arrays(self) -> tuple[type, tuple[Any, ...]] | None:
        """``(array type, dtypes)`` whose repeated calls :mod:`polycos._validate` may recognise cheaply.

        Arrays of exactly that type and one of those dtypes pass every check of
        :meth:`accept` and :meth:`promote` unchanged whenever :meth:`plain_now`
        holds: validating them again for shapes already seen would only repeat
        the same work. ``None`` (the default): always validated in full.
        """
        return None

    def plain_now(self, x1: Any, x2: Any | None) -> bool:
        """For arrays of :meth:`plain_arrays`' type and dtypes: whether this call's other checks pass too."""
        return True

    # ------------------------------------------------------------------ input policy

    def namespace(self, arrays: tuple[tuple[str, Any], ...]) -> Any:
        """The array-API namespace the core runs on for these arrays."""
        try:
            return array_api_compat.array_namespace(*(x for _, x in arrays))
        except TypeError as e:
            names = " and ".join(n for n, _ in arrays)
            raise TypeError(f"{names}: {e}") from None

    def accept(self, xp: Any, arrays: tuple[tuple[str, Any], ...]) -> tuple[Any, ...]:
        """Check containers, dtypes and devices; return the arrays to compute with."""
        for name, x in arrays:
            self.check_dtype(xp, name, x)
        self.check_same_device(arrays)
        return tuple(x for _, x in arrays)

    def check_dtype(self, xp: Any, name: str, x: Any) -> None:
        """Real floating dtypes the backend runs, integers and bool (promoted); nothing else."""
        kind = self.dtype_kind(xp, x.dtype)
        if kind == "complex":
            raise TypeError(f"{name} has complex dtype {x.dtype}; only real inputs are supported")
        if kind == "float" and dtype_name(x.dtype) not in self.dtypes:
            raise TypeError(
                f"{name} has dtype {x.dtype}, which polycos does not support on {self.name} arrays "
                f"(supported: {', '.join(self.dtypes)}; integer and bool inputs are promoted)"
            )
        if kind is None:
            raise TypeError(
                f"{name} has dtype {x.dtype}, which is not numeric; expected a real floating, "
                "integer or bool dtype"
            )

    def dtype_kind(self, xp: Any, dtype: Any) -> str | None:
        """``"float"``, ``"integral"`` (integers and bool), ``"complex"`` or ``None`` (not numeric)."""
        for kind, names in (("float", ("real floating",)), ("complex", ("complex floating",)),
                            ("integral", ("integral", "bool"))):
            try:
                if any(bool(xp.isdtype(dtype, k)) for k in names):
                    return kind
            except Exception:
                continue
        return None

    def check_same_device(self, arrays: tuple[tuple[str, Any], ...]) -> None:
        """All arrays on one device (``ValueError`` naming both otherwise)."""
        devices = [(name, self.device(x)) for name, x in arrays]
        first_name, first = devices[0]
        for name, dev in devices[1:]:
            if not self.same_device(first, dev):
                raise ValueError(
                    f"{first_name} and {name} must be on the same device, got {first} and {dev}"
                )

    def device(self, x: Any) -> Any:
        try:
            return array_api_compat.device(x)
        except Exception:  # traced arrays without a committed device
            return None

    def same_device(self, a: Any, b: Any) -> bool:
        return a is None or b is None or a == b

    def default_float(self, xp: Any, like: Any) -> Any:
        """The library's default floating dtype on ``like``'s device (for integer and bool inputs)."""
        try:
            info = xp.__array_namespace_info__()
            return info.default_dtypes(device=self.device(like))["real floating"]
        except Exception:
            return xp.float64 if hasattr(xp, "float64") else xp.float32

    def promote(self, xp: Any, x1: Any, x2: Any) -> tuple[Any, Any]:
        """Both inputs in their common real floating dtype (spec section 2.1)."""
        floats = [self.dtype_kind(xp, x.dtype) == "float" for x in (x1, x2)]
        if floats[0] != floats[1]:
            # One floating input: the library's own promotion of the pair where it is floating
            # (torch and JAX: float16 with int64 is float16; NumPy: float64), as its ops promote.
            dtype = self._mixed_result_type(xp, x1, x2)
            if dtype is not None:
                return tuple(x if x.dtype == dtype else xp.astype(x, dtype) for x in (x1, x2))  # type: ignore[return-value]
        xs = []
        for x, floating in zip((x1, x2), floats, strict=True):
            if floating:
                xs.append(x)
            else:  # integer and bool inputs become the library's default float
                xs.append(xp.astype(x, self.default_float(xp, x)))
        names = {dtype_name(x.dtype) for x in xs}
        if names == {"float16", "bfloat16"}:  # as torch and JAX promote the pair
            dtype = xp.float32
        else:
            dtype = self.result_type(xp, xs[0], xs[1])
        return tuple(x if x.dtype == dtype else xp.astype(x, dtype) for x in xs)  # type: ignore[return-value]

    def result_type(self, xp: Any, x1: Any, x2: Any) -> Any:
        return xp.result_type(x1, x2)

    def _mixed_result_type(self, xp: Any, x1: Any, x2: Any) -> Any:
        """:meth:`result_type` of a floating and an integer or bool input, if the library has one."""
        try:
            dtype = self.result_type(xp, x1, x2)
        except Exception:  # the array API leaves mixed kinds undefined (array-api-strict refuses them)
            return None
        return dtype if self.dtype_kind(xp, dtype) == "float" else None

    def cast_grad(self, xp: Any, grad: Any, dtype: Any) -> Any:
        """An upstream gradient in the result dtype (real floating, integer or bool only).

        As autograd holds it: a value beyond the result dtype's range becomes
        ``inf`` (quietly: a valid call raises no floating-point warning, G13).
        """
        if grad.dtype == dtype:
            return grad
        with self.quiet():
            return xp.astype(grad, dtype)

    # ------------------------------------------------------------------ the route

    def forward(self, call: Call) -> Array:
        """:func:`polycos.cosine_similarity` on a validated call."""
        plan, x1, x2 = self.value_plan(call)
        if plan is not None:
            a1, a2 = plan.inputs(call.xp, x1, x2)
            return plan.output(call.xp, self.pairwise_forward(a1, a2, call.eps))
        return self.rowwise_value(call)

    def forward_with_residuals(self, call: Call) -> tuple[Array, Any]:
        """The forward value and what :meth:`vjp` can reuse (``None``: nothing)."""
        plan = call.outer
        if plan is not None:  # an outer product: the pairwise forward's residuals, and its inputs
            a1, a2 = plan.inputs(call.xp, call.x1, call.x2)
            s, residuals = self.pairwise_forward_with_residuals(a1, a2, call.eps)
            return plan.output(call.xp, s), OuterResiduals(a1, a2, residuals)
        if self.value_plan(call)[0] is not None:  # stride-0 views read as an outer product: the value only
            return self.forward(call), None
        return self.rowwise_forward(call)

    def vjp(self, grad: Array, call: Call, residuals: Any = None) -> tuple[Array, Array]:
        """:func:`polycos.cosine_similarity_vjp` on a validated call and checked ``grad``."""
        xp, out_shape = call.xp, call.out_shape
        # (a dask result of unknown size cannot be broadcast to: the backend pairs g block by block)
        if tuple(grad.shape) == out_shape or not _known_shape(out_shape):
            g = grad
        else:
            g = xp.broadcast_to(grad, out_shape)
        plan = call.outer
        if plan is not None:
            if isinstance(residuals, OuterResiduals):
                a1, a2, residuals = residuals
            else:
                a1, a2 = plan.inputs(xp, call.x1, call.x2)
            d = self.pairwise_vjp(plan.grad(xp, g), a1, a2, call.eps, residuals)
            return plan.gradients(xp, d, tuple(call.x1.shape), tuple(call.x2.shape))
        return self.rowwise_vjp(g, call, residuals)

    def value_plan(self, call: Call) -> tuple[Any, Array, Array]:
        """The outer-product plan for the forward *value* and the inputs it applies to.

        Where arrays expose element strides (``strided_views``: NumPy, CuPy), stride-0
        broadcast views that hide an outer product (``np.broadcast_to(z[:, None], ...)``)
        take the matrix path too, for the value only (:func:`polycos._outer.collapse_stride0`).
        """
        if not self.strided_views or call.outer is not None or len(call.shape) < 3 or call.empty:
            return call.outer, call.x1, call.x2
        from polycos import _outer

        x1, x2 = _outer.collapse_stride0(call.x1, call.x2, len(call.shape))
        if x1 is call.x1 and x2 is call.x2:
            return None, x1, x2
        return _outer.plan(call.shape, call.axis, tuple(x1.shape), tuple(x2.shape)), x1, x2

    # ------------------------------------------------------------------ leaves (the core)

    def quiet(self) -> contextlib.AbstractContextManager:
        """Silence floating-point warnings of arithmetic the definition handles on purpose (G6, G13)."""
        return contextlib.nullcontext()

    def rowwise_forward(self, call: Call) -> tuple[Array, Any]:
        xp = call.xp
        x1, x2 = _vectors(call)
        with self.quiet():
            out, res = _core.forward(xp, x1, x2, call.axis if call.shape else 0, call.eps, eager=self.eager)
        return (xp.reshape(out, ()) if not call.shape else out), res

    def rowwise_value(self, call: Call) -> Array:
        """The row-wise value alone; a kernel can skip writing the residuals (D = 16: 40 of 168 bytes a row)."""
        return self.rowwise_forward(call)[0]

    def rowwise_vjp(self, g: Array, call: Call, residuals: Any) -> tuple[Array, Array]:
        xp = call.xp
        x1, x2 = _vectors(call)
        with self.quiet():
            d1, d2 = _core.vjp(
                xp, g, x1, x2, call.axis if call.shape else 0, call.eps, residuals, eager=self.eager
            )
        return xp.reshape(d1, tuple(call.x1.shape)), xp.reshape(d2, tuple(call.x2.shape))

    def pairwise_forward(self, x1: Array, x2: Array | None, eps: float) -> Array:
        """``S`` of canonical ``(..., N, D)`` inputs (``x2=None``: ``x1`` with itself)."""
        xp = array_api_compat.array_namespace(x1)
        with self.quiet():
            return _core.pairwise_forward(xp, x1, x2, eps)[0]

    def pairwise_forward_with_residuals(self, x1: Array, x2: Array | None, eps: float) -> tuple[Array, Any]:
        """``S`` and what :meth:`pairwise_vjp` can reuse (``None``: nothing, the default)."""
        return self.pairwise_forward(x1, x2, eps), None

    def pairwise_vjp(
        self, g: Array, x1: Array, x2: Array | None, eps: float, residuals: Any = None
    ) -> tuple[Array, Array | None]:
        """``(dL/dx1, dL/dx2)`` of ``S`` for ``g`` (``None`` second for self-similarity).

        ``residuals``: :meth:`pairwise_forward_with_residuals`' (``None``: recompute).
        """
        xp = array_api_compat.array_namespace(x1)
        with self.quiet():
            return _core.pairwise_vjp(xp, g, x1, x2, eps)

    # public pairwise route

    def pairwise(self, call: PairwiseCall) -> Array:
        """:func:`polycos.pairwise_cosine_similarity` on a validated call."""
        return self.pairwise_forward(call.x1, call.x2, call.eps)

    def pairwise_with_residuals(self, call: PairwiseCall) -> tuple[Array, Any]:
        """:func:`polycos.pairwise_cosine_similarity_with_vjp`'s forward: ``S`` and its residuals."""
        return self.pairwise_forward_with_residuals(call.x1, call.x2, call.eps)

    def pairwise_call_vjp(self, grad: Array, call: PairwiseCall, residuals: Any = None) -> tuple[Array, Array | None]:
        g = grad if _core._same_shape(tuple(grad.shape), call.shape) else call.xp.broadcast_to(grad, call.shape)
        return self.pairwise_vjp(g, call.x1, call.x2, call.eps, residuals)

    # ------------------------------------------------------------------ conversions

    def to_numpy(self, x: Array) -> Any:
        """A NumPy copy of ``x`` (bfloat16 as float32)."""
        import numpy as np

        if dtype_name(x.dtype) == "bfloat16":
            xp = array_api_compat.array_namespace(x)
            x = xp.astype(x, xp.float32)
        return np.array(np.from_dlpack(x) if hasattr(x, "__dlpack__") else x, copy=True)

    def from_numpy(self, a: Any, dtype: str | None = None, *, xp: Any = None, device: Any = None) -> Array:
        """``a`` as an array of this library (``dtype`` by name)."""
        if xp is None:
            raise TypeError(f"the {self.name} backend needs xp= to create arrays")
        import numpy as np

        dtype = dtype or a.dtype.name
        kwargs = {} if device is None else {"device": device}
        return xp.asarray(np.asarray(a, dtype="float32" if dtype == "bfloat16" else None), dtype=getattr(xp, dtype), **kwargs)


def _known_shape(shape: tuple) -> bool:
    """No unknown (dask NaN or None) size."""
    return all(d is not None and d == d for d in shape)


def _vectors(call: Call) -> tuple[Array, Array]:
    """0-d inputs become 1-vectors (the core needs an axis to reduce)."""
    if call.shape:
        return call.x1, call.x2
    xp = call.xp
    return xp.reshape(call.x1, (1,)), xp.reshape(call.x2, (1,))


class Widened:
    """A backend's route run in float64 on inputs widened to it, results rounded once to ``dtype``.

    For an ``eps`` beyond float32's range on inputs whose sums run in float32
    (bfloat16): there ``eps`` would be held as float32's largest value
    (:func:`polycos._core._eps_for`), and every row whose exact value does not
    underflow would get the value for that ``eps`` instead. Widening is exact;
    each result is the float64 path's, rounded once. :func:`polycos._validate.validate`
    puts it in a call's ``backend`` where float64 exists; every other attribute is
    the backend's own. ``out_dtype``: the inputs' dtype, the results'.
    """

    def __init__(self, backend: Backend, dtype: Any) -> None:
        self._backend, self.out_dtype = backend, dtype

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def _narrow(self, xp: Any, a: Array | None) -> Array | None:
        # (the backend's quiet cast to a narrower dtype: rounding to bfloat16 may underflow by design)
        return None if a is None else self._backend.cast_grad(xp, a, self.out_dtype)

    def forward(self, call: Call) -> Array:
        return self._narrow(call.xp, self._backend.forward(call))

    def forward_with_residuals(self, call: Call) -> tuple[Array, Any]:
        s, residuals = self._backend.forward_with_residuals(call)
        return self._narrow(call.xp, s), residuals

    def vjp(self, grad: Array, call: Call, residuals: Any = None) -> tuple[Array, Array]:
        d1, d2 = self._backend.vjp(grad, call, residuals)
        return self._narrow(call.xp, d1), self._narrow(call.xp, d2)

    def pairwise(self, call: PairwiseCall) -> Array:
        return self._narrow(call.xp, self._backend.pairwise(call))

    def pairwise_with_residuals(self, call: PairwiseCall) -> tuple[Array, Any]:
        s, residuals = self._backend.pairwise_with_residuals(call)
        return self._narrow(call.xp, s), residuals

    def pairwise_call_vjp(self, grad: Array, call: PairwiseCall, residuals: Any = None) -> tuple[Array, Array | None]:
        d1, d2 = self._backend.pairwise_call_vjp(grad, call, residuals)
        return self._narrow(call.xp, d1), self._narrow(call.xp, d2)
