"""polycos: cosine similarity and its exact gradient, one implementation for every array library.

>>> import numpy as np
>>> import polycos
>>> x1 = np.array([[1.0, 2.0], [3.0, 4.0]])
>>> x2 = np.array([[5.0, 6.0], [7.0, 8.0]])
>>> polycos.cosine_similarity(x1, x2, dim=1)
array([0.97341717, 0.99716412])

The formulas live in :mod:`polycos._core`; adapters for PyTorch, JAX and CuPy
are imported only when arrays of those libraries are passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from polycos import _pairwise
from polycos._dispatch import adapter_for
from polycos._pairwise import pairwise_cosine_similarity, pairwise_cosine_similarity_vjp
from polycos._validate import broadcast_shapes, resolve_dim, validate

if TYPE_CHECKING:
    from typing import TypeVar

    Array = TypeVar("Array")
else:
    Array = Any

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "cosine_similarity",
    "cosine_similarity_vjp",
    "cosine_similarity_with_vjp",
    "pairwise_cosine_similarity",
    "pairwise_cosine_similarity_vjp",
]


def cosine_similarity(
    x1: Array,
    x2: Array,
    dim: int | None = None,
    eps: float = 1e-8,
    *,
    axis: int | None = None,
) -> Array:
    r"""Cosine similarity of ``x1`` and ``x2`` along ``dim``, for any array library.

    A drop-in for :func:`torch.nn.functional.cosine_similarity`:

    .. math::

        s = \operatorname{clip}\Big(\frac{\langle x_1, x_2 \rangle}
            {\max(\lVert x_1\rVert, \varepsilon)\,\max(\lVert x_2\rVert, \varepsilon)},
            -1, 1\Big)

    computed along ``dim`` after ``x1`` and ``x2`` are broadcast together.

    Parameters
    ----------
    x1, x2 : array
        Arrays of one library (NumPy, PyTorch, JAX, CuPy, dask, array-api-strict,
        ...). Integer and bool inputs are promoted to the library's default
        floating dtype; complex inputs are rejected.
    dim : int, optional
        The axis of the *broadcast* shape holding the vectors (default 1;
        negative values count from the end). ``axis=`` is an alias; give at most one.
    eps : float, optional
        Lower bound on each norm, ``>= 0`` (default ``1e-8``). With ``eps=0`` a zero
        vector has similarity 0 with everything.

    Returns
    -------
    array
        Same library, device and (promoted) dtype as the inputs, with the
        broadcast shape less ``dim``. ``|s| <= 1`` always.

    Raises
    ------
    TypeError
        Non-arrays, arrays of two libraries, complex dtypes, ``dim`` and ``axis`` both given.
    ValueError
        Shapes that do not broadcast; ``eps`` negative, NaN or infinite.
    IndexError
        ``dim`` out of range for the broadcast shape.

    See Also
    --------
    cosine_similarity_vjp : the gradient, for arrays without autodiff.

    Examples
    --------
    Rows of a matrix (``dim=1``) and columns (``dim=0``):

    >>> import numpy as np
    >>> import polycos
    >>> a = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> b = np.array([[5.0, 6.0], [7.0, 8.0]])
    >>> polycos.cosine_similarity(a, b, dim=1).round(4)
    array([0.9734, 0.9972])
    >>> polycos.cosine_similarity(a, b, dim=0).round(4)
    array([0.9558, 0.9839])

    Broadcasting: one query against many rows.

    >>> q = np.array([1.0, 0.0])
    >>> polycos.cosine_similarity(q, np.array([[2.0, 0.0], [0.0, 3.0]]), dim=-1)
    array([1., 0.])
    """
    call = validate(x1, x2, resolve_dim(dim, axis), eps)
    outer = _pairwise.forward_outer(call)  # outer-product broadcast: one matrix product
    if outer is not None:
        return outer
    return adapter_for(call.x1).forward(call)


def cosine_similarity_vjp(
    grad: Array,
    x1: Array,
    x2: Array,
    dim: int | None = None,
    eps: float = 1e-8,
    *,
    axis: int | None = None,
) -> tuple[Array, Array]:
    r"""Vector-Jacobian product of :func:`cosine_similarity`: ``(dL/dx1, dL/dx2)``.

    For an upstream gradient :math:`g = \partial L / \partial s`,

    .. math::

        \frac{\partial L}{\partial x_1} = \frac{g}{c_1}\Big(\frac{x_2}{c_2}
            - [n_1 > \varepsilon]\,\frac{s}{n_1}\,x_1\Big), \qquad
        n_i = \lVert x_i \rVert,\; c_i = \max(n_i, \varepsilon),

    and symmetrically for ``x2``: the exact derivative in every regime,
    including norms below ``eps`` (where the function is linear in that input)
    and zero vectors with ``eps=0`` (gradient 0).

    Parameters
    ----------
    grad : array
        Upstream gradient, with (or broadcastable to) the shape of
        ``cosine_similarity(x1, x2, dim, eps)``.
    x1, x2, dim, eps, axis
        As for :func:`cosine_similarity`.

    Returns
    -------
    (array, array)
        Gradients with the shapes and (promoted) dtypes of ``x1`` and ``x2``;
        an input that was broadcast gets its gradient summed back to its shape.

    Examples
    --------
    >>> import numpy as np
    >>> import polycos
    >>> x1 = np.array([[1.0, 0.0]])
    >>> x2 = np.array([[1.0, 1.0]])
    >>> g1, g2 = polycos.cosine_similarity_vjp(np.ones(1), x1, x2)
    >>> g1.round(4), g2.round(4)
    (array([[0.    , 0.7071]]), array([[ 0.3536, -0.3536]]))
    """
    call = validate(x1, x2, resolve_dim(dim, axis), eps)
    grad = _check_grad(grad, call)
    outer = _pairwise.vjp_outer(grad, call)  # outer-product broadcast: matrix products
    if outer is not None:
        return outer
    return adapter_for(call.x1).vjp(grad, call)


def cosine_similarity_with_vjp(
    x1: Array,
    x2: Array,
    dim: int | None = None,
    eps: float = 1e-8,
    *,
    axis: int | None = None,
) -> tuple[Array, Callable[[Array], tuple[Array, Array]]]:
    """:func:`cosine_similarity` and a function for its VJP that reuses the forward's work.

    Like :func:`jax.vjp`: the returned ``vjp(grad)`` gives ``(dL/dx1, dL/dx2)``
    exactly as :func:`cosine_similarity_vjp` would, without recomputing the
    norms and dot products (on NumPy and array-API arrays that halves the
    memory traffic of a forward-plus-backward step). Arguments and errors are
    those of :func:`cosine_similarity`.

    Examples
    --------
    >>> import numpy as np
    >>> import polycos
    >>> s, vjp = polycos.cosine_similarity_with_vjp(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]))
    >>> s.round(4)
    array([0.7071])
    >>> g1, g2 = vjp(np.ones(1))
    >>> g1.round(4)
    array([[0.    , 0.7071]])
    """
    call = validate(x1, x2, resolve_dim(dim, axis), eps)
    outer = _pairwise.forward_outer(call)
    adapter = adapter_for(call.x1)
    if outer is not None:
        value, residuals = outer, None
    elif hasattr(adapter, "forward_with_residuals"):
        value, residuals = adapter.forward_with_residuals(call)
    else:
        value, residuals = adapter.forward(call), None

    def vjp(grad: Array) -> tuple[Array, Array]:
        grad = _check_grad(grad, call)
        if outer is not None:
            # The forward may see an outer product where the VJP cannot (stride-0
            # axes count as broadcast for the value only): then the direct VJP.
            grads = _pairwise.vjp_outer(grad, call)
            return grads if grads is not None else adapter.vjp(grad, call)
        if residuals is not None:
            return adapter.vjp(grad, call, residuals)
        return adapter.vjp(grad, call)

    return value, vjp


def _check_grad(grad: Any, call: Any) -> Any:
    """``grad`` of the inputs' library, broadcastable to the result, in the result dtype."""
    out_shape = tuple(d for i, d in enumerate(call.shape) if i != call.axis)
    if not _same_library(grad, call.x1):
        raise TypeError(
            f"grad must be an array of the same library as x1 and x2, got {type(grad).__name__}"
        )
    try:
        if broadcast_shapes(tuple(grad.shape), out_shape) != out_shape:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"grad with shape {tuple(grad.shape)} does not broadcast to the result "
            f"shape {out_shape}"
        ) from None
    return call.xp.astype(grad, call.dtype) if grad.dtype != call.dtype else grad


def _same_library(a: Any, b: Any) -> bool:
    import array_api_compat

    if not array_api_compat.is_array_api_obj(a):
        return False
    try:
        array_api_compat.array_namespace(a, b)
    except TypeError:
        return False
    return True
