r"""CuPy: :func:`cosine_similarity` and :func:`cosine_similarity_vjp` for ``cupy.ndarray``.

The definition is documented once, at :func:`polycos.cosine_similarity` (which
routes CuPy arrays here too). CuPy arrays run the hand-written CUDA kernels of
``polycos/_kernels/cuda.cu`` (one fused pass per row for the forward, one for
the VJP), which share their per-row functions with the CPU kernel
(``polycos/_kernels/rows.h``); the launches are in
:mod:`polycos._backends.cupy`. ``import polycos.cupy`` works without CuPy or a
GPU; a call without a usable GPU raises :class:`RuntimeError`.

>>> import polycos.cupy
>>> sorted(polycos.cupy.__all__)
['cosine_similarity', 'cosine_similarity_vjp']
>>> import cupy  # doctest: +SKIP
>>> x = cupy.asarray([[1.0, 2.0], [3.0, 4.0]])  # doctest: +SKIP
>>> polycos.cupy.cosine_similarity(x, x[::-1])  # doctest: +SKIP
array([0.98386991, 0.98386991])
"""

from __future__ import annotations

from typing import Any

from polycos import _validate

__all__ = ["cosine_similarity", "cosine_similarity_vjp"]


def _check_cupy(**arrays: Any) -> None:
    for name, x in arrays.items():
        if type(x).__module__.split(".")[0] != "cupy":
            t = type(x)
            raise TypeError(
                f"{name} must be a cupy.ndarray for polycos.cupy, got {t.__module__}.{t.__qualname__} "
                "(polycos.cosine_similarity accepts every array library)"
            )


def cosine_similarity(x1: Any, x2: Any, dim: int | None = None, eps: float = 1e-8, *, axis: int | None = None) -> Any:
    """:func:`polycos.cosine_similarity` for CuPy arrays (same arguments, same definition).

    Raises ``TypeError`` for anything but CuPy arrays and ``RuntimeError``
    without a usable GPU.

    >>> import cupy  # doctest: +SKIP
    >>> from polycos.cupy import cosine_similarity
    >>> cosine_similarity(cupy.ones((2, 3)), cupy.ones(3))  # doctest: +SKIP
    array([1., 1.])
    """
    _check_cupy(x1=x1, x2=x2)
    call = _validate.validate(x1, x2, dim, eps, axis=axis)
    return call.backend.forward(call)


def cosine_similarity_vjp(
    grad: Any, x1: Any, x2: Any, dim: int | None = None, eps: float = 1e-8, *, axis: int | None = None
) -> tuple[Any, Any]:
    """:func:`polycos.cosine_similarity_vjp` for CuPy arrays: one kernel writes both gradients.

    >>> import cupy  # doctest: +SKIP
    >>> from polycos.cupy import cosine_similarity_vjp
    >>> g1, g2 = cosine_similarity_vjp(cupy.ones(1), cupy.asarray([[1.0, 0.0]]),
    ...                                cupy.asarray([[1.0, 1.0]]))  # doctest: +SKIP
    >>> g1  # doctest: +SKIP
    array([[0.        , 0.70710678]])
    """
    _check_cupy(grad=grad, x1=x1, x2=x2)
    call = _validate.validate(x1, x2, dim, eps, axis=axis)
    grad = _validate.check_grad(grad, call, call.out_shape)
    return call.backend.vjp(grad, call)
