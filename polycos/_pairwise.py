r"""Pairwise cosine similarity in O(N·M) memory, and outer-broadcast detection.

Two spellings give the same similarity matrix:

* :func:`pairwise_cosine_similarity` ``(x1, x2=None)``: ``(..., N, D) x (..., M, D)
  -> (..., N, M)``, leading dimensions broadcast, ``x2=None`` for ``x1`` with itself;
* :func:`polycos.cosine_similarity` on an *outer-product broadcast*, e.g.
  ``cosine_similarity(x[:, None, :], y[None, :, :], dim=-1)`` or SimCLR's
  ``cosine_similarity(z[None], z[:, None], dim=2)``, recognised by :func:`detect`
  from shapes alone and computed by the same matrix-product path.

Both normalise the rows once and take one matrix product (the math is
:func:`polycos._core.pairwise_forward` and :func:`polycos._core.pairwise_vjp`),
so nothing of size ``N·M·D`` is ever built, forward or backward.

Recognised patterns (:func:`detect`)
------------------------------------
Let ``B`` be the broadcast shape and ``dim`` the reduced axis. Every other
axis ``k`` of ``B`` (after prepending unit axes to the shorter input) is

* **batch** if ``B[k] == 1`` or both inputs have size ``B[k]`` there,
* **left** if ``x1`` has size ``B[k] > 1`` there and ``x2`` has size 1,
* **right** if ``x2`` has size ``B[k] > 1`` there and ``x1`` has size 1.

The call is an outer product, and takes the matrix path, when at least one
axis is left and at least one is right; any number of each, in any order,
with any batch axes, and ``dim`` anywhere (the reduced lengths equal, or one
of them 1). Everything else (no left or no right axis, unknown dask sizes)
keeps the direct path. Only shapes are read, never values, so detection works
on traced and lazy arrays. For NumPy and CuPy *forward* calls an axis of size
``> 1`` and stride 0 (``np.broadcast_to``) counts as size 1 too; the VJP of such
an input has its full shape, so there the direct path is kept.

The result is the same as the direct path's to within the accuracy guarantee
(both are within ``ulp(1.0)`` of the exact value for float32), and so are the
gradients (the VJP of the matrix path is the row-wise VJP summed over the
partner rows, computed as two matrix products).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat

from polycos import _core
from polycos._dispatch import adapter_for
from polycos._validate import Call, broadcast_shapes, check_eps, namespace, promote

__all__ = [
    "OuterPlan",
    "PairwiseCall",
    "detect",
    "forward_outer",
    "pairwise_cosine_similarity",
    "pairwise_cosine_similarity_vjp",
    "validate_pairwise",
    "vjp_outer",
]

#: On NumPy, a float64 product matrix up to this many elements is formed in
#: one BLAS call; larger ones are formed in blocks of rows, each clamped and
#: cast into the result at once (no float64 copy of the whole matrix).
PRODUCT_ELEMENTS = 1 << 23
#: Elements of one float64 block of the product matrix (NumPy, large inputs).
BLOCK_ELEMENTS = 1 << 20


#: ``pairwise(x1, x2_or_None, eps) -> S`` and ``pairwise_vjp(g, x1, x2_or_None, eps)
#: -> (d1, d2_or_None)`` on validated ``(..., N, D)`` inputs: what a backend supplies.
Pairwise = Callable[[Any, Any, float], Any]
PairwiseVJP = Callable[[Any, Any, Any, float], "tuple[Any, Any]"]


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class PairwiseCall:
    """A validated pairwise call: one floating dtype, ``x2=None`` for self-similarity."""

    xp: Any
    x1: Any
    x2: Any | None
    eps: float
    shape: tuple  #: result shape ``(..., N, M)``


def validate_pairwise(x1: Any, x2: Any | None, eps: Any) -> PairwiseCall:
    """Check the arguments of :func:`pairwise_cosine_similarity` (spec section 4)."""
    xp = namespace(x1, x1 if x2 is None else x2)
    given = (("x1", x1),) if x2 is None else (("x1", x1), ("x2", x2))
    for name, x in given:
        if x.ndim < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., N, D), got shape {tuple(x.shape)}"
            )
    other = x1 if x2 is None else x2
    try:
        batch = broadcast_shapes(tuple(x1.shape[:-2]), tuple(other.shape[:-2]))
    except ValueError:
        raise ValueError(
            f"leading dimensions do not broadcast: x1 with shape {tuple(x1.shape)} and "
            f"x2 with shape {tuple(other.shape)}"
        ) from None
    d1, d2 = x1.shape[-1], other.shape[-1]
    if d1 != d2 and 1 not in (d1, d2):
        raise ValueError(
            f"vector lengths differ: x1 with shape {tuple(x1.shape)} has D={d1}, "
            f"x2 with shape {tuple(other.shape)} has D={d2}"
        )
    eps = check_eps(eps)
    p1, p2 = promote(xp, x1, other)
    shape = (*batch, x1.shape[-2], other.shape[-2])
    return PairwiseCall(xp, p1, None if x2 is None else p2, eps, shape)


# --------------------------------------------------------------------------- generic backend


def _quiet(xp: Any) -> contextlib.AbstractContextManager:
    if array_api_compat.is_numpy_namespace(xp):
        import numpy as np

        return np.errstate(all="ignore")
    return contextlib.nullcontext()


def _numpy_product(h1: Any, h2: Any | None, dtype: Any) -> Any:
    """:func:`polycos._core.pairwise_product` on NumPy, without a float64 ``N·M`` copy when large."""
    import numpy as np

    # For self-similarity ``h1 @ h1.T`` NumPy would call syrk, which OpenBLAS runs
    # slower than gemm on a transposed copy (measured: 1.5-2x); the copy is O(N D).
    h2t = np.ascontiguousarray(np.swapaxes(h1, -1, -2)) if h2 is None else np.swapaxes(h2, -1, -2)
    n = h1.shape[-2]
    shape = (*np.broadcast_shapes(h1.shape[:-2], h2t.shape[:-2]), n, h2t.shape[-1])
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


def _generic_forward(xp: Any, x1: Any, x2: Any | None, eps: float) -> Any:
    native = _numpy_product if array_api_compat.is_numpy_namespace(xp) else None
    with _quiet(xp):
        s, _ = _core.pairwise_forward(xp, x1, x2, eps, native_product=native)
    return s


def _generic_vjp(xp: Any, g: Any, x1: Any, x2: Any | None, eps: float) -> tuple[Any, Any]:
    with _quiet(xp):
        return _core.pairwise_vjp(xp, g, x1, x2, eps)


def _native_adapter(x: Any) -> Any | None:
    """The torch/JAX adapter when it provides its own pairwise path (autodiff-aware)."""
    if array_api_compat.is_torch_array(x) or array_api_compat.is_jax_array(x):
        adapter = adapter_for(x)
        if hasattr(adapter, "pairwise_forward"):
            return adapter
    return None


# --------------------------------------------------------------------------- public


def pairwise_cosine_similarity(x1: Any, x2: Any | None = None, *, eps: float = 1e-8) -> Any:
    r"""Cosine similarity of every row of ``x1`` with every row of ``x2``.

    .. math::

        S_{\dots ij} = \operatorname{clip}\big(\hat x_{1,\dots i} \cdot
            \hat x_{2,\dots j}, -1, 1\big), \qquad
        \hat x = \frac{x}{\max(\lVert x\rVert, \varepsilon)},

    the same value as ``cosine_similarity(x1[..., :, None, :], x2[..., None, :, :],
    dim=-1, eps=eps)``, computed as one matrix product after normalising the
    rows: ``O(N·M + (N + M)·D)`` memory, never ``N·M·D``. For float32 inputs
    the product runs in float64, so every entry is within 1 ulp(1.0) of the
    exact value (except on JAX with ``jax_enable_x64`` off, where no float64
    exists and the float32 product is off by a few ulp(1.0); see
    docs/pairwise.md); ``|S| <= 1``; zero rows give 0 (also with ``eps=0``); NaN or
    inf in a row gives NaN in that row (or column) only.

    Parameters
    ----------
    x1 : array, shape (..., N, D)
        Rows to compare, of any supported array library.
    x2 : array, shape (..., M, D), optional
        Rows to compare against, of the same library. ``None`` (default) means
        ``x1`` itself (the self-similarity matrix of SimCLR and friends).
        Leading dimensions broadcast with ``x1``'s; ``D`` must match (or be 1).
    eps : float, optional
        Lower bound on each norm, ``>= 0`` (default ``1e-8``).

    Returns
    -------
    array, shape (..., N, M)
        Same library, device and promoted floating dtype as the inputs.

    Raises
    ------
    TypeError
        Non-arrays, arrays of two libraries, complex dtypes.
    ValueError
        Inputs with fewer than 2 dimensions, leading dimensions that do not
        broadcast, different ``D``, ``eps`` negative, NaN or infinite.

    See Also
    --------
    pairwise_cosine_similarity_vjp : its gradient, for arrays without autodiff.
    cosine_similarity : the row-wise similarity; it routes outer-product
        broadcasts here by itself.

    Examples
    --------
    >>> import numpy as np
    >>> import polycos
    >>> x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    >>> polycos.pairwise_cosine_similarity(x).round(4)
    array([[1.    , 0.7071, 0.    ],
           [0.7071, 1.    , 0.    ],
           [0.    , 0.    , 0.    ]])
    >>> y = np.array([[0.0, 2.0]])
    >>> polycos.pairwise_cosine_similarity(x, y).round(4)
    array([[0.    ],
           [0.7071],
           [0.    ]])

    The broadcast spelling of an outer product (rows of ``x`` against two or
    more rows of ``y``) gives the same matrix, by the same path:

    >>> y2 = np.array([[0.0, 2.0], [3.0, 1.0]])
    >>> s = polycos.cosine_similarity(x[:, None, :], y2[None, :, :], dim=-1)
    >>> np.array_equal(s, polycos.pairwise_cosine_similarity(x, y2))
    True
    """
    call = validate_pairwise(x1, x2, eps)
    adapter = _native_adapter(call.x1)
    if adapter is not None:
        return adapter.pairwise_forward(call)
    return _generic_forward(call.xp, call.x1, call.x2, call.eps)


def pairwise_cosine_similarity_vjp(
    grad: Any, x1: Any, x2: Any | None = None, *, eps: float = 1e-8
) -> tuple[Any, ...]:
    r"""Vector-Jacobian product of :func:`pairwise_cosine_similarity`.

    For :math:`G = \partial L / \partial S`, by two matrix products and the
    VJP of the row normalisation:

    .. math::

        \frac{\partial L}{\partial x_{1i}} = \frac{1}{c_{1i}}\Big(v_i
            - [n_{1i} > \varepsilon]\,(\hat x_{1i}\cdot v_i)\,\hat x_{1i}\Big),
        \qquad v = G\,\hat X_2,

    with :math:`c = \max(n, \varepsilon)`, :math:`n = \lVert x\rVert`; likewise
    for ``x2`` with :math:`G^{\mathsf T} \hat X_1`. For self-similarity
    (``x2=None``) ``x1`` appears on both sides and :math:`v = (G + G^{\mathsf T})
    \hat X_1`. This equals the row-wise gradient of
    :func:`cosine_similarity_vjp` summed over the partner rows, exactly.

    Parameters
    ----------
    grad : array, shape (..., N, M)
        Upstream gradient (broadcastable to the result's shape).
    x1, x2, eps
        As for :func:`pairwise_cosine_similarity`.

    Returns
    -------
    tuple of arrays
        ``(dL/dx1, dL/dx2)``, or ``(dL/dx1,)`` when ``x2`` is ``None``: one
        gradient per array passed, with its shape and promoted dtype.

    Examples
    --------
    >>> import numpy as np
    >>> import polycos
    >>> x = np.array([[1.0, 0.0]])
    >>> y = np.array([[1.0, 1.0]])
    >>> gx, gy = polycos.pairwise_cosine_similarity_vjp(np.ones((1, 1)), x, y)
    >>> gx.round(4), gy.round(4)
    (array([[0.    , 0.7071]]), array([[ 0.3536, -0.3536]]))
    >>> (gz,) = polycos.pairwise_cosine_similarity_vjp(np.ones((2, 2)), np.eye(2))
    >>> gz + 0.0  # (+ 0.0 turns -0.0 into 0.0)
    array([[0., 2.],
           [2., 0.]])
    """
    call = validate_pairwise(x1, x2, eps)
    xp = call.xp
    if not _same_library(grad, call.x1):
        raise TypeError(
            f"grad must be an array of the same library as x1, got {type(grad).__name__}"
        )
    try:
        if broadcast_shapes(tuple(grad.shape), call.shape) != call.shape:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"grad with shape {tuple(grad.shape)} does not broadcast to the result "
            f"shape {call.shape}"
        ) from None
    grad = xp.astype(grad, call.x1.dtype) if grad.dtype != call.x1.dtype else grad
    grad = xp.broadcast_to(grad, call.shape)
    adapter = _native_adapter(call.x1)
    if adapter is not None:
        g1, g2 = adapter.pairwise_vjp(grad, call)
    else:
        g1, g2 = _generic_vjp(xp, grad, call.x1, call.x2, call.eps)
    return (g1,) if call.x2 is None else (g1, g2)


def _same_library(a: Any, b: Any) -> bool:
    if not array_api_compat.is_array_api_obj(a):
        return False
    try:
        array_api_compat.array_namespace(a, b)
    except TypeError:
        return False
    return True


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class OuterPlan:
    """How a row-wise call decomposes into one batched pairwise product.

    Axes index the broadcast shape ``shape``; ``axis`` is the reduced one.
    ``x1`` is canonicalised to ``(batch..., prod(left), D)`` and ``x2`` to
    ``(batch..., prod(right), D)``; when ``swap`` the product is taken as
    ``x2`` against ``x1`` so the result comes out in the caller's axis order.
    """

    shape: tuple[int, ...]
    axis: int
    batch: tuple[int, ...]
    left: tuple[int, ...]
    right: tuple[int, ...]

    @property
    def swap(self) -> bool:
        """The result's axis order is ``batch, right, left`` (e.g. SimCLR's ``z[None], z[:, None]``)."""
        out = [k for k in range(len(self.shape)) if k != self.axis]
        return out == [*self.batch, *self.right, *self.left]

    def _order(self) -> tuple[int, ...]:
        """Axes of the pairwise result, in the order it is computed."""
        first, second = (self.right, self.left) if self.swap else (self.left, self.right)
        return (*self.batch, *first, *second)

    def canonical(self, xp: Any, x: Any, own: tuple[int, ...]) -> Any:
        """``x`` (``x1`` with ``own = left`` or ``x2`` with ``right``) as ``(batch..., R, D)``."""
        nd = len(self.shape)
        x = xp.reshape(x, (1,) * (nd - x.ndim) + tuple(x.shape))
        rest = tuple(
            k for k in range(nd) if k not in own and k not in self.batch and k != self.axis
        )
        x = xp.permute_dims(x, (*self.batch, *own, *rest, self.axis))
        sizes = tuple(x.shape)
        nb = len(self.batch)
        return xp.reshape(x, (*sizes[:nb], math.prod(sizes[nb : nb + len(own)]), sizes[-1]))

    def uncanonical(self, xp: Any, d: Any, x_shape: tuple, own: tuple[int, ...]) -> Any:
        """Inverse of :meth:`canonical`: a gradient back to the input's shape ``x_shape``."""
        nd = len(self.shape)
        full = (1,) * (nd - len(x_shape)) + tuple(x_shape)
        rest = tuple(
            k for k in range(nd) if k not in own and k not in self.batch and k != self.axis
        )
        order = (*self.batch, *own, *rest, self.axis)
        d = xp.reshape(d, tuple(full[k] for k in order))
        d = xp.permute_dims(d, tuple(order.index(k) for k in range(nd)))
        return xp.reshape(d, tuple(x_shape))

    def output(self, xp: Any, s: Any) -> Any:
        """The pairwise result ``(batch..., R1, R2)`` in the caller's shape and axis order."""
        order = self._order()
        s = xp.reshape(s, tuple(self.shape[k] for k in order))
        out = [k for k in range(len(self.shape)) if k != self.axis]
        perm = tuple(order.index(k) for k in out)
        return s if perm == tuple(range(len(perm))) else xp.permute_dims(s, perm)

    def grad(self, xp: Any, g: Any) -> Any:
        """Inverse of :meth:`output`: an upstream gradient as ``(batch..., R1, R2)``."""
        order = self._order()
        out = [k for k in range(len(self.shape)) if k != self.axis]
        g = xp.permute_dims(g, tuple(out.index(k) for k in order))
        first, second = (self.right, self.left) if self.swap else (self.left, self.right)
        sizes = (
            *(self.shape[k] for k in self.batch),
            math.prod(self.shape[k] for k in first),
            math.prod(self.shape[k] for k in second),
        )
        return xp.reshape(g, sizes)


def _expanded_axes(x: Any) -> frozenset[int]:
    """Axes of size > 1 and stride 0 of a NumPy/CuPy array (empty for other libraries)."""
    if not (array_api_compat.is_numpy_array(x) or array_api_compat.is_cupy_array(x)):
        return frozenset()
    if x.size == 0:  # an empty array's strides say nothing about broadcasting
        return frozenset()
    return frozenset(
        k for k, (n, st) in enumerate(zip(x.shape, x.strides, strict=True)) if st == 0 and n > 1
    )


def _collapse(x1: Any, x2: Any, nd: int) -> tuple[Any, Any]:
    """Take one element along stride-0 axes of one input where the other input is full."""
    z1 = {k + nd - x1.ndim for k in _expanded_axes(x1)}
    z2 = {k + nd - x2.ndim for k in _expanded_axes(x2)}

    def take(x: Any, axes: set[int]) -> Any:
        if not axes:
            return x
        off = nd - x.ndim
        return x[tuple(slice(0, 1) if k + off in axes else slice(None) for k in range(x.ndim))]

    return take(x1, z1 - z2), take(x2, z2 - z1)


def detect(call: Call, x1: Any = None, x2: Any = None) -> OuterPlan | None:
    """The :class:`OuterPlan` of an outer-product broadcast, or ``None`` (shapes only).

    ``x1``, ``x2`` default to the call's inputs; pass others of the same
    broadcast shape (e.g. with stride-0 axes collapsed) to classify those.
    """
    x1 = call.x1 if x1 is None else x1
    x2 = call.x2 if x2 is None else x2
    shape, axis = tuple(call.shape), call.axis
    nd = len(shape)
    if nd < 3 or not all(isinstance(d, int) for d in (*shape, *x1.shape, *x2.shape)):
        return None
    s1 = (1,) * (nd - x1.ndim) + tuple(x1.shape)
    s2 = (1,) * (nd - x2.ndim) + tuple(x2.shape)
    batch, left, right = [], [], []
    for k in range(nd):
        if k == axis:
            continue
        if shape[k] == 1 or s1[k] == s2[k]:
            batch.append(k)
        elif s2[k] == 1:
            left.append(k)
        else:
            right.append(k)
    if not left or not right:
        return None
    return OuterPlan(shape, axis, tuple(batch), tuple(left), tuple(right))


def forward_outer(call: Call, pairwise: Pairwise | None = None) -> Any | None:
    """The result of an outer-product call by the matrix path, or ``None`` if it is not one.

    ``pairwise(x1, x2, eps)`` computes the ``(..., N, M)`` matrix of canonical
    inputs; by default the generic one (NumPy, CuPy, array-api-strict,
    dask, ...). The torch and JAX adapters pass their own, autodiff-aware,
    functions (from their ``forward``); without one, ``None`` is returned for
    their arrays so that they are routed to the adapter.
    """
    if pairwise is None and _has_autodiff(call.x1):
        return None
    nd = len(call.shape)
    x1, x2 = _collapse(call.x1, call.x2, nd) if nd >= 3 else (call.x1, call.x2)
    plan = detect(call, x1, x2)
    if plan is None:
        return None
    xp = call.xp
    a1, a2 = plan.canonical(xp, x1, plan.left), plan.canonical(xp, x2, plan.right)
    if plan.swap:
        a1, a2 = a2, a1
    pairwise = pairwise or (lambda a, b, eps: _generic_forward(xp, a, b, eps))
    return plan.output(xp, pairwise(a1, a2, call.eps))


def _has_autodiff(x: Any) -> bool:
    return array_api_compat.is_torch_array(x) or array_api_compat.is_jax_array(x)


def vjp_outer(
    grad: Any, call: Call, pairwise_vjp: PairwiseVJP | None = None
) -> tuple[Any, Any] | None:
    """:func:`polycos.cosine_similarity_vjp` of an outer-product call by matrix products, or ``None``.

    ``pairwise_vjp(g, x1, x2, eps)`` as for :func:`forward_outer`.
    """
    if pairwise_vjp is None and _has_autodiff(call.x1):
        return None
    plan = detect(call)
    if plan is None:
        return None
    xp = call.xp
    vjp = pairwise_vjp or (lambda g, a, b, eps: _generic_vjp(xp, g, a, b, eps))
    out_shape = tuple(d for k, d in enumerate(call.shape) if k != call.axis)
    g = plan.grad(xp, xp.broadcast_to(grad, out_shape))
    a1, a2 = plan.canonical(xp, call.x1, plan.left), plan.canonical(xp, call.x2, plan.right)
    if plan.swap:
        d2, d1 = vjp(g, a2, a1, call.eps)
    else:
        d1, d2 = vjp(g, a1, a2, call.eps)
    return (
        plan.uncanonical(xp, d1, tuple(call.x1.shape), plan.left),
        plan.uncanonical(xp, d2, tuple(call.x2.shape), plan.right),
    )
