r"""JAX arrays: the fused CPU kernels inside ``jit`` through ``jax.ffi``, under custom JVP rules.

Row-wise similarity is :func:`cosine_value`, a :func:`jax.custom_jvp` function.
Each kernel is chosen at lowering by :func:`jax.lax.platform_dependent`: the
fused CPU kernel (:func:`jax.ffi.ffi_call`) on CPU, the array-API core in
``jax.numpy`` elsewhere (GPU, TPU) or where the kernel is not built.

* **Value** (nothing differentiated): one kernel call that writes ``s`` only.
* **Tangent rule**: :func:`cosine` gives ``s`` and the packed residuals (per
  row ``s``, the scaled norms and the scales; :func:`polycos._core.pack_residuals`),
  and the tangents go through :data:`tangent_p`, a linear primitive for the
  core's JVP (:func:`polycos._core.jvp`)

  .. math::  \dot s = \textstyle\sum_{\text{axis}} (J_1 t_1 + J_2 t_2),
             \qquad J_i = \partial s / \partial x_i \text{ from the residuals}.

  Forward mode (``jvp``, ``jacfwd``) lowers it to that jnp code.
* **Reverse mode** transposes it: ``J_i^T g`` is :func:`pullback`, one pass of
  the kernel's backward (reads ``x1, x2, g`` and the residuals, writes both
  gradients), summed back to broadcast inputs' shapes in the accumulation dtype.
  XLA's transpose of the jnp tangent map would make several passes over
  ``N x D`` arrays instead.
* **Higher orders**: :func:`cosine`'s own rule gives the residuals' tangents;
  the primitive's JVP rule (bilinear: ``A dt + dA[dx, dres] t``) and
  :func:`pullback`'s (the core's VJP under :func:`jax.jvp`) are jnp code, so
  ``hessian``, ``jacfwd(jacrev)`` and grad of grad work.
* **vmap**: the FFI calls take batch dimensions; the primitive's batching
  rule moves them in front and binds it again one axis further on.

Pairwise similarity is a :func:`jax.custom_jvp` over the core whose tangent
rule is another linear primitive, :data:`ptangent_p`, transposed into the
hand-written VJP for reverse mode. For float32
inputs with ``jax_enable_x64`` off, the row normalisation and the product run
inside a scoped ``jax.enable_x64`` (float64), so the matrix is within 1
ulp(1.0) of exact on every CPU, as with x64 on (docs/pairwise.md); that code
is a call of :data:`in_x64_p`, a primitive whose rules (lowering, batching,
JVP, transpose) trace it inside the scope, so transformations applied after
the scope has closed (``vmap(jit(f))``) see float32 only. Two native
hooks keep it near a plain float32 normalise-then-multiply on XLA:CPU:
:func:`_product` forms a large float64 product in blocks of rows inside a
``fori_loop``, and :func:`_tmatmul` gives the backward's ``G^T X`` as a
product XLA sends to its fast GEMM.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from polycos import _core
from polycos._backends._base import Backend, dtype_name

if TYPE_CHECKING:
    from polycos._call import Call

__all__ = ["JaxBackend", "cosine", "cosine_value", "in_x64_p", "pullback", "tangent", "tangent_p"]


class _Namespace:
    """:mod:`jax.numpy`, with a square root that reverse mode can differentiate at 0.

    ``jnp.sqrt``'s derivative at 0 is ``inf``, and reverse mode multiplies it by
    the zero cotangent of a branch ``jnp.where`` did not take: ``0 * inf = NaN``
    in second derivatives at zero rows. The core takes square roots only of sums
    of squares and never uses the root's slope where one is 0, so here the root
    of 0 is a constant 0 (values are bitwise those of ``jnp.sqrt``).
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(jnp, name)

    @staticmethod
    def sqrt(x: jax.Array) -> jax.Array:
        pos = x > 0
        rest = jnp.where(x == 0, jnp.zeros_like(x), jnp.full_like(x, jnp.nan))  # NaN below 0
        return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, jnp.ones_like(x))), rest)


xp = _Namespace()


# --------------------------------------------------------------------------- the sums on XLA


def _dots(a1: jax.Array, a2: jax.Array, axis: int, compensated: bool) -> tuple[jax.Array, ...]:
    """:func:`polycos._core.dots` as one XLA variadic reduce (a mirror of the core's sums).

    Written as three ``vecdot`` calls, XLA makes three passes; one
    ``lax.reduce`` over the three products reads each input once. Compensated
    (float32 with x64 off), every product is split exactly into ``p + e``
    (TwoProduct) and each sum carried as a pair ``hi + lo`` combined by TwoSum,
    in the same pass: as accurate as :func:`polycos._core.accurate_dot`.
    """
    if a1.shape != a2.shape:
        # One shape for the variadic reduce: XLA fuses the broadcast into it (nothing is
        # materialised), and the core's pairwise tree, a Python loop over the length,
        # cannot take a symbolic length (jax.export).
        a1, a2 = jnp.broadcast_arrays(a1, a2)
    zero = jnp.zeros((), a1.dtype)
    if not compensated:
        sums = lax.reduce((a1 * a2, a1 * a1, a2 * a2), (zero,) * 3, _add3, (axis,))
        return tuple(jnp.expand_dims(w, axis) for w in sums)
    factor = _core._split_factor(a1.dtype)
    pairs = ((a1, a2), (a1, a1), (a2, a2))
    products = [t for u, v in pairs for t in _core._two_product(jnp, u, v, factor)]
    hi12, lo12, hi11, lo11, hi22, lo22 = lax.reduce(tuple(products), (zero,) * 6, _two_sums, (axis,))
    sums = []
    for hi, lo in ((hi12, lo12), (hi11, lo11), (hi22, lo22)):
        w = hi + lo  # the pair as one rounded sum, and what that rounding left (Fast2Sum)
        sums.append((w, lo - (w - hi)))
    return tuple(jnp.expand_dims(t, axis) for t in (*(w for w, _ in sums), *(r for _, r in sums)))


def _add3(u: tuple, v: tuple) -> tuple:
    return tuple(a + b for a, b in zip(u, v, strict=True))


def _two_sums(u: tuple, v: tuple) -> tuple:
    """Add pairs ``(hi, lo)`` of double-word sums: TwoSum of the highs, lows added."""
    out: list = []
    for i in range(0, len(u), 2):
        h1, l1, h2, l2 = u[i], u[i + 1], v[i], v[i + 1]
        s = h1 + h2
        b = s - h1
        err = (h1 - (s - b)) + (h2 - b)
        out += [s, (l1 + l2) + err]
    return tuple(out)


def _pow2_scale(eps: float) -> Any:
    """The core's row scaling by a power of two near its ``m`` (:data:`polycos._core.Scale`).

    XLA on CPU divides by multiplying with the reciprocal, and ``1 / max``
    near the top of the range is subnormal, which XLA flushes to zero: ``x / m``
    would be 0. ``ldexp`` by the exponent of :func:`polycos._core._row_scale`'s
    ``m`` scales exactly instead.
    """

    def scale(a: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
        m = _core._row_scale(xp, a, axis, eps)
        _, e = jnp.frexp(m)
        return jnp.ldexp(a, 1 - e), jnp.ldexp(jnp.ones_like(m), e - 1)

    return scale


def _branch(pred: jax.Array, then_fn: Any, else_fn: Any) -> Any:
    """The core's range rescue runs only when a row needs it (compiled, not always taken).

    Inside ``shard_map`` both branches' results are marked varying along every mesh axis
    ``pred`` varies along (it reads both inputs): a sum of squares of a replicated input
    alone is not varying in the plain branch but is in the rescued one, and ``cond``
    needs equal types.
    """
    return lax.cond(pred, lambda: _varying_as(then_fn(), (pred,)), lambda: _varying_as(else_fn(), (pred,)))


# --------------------------------------------------------------------------- kernel or core


def _kernels() -> Any:
    from polycos._backends.numpy import _kernels

    k = _kernels()
    return k if k is not None and hasattr(k, "jax_forward_value") else None


def _by_platform(kernel: Any, core: Any, *args: jax.Array) -> Any:
    """``kernel(*args)`` on CPU, ``core(*args)`` elsewhere (chosen at lowering); ``core`` without the kernel."""
    if _kernels() is None:
        return core(*args)
    return lax.platform_dependent(*args, cpu=lambda *a: _varying_as(kernel(*a), a), default=core)


def _varying(x: Any) -> frozenset:
    """The ``shard_map`` mesh axes along which ``x`` (an array or abstract value) varies (empty outside ``shard_map``)."""
    t = x if isinstance(x, jax.core.AbstractValue) else jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()))


def _varying_as(outs: Any, ins: tuple) -> Any:
    """``outs`` marked varying along every axis an input varies along, as the core's results are.

    An FFI call's results carry no such type inside ``shard_map``; without it the two branches of
    :func:`jax.lax.platform_dependent` have different types, and tracing fails.
    """
    if not hasattr(lax, "pcast") or not hasattr(jax, "typeof"):  # (older JAX: no varying types)
        return outs
    want = frozenset().union(*(_varying(x) for x in ins))
    if not want:
        return outs

    def mark(o: jax.Array) -> jax.Array:
        missing = tuple(sorted(want - _varying(o)))
        return lax.pcast(o, missing, to="varying") if missing else o

    return jax.tree.map(mark, outs)


def _summed_to(ct: jax.Array, operand: Any) -> jax.Array:
    """A cotangent with the mesh axes of its ``operand`` (an undefined primal): summed over the others.

    Inside ``shard_map`` a replicated operand meets a varying one in the kernel as if
    broadcast to every device; the transpose of that broadcast is the sum over the
    devices (as JAX's own ``pvary`` transposes to ``psum``).
    """
    extra = tuple(sorted(_varying(ct) - _varying(operand.aval)))
    return lax.psum(ct, extra) if extra else ct


def _quiet(fn: Callable) -> Callable:
    """``fn`` traced with NumPy's underflow ignored (G13).

    Tracing the core casts ``eps`` (a Python float) to the arrays' dtype with
    NumPy; a subnormal result (``eps = 1e-39`` in float32) is valid, but under
    ``np.errstate(all="raise")`` the cast would raise ``FloatingPointError``.
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(under="ignore"):
            return fn(*args, **kwargs)

    return run


@_quiet
def _core_primal(x1: jax.Array, x2: jax.Array, axis: int, eps: float) -> tuple[jax.Array, jax.Array]:
    out, res = _core.forward(xp, x1, x2, axis, eps, native_dots=_dots, branch=_branch, scale=_pow2_scale(eps))
    return out, _core.pack_residuals(xp, res, axis)


# --------------------------------------------------------------------------- the value and its residuals


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def cosine_value(x1: jax.Array, x2: jax.Array, axis: int, eps: float) -> jax.Array:
    """``s`` of validated inputs (one floating dtype, ``axis >= 0``, at least one dimension).

    Not differentiated, the kernel writes ``s`` only (no residuals). The tangent
    rule asks :func:`cosine` for the residuals and maps the tangents through
    :data:`tangent_p`, which reverse mode transposes into the kernel's backward.
    """
    return _by_platform(
        lambda a, b: _kernels().jax_forward_value(a, b, axis, eps),
        lambda a, b: _core_primal(a, b, axis, eps)[0],
        x1, x2,
    )


def _cosine_value_jvp(axis: int, eps: float, primals: tuple, tangents: tuple) -> tuple:
    x1, x2 = primals
    out, packed = cosine(x1, x2, axis, eps)  # differentiable again: higher orders
    t1, t2 = (None if isinstance(t, SymbolicZero) else t for t in tangents)  # no pass over a zero tangent
    return out, tangent(t1, t2, x1, x2, packed, axis, eps, out.dtype)


cosine_value.defjvp(_cosine_value_jvp, symbolic_zeros=True)


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def cosine(x1: jax.Array, x2: jax.Array, axis: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """``(s, packed residuals)`` of validated inputs (:func:`polycos._core.pack_residuals`)."""
    return _by_platform(
        lambda a, b: tuple(_kernels().jax_forward(a, b, axis, eps)),
        lambda a, b: _core_primal(a, b, axis, eps),
        x1, x2,
    )


@cosine.defjvp
@_quiet
def _cosine_jvp(axis: int, eps: float, primals: tuple, tangents: tuple) -> tuple:
    """Tangents of ``s`` and of the residuals ``(s, n1s, n2s, m1, m2)`` (the scales are piecewise constant)."""
    x1, x2 = primals
    t1, t2 = tangents
    out, packed = cosine(x1, x2, axis, eps)  # differentiable again: higher orders
    res = _core.unpack_residuals(xp, packed, axis)
    acc = packed.dtype
    ds_acc = tangent(t1, t2, x1, x2, packed, axis, eps, acc)
    ds = ds_acc.astype(out.dtype)
    a1, a2 = _core._align(xp, x1, x2, axis)  # each row at its full length along the axis
    dn1 = _norm_tangent(a1, jnp.broadcast_to(_core._expand_to(xp, t1, a1.ndim), a1.shape), res.n1s, res.m1, axis, acc)
    dn2 = _norm_tangent(a2, jnp.broadcast_to(_core._expand_to(xp, t2, a2.ndim), a2.shape), res.n2s, res.m2, axis, acc)
    shape = ds_acc.shape
    zero = jnp.zeros(shape, acc)
    dres = jnp.stack([ds_acc, jnp.broadcast_to(dn1, shape), jnp.broadcast_to(dn2, shape), zero, zero], axis=-1)
    return (out, packed), (ds, dres)


def _norm_tangent(x: jax.Array, t: jax.Array, ns: jax.Array, m: jax.Array, axis: int, acc: Any) -> jax.Array:
    """Tangent of ``n_s = ||x / m||`` (``m`` piecewise constant): ``sum((x/m) t) / (m n_s)``, 0 at a zero row."""
    b = x.astype(acc) / m
    num = jnp.sum(b * t.astype(acc), axis=axis, keepdims=True)
    out = _core._safe_divide(xp, num / m, ns)
    return jnp.squeeze(jnp.broadcast_to(out, jnp.broadcast_shapes(out.shape, ns.shape)), axis=axis)


# --------------------------------------------------------------------------- the tangent map, a linear primitive
#
# ds = sum_axis(J1 * t1 + J2 * t2), J_i = ds/dx_i from the residuals (polycos._core.jvp). As jnp
# code, reverse mode would be XLA's transpose of it: several passes over N x D arrays. As a
# primitive, its transpose is one call of the kernel's backward (one pass), and its JVP and
# batching rules keep every other transformation on the jnp code.

tangent_p = Primitive("polycos_cosine_tangent")


def tangent(
    t1: jax.Array | None, t2: jax.Array | None, x1: jax.Array, x2: jax.Array, packed: jax.Array,
    axis: int, eps: float, dtype: Any,
) -> jax.Array:
    """``ds`` along ``(t1, t2)`` (``None``: a zero tangent) at ``x1, x2`` with their residuals, in ``dtype``.

    ``dtype``: the inputs' (the result's tangent) or the accumulation dtype (the
    residual ``s``'s tangent).
    """
    ts = tuple(t for t in (t1, t2) if t is not None)
    params = {"axis": axis, "eps": eps, "present": (t1 is not None, t2 is not None), "dtype": np.dtype(dtype)}
    if not ts:
        return jnp.zeros(_tangent_shape(x1.shape, x2.shape, packed.shape, **params), dtype)
    return tangent_p.bind(*ts, x1, x2, packed, **params)


def _unpack(operands: tuple, present: tuple[bool, bool]) -> tuple:
    """``(t1 | None, t2 | None, x1, x2, packed)`` from the primitive's operands."""
    it = iter(operands[:-3])
    return (next(it) if present[0] else None, next(it) if present[1] else None, *operands[-3:])


def _tangent_shape(*shapes: tuple, axis: int, present: tuple, **_: Any) -> tuple:
    """The result's shape: the operands' (``t1, t2, x1, x2``) broadcast without ``axis``, and the residuals'."""
    *rows, packed = shapes
    nd = max(len(s) for s in rows)
    full = jnp.broadcast_shapes(*((1,) * (nd - len(s)) + tuple(s) for s in rows))
    return jnp.broadcast_shapes(full[:axis] + full[axis + 1 :], tuple(packed[:-1]))


@_quiet
def _tangent_core(*operands: jax.Array, axis: int, eps: float, present: tuple, dtype: Any) -> jax.Array:
    """The tangent map in ``jax.numpy``: the core's JVP (:func:`polycos._core.jvp_accumulated`)."""
    t1, t2, x1, x2, packed = _unpack(operands, present)
    res = _core.unpack_residuals(xp, packed, axis)
    shape = _tangent_shape(*(o.shape for o in operands), axis=axis, present=present)
    ds = _core.jvp_accumulated(xp, t1, t2, x1, x2, axis, eps, res)
    return jnp.broadcast_to(ds, shape).astype(dtype)


_tangent_core_jit = jax.jit(_tangent_core, static_argnames=("axis", "eps", "present", "dtype"))


def _tangent_abstract(*avals: Any, dtype: Any, **params: Any) -> Any:
    return _aval_like(avals, _tangent_shape(*(a.shape for a in avals), **params), dtype)


def _aval_like(avals: tuple, shape: tuple, dtype: Any) -> Any:
    """A result of ``shape`` and ``dtype`` that varies along the ``shard_map`` mesh axes its operands do."""
    varying = frozenset().union(*(_varying(a) for a in avals)) if hasattr(jax, "typeof") else frozenset()
    if not varying:
        return jax.core.ShapedArray(shape, dtype)
    like = next(a for a in avals if _varying(a) == varying)
    mesh = like.sharding.mesh
    return like.update(shape=shape, dtype=dtype, weak_type=False,
                       sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*[None] * len(shape))))


def _tangent_transpose(ct: Any, *operands: Any, axis: int, eps: float, present: tuple, dtype: Any) -> list:
    """The cotangents of ``t1, t2`` for ``ct``: ``pullback`` (the kernel's backward on CPU); none for the rest."""
    t1, t2, x1, x2, packed = _unpack(operands, present)
    wanted = [t is not None and ad.is_undefined_primal(t) for t in (t1, t2)]
    if type(ct) is ad.Zero or not any(wanted) or math.prod(ct.shape) == 0:
        # None: a symbolic zero. With no result elements nothing is summed, and nothing
        # of a broadcast partner's size is made (its cotangent would be all zeros).
        return [None] * len(operands)
    shapes = tuple(_shape(x if t is None else t) for t, x in ((t1, x1), (t2, x2)))
    d = pullback(ct, x1, x2, packed, axis, eps, *shapes)
    cts = [_summed_to(d[i], (t1, t2)[i]) if wanted[i] else None for i in range(2) if present[i]]
    return [*cts, None, None, None]


def _shape(a: Any) -> tuple:
    return tuple(a.aval.shape if ad.is_undefined_primal(a) else jnp.shape(a))


def _tangent_jvp(primals: tuple, tangents: tuple, *, axis: int, eps: float, present: tuple, dtype: Any) -> tuple:
    """``A(x, res) t`` is bilinear: its tangent is ``A(x, res) dt + dA(x, res)[dx, dres] t``."""
    t1, t2, x1, x2, packed = _unpack(primals, present)
    dt1, dt2, *dargs = (None if d is None or type(d) is ad.Zero else d for d in _unpack(tangents, present))
    out = tangent(t1, t2, x1, x2, packed, axis, eps, dtype)
    dout = tangent(dt1, dt2, x1, x2, packed, axis, eps, dtype)
    if any(d is not None for d in dargs):
        args, dargs = (x1, x2, packed), tuple(jnp.zeros_like(a) if d is None else d for a, d in zip((x1, x2, packed), dargs, strict=True))
        ts = tuple(t for t in (t1, t2) if t is not None)
        f = lambda *a: _tangent_core(*ts, *a, axis=axis, eps=eps, present=present, dtype=dtype)  # noqa: E731
        dout = dout + jax.jvp(f, args, dargs)[1]
    return out, dout


def _tangent_batch(args: tuple, dims: tuple, *, axis: int, **params: Any) -> tuple:
    """Batch dimensions in front (a unit one where unbatched), every operand at the full rank: ``axis + 1``."""
    pairs = _unpack(tuple(zip(args, dims, strict=True)), params["present"])
    rank = max(a.ndim - (d is not None) for a, d in pairs[2:4])

    def front(pair: tuple | None, nd: int) -> jax.Array | None:
        if pair is None:
            return None
        a, d = pair
        a = a[None] if d is None else jnp.moveaxis(a, d, 0)
        return jnp.reshape(a, (a.shape[0], *(1,) * (nd + 1 - a.ndim), *a.shape[1:]))

    t1, t2, x1, x2 = (front(p, rank) for p in pairs[:4])
    packed = front(pairs[4], rank)  # (*result, 5): the result has rank - 1 dimensions
    return tangent(t1, t2, x1, x2, packed, axis + 1, params["eps"], params["dtype"]), 0


def _define_linear(prim: Primitive, core: Callable, core_jit: Callable, abstract: Callable, jvp: Callable,
                   transpose: Callable, batch: Callable) -> None:
    """The rules of a linear tangent primitive: ``core`` (jnp) evaluates and lowers it."""
    prim.def_impl(lambda *operands, **params: core_jit(*operands, **params))
    prim.def_abstract_eval(abstract)
    ad.primitive_jvps[prim] = jvp
    ad.primitive_transposes[prim] = transpose
    batching.primitive_batchers[prim] = batch
    mlir.register_lowering(prim, mlir.lower_fun(core, multiple_results=False))


_define_linear(tangent_p, _tangent_core, _tangent_core_jit, _tangent_abstract, _tangent_jvp, _tangent_transpose,
               _tangent_batch)


# --------------------------------------------------------------------------- the transpose: the kernel's backward


@partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def pullback(
    g: jax.Array, x1: jax.Array, x2: jax.Array, packed: jax.Array, axis: int, eps: float, shape1: tuple, shape2: tuple,
) -> tuple[jax.Array, jax.Array]:
    """The VJP ``(d1, d2)`` from the residuals, summed to ``shape1``, ``shape2`` (broadcasts of ``x1``, ``x2``).

    :func:`polycos._core.vjp`: one pass of the kernel's backward on CPU (it reads
    ``x1, x2, g`` and the residuals, writes the gradients), the core elsewhere.
    Its tangent rule is the core's, so gradients can be differentiated again.
    """
    return _by_platform(
        lambda *a: _kernel_pullback(*a, axis, eps, shape1, shape2),
        lambda *a: _core_pullback(*a, axis, eps, shape1, shape2),
        g, x1, x2, packed,
    )


@pullback.defjvp
def _pullback_jvp(axis: int, eps: float, shape1: tuple, shape2: tuple, primals: tuple, tangents: tuple) -> tuple:
    core = partial(_core_pullback, axis=axis, eps=eps, shape1=shape1, shape2=shape2)
    return pullback(*primals, axis, eps, shape1, shape2), jax.jvp(core, primals, tangents)[1]


@_quiet
def _core_pullback(
    g: jax.Array, x1: jax.Array, x2: jax.Array, packed: jax.Array, axis: int, eps: float, shape1: tuple, shape2: tuple,
) -> tuple[jax.Array, jax.Array]:
    res = _core.unpack_residuals(xp, packed, axis)
    x1, x2 = jnp.broadcast_to(x1, shape1), jnp.broadcast_to(x2, shape2)
    return _core.vjp(xp, g, x1, x2, axis, eps, res)


def _kernel_pullback(
    g: jax.Array, x1: jax.Array, x2: jax.Array, packed: jax.Array, axis: int, eps: float, shape1: tuple, shape2: tuple,
) -> tuple[jax.Array, jax.Array]:
    """The kernel's gradients over the full broadcast shape, summed (in the accumulation dtype) where broadcast."""
    k = _kernels()
    nd = max(x1.ndim, x2.ndim, len(shape1), len(shape2))
    full = jnp.broadcast_shapes(tuple(x1.shape), tuple(x2.shape), shape1, shape2, _with_axis(g.shape, axis, nd))
    size = math.prod(full)
    if math.prod(shape1) == size and math.prod(shape2) == size:  # nothing to sum: the kernel rounds once
        d1, d2 = k.jax_backward(g, x1, x2, packed, axis, eps)
        return jnp.reshape(d1, shape1), jnp.reshape(d2, shape2)
    d1, d2 = k.jax_backward(g, x1, x2, packed, axis, eps, out_dtype=packed.dtype)
    return tuple(
        _core.sum_to_shape(xp, d, s).astype(x1.dtype) for d, s in ((d1, shape1), (d2, shape2))
    )


def _with_axis(shape: tuple, axis: int, nd: int) -> tuple:
    """A result's shape with a unit ``axis`` put back, at rank ``nd``."""
    shape = (1,) * (nd - 1 - len(shape)) + tuple(shape)
    return (*shape[:axis], 1, *shape[axis:])


# Called outside jit, each op would be dispatched (and compiled for a new shape) one
# by one; jitted, one compilation per shape and dtype, inlined into an enclosing jit.


@partial(jax.jit, static_argnums=(2, 3))
def _value(x1: jax.Array, x2: jax.Array, axis: int, eps: float) -> jax.Array:
    return cosine_value(x1, x2, axis, eps)


@partial(jax.jit, static_argnums=(3, 4))
def _vjp(g: jax.Array, x1: jax.Array, x2: jax.Array, axis: int, eps: float) -> tuple[jax.Array, jax.Array]:
    _, pull = jax.vjp(lambda a, b: cosine_value(a, b, axis, eps), x1, x2)
    return pull(g)


# --------------------------------------------------------------------------- pairwise


def _product(h1: jax.Array, h2: jax.Array | None, dtype: Any) -> jax.Array:
    """:func:`polycos._core.pairwise_product`, a large float64 product of a float32 call in blocks of rows.

    XLA writes a whole float64 ``N x M`` product to a new buffer, then clamps
    and rounds it into the result: at 2048 x 2048 x 128 (one thread) 55 ms,
    against 30-35 ms for the same product in blocks of at most 4 MiB
    (:func:`polycos._kernels.product_blocks`: the rows of a block and all
    columns), each clamped and rounded into its rows of the result by a
    ``fori_loop`` (the block's memory is reused, the result updated in place).
    Each entry is the same dot product rounded once, as in the core.
    """
    from polycos._kernels import product_blocks

    other = h1 if h2 is None else h2
    n, m = h1.shape[-2], other.shape[-2]
    if not (type(n) is int and type(m) is int):  # symbolic sizes (jax.export): one product
        return _core.pairwise_product(xp, h1, h2, dtype)
    rows = product_blocks(n, m)[0]
    if h1.ndim != 2 or other.ndim != 2 or h1.dtype == dtype or rows >= n:
        return _core.pairwise_product(xp, h1, h2, dtype)

    def block(h: jax.Array) -> jax.Array:
        return _core.pairwise_product(xp, h, other, dtype)

    def step(i: Any, out: jax.Array) -> jax.Array:
        part = block(lax.dynamic_slice_in_dim(h1, i * rows, rows, 0))
        return lax.dynamic_update_slice_in_dim(out, part, i * rows, 0)

    full = n // rows
    start = _by_platform(  # every row is written below: no zeros first
        lambda h: _kernels().jax_uninitialized((n, m), dtype), lambda h: jnp.zeros((n, m), dtype), h1)
    out = lax.fori_loop(0, full, step, start)
    if n % rows:
        out = lax.dynamic_update_slice_in_dim(out, block(h1[full * rows:]), full * rows, 0)
    return out


def _tmatmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``matrix_transpose(a) @ b`` as ``matrix_transpose(matrix_transpose(b) @ a)``, both transposes materialised.

    XLA:CPU gives a dot that contracts its left operand's rows to a slower GEMM
    than its usual one: ``G^T X`` for ``G`` 2048 x 2048 and ``X`` 2048 x 128
    took 27 ms against 13 ms for ``G X`` (one thread; 106 against 54 ms at
    4096). Written as ``(X^T G)^T`` XLA rewrites it back into that dot; the
    optimisation barriers keep ``X^T`` (small, ``D x N``) and the ``D x M``
    product as arrays, and the product takes the fast GEMM (18 ms, 59 ms at
    4096). Float32 sums in another order: the gradient carries no 1-ulp promise.
    """
    bt = lax.optimization_barrier(jnp.swapaxes(b, -1, -2))
    return jnp.swapaxes(lax.optimization_barrier(jnp.matmul(bt, a)), -1, -2)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def pairwise(x1: jax.Array, x2: jax.Array | None, eps: float) -> jax.Array:
    """The similarity matrix (:func:`polycos._core.pairwise_forward`); ``x2=None``: ``x1`` itself.

    Its tangent rule is :data:`ptangent_p`, a linear primitive whose transpose is
    :func:`pairwise_vjp`: forward mode evaluates the core's JVP, reverse mode the
    VJP (the same graph as a ``custom_vjp``), to any order.
    """
    if _scoped(x1.dtype):
        _no_symbolic_sizes(x1, x2)
        return in_x64_p.bind(*_present(x1, x2), fn=_InX64(_pairwise_core, eps))[0]
    return _pairwise_core(x1, *_present(x2), eps=eps)[0]


def _no_symbolic_sizes(*xs: jax.Array | None) -> None:
    """Symbolic sizes (``jax.export`` shape polymorphism) cannot enter the scoped float64 code."""
    if any(type(d) is not int for x in xs if x is not None for d in x.shape):
        raise NotImplementedError(
            "float32 pairwise similarity with symbolic shapes needs jax_enable_x64: its float64 "
            "product runs in a scoped float64 that JAX's shape polymorphism cannot enter (dimension "
            "variables of two integer widths); export with concrete shapes, or with x64 enabled"
        )


def _pairwise_jvp(eps: float, primals: tuple, tangents: tuple) -> tuple:
    x1, x2 = primals
    t1, t2 = (None if t is None or isinstance(t, SymbolicZero) else t for t in tangents)
    out = pairwise(x1, x2, eps)  # differentiable again: higher orders
    return out, pairwise_tangent(t1, t2, x1, x2, eps)


pairwise.defjvp(_pairwise_jvp, symbolic_zeros=True)


def pairwise_vjp(g: jax.Array, x1: jax.Array, x2: jax.Array | None, eps: float) -> tuple[jax.Array, jax.Array | None]:
    """``(dx1, dx2)`` of ``sum(g * pairwise(x1, x2))`` (:func:`polycos._core.pairwise_vjp`); ``dx2`` ``None`` for ``x2=None``."""
    if _scoped(x1.dtype):
        _no_symbolic_sizes(g, x1, x2)
        d = in_x64_p.bind(g, *_present(x1, x2), fn=_InX64(_pairwise_vjp_core, eps))
    else:
        d = _pairwise_vjp_core(g, x1, *_present(x2), eps=eps)
    return d[0], (d[1] if x2 is not None else None)


@_quiet
def _normalize(x: jax.Array, eps: float) -> _core.RowNorms:
    return _core.normalize_rows(xp, x, eps, scale=_pow2_scale(eps))




# --------------------------------------------------------------------------- pairwise: the tangent map, a linear primitive
#
# dS = dH1 H2^T + H1 dH2^T (polycos._core.pairwise_jvp). As jnp code, reverse mode would be XLA's
# transpose of it; as a primitive its transpose is pairwise_vjp (the hand-written VJP: the row
# normalisation's VJP and two products), and its JVP and batching rules keep every other
# transformation on the jnp code.

ptangent_p = Primitive("polycos_pairwise_tangent")


def pairwise_tangent(
    t1: jax.Array | None, t2: jax.Array | None, x1: jax.Array, x2: jax.Array | None, eps: float
) -> jax.Array:
    """``dS`` along ``(t1, t2)`` (``None``: a zero tangent; ``t2`` unused when ``x2`` is ``None``) at ``x1, x2``."""
    selfsim = x2 is None
    present = (t1 is not None, not selfsim and t2 is not None)
    ts = tuple(t for t, p in zip((t1, t2), present, strict=True) if p)
    if not ts:
        return jnp.zeros(_core._pairwise_shape(x1, x2), x1.dtype)
    return ptangent_p.bind(*ts, *_present(x1, x2), eps=eps, present=present, selfsim=selfsim)


def _punpack(operands: tuple, present: tuple, selfsim: bool) -> tuple:
    """``(t1 | None, t2 | None, x1, x2 | None)`` from the primitive's operands."""
    it = iter(operands)
    t1 = next(it) if present[0] else None
    t2 = next(it) if present[1] else None
    x1 = next(it)
    return t1, t2, x1, None if selfsim else next(it)


@dataclass(frozen=True)
class _PairwiseTangent:
    """:func:`polycos._core.pairwise_jvp` on the primitive's operands, as a tuple (for :data:`in_x64_p`)."""

    present: tuple
    selfsim: bool

    def __call__(self, *operands: jax.Array, eps: float) -> tuple[jax.Array]:
        t1, t2, x1, x2 = _punpack(operands, self.present, self.selfsim)
        return (_core.pairwise_jvp(xp, t1, t2, x1, x2, eps),)


@_quiet
def _ptangent_core(*operands: jax.Array, eps: float, present: tuple, selfsim: bool) -> jax.Array:
    fn = _PairwiseTangent(present, selfsim)
    if _scoped(operands[0].dtype):  # float32 with x64 off: the float64 products in the scope
        _no_symbolic_sizes(*operands)
        return in_x64_p.bind(*operands, fn=_InX64(fn, eps))[0]
    return fn(*operands, eps=eps)[0]


_ptangent_core_jit = jax.jit(_ptangent_core, static_argnames=("eps", "present", "selfsim"))


def _ptangent_abstract(*avals: Any, eps: float, present: tuple, selfsim: bool) -> Any:
    _, _, x1, x2 = _punpack(avals, present, selfsim)
    return _aval_like(avals, _core._pairwise_shape(x1, x2), x1.dtype)


def _ptangent_transpose(ct: Any, *operands: Any, eps: float, present: tuple, selfsim: bool) -> list:
    """The cotangents of ``t1, t2`` for ``ct``: :func:`pairwise_vjp`; none for ``x1, x2``."""
    t1, t2, x1, x2 = _punpack(operands, present, selfsim)
    wanted = [t is not None and ad.is_undefined_primal(t) for t in (t1, t2)]
    if type(ct) is ad.Zero or not any(wanted):
        return [None] * len(operands)
    d = pairwise_vjp(ct, x1, x2, eps)
    cts = [_summed_to(d[i], (t1, t2)[i]) if wanted[i] else None for i in range(2) if present[i]]
    return [*cts, *[None] * (len(operands) - len(cts))]


def _ptangent_jvp(primals: tuple, tangents: tuple, *, eps: float, present: tuple, selfsim: bool) -> tuple:
    """``A(x) t`` is bilinear in ``(x, t)``: its tangent is ``A(x) dt + dA(x)[dx] t``."""
    t1, t2, x1, x2 = _punpack(primals, present, selfsim)
    dt1, dt2, dx1, dx2 = (None if d is None or type(d) is ad.Zero else d for d in _punpack(tangents, present, selfsim))
    out = pairwise_tangent(t1, t2, x1, x2, eps)
    dout = pairwise_tangent(dt1, dt2, x1, x2, eps)
    xs, dxs = _present(x1, x2), (dx1,) if selfsim else (dx1, dx2)
    if any(d is not None for d in dxs):
        ts = tuple(t for t in (t1, t2) if t is not None)
        dxs = tuple(jnp.zeros_like(a) if d is None else d for a, d in zip(xs, dxs, strict=True))
        f = lambda *a: _ptangent_core(*ts, *a, eps=eps, present=present, selfsim=selfsim)  # noqa: E731
        dout = dout + jax.jvp(f, xs, dxs)[1]
    return out, dout


def _ptangent_batch(args: tuple, dims: tuple, *, eps: float, present: tuple, selfsim: bool) -> tuple:
    """Batch dimensions in front of every operand (pairwise takes leading batch dimensions)."""
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    moved = [jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
             for a, d in zip(args, dims, strict=True)]
    return ptangent_p.bind(*moved, eps=eps, present=present, selfsim=selfsim), 0


_define_linear(ptangent_p, _ptangent_core, _ptangent_core_jit, _ptangent_abstract, _ptangent_jvp,
               _ptangent_transpose, _ptangent_batch)


def _present(*xs: jax.Array | None) -> tuple[jax.Array, ...]:
    return tuple(x for x in xs if x is not None)


@_quiet
def _pairwise_core(x1: jax.Array, *x2: jax.Array, eps: float) -> tuple[jax.Array]:
    return _core.pairwise_forward(xp, x1, x2[0] if x2 else None, eps, native_normalize=_normalize,
                                  native_product=_product)[:1]


@_quiet
def _pairwise_vjp_core(g: jax.Array, x1: jax.Array, *x2: jax.Array, eps: float) -> tuple[jax.Array, ...]:
    d1, d2 = _core.pairwise_vjp(xp, g, x1, x2[0] if x2 else None, eps, native_normalize=_normalize,
                                native_tmatmul=_tmatmul)
    return (d1,) if d2 is None else (d1, d2)


# --------------------------------------------------------------------------- pairwise: float64 in a float32 graph
#
# Float32 pairwise with x64 off runs in a scoped ``jax.enable_x64``. A graph traced inside the scope
# and transformed after it closed (``vmap(jit(f))``: JAX batches the graph ``jit`` traced; a loop's
# indices inside ``jit(vmap(f))``; the transpose of a second derivative) has its float64 and int64
# values canonicalised to 32 bits: a TypeError, or a float64 product silently made float32. So that
# code runs as one primitive, :data:`in_x64_p`, with float32 operands and results; each rule traces
# the code inside the scope when it runs, and every transformation becomes a step of the code:
# lowering (once per compilation), batching (``vmap``), JVP (the tangent map, itself a call of the
# primitive) and the transpose of that tangent map (``vjp`` of it), to any order.


def _scoped(dtype: Any) -> bool:
    """Float32 with x64 off: the pairwise product runs in a scoped float64."""
    return dtype_name(dtype) == "float32" and not jax.config.jax_enable_x64


@dataclass(frozen=True)
class _InX64:
    """A function of arrays returning a tuple of arrays, run with x64 on: ``base(*arrays, eps=eps)``, then
    the transformations in ``steps``. A value (equal, hashable): the primitive's parameter."""

    base: Callable[..., tuple]
    eps: float
    steps: tuple = ()

    def then(self, *step: Any) -> _InX64:
        return _InX64(self.base, self.eps, (*self.steps, step))

    def __call__(self, *args: jax.Array) -> tuple:
        f: Callable[..., Any] = partial(self.base, eps=self.eps)
        for step in self.steps:
            f = _STEPS[step[0]](f, *step[1:])
        with jax.enable_x64(True):
            return tuple(f(*args))


def _vmap_step(f: Callable, dims: tuple) -> Callable:
    return jax.vmap(f, in_axes=dims, out_axes=0)


def _jvp_step(f: Callable, n: int) -> Callable:
    """The tangent map: ``(*primals, *tangents) -> tangents of f``, linear in the tangents."""
    return lambda *a: jax.jvp(f, a[:n], a[n:])[1]


def _transpose_step(f: Callable, linear: tuple[bool, ...], avals: tuple, n_out: int) -> Callable:
    """``(*cotangents, *fixed operands) -> cotangents of the linear operands`` of ``f`` (linear in those)."""

    def transposed(*a: jax.Array) -> tuple:
        cts, fixed = a[:n_out], iter(a[n_out:])
        fixed_args = [None if is_linear else next(fixed) for is_linear in linear]

        def of_linear(*u: jax.Array) -> tuple:
            it = iter(u)
            return tuple(f(*(next(it) if is_linear else x for x, is_linear in zip(fixed_args, linear, strict=True))))

        zeros = tuple(jnp.zeros(shape, dtype) for shape, dtype in avals)
        return jax.vjp(of_linear, *zeros)[1](tuple(cts))

    return transposed


_STEPS: dict[str, Callable[..., Callable]] = {"vmap": _vmap_step, "jvp": _jvp_step, "transpose": _transpose_step}

in_x64_p = Primitive("polycos_in_x64")
in_x64_p.multiple_results = True


def _in_x64_abstract(*avals: Any, fn: _InX64) -> list:
    out = jax.eval_shape(fn, *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals))  # fn enters the scope
    return [_aval_like(avals, o.shape, o.dtype) for o in out]


def _in_x64_eager(*operands: jax.Array, fn: _InX64) -> Any:
    if jax.config.jax_disable_jit:  # (the jitted call would bind the primitive again: no end)
        return list(fn(*operands))
    return _in_x64_jit(fn)(*operands)


@cache
def _in_x64_jit(fn: _InX64) -> Any:
    return jax.jit(lambda *ops: in_x64_p.bind(*ops, fn=fn))


def _in_x64_lowering(ctx: Any, *operands: Any, fn: _InX64) -> Any:
    with jax.enable_x64(True):  # around the lowering too: the traced graph's float64 constants
        return mlir.lower_fun(fn, multiple_results=True)(ctx, *operands)


def _in_x64_batch(args: tuple, dims: tuple, *, fn: _InX64) -> tuple:
    out = in_x64_p.bind(*args, fn=fn.then("vmap", tuple(dims)))
    return out, [0] * len(out)


def _in_x64_jvp(primals: tuple, tangents: tuple, *, fn: _InX64) -> tuple:
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    out = in_x64_p.bind(*primals, fn=fn)
    return out, in_x64_p.bind(*primals, *tangents, fn=fn.then("jvp", len(primals)))


def _in_x64_transpose(cts: Any, *operands: Any, fn: _InX64) -> list:
    """Only a tangent map (a ``jvp`` step, or a transpose of one) is transposed: linear in its undefined operands."""
    linear = tuple(ad.is_undefined_primal(o) for o in operands)
    avals = tuple((o.aval.shape, o.aval.dtype) for o in operands if ad.is_undefined_primal(o))
    fixed = [o for o in operands if not ad.is_undefined_primal(o)]
    cts = [ad.instantiate_zeros(c) for c in cts]
    d = iter(in_x64_p.bind(*cts, *fixed, fn=fn.then("transpose", linear, avals, len(cts))))
    return [next(d) if is_linear else None for is_linear in linear]


in_x64_p.def_impl(_in_x64_eager)
in_x64_p.def_abstract_eval(_in_x64_abstract)
batching.primitive_batchers[in_x64_p] = _in_x64_batch
ad.primitive_jvps[in_x64_p] = _in_x64_jvp
ad.primitive_transposes[in_x64_p] = _in_x64_transpose
mlir.register_lowering(in_x64_p, _in_x64_lowering)


def _traced(*xs: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


# Jitted entry points (as _value and _vjp above): one compilation per shape, not one per op.
_pairwise_jit = jax.jit(pairwise, static_argnums=(2,))
_pairwise_vjp_jit = jax.jit(pairwise_vjp, static_argnums=(3,))


# --------------------------------------------------------------------------- the backend


class JaxBackend(Backend):
    """jax.Array (traced too): custom JVP over the kernel or the core; never inspects values."""

    autodiff = True

    @property
    def native(self) -> bool:
        return _kernels() is not None

    def namespace(self, arrays: tuple[tuple[str, Any], ...]) -> Any:
        return jnp

    def device(self, x: Any) -> Any:
        """The device(s) of a concrete array *committed* to them; ``None`` (any) otherwise.

        JAX moves uncommitted arrays itself, and a traced array has no device;
        arrays committed to different devices cannot meet in one computation.
        """
        if isinstance(x, jax.core.Tracer):
            return None
        try:
            if not x.committed:
                return None
            devices = x.devices()
        except Exception:
            return None
        return next(iter(devices)) if len(devices) == 1 else frozenset(devices)

    def default_float(self, xp_: Any, like: Any) -> Any:
        return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32

    def result_type(self, xp_: Any, x1: Any, x2: Any) -> Any:
        return jnp.result_type(x1, x2)

    def dtype_kind(self, xp_: Any, dtype: Any) -> str | None:
        if jnp.issubdtype(dtype, jnp.complexfloating):
            return "complex"
        if jnp.issubdtype(dtype, jnp.floating):
            return "float"
        if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
            return "integral"
        return None

    def rowwise_forward(self, call: Call) -> tuple[Any, Any]:
        x1, x2 = call.x1, call.x2
        if not call.shape:
            return jnp.reshape(_value(jnp.reshape(x1, (1,)), jnp.reshape(x2, (1,)), 0, call.eps), ()), None
        return _value(x1, x2, call.axis, call.eps), None

    def rowwise_vjp(self, g: Any, call: Call, residuals: Any) -> tuple[Any, Any]:
        x1, x2 = call.x1, call.x2
        if not call.shape:
            d1, d2 = _vjp(jnp.reshape(g, ()), jnp.reshape(x1, (1,)), jnp.reshape(x2, (1,)), 0, call.eps)
        else:
            d1, d2 = _vjp(g, x1, x2, call.axis, call.eps)
        return jnp.reshape(d1, x1.shape), jnp.reshape(d2, x2.shape)

    def pairwise_forward(self, x1: Any, x2: Any | None, eps: float) -> Any:
        return (pairwise if _traced(x1, x2) else _pairwise_jit)(x1, x2, eps)

    def pairwise_vjp(
        self, g: Any, x1: Any, x2: Any | None, eps: float, residuals: Any = None
    ) -> tuple[Any, Any | None]:
        return (pairwise_vjp if _traced(g, x1, x2) else _pairwise_vjp_jit)(g, x1, x2, eps)

    def to_numpy(self, x: Any) -> Any:
        import numpy as np

        if dtype_name(x.dtype) == "bfloat16":
            x = x.astype(jnp.float32)
        return np.array(x, copy=True)

    def from_numpy(self, a: Any, dtype: str | None = None, *, xp: Any = None, device: Any = None) -> Any:
        dtype = dtype or a.dtype.name
        if dtype == "float64" and not jax.config.jax_enable_x64:
            dtype = "float32"  # what JAX makes of float64 without x64 (quietly, here)
        return jnp.asarray(a, dtype=getattr(jnp, dtype))
