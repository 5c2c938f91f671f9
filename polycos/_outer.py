r"""Outer-product broadcasts: recognised from shapes, computed as one batched matrix product.

``cosine_similarity(x[:, None, :], y[None, :, :], dim=-1)`` (or SimCLR's
``cosine_similarity(z[None], z[:, None], dim=2)``) is the pairwise similarity
matrix spelled as a broadcast. Computed row by row it costs ``N·M·D`` reads
(and, on autodiff backends, ``N·M·D`` memory for the broadcast inputs'
gradients); as normalise-then-multiply it costs ``O(N·M + (N + M)·D)``
(G9). :func:`plan` recognises the pattern once, at validation, from shapes
alone (so it works on traced and lazy arrays), and :class:`OuterPlan` moves the
inputs to the canonical ``(batch..., N, D)`` layout of
:func:`polycos._core.pairwise_forward` and the result back.

Let ``B`` be the broadcast shape and ``dim`` the reduced axis. Every other
axis ``k`` of ``B`` (after prepending unit axes to the shorter input) is

* **batch** if ``B[k] == 1`` or both inputs have size ``B[k]`` there,
* **left** if ``x1`` has size ``B[k] > 1`` there and ``x2`` has size 1,
* **right** if ``x2`` has size ``B[k] > 1`` there and ``x1`` has size 1.

The call is an outer product when at least one axis is left and one is right;
any number of each, in any order, with any batch axes, and ``dim`` anywhere.
Results with no elements never take this path (there is nothing to compute).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OuterPlan", "collapse_stride0", "plan", "register_c_order", "register_reshape_method"]

#: Array types whose ``reshape`` method is their namespace's ``reshape`` and is
#: cheaper to call (NumPy's ``reshape`` function wraps the method in Python:
#: about 0.8 us, six times per forward and VJP of an outer product).
_RESHAPE_METHOD: set[type] = set()


def register_reshape_method(array_type: type) -> None:
    """Reshape arrays of exactly ``array_type`` by their ``reshape`` method."""
    _RESHAPE_METHOD.add(array_type)


#: Array types with their C-order copy (a no-op when already contiguous), for :func:`_c_order`.
_C_ORDER: dict[type, Any] = {}


def register_c_order(array_type: type, c_order: Any) -> None:
    """Lay out permuted results of ``array_type`` (subclasses too) in C order with ``c_order(x)``."""
    _C_ORDER[array_type] = c_order


def _reshape(xp: Any, x: Any, shape: tuple) -> Any:
    return x.reshape(shape) if type(x) in _RESHAPE_METHOD else xp.reshape(x, shape)


@dataclass(frozen=True)
class OuterPlan:
    """How a row-wise call decomposes into one batched pairwise product.

    Axes index the broadcast shape ``shape``; ``axis`` is the reduced one.
    ``x1`` becomes ``(batch..., prod(left), D)`` and ``x2`` ``(batch...,
    prod(right), D)``; when ``swap`` the product is taken as ``x2`` against
    ``x1`` so the result comes out in the caller's axis order.
    """

    shape: tuple[int, ...]
    axis: int
    batch: tuple[int, ...]
    left: tuple[int, ...]
    right: tuple[int, ...]
    #: ``x1``'s and ``x2``'s shapes as planned (known: every move below is then
    #: decided once; empty when not given)
    shape1: tuple[int, ...] = ()
    shape2: tuple[int, ...] = ()
    #: where every move of the inputs, the result and the gradients keeps the
    #: order of the elements, the shapes it takes: ``(x1, x2, S, G)`` as the
    #: product sees them (one reshape each, no permutation); else ``None``
    direct: tuple | None = field(default=None, compare=False, repr=False)
    #: the result's axis order is ``batch, right, left`` (e.g. SimCLR's ``z[None], z[:, None]``)
    swap: bool = field(default=False, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        out = [k for k in range(len(self.shape)) if k != self.axis]
        object.__setattr__(self, "swap", out == [*self.batch, *self.right, *self.left])
        if self.shape1 and self.shape2 and self.direct is None:
            object.__setattr__(self, "direct", self._direct())

    def _direct(self) -> tuple | None:
        """:attr:`direct` from the planned shapes (``None`` where a permutation moves data).

        A permutation is a reshape when the axes it moves all have size 1: the
        other axes, taken in their new order, are still increasing.
        """
        nd, ax, batch = len(self.shape), self.axis, self.batch
        shapes = []
        for x_shape, own in ((self.shape1, self.left), (self.shape2, self.right)):
            full = (1,) * (nd - len(x_shape)) + tuple(x_shape)
            # canonical order: batch, own, the partner's axes (size 1 here), axis
            moved = [k for k in (*batch, *own, ax) if full[k] != 1]
            if moved != sorted(moved):
                return None
            shapes.append((*[full[k] for k in batch], math.prod([full[k] for k in own]), full[ax]))
        moved = [k for k in self._order() if self.shape[k] != 1]
        if moved != sorted(moved):  # the product's axis order against the result's
            return None
        a1, a2 = shapes
        out = tuple([self.shape[k] for k in range(nd) if k != ax])
        return ((a2, a1) if self.swap else (a1, a2)) + (out, self._product_shape())

    def _product_shape(self) -> tuple:
        """The result's shape as the product forms it: ``(batch..., R1, R2)``."""
        first, second = (self.right, self.left) if self.swap else (self.left, self.right)
        return (
            *[self.shape[k] for k in self.batch],
            math.prod([self.shape[k] for k in first]),
            math.prod([self.shape[k] for k in second]),
        )

    def _order(self) -> tuple[int, ...]:
        """Axes of the pairwise result, in the order it is computed."""
        first, second = (self.right, self.left) if self.swap else (self.left, self.right)
        return (*self.batch, *first, *second)

    def _rest(self, own: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            k for k in range(len(self.shape))
            if k not in own and k not in self.batch and k != self.axis
        )

    def canonical(self, xp: Any, x: Any, own: tuple[int, ...]) -> Any:
        """``x`` (``x1`` with ``own = left`` or ``x2`` with ``right``) as ``(batch..., R, D)``."""
        nd = len(self.shape)
        if x.ndim < nd:
            x = _reshape(xp, x, (1,) * (nd - x.ndim) + tuple(x.shape))
        x = _permute(xp, x, (*self.batch, *own, *self._rest(own), self.axis))
        sizes = tuple(x.shape)
        nb = len(self.batch)
        return _reshape(xp, x, (*sizes[:nb], math.prod(sizes[nb : nb + len(own)]), sizes[-1]))

    def inputs(self, xp: Any, x1: Any, x2: Any) -> tuple[Any, Any]:
        """The canonical pair, in the order the product takes them."""
        if self.direct is not None:
            first, second = (x2, x1) if self.swap else (x1, x2)
            return _reshape(xp, first, self.direct[0]), _reshape(xp, second, self.direct[1])
        a1, a2 = self.canonical(xp, x1, self.left), self.canonical(xp, x2, self.right)
        return (a2, a1) if self.swap else (a1, a2)

    def uncanonical(self, xp: Any, d: Any, x_shape: tuple, own: tuple[int, ...]) -> Any:
        """Inverse of :meth:`canonical`: a gradient back to the input's shape ``x_shape``."""
        nd = len(self.shape)
        full = (1,) * (nd - len(x_shape)) + tuple(x_shape)
        order = (*self.batch, *own, *self._rest(own), self.axis)
        d = _reshape(xp, d, tuple(full[k] for k in order))
        d = _permute(xp, d, tuple(order.index(k) for k in range(nd)))
        return _reshape(xp, d, tuple(x_shape))

    def gradients(self, xp: Any, d: tuple[Any, Any], shape1: tuple, shape2: tuple) -> tuple[Any, Any]:
        """Pairwise gradients (in the product's order) back to the inputs' shapes."""
        d1, d2 = (d[1], d[0]) if self.swap else d
        if self.direct is not None:
            return _reshape(xp, d1, tuple(shape1)), _reshape(xp, d2, tuple(shape2))
        return (
            self.uncanonical(xp, d1, shape1, self.left),
            self.uncanonical(xp, d2, shape2, self.right),
        )

    def output(self, xp: Any, s: Any) -> Any:
        """The pairwise result ``(batch..., R1, R2)`` in the caller's shape and axis order."""
        if self.direct is not None:
            return _reshape(xp, s, self.direct[2])
        order = self._order()
        s = _reshape(xp, s, tuple(self.shape[k] for k in order))
        out = [k for k in range(len(self.shape)) if k != self.axis]
        perm = tuple(order.index(k) for k in out)
        return s if perm == tuple(range(len(perm))) else _c_order(xp.permute_dims(s, perm))

    def grad(self, xp: Any, g: Any) -> Any:
        """Inverse of :meth:`output`: an upstream gradient (full result shape) as ``(batch..., R1, R2)``."""
        if self.direct is not None:
            return _reshape(xp, g, self.direct[3])
        order = self._order()
        out = [k for k in range(len(self.shape)) if k != self.axis]
        g = _permute(xp, g, tuple(out.index(k) for k in order))
        return _reshape(xp, g, self._product_shape())


def _c_order(x: Any) -> Any:
    """A permuted result laid out in C order, as the row-wise broadcast lays out its result.

    ``F.cosine_similarity`` and NumPy's own broadcasting return contiguous arrays;
    a permuted view would not be (``view(-1)`` fails on it). Strided arrays only:
    the types registered with :func:`register_c_order` (torch), and NumPy and CuPy
    (read from ``flags``); other libraries have no layout to fix (JAX, dask,
    array-api-strict).
    """
    for array_type, c_order in _C_ORDER.items():
        if isinstance(x, array_type):
            return c_order(x)
    flags = getattr(x, "flags", None)
    if flags is not None and hasattr(flags, "c_contiguous"):
        return x if flags.c_contiguous else x.copy(order="C")
    return x


def _permute(xp: Any, x: Any, perm: tuple[int, ...]) -> Any:
    """``permute_dims``, skipped when ``perm`` is the identity (the usual spellings: a per-call cost)."""
    return x if perm == tuple(range(len(perm))) else xp.permute_dims(x, perm)


def _is_int(d: Any) -> bool:
    """A known size: an int, or a symbolic int (``torch.compile`` dynamic shapes); not dask's NaN."""
    return type(d) is int or isinstance(d, numbers.Integral) or type(d).__name__ == "SymInt"


def plan(shape: tuple, axis: int, shape1: tuple, shape2: tuple) -> OuterPlan | None:
    """The :class:`OuterPlan` of an outer-product broadcast, or ``None`` (shapes only)."""
    nd = len(shape)
    if nd < 3 or not all(_is_int(d) for d in (*shape, *shape1, *shape2)):
        return None
    if 0 in shape:  # an empty result: nothing to multiply
        return None
    # The index ``axis`` equals, as a plain int: ``torch.compile(dynamic=True)`` traces ``dim``
    # as a symbolic int (whose type Dynamo reports as int), which the plan's axis orders cannot
    # sort. Comparing it with each index guards on it, which specialises it as
    # ``F.cosine_similarity`` does (a new ``dim`` compiles once more).
    axis = next(k for k in range(nd) if k == axis)
    s1 = (1,) * (nd - len(shape1)) + tuple(shape1)
    s2 = (1,) * (nd - len(shape2)) + tuple(shape2)
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
    known = all(type(d) is int for d in (*shape1, *shape2))
    return OuterPlan(
        tuple(shape), axis, tuple(batch), tuple(left), tuple(right),
        tuple(shape1) if known else (), tuple(shape2) if known else (),
    )


def collapse_stride0(x1: Any, x2: Any, nd: int) -> tuple[Any, Any]:
    """Forward only: take one element along axes where one input is a stride-0 broadcast view.

    ``np.broadcast_to(z[:, None], (N, N, D))`` has the full shape but one
    distinct value per broadcast axis; taking one element there (a view)
    reveals the outer product for the *value*. Only where the partner has the
    full size along that axis (so the broadcast shape is unchanged), and only
    for strided arrays that expose element strides (NumPy, CuPy). A gradient
    needs every broadcast copy, so VJPs never collapse.
    """

    def stride0(x: Any) -> set[int]:
        strides = getattr(x, "strides", None)
        if not isinstance(strides, tuple) or getattr(x, "size", 0) == 0:
            return set()
        off = nd - x.ndim
        return {k + off for k, (n, st) in enumerate(zip(x.shape, strides, strict=True)) if st == 0 and n > 1}

    z1, z2 = stride0(x1), stride0(x2)
    if not (z1 or z2):
        return x1, x2

    def full(x: Any, k: int) -> bool:
        off = nd - x.ndim
        return k - off >= 0 and x.shape[k - off] > 1

    def take(x: Any, axes: set[int]) -> Any:
        if not axes:
            return x
        off = nd - x.ndim
        return x[tuple(slice(0, 1) if k + off in axes else slice(None) for k in range(x.ndim))]

    c1 = {k for k in z1 - z2 if full(x2, k)}
    c2 = {k for k in z2 - z1 if full(x1, k)}
    return take(x1, c1), take(x2, c2)
