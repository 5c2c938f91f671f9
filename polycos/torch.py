r"""PyTorch: :func:`cosine_similarity`, the module :class:`CosineSimilarity` and the autograd Function.

Drop-ins for :func:`torch.nn.functional.cosine_similarity` and
:class:`torch.nn.CosineSimilarity` (the definition is documented once, at
:func:`polycos.cosine_similarity`). Tensors are computed by ``torch.library``
operators over the native kernels (CPU and CUDA) under an
``autograd.Function``; tensor subclasses, :mod:`torch.func` transforms and other
devices run the array-API core in torch ops (see docs/backends/torch.md).
Differentiable to any order, in forward and reverse mode; works with
FakeTensor, meta tensors, ``torch.compile`` (dynamic shapes too),
``torch.export`` and ``torch.jit.trace``.

Examples
--------
>>> import torch
>>> from polycos.torch import CosineSimilarity, cosine_similarity
>>> x1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
>>> x2 = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
>>> s = cosine_similarity(x1, x2)
>>> s
tensor([0.9734, 0.9972], grad_fn=<CosineFunctionBackward>)
>>> s.sum().backward()
>>> x1.grad
tensor([[ 0.0916, -0.0458],
        [ 0.0120, -0.0090]])
>>> CosineSimilarity(dim=0)
CosineSimilarity(dim=0, eps=1e-08)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from polycos import _validate
from polycos._backends import torch as _backend
from polycos._backends._base import Widened

__all__ = ["CosineSimilarity", "CosineSimilarityFunction", "cosine_similarity"]


def _check_tensors(**xs: Any) -> None:
    for name, x in xs.items():
        if not isinstance(x, torch.Tensor):
            t = type(x)
            raise TypeError(
                f"{name} must be a torch.Tensor for polycos.torch, got {t.__module__}.{t.__qualname__} "
                "(polycos.cosine_similarity accepts every array library)"
            )


def cosine_similarity(
    x1: torch.Tensor,
    x2: torch.Tensor,
    dim: int | None = None,
    eps: float = 1e-8,
    *,
    axis: int | None = None,
) -> torch.Tensor:
    """:func:`polycos.cosine_similarity` for tensors (same arguments, same definition).

    Raises ``TypeError`` for anything but tensors.

    >>> import torch
    >>> from polycos.torch import cosine_similarity
    >>> cosine_similarity(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]]))
    tensor([0.9600])
    >>> cosine_similarity(torch.zeros(2), torch.ones(2), dim=0, eps=0.0)
    tensor(0.)
    """
    _check_tensors(x1=x1, x2=x2)
    call = _validate.validate(x1, x2, dim, eps, axis=axis)
    return call.backend.forward(call)


class CosineSimilarityFunction(_backend.CosineFunction):
    r"""Cosine similarity as a :class:`torch.autograd.Function`: forward, backward and ``jvp``.

    ``CosineSimilarityFunction.apply(x1, x2, dim=1, eps=1e-8)`` validates its
    arguments like :func:`cosine_similarity` and returns ``(s, res)``: the
    similarity and its residuals (non-differentiable; the clamped similarity,
    scaled norms and scales per row, in the accumulation dtype), which backward
    reuses. Unlike :func:`cosine_similarity` it never takes the matrix-product
    path for outer-product broadcasts.

    Examples
    --------
    >>> import torch
    >>> from polycos.torch import CosineSimilarityFunction
    >>> x1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    >>> x2 = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    >>> s, _ = CosineSimilarityFunction.apply(x1, x2, 1, 1e-8)
    >>> s
    tensor([0.7071], dtype=torch.float64, grad_fn=<CosineSimilarityFunctionBackward>)
    >>> torch.autograd.gradcheck(lambda a: CosineSimilarityFunction.apply(a, x2, 1, 1e-8)[0], x1)
    True
    """

    @classmethod
    def apply(cls, x1: Any, x2: Any, dim: int = 1, eps: float = 1e-8) -> Any:  # type: ignore[override]
        _check_tensors(x1=x1, x2=x2)
        call = _validate.validate(x1, x2, dim, eps)
        a1, a2, axis = call.x1, call.x2, call.axis
        # Dynamo graph-breaks on a Function with a custom ``jvp`` and runs this eagerly; where
        # it traces this method anyway, the twin without ``jvp`` (it cannot trace ``super()`` here).
        fn = _backend._Cosine if torch.compiler.is_compiling() else cls
        if not call.shape:
            s, res = _backend._apply(fn, a1.reshape(1), a2.reshape(1), 0, call.eps)
            s = s.reshape(())
        else:
            s, res = _backend._apply(fn, a1, a2, axis, call.eps)
        if isinstance(call.backend, Widened):  # (an eps beyond float32's range: computed in float64)
            s = s.to(call.backend.out_dtype)
        return s, res


class CosineSimilarity(nn.Module):
    r"""Cosine similarity along ``dim``: a drop-in for :class:`torch.nn.CosineSimilarity`.

    Parameters
    ----------
    dim : int, optional
        Axis holding the vectors (default 1).
    eps : float, optional
        Lower bound on each norm (default ``1e-8``).

    Examples
    --------
    >>> import torch
    >>> from polycos.torch import CosineSimilarity
    >>> cos = CosineSimilarity(dim=1, eps=1e-6)
    >>> cos
    CosineSimilarity(dim=1, eps=1e-06)
    >>> cos(torch.ones(2, 3), torch.ones(2, 3))
    tensor([1., 1.])
    """

    __constants__: ClassVar[list[str]] = ["dim", "eps"]
    dim: int
    eps: float

    def __init__(self, dim: int = 1, eps: float = 1e-8) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of ``x1`` and ``x2`` along ``self.dim``."""
        return cosine_similarity(x1, x2, self.dim, self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"
