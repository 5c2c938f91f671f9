r"""polycos: cosine similarity and its exact gradient, one implementation for every array library.

>>> import numpy as np
>>> import polycos
>>> x1 = np.array([[1.0, 2.0], [3.0, 4.0]])
>>> x2 = np.array([[5.0, 6.0], [7.0, 8.0]])
>>> polycos.cosine_similarity(x1, x2, dim=1)
array([0.97341717, 0.99716412])

Every public function validates its arguments and plans the call once
(:mod:`polycos._validate`), then hands the call to the backend that owns the
arrays (:mod:`polycos._backends`, imported only when such arrays appear). The
formulas live in :mod:`polycos._core`; docs/architecture.md maps the layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from polycos import _validate

if TYPE_CHECKING:
    from typing import TypeVar

    Array = TypeVar("Array")
else:
    Array = Any

__version__ = "0.2.0"
__all__ = [
    "__version__",
    "cosine_similarity",
    "cosine_similarity_vjp",
    "cosine_similarity_with_vjp",
    "pairwise_cosine_similarity",
    "pairwise_cosine_similarity_vjp",
    "pairwise_cosine_similarity_with_vjp",
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

        n_i = \lVert x_i\rVert_2, \quad c_i = \max(n_i, \varepsilon), \quad
        s = \operatorname{clip}\Big(\frac{\langle x_1, x_2 \rangle}{c_1 c_2}, -1, 1\Big)

    along ``dim`` after ``x1`` and ``x2`` are broadcast together; ``s = 0`` for a
    zero vector with ``eps = 0``. This is the one docstring of the definition;
    :mod:`polycos._core` states how it is computed, and the other public
    functions refer here.

    Parameters
    ----------
    x1, x2 : array
        Arrays of one library (NumPy, PyTorch, JAX, CuPy, dask, array-api-strict,
        ...) and one device. Integer and bool inputs are promoted to the
        library's default floating dtype; complex and non-numeric inputs are
        rejected (the policy for every container is in docs/semantics.md).
    dim : int, optional
        The axis of the *broadcast* shape holding the vectors (default 1;
        negative values count from the end). ``axis=`` is an alias; give at most one.
    eps : float, optional
        Lower bound on each norm, ``>= 0`` (default ``1e-8``).

    Returns
    -------
    array
        Same library, device and (promoted) dtype as the inputs, with the
        broadcast shape less ``dim``. ``|s| <= 1`` always, within 1 ulp(1.0) of
        the exact value; differentiable on torch and JAX (first and higher
        order, forward and reverse mode).

    Raises
    ------
    TypeError
        Non-arrays, arrays of two libraries, complex or non-numeric dtypes,
        unsupported containers, ``dim`` and ``axis`` both given.
    ValueError
        Shapes that do not broadcast; inputs on different devices; ``eps``
        negative, NaN or infinite.
    IndexError
        ``dim`` out of range for the broadcast shape.

    See Also
    --------
    cosine_similarity_vjp : the gradient, for arrays without autodiff.
    pairwise_cosine_similarity : every row against every row.

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
    call = _validate.validate(x1, x2, dim, eps, axis=axis)
    return call.backend.forward(call)


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
            - [n_1 > \varepsilon]\, s\,\frac{x_1}{c_1}\Big)

    and symmetrically for ``x2`` (notation of :func:`cosine_similarity`): the
    exact derivative in every regime, including norms below ``eps`` (where the
    function is linear in that input) and zero vectors with ``eps=0``
    (gradient 0).

    Parameters
    ----------
    grad : array
        Upstream gradient of the inputs' library and device, broadcastable to
        the shape of ``cosine_similarity(x1, x2, dim, eps)``.
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
    call = _validate.validate(x1, x2, dim, eps, axis=axis)
    grad = _validate.check_grad(grad, call, call.out_shape)
    return call.backend.vjp(grad, call)


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
    per-row norms and dot products (the forward's residuals), so a
    forward-plus-backward step reads each input twice instead of three times.
    Arguments and errors are those of :func:`cosine_similarity`; the call is
    validated once, here.

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
    call = _validate.validate(x1, x2, dim, eps, axis=axis)
    value, residuals = call.backend.forward_with_residuals(call)

    def vjp(grad: Array) -> tuple[Array, Array]:
        grad = _validate.check_grad(grad, call, call.out_shape)
        return call.backend.vjp(grad, call, residuals)

    return value, vjp


def pairwise_cosine_similarity(x1: Array, x2: Array | None = None, *, eps: float = 1e-8) -> Array:
    r"""Cosine similarity of every row of ``x1`` with every row of ``x2``.

    .. math::

        S_{\dots ij} = \operatorname{clip}\big(\hat x_{1,\dots i} \cdot
            \hat x_{2,\dots j}, -1, 1\big), \qquad
        \hat x = \frac{x}{\max(\lVert x\rVert, \varepsilon)},

    the same value as ``cosine_similarity(x1[..., :, None, :], x2[..., None, :, :],
    dim=-1, eps=eps)`` (which is routed here by itself), computed as one matrix
    product after normalising the rows: ``O(N·M + (N + M)·D)`` memory, never
    ``N·M·D``. Float32 products run in float64, so entries are within 1
    ulp(1.0) of exact (docs/pairwise.md gives the float64 bound).

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
    TypeError, ValueError
        As :func:`cosine_similarity`; also inputs with fewer than 2 dimensions,
        leading dimensions that do not broadcast, different ``D``.

    Examples
    --------
    >>> import numpy as np
    >>> import polycos
    >>> x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    >>> polycos.pairwise_cosine_similarity(x).round(4)
    array([[1.    , 0.7071, 0.    ],
           [0.7071, 1.    , 0.    ],
           [0.    , 0.    , 0.    ]])
    >>> y = np.array([[0.0, 2.0], [3.0, 1.0]])
    >>> s = polycos.cosine_similarity(x[:, None, :], y[None, :, :], dim=-1)
    >>> np.array_equal(s, polycos.pairwise_cosine_similarity(x, y))
    True
    """
    call = _validate.validate_pairwise(x1, x2, eps)
    return call.backend.pairwise(call)


def pairwise_cosine_similarity_vjp(
    grad: Array, x1: Array, x2: Array | None = None, *, eps: float = 1e-8
) -> tuple[Array, ...]:
    r"""Vector-Jacobian product of :func:`pairwise_cosine_similarity`.

    For :math:`G = \partial L / \partial S`, by two matrix products and the
    VJP of the row normalisation:

    .. math::

        \frac{\partial L}{\partial x_{1i}} = \frac{1}{c_{1i}}\Big(v_i
            - [n_{1i} > \varepsilon]\,(\hat x_{1i}\cdot v_i)\,\hat x_{1i}\Big),
        \qquad v = G\,\hat X_2,

    likewise for ``x2`` with :math:`G^{\mathsf T} \hat X_1`; for self-similarity
    :math:`v = (G + G^{\mathsf T}) \hat X_1`. This equals the row-wise gradient
    of :func:`cosine_similarity_vjp` summed over the partner rows.

    Returns
    -------
    tuple of arrays
        ``(dL/dx1, dL/dx2)``, or ``(dL/dx1,)`` when ``x2`` is ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> import polycos
    >>> gx, gy = polycos.pairwise_cosine_similarity_vjp(np.ones((1, 1)), np.array([[1.0, 0.0]]),
    ...                                                 np.array([[1.0, 1.0]]))
    >>> gx.round(4), gy.round(4)
    (array([[0.    , 0.7071]]), array([[ 0.3536, -0.3536]]))
    """
    call = _validate.validate_pairwise(x1, x2, eps)
    grad = _validate.check_grad(grad, call, call.shape)
    g1, g2 = call.backend.pairwise_call_vjp(grad, call)
    return (g1,) if call.x2 is None else (g1, g2)


def pairwise_cosine_similarity_with_vjp(
    x1: Array, x2: Array | None = None, *, eps: float = 1e-8
) -> tuple[Array, Callable[[Array], tuple[Array, ...]]]:
    """:func:`pairwise_cosine_similarity` and a function for its VJP that reuses the forward's work.

    The pairwise :func:`cosine_similarity_with_vjp`: the returned ``vjp(grad)``
    gives exactly what :func:`pairwise_cosine_similarity_vjp` would (``(dL/dx1,
    dL/dx2)``, or ``(dL/dx1,)`` when ``x2`` is ``None``), reusing the rows the
    forward normalised (and their norms) where the backend keeps them (the
    NumPy kernel path) instead of normalising again. Arguments and errors are
    those of :func:`pairwise_cosine_similarity`; the call is validated once,
    here.

    Examples
    --------
    >>> import numpy as np
    >>> import polycos
    >>> x = np.array([[1.0, 0.0], [1.0, 1.0]])
    >>> s, vjp = polycos.pairwise_cosine_similarity_with_vjp(x)
    >>> s.round(4)
    array([[1.    , 0.7071],
           [0.7071, 1.    ]])
    >>> (g,) = vjp(np.ones((2, 2)))
    >>> np.array_equal(g, polycos.pairwise_cosine_similarity_vjp(np.ones((2, 2)), x)[0])
    True
    """
    call = _validate.validate_pairwise(x1, x2, eps)
    value, residuals = call.backend.pairwise_with_residuals(call)

    def vjp(grad: Array) -> tuple[Array, ...]:
        grad = _validate.check_grad(grad, call, call.shape)
        g1, g2 = call.backend.pairwise_call_vjp(grad, call, residuals)
        return (g1,) if call.x2 is None else (g1, g2)

    return value, vjp
