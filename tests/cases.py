"""The OpInfo-style table that drives the guarantee tests: backends, samples, error inputs.

One declarative record per backend (:class:`BackendInfo`: how to make its
arrays, which dtypes it runs, capability flags, tolerances) and one table of
sample inputs (:data:`SAMPLES`) and error inputs (:data:`ERRORS`), the way
PyTorch's OpInfo drives every test of an operator. ``tests/test_guarantees.py``
runs each guarantee once, parametrised over every installed backend; a new
backend is one more :class:`BackendInfo` (built from the registry's capability
flags) and gets every test for free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import polycos
from polycos import _backends
from polycos.testing import available_backends, to_numpy

ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class BackendInfo:
    """What the guarantee tests need to know about one backend."""

    name: str
    make: Callable[[np.ndarray, str], Any]  #: (values, dtype name) -> array of the backend
    dtypes: tuple[str, ...]  #: dtypes it computes in
    autodiff: bool  #: gradients also flow through the library's own autodiff
    lazy: bool  #: values are never inspected (dask)
    flushes_subnormals: bool  #: subnormal inputs count as zero in values (XLA arithmetic)
    grad_flushes_subnormals: bool  #: ... and in gradients
    writable: bool = True  #: inputs can be checked for in-place modification
    max_side: int = 6  #: array sides for property tests (JAX compiles per shape)
    examples: int | None = None  #: Hypothesis examples per property (None: the profile's)

    def array(self, a: Any, dtype: str | None = None) -> Any:
        a = np.asarray(a)
        return self.make(a, dtype or a.dtype.name)

    def grad_of(self, fn: Callable[..., Any], x1: Any, x2: Any) -> tuple[Any, Any] | None:
        """``d sum(fn(x1, x2)) / d(x1, x2)`` through the library's autodiff, or ``None``."""
        if self.name == "torch":

            a = x1.detach().clone().requires_grad_(True)
            b = x2.detach().clone().requires_grad_(True)
            fn(a, b).sum().backward()
            return a.grad, b.grad
        if self.name == "jax":
            import jax

            return jax.grad(lambda a, b: fn(a, b).sum(), argnums=(0, 1))(x1, x2)
        return None


def _make(name: str) -> Callable[[np.ndarray, str], Any]:
    backend = _backends.get(name)
    xp = None
    if name == "array_api_strict":
        import array_api_strict as xp
    return lambda a, dtype: backend.from_numpy(np.asarray(a), dtype, xp=xp)


def _info(name: str) -> BackendInfo:
    backend = _backends.get(name)
    dtypes: tuple[str, ...] = ALL_DTYPES
    flush = False
    examples = None
    max_side = 6
    if name == "array_api_strict":
        dtypes = ("float32", "float64")
    if name == "jax":
        import jax

        dtypes = ALL_DTYPES if jax.config.jax_enable_x64 else ("float16", "bfloat16", "float32")
        flush = not backend.native
        examples = 15  # one compilation per drawn shape
        max_side = 4
    if name == "dask":
        examples = 15  # a graph per call
    return BackendInfo(
        name=name,
        make=_make(name),
        dtypes=dtypes,
        autodiff=backend.autodiff,
        lazy=backend.lazy,
        flushes_subnormals=flush,
        grad_flushes_subnormals=name == "jax",  # the tangent rule is XLA code, also over the kernel
        writable=name not in ("jax",),
        max_side=max_side,
        examples=examples,
    )


#: Every installed backend (CuPy only with a GPU).
BACKENDS: tuple[BackendInfo, ...] = tuple(_info(n) for n in available_backends())


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    """A sample input: ``cosine_similarity(x1, x2, dim, eps)`` in float64 values, cast per dtype."""

    name: str
    x1: np.ndarray
    x2: np.ndarray
    dim: int = 1
    eps: float = 1e-8
    dtypes: tuple[str, ...] = ALL_DTYPES  #: where the values are representable
    tags: tuple[str, ...] = ()  #: the guarantees it exercises beyond G1/G2

    def __repr__(self) -> str:
        return self.name


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _samples() -> tuple[Sample, ...]:
    r = _rng(0)
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[5.0, 6.0], [7.0, 8.0]])
    z = r.standard_normal((5, 3))
    out = [
        Sample("seed_rows", a, b, 1),
        Sample("seed_columns", a, b, 0),
        Sample("random_3d_dim1", r.standard_normal((3, 4, 5)), r.standard_normal((3, 4, 5)), 1),
        Sample("random_neg_dim", r.standard_normal((2, 3, 7)), r.standard_normal((2, 3, 7)), -1),
        Sample("broadcast_query", r.standard_normal(6), r.standard_normal((4, 6)), -1, tags=("broadcast",)),
        Sample("broadcast_middle", r.standard_normal((3, 1, 5)), r.standard_normal((1, 4, 5)), 0,
               tags=("broadcast",)),
        Sample("outer_simclr", z[None], z[:, None], 2, tags=("outer",)),
        Sample("outer_rows", z[:, None, :], r.standard_normal((1, 4, 3)), -1, tags=("outer",)),
        Sample("zero_rows", np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]),
               np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), 1, tags=("zero",)),
        Sample("zero_rows_eps0", np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]),
               np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), 1, 0.0, tags=("zero",)),
        Sample("below_eps", np.array([[1e-3, 2e-3], [3.0, 4.0]]), np.array([[1.0, 1.0], [1e-3, -1e-3]]),
               1, 0.5, tags=("eps",)),
        Sample("identical", z, z.copy(), 1, tags=("g1",)),
        Sample("antiparallel", z, -3 * z, 1, tags=("g1",)),
        Sample("zero_dim", np.array(3.0), np.array(-2.0), 0),
        Sample("size_zero_rows", np.zeros((0, 4)), np.zeros((0, 4)), 1),
        Sample("size_zero_vectors", np.zeros((3, 0)), np.zeros((3, 0)), 1, tags=("zero",)),
        Sample("length_one", r.standard_normal((4, 1)), r.standard_normal((4, 1)), 1),
        Sample("nan_row", np.array([[np.nan, 1.0], [1.0, 2.0]]), np.array([[1.0, 1.0], [2.0, 1.0]]), 1,
               tags=("nonfinite",)),
        Sample("inf_row", np.array([[np.inf, 1.0], [1.0, 2.0]]), np.array([[1.0, 1.0], [2.0, 1.0]]), 1,
               tags=("nonfinite",)),
    ]
    return tuple(out)


SAMPLES: tuple[Sample, ...] = _samples()


def sample_ids(s: Sample) -> str:
    return s.name


# --------------------------------------------------------------------------- error inputs


@dataclass(frozen=True)
class ErrorInput:
    """A call that must raise ``exc`` at once, with a message matching ``match``."""

    name: str
    build: Callable[[BackendInfo], tuple[Callable[..., Any], tuple, dict]]
    exc: type[BaseException]
    match: str
    backends: tuple[str, ...] | None = None  #: only these (None: every backend)

    def __repr__(self) -> str:
        return self.name


def _two(info: BackendInfo, s1: tuple = (2, 3), s2: tuple = (2, 3), dtype: str = "float32") -> tuple[Any, Any]:
    return info.array(np.ones(s1), dtype), info.array(np.ones(s2), dtype)


def _call(*args: Any, **kwargs: Any) -> tuple[Callable[..., Any], tuple, dict]:
    return polycos.cosine_similarity, args, kwargs


ERRORS: tuple[ErrorInput, ...] = (
    ErrorInput("not_an_array", lambda i: _call([1.0, 2.0], _two(i)[1]), TypeError, r"x1 must be an array"),
    ErrorInput("second_not_an_array", lambda i: _call(_two(i)[0], "abc"), TypeError, r"x2 must be an array"),
    ErrorInput("mixed_libraries", lambda i: _call(_two(i)[0], np.ones((2, 3)) if i.name != "numpy" else _mixed()),
               TypeError, r"same array library"),
    ErrorInput("no_broadcast", lambda i: _call(*_two(i, (2, 3), (4, 3))), ValueError, r"do not broadcast.*x1.*x2"),
    ErrorInput("dim_out_of_range", lambda i: _call(*_two(i), dim=2), IndexError, r"dim=2 is out of range"),
    ErrorInput("dim_negative_out_of_range", lambda i: _call(*_two(i), dim=-3), IndexError, r"dim=-3"),
    ErrorInput("dim_not_int", lambda i: _call(*_two(i), dim=1.5), TypeError, r"dim must be an int"),
    ErrorInput("dim_and_axis", lambda i: _call(*_two(i), dim=1, axis=1), TypeError, r"dim or axis, not both"),
    ErrorInput("eps_negative", lambda i: _call(*_two(i), eps=-1.0), ValueError, r"eps must be finite and >= 0"),
    ErrorInput("eps_nan", lambda i: _call(*_two(i), eps=float("nan")), ValueError, r"eps must be finite"),
    ErrorInput("eps_inf", lambda i: _call(*_two(i), eps=float("inf")), ValueError, r"eps must be finite"),
    ErrorInput("eps_huge_int", lambda i: _call(*_two(i), eps=10**400), ValueError, r"eps must be finite"),
    ErrorInput("eps_string", lambda i: _call(*_two(i), eps="1e-8"), TypeError, r"eps must be a real number"),
    ErrorInput("eps_complex", lambda i: _call(*_two(i), eps=1j), TypeError, r"eps must be a real number"),
    ErrorInput("eps_bool", lambda i: _call(*_two(i), eps=True), TypeError, r"eps must be a real number"),
    ErrorInput("complex_x1", lambda i: _call(_complex(i), _two(i)[1]), TypeError, r"x1 has complex dtype"),
    ErrorInput("grad_wrong_library",
               lambda i: (polycos.cosine_similarity_vjp, ([1.0, 1.0], *_two(i)), {}), TypeError,
               r"grad must be an array of the same library"),
    ErrorInput("grad_wrong_shape",
               lambda i: (polycos.cosine_similarity_vjp, (i.array(np.ones(3), "float32"), *_two(i)), {}),
               ValueError, r"grad with shape \(3,\) does not broadcast to the result shape \(2,\)"),
    ErrorInput("pairwise_1d", lambda i: (polycos.pairwise_cosine_similarity, (i.array(np.ones(3), "float32"),), {}),
               ValueError, r"x1 must have at least 2 dimensions"),
    ErrorInput("pairwise_lengths",
               lambda i: (polycos.pairwise_cosine_similarity,
                          (i.array(np.ones((2, 3)), "float32"), i.array(np.ones((2, 4)), "float32")), {}),
               ValueError, r"vector lengths differ"),
)


def _mixed() -> Any:
    import array_api_strict

    return array_api_strict.ones((2, 3))


def _complex(info: BackendInfo) -> Any:
    return info.make(np.ones((2, 3)), "complex64")


__all__ = ["BACKENDS", "ERRORS", "SAMPLES", "BackendInfo", "ErrorInput", "Sample", "to_numpy"]
