r"""JAX adapter: the core (:mod:`polycos._core`) as a :func:`jax.custom_vjp`.

The forward pass and the VJP are the core's, evaluated with :mod:`jax.numpy`
(an array-API namespace); this module only registers them with JAX's autodiff.
The forward rule saves the inputs and the core's residuals ``(s, n1, n2)`` (one
value per row each); the backward rule is :func:`polycos._core.vjp` on them.
Nothing branches on array values, so everything works under :func:`jax.jit`,
:func:`jax.vmap`, :func:`jax.grad` (to any order), :func:`jax.jacrev` and on
sharded arrays.

Forward mode of the function itself (:func:`jax.jvp`, :func:`jax.jacfwd`) is
not available: a ``custom_vjp`` defines reverse mode only, and it raises a
``TypeError`` saying so. Forward mode *over* reverse mode works (the backward
rule is ordinary ``jax.numpy`` code): :func:`jax.hessian`, ``jax.jvp`` of ``jax.grad``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from polycos import _core
from polycos import _pairwise as _pairwise_module
from polycos._validate import Call, resolve_dim, validate

__all__ = ["cosine_similarity", "forward", "pairwise_forward", "pairwise_vjp", "vjp"]

_FORWARD_MODE_HINT = (
    "polycos.jax.cosine_similarity is a jax.custom_vjp: it supports reverse mode "
    "(jax.grad, jax.vjp, jax.jacrev, to any order) and forward-over-reverse (jax.hessian, "
    "jax.jvp of jax.grad), but not forward mode of the function itself (jax.jvp, "
    "jax.jacfwd). Use jax.jacrev for its Jacobian."
)


class _Namespace:
    """:mod:`jax.numpy`, with a square root that reverse mode can differentiate at 0.

    ``jnp.sqrt``'s derivative at 0 is ``inf``, and reverse mode multiplies it by
    the zero cotangent of a branch ``jnp.where`` did not take: ``0 * inf = NaN``
    in second derivatives at zero vectors. The core takes square roots only of
    sums of squares, and where one is 0 it never uses the root's slope, so here
    the root of 0 is a constant 0 (values are bitwise those of ``jnp.sqrt``).
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(jnp, name)

    @staticmethod
    def sqrt(x: jax.Array) -> jax.Array:
        pos = x > 0
        rest = jnp.where(x == 0, jnp.zeros_like(x), jnp.full_like(x, jnp.nan))  # NaN below 0
        return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, jnp.ones_like(x))), rest)


_xp = _Namespace()


def _dots(x1: jax.Array, x2: jax.Array, axis: int, compensated: bool) -> tuple[jax.Array, ...]:
    """The core's three sums (:func:`polycos._core.dots`) as one XLA variadic reduce.

    Written as three ``vecdot`` calls, XLA materialises the accumulation-dtype
    copies of ``x1`` and ``x2`` (each is shared by two reductions) and makes
    three passes; one ``lax.reduce`` over the three products reads each input
    once, converting on the fly. The sums are the same; only their evaluation
    differs.

    Compensated (float32 with ``jax_enable_x64`` off: nothing wider exists),
    every product is split exactly into ``p + e`` (Dekker's TwoProduct) and
    each sum is carried as an unevaluated pair ``hi + lo`` combined by Knuth's
    error-free TwoSum, in the same single pass: the sums are as accurate as in
    twice the working precision, like the core's
    :func:`polycos._core.accurate_dot`, which evaluates them with a pairwise
    tree of TwoSums costing about 20 XLA passes. Measured at N = 65536,
    D = 256 on the 2-core benchmark machine: 2.1 s for the tree; 58 ms for
    this reduce with rounded products, which let parallel rows come out as
    ``1 - 2**-23`` (1 ulp(1.0) off); about twice that with exact products,
    which is what runs.
    """
    acc = _core.accumulation_dtype(_xp, x1.dtype, x1)
    a1, a2 = x1.astype(acc), x2.astype(acc)
    if a1.shape != a2.shape:  # broadcast: the three sums have different shapes
        return _core.dots(_xp, a1, a2, axis, compensated=compensated)
    if compensated:
        return tuple(jnp.expand_dims(w, axis) for w in _compensated_sums(a1, a2, axis))
    zero = jnp.zeros((), acc)
    sums = lax.reduce((a1 * a2, a1 * a1, a2 * a2), (zero,) * 3, _add3, (axis,))
    return tuple(jnp.expand_dims(w, axis) for w in sums)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _compensated_sums(a1: jax.Array, a2: jax.Array, axis: int) -> tuple[jax.Array, ...]:
    """``(w12, w11, w22, l12, l11, l22)``: double-word sums, rounded, and their remainders."""
    zero = jnp.zeros((), a1.dtype)
    factor = _core._split_factor(a1.dtype)
    # Each product exactly, as p + e (TwoProduct); the e's start the low words.
    pairs = ((a1, a2), (a1, a1), (a2, a2))
    products = [t for u, v in pairs for t in _core._two_product(jnp, u, v, factor)]
    products = tuple(jnp.broadcast_to(p, a1.shape) for p in products)
    hi12, lo12, hi11, lo11, hi22, lo22 = lax.reduce(products, (zero,) * 6, _two_sums, (axis,))
    sums = []
    for hi, lo in ((hi12, lo12), (hi11, lo11), (hi22, lo22)):
        w = hi + lo  # the pair as one rounded sum, and what that rounding left (Fast2Sum)
        sums.append((w, lo - (w - hi)))
    return (*(w for w, _ in sums), *(r for _, r in sums))


@_compensated_sums.defjvp
def _compensated_sums_jvp(axis: int, primals: tuple, tangents: tuple) -> tuple:
    # A general lax.reduce has no derivative rule; the sums' derivatives are
    # plain sums (to working precision), differentiable again for higher orders.
    a1, a2 = primals
    t1, t2 = tangents
    out = _compensated_sums(a1, a2, axis)
    d12 = jnp.sum(t1 * a2 + a1 * t2, axis=axis)
    d11 = 2 * jnp.sum(a1 * t1, axis=axis)
    d22 = 2 * jnp.sum(a2 * t2, axis=axis)
    zero = jnp.zeros_like(d12)
    return out, (d12, d11, d22, zero, jnp.zeros_like(d11), jnp.zeros_like(d22))


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


def _branch(pred: jax.Array, then_fn: Any, else_fn: Any) -> Any:
    """The core's range rescue runs only when a row needs it (compiled, not always taken)."""
    return lax.cond(pred, then_fn, else_fn)


# Each rule is jitted: called eagerly, the core's few dozen operations (and the
# rescue's lax.cond) would each be dispatched, and compiled for a new shape, one
# by one (about 1 s for a first call); jitted, one compilation per shape, cached,
# and inlined into an enclosing jit.


@partial(jax.jit, static_argnums=(2, 3))
def _forward(x1: jax.Array, x2: jax.Array, axis: int, eps: float) -> tuple[jax.Array, Any]:
    return _core.forward(_xp, x1, x2, axis, eps, native_dots=_dots, branch=_branch)


@partial(jax.jit, static_argnums=(3, 4))
def _vjp(
    g: jax.Array, x1: jax.Array, x2: jax.Array, axis: int, eps: float, residuals: Any = None
) -> tuple[jax.Array, jax.Array]:
    return _core.vjp(_xp, g, x1, x2, axis, eps, residuals, native_dots=_dots, branch=_branch)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cosine(x1: jax.Array, x2: jax.Array, axis: int, eps: float) -> jax.Array:
    return _forward(x1, x2, axis, eps)[0]


def _cosine_fwd(x1: jax.Array, x2: jax.Array, axis: int, eps: float) -> tuple[jax.Array, Any]:
    out, residuals = _forward(x1, x2, axis, eps)
    return out, (x1, x2, residuals)


def _cosine_bwd(axis: int, eps: float, saved: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x1, x2, residuals = saved
    return _vjp(g, x1, x2, axis, eps, residuals)


_cosine.defvjp(_cosine_fwd, _cosine_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pairwise(x1: jax.Array, x2: jax.Array | None, eps: float) -> jax.Array:
    """The similarity matrix (:func:`polycos._core.pairwise_forward`); ``x2=None``: ``x1`` itself."""
    return _core.pairwise_forward(_xp, x1, x2, eps)[0]


def _pairwise_fwd(x1: jax.Array, x2: jax.Array | None, eps: float) -> tuple[jax.Array, Any]:
    # Saves the inputs only: the backward's row norms cost O((N + M) D), small
    # beside its two matrix products.
    return _pairwise(x1, x2, eps), (x1, x2)


def _pairwise_bwd(eps: float, saved: Any, g: jax.Array) -> tuple:
    x1, x2 = saved
    return _pairwise_vjp(g, x1, x2, eps)


def _pairwise_vjp(
    g: jax.Array, x1: jax.Array, x2: jax.Array | None, eps: float
) -> tuple[jax.Array, jax.Array | None]:
    return _core.pairwise_vjp(_xp, g, x1, x2, eps)


_pairwise.defvjp(_pairwise_fwd, _pairwise_bwd)


def pairwise_forward(call: Any) -> jax.Array:
    """``polycos.pairwise_cosine_similarity`` on JAX arrays (a validated pairwise call)."""
    return _pairwise(call.x1, call.x2, call.eps)


def pairwise_vjp(grad: jax.Array, call: Any) -> tuple[jax.Array, jax.Array | None]:
    """``polycos.pairwise_cosine_similarity_vjp`` on JAX arrays."""
    return _pairwise_vjp(grad, call.x1, call.x2, call.eps)


def _as_vectors(call: Call) -> tuple[jax.Array, jax.Array]:
    """0-d inputs become 1-vectors (the core needs an axis to reduce)."""
    if call.shape:
        return call.x1, call.x2
    return jnp.reshape(call.x1, (1,)), jnp.reshape(call.x2, (1,))


def forward(call: Call) -> jax.Array:
    """Forward on a validated call (the adapter contract of :mod:`polycos._dispatch`)."""
    if len(call.shape) >= 3:  # an outer-product broadcast becomes one matrix product
        outer = _pairwise_module.forward_outer(call, _pairwise)
        if outer is not None:
            return outer
    x1, x2 = _as_vectors(call)
    try:
        out = _cosine(x1, x2, call.axis, call.eps)
    except TypeError as err:
        if "forward-mode" in str(err):
            raise TypeError(_FORWARD_MODE_HINT) from err
        raise
    return jnp.reshape(out, ()) if not call.shape else out


def vjp(grad: jax.Array, call: Call) -> tuple[jax.Array, jax.Array]:
    """VJP on a validated call; ``grad`` broadcasts to the forward result's shape."""
    outer = _pairwise_module.vjp_outer(grad, call, _pairwise_vjp)
    if outer is not None:
        return outer
    x1, x2 = _as_vectors(call)
    out_shape = tuple(d for i, d in enumerate(call.shape) if i != call.axis)
    g = jnp.broadcast_to(jnp.asarray(grad, dtype=call.dtype), out_shape)
    if not call.shape:
        g = jnp.reshape(g, ())
    g1, g2 = _vjp(g, x1, x2, call.axis, call.eps)
    return jnp.reshape(g1, call.x1.shape), jnp.reshape(g2, call.x2.shape)


def cosine_similarity(
    x1: jax.Array,
    x2: jax.Array,
    dim: int | None = None,
    eps: float = 1e-8,
    *,
    axis: int | None = None,
) -> jax.Array:
    r"""Cosine similarity of JAX arrays along ``dim``, differentiable by ``jax.custom_vjp``.

    .. math::

        s = \operatorname{clip}\Big(\frac{\langle x_1, x_2 \rangle}
            {\max(\lVert x_1\rVert, \varepsilon)\,\max(\lVert x_2\rVert, \varepsilon)},
            -1, 1\Big)

    along ``dim`` of the broadcast shape, with the semantics of
    :func:`torch.nn.functional.cosine_similarity` (see :func:`polycos.cosine_similarity`).
    The gradient is the exact derivative in every regime: for a norm below
    ``eps`` the function is linear in that input, and with ``eps=0`` the
    gradient at a zero vector is 0.

    Parameters
    ----------
    x1, x2 : jax.Array
        Arrays that broadcast together (NumPy arrays are converted, as
        ``jax.numpy`` functions do). Integer and bool inputs are promoted to
        JAX's default float dtype; otherwise the result dtype follows JAX's
        promotion (with ``jax_enable_x64`` off, float64 requests give float32).
    dim : int, optional
        Axis of the broadcast shape holding the vectors (default 1; negative
        counts from the end). Static: a Python int. ``axis=`` is an alias.
    eps : float, optional
        Lower bound on each norm, ``>= 0`` (default ``1e-8``). Static: a Python float.

    Returns
    -------
    jax.Array
        The broadcast shape without ``dim``, on the inputs' devices and
        sharding; ``|s| <= 1``.

    Raises
    ------
    TypeError
        Non-arrays, arrays of another library, complex dtypes; forward-mode
        differentiation (:func:`jax.jvp`, :func:`jax.jacfwd`).
    ValueError
        Shapes that do not broadcast; ``eps`` negative, NaN or infinite.
    IndexError
        ``dim`` out of range.

    Notes
    -----
    Reductions accumulate float16/bfloat16 in float32, and float32 in float64
    when ``jax_enable_x64`` is on; otherwise float32 in float32 with
    compensated (error-free) summation, so results are within 1 ulp of the
    exact value either way.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from polycos.jax import cosine_similarity
    >>> a = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> b = jnp.array([[5.0, 6.0], [7.0, 8.0]])
    >>> [round(v, 4) for v in cosine_similarity(a, b, dim=1).tolist()]
    [0.9734, 0.9972]
    >>> [round(v, 4) for v in cosine_similarity(a, b, dim=0).tolist()]
    [0.9558, 0.9839]

    Under ``jit`` and ``grad`` (``dim`` and ``eps`` are static):

    >>> loss = jax.jit(lambda a, b: cosine_similarity(a, b).sum())
    >>> jax.grad(loss)(a, b).round(4)
    Array([[ 0.0916, -0.0458],
           [ 0.012 , -0.009 ]], dtype=float32)
    """
    if isinstance(eps, jax.core.Tracer):
        raise TypeError(
            "eps must be a static Python float, got a traced value; pass it outside "
            "jax.jit (or mark it static with static_argnums)"
        )
    x1, x2 = (jnp.asarray(x) if isinstance(x, np.ndarray | np.generic) else x for x in (x1, x2))
    call = validate(x1, x2, resolve_dim(dim, axis), eps)
    return forward(call)
