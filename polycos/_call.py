"""The validated call that every backend receives: :class:`Call` (row-wise) and :class:`PairwiseCall`.

Made by :mod:`polycos._validate` (the only place that builds them); read by the
backends (:mod:`polycos._backends`). A module of its own, importing nothing of
polycos, so that the backends and the validation do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Call", "PairwiseCall"]


@dataclass(frozen=True)
class Call:
    """A validated row-wise call.

    ``x1`` and ``x2`` are promoted to one real floating dtype but *not*
    broadcast (so no ``N*M*D`` array is ever built); ``shape`` is their
    broadcast shape and ``axis`` a non-negative index into it (a 0-d broadcast
    shape has ``shape == ()``, ``axis == 0``). ``outer`` is the plan of an
    outer-product broadcast (``None`` if it is not one).
    """

    backend: Any
    xp: Any
    x1: Any
    x2: Any
    shape: tuple
    axis: int
    eps: float
    outer: Any  #: :class:`polycos._outer.OuterPlan` or ``None``
    #: The result's shape: the broadcast shape without ``axis`` (computed once,
    #: here unless given: the forward and the VJP both read it)
    out_shape: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.out_shape is None:
            object.__setattr__(self, "out_shape", tuple(d for i, d in enumerate(self.shape) if i != self.axis))

    @property
    def dtype(self) -> Any:
        return self.x1.dtype

    @property
    def empty(self) -> bool:
        """The result has no elements (checked on known sizes only)."""
        return any(type(d) is int and d == 0 for d in self.out_shape)


@dataclass(frozen=True)
class PairwiseCall:
    """A validated pairwise call: one floating dtype, ``x2=None`` for self-similarity."""

    backend: Any
    xp: Any
    x1: Any
    x2: Any | None
    eps: float
    shape: tuple  #: result shape ``(..., N, M)``

    @property
    def dtype(self) -> Any:
        return self.x1.dtype


