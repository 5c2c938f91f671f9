"""Adversarial inputs (issue 13): every class of attack a hostile but realistic user tries, as tables.

Each :class:`Attack` is one case of one class; it runs on every backend of
``tests/cases.py:BACKENDS`` it applies to (``backends=None``: all of them), so a
new backend gets the same attacks for free. A case either gets the right answer
(checked against :func:`polycos.testing.reference`, :func:`~polycos.testing.exact_reference`
and :func:`~polycos.testing.reference_vjp`) or an immediate ``TypeError`` /
``ValueError`` / ``IndexError`` whose message names the argument and the
offending value, type, dtype, shape or device; inputs are never modified.

The classes (:data:`CLASSES`):

* ``wrong_answers``: values that used to come back silently wrong.
* ``crashes``: valid calls that used to raise from deep inside a library.
* ``unclear_errors``: misuse that used to raise, but not naming the argument.
* ``containers``: every container and dtype family, with the policy of docs/semantics.md.
* ``devices``: device in = device out; mixed devices raise, naming both.
* ``extremes``: the top and bottom of every dtype's range, values and gradients.
* ``broadcasts``: empty results against huge stride-0 partners; stride-0 inputs never materialised.
* ``threads``: concurrent calls on every backend agree with serial ones bitwise.
* ``hygiene``: ``np.errstate(all="raise")`` and ``warnings.simplefilter("error")`` change nothing.

A case that fails because of a bug outside the input policy carries an
``xfail`` (strict) with the reason, per backend; ``tests/test_hygiene.py`` holds
the fresh-interpreter checks (first use from many threads, global state).
"""

from __future__ import annotations

import decimal
import fractions
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import array_api_compat
import numpy as np
import pytest
from cases import BACKENDS, BackendInfo

import polycos
from polycos import _backends
from polycos._backends._base import dtype_name
from polycos.testing import (
    _finfo,
    _round_to,
    assert_matches_reference,
    assert_vjp_matches_reference,
    exact_reference,
    reference_vjp,
    to_numpy,
)

CLASSES = (
    "wrong_answers", "crashes", "unclear_errors", "containers", "devices", "extremes", "broadcasts",
    "threads", "hygiene",
)
NAMES = tuple(b.name for b in BACKENDS)
ULP = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}

#: Known bugs outside the input policy (reported to the lead; strict xfails).


@dataclass(frozen=True)
class Attack:
    """One adversarial case of class ``cls``: ``run(info)`` attacks one backend and asserts."""

    cls: str
    name: str
    run: Callable[[BackendInfo], None]
    backends: tuple[str, ...] | None = None  #: where it applies (None: every backend)
    xfail: dict[str, str] = field(default_factory=dict)  #: backend -> reason (strict)

    def __repr__(self) -> str:
        return f"{self.cls}:{self.name}"


# =========================================================================== helpers


def _xp(info: BackendInfo) -> Any:
    return array_api_compat.array_namespace(info.array(np.zeros(1), "float32"))


def _dt(x: Any) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]


def _np(x: Any) -> np.ndarray:
    return to_numpy(x).astype(np.float64)


def _owned(info: BackendInfo, out: Any) -> None:
    owner = _backends.backend_for((("result", out),))
    assert owner.name == info.name, f"result is {type(out).__module__}.{type(out).__name__}, not {info.name}"


def _raises(exc: type[BaseException], match: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``fn(*args, **kwargs)`` raises ``exc`` at once with a message matching ``match``; inputs unchanged."""
    before = [_snapshot(a) for a in args]
    with pytest.raises(exc, match=match):
        _force(fn(*args, **kwargs))
    assert [_snapshot(a) for a in args] == before, "an input was modified by a call that raised"


def _snapshot(a: Any) -> Any:
    try:
        return to_numpy(a).tobytes()
    except Exception:
        return repr(type(a))


def _force(out: Any) -> None:
    """Compute lazy results (dask) so errors raised at compute time count."""
    for o in out if isinstance(out, tuple) else (out,):
        if hasattr(o, "compute"):
            o.compute()


def _check_forward(info: BackendInfo, x1: Any, x2: Any, dim: int = 1, eps: float = 1e-8, *,
                   r1: Any = None, r2: Any = None, dtype: str | None = None, exact: bool = False) -> Any:
    """The forward on ``x1, x2``: the backend's type, the promoted dtype, within 1 ulp(1) of exact."""
    s = polycos.cosine_similarity(x1, x2, dim, eps)
    _owned(info, s)
    if dtype is not None:
        assert _dt(s) == dtype, f"result dtype {_dt(s)}, expected {dtype}"
    r1 = _np(x1) if r1 is None else r1
    r2 = _np(x2) if r2 is None else r2
    if exact:
        got, want = _np(s), exact_reference(r1, r2, dim, eps)
        tol = ULP[_dt(s)]
        assert got.shape == want.shape
        assert np.all(np.abs(got - want) <= tol) or _flushed_ok(info, got, r1, r2, dim, eps, tol), (
            f"got {got}, exact {want}"
        )
    else:
        assert_matches_reference(s, r1, r2, dim, eps)
    return s


def _flushed(a: np.ndarray, dtype: str) -> np.ndarray:
    tiny = float(_finfo(dtype).smallest_normal)
    return np.where(np.abs(a) < tiny, 0.0, a)


def _flushed_ok(info: BackendInfo, got: np.ndarray, r1: np.ndarray, r2: np.ndarray, dim: int, eps: float,
                tol: float) -> bool:
    """XLA flushes subnormal inputs to zero (documented): JAX may answer for the flushed inputs."""
    if not info.grad_flushes_subnormals:
        return False
    dtype = {2.0**-10: "float16", 2.0**-7: "bfloat16", 2.0**-23: "float32", 2.0**-52: "float64"}[tol]
    want = exact_reference(_flushed(r1, dtype), _flushed(r2, dtype), dim, eps)
    return bool(np.all(np.abs(got - want) <= tol))


def _check_vjp(info: BackendInfo, g: np.ndarray, x1: Any, x2: Any, dim: int = 1, eps: float = 1e-8, *,
               r1: Any = None, r2: Any = None, dtype: str | None = None, ulps: float = 4.0,
               autodiff: bool | None = None) -> tuple[Any, Any]:
    """The VJP (and the library's autodiff) against the exact derivative; shapes, dtypes, library kept.

    ``autodiff=None``: through torch's autograd too (its own path, the autograd.Function), but
    through ``jax.grad`` only where asked (it runs the VJP's own rule, traced anew per call).

    Backends whose gradient arithmetic flushes subnormals (XLA) may return 0 where the exact
    gradient is subnormal in the result dtype.
    """
    dt = dtype or _dt(x1)
    grads = polycos.cosine_similarity_vjp(info.array(g, dt), x1, x2, dim, eps)
    r1 = _np(x1) if r1 is None else r1
    r2 = _np(x2) if r2 is None else r2
    for d, x in zip(grads, (x1, x2), strict=True):
        _owned(info, d)
        assert tuple(d.shape) == tuple(x.shape)
    _assert_grads(info, grads, g, r1, r2, dim, eps, ulps)
    if autodiff is None:
        autodiff = info.name != "jax"
    if autodiff and info.autodiff and np.size(g):
        auto = info.grad_of(lambda a, b: polycos.cosine_similarity(a, b, dim, eps) * info.array(g, dt), x1, x2)
        _assert_grads(info, auto, g, r1, r2, dim, eps, ulps)
    return grads


def _assert_grads(info: BackendInfo, grads: Any, g: np.ndarray, r1: np.ndarray, r2: np.ndarray, dim: int,
                  eps: float, ulps: float) -> None:
    if info.grad_flushes_subnormals:
        refs = reference_vjp(g, r1, r2, dim, eps)
        fixed = []
        for d, ref in zip(grads, refs, strict=True):
            dt = _dt(d)
            got = _np(d)
            tiny = float(_finfo(dt).smallest_normal)
            got = np.where((got == 0) & (np.abs(ref) < tiny), ref, got)  # flushed to zero: allowed
            fixed.append(_as_dtype(got, dt))
        grads = tuple(fixed)
    assert_vjp_matches_reference(grads, g, r1, r2, dim, eps, ulps=ulps)


def _as_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        if dtype == "bfloat16":
            import ml_dtypes

            return a.astype(ml_dtypes.bfloat16)
        return a.astype(dtype)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _heavy(info: BackendInfo) -> bool:
    """JAX compiles and dask builds a graph per call shape: loops over many variants are trimmed there."""
    return info.examples is not None


def _has(info: BackendInfo, *dtypes: str) -> bool:
    return all(d in info.dtypes for d in dtypes)


ATTACKS: list[Attack] = []


def attack(cls: str, name: str, *, backends: tuple[str, ...] | None = None,
           xfail: dict[str, str] | None = None) -> Callable[[Callable[[BackendInfo], None]], Callable[[BackendInfo], None]]:
    """Register ``fn(info)`` as an attack of class ``cls``."""
    assert cls in CLASSES, cls

    def register(fn: Callable[[BackendInfo], None]) -> Callable[[BackendInfo], None]:
        ATTACKS.append(Attack(cls, name, fn, backends, dict(xfail or {})))
        return fn

    return register


# =========================================================================== wrong answers


@attack("wrong_answers", "float32_rows_near_the_maximum")
def _(info: BackendInfo) -> None:
    """Issue 13: XLA gave 0.0 (exact 0.1690821) dividing by the row maximum."""
    x1 = np.array([[3.4e38, 1e38, -2e38]], np.float32)
    x2 = np.array([[1e38, 3.4e38, 2e38]], np.float32)
    a1, a2 = info.array(x1, "float32"), info.array(x2, "float32")
    s = _check_forward(info, a1, a2, eps=0.0, dtype="float32", exact=True)
    assert abs(float(_np(s)[0]) - 0.1690821) < 1e-6
    if info.name == "jax":
        import jax

        jitted = jax.jit(lambda p, q: polycos.cosine_similarity(p, q, eps=0.0))(a1, a2)
        assert abs(float(_np(jitted)[0]) - 0.1690821) < 1e-6


@attack("wrong_answers", "bfloat16_rows_near_the_maximum")
def _(info: BackendInfo) -> None:
    if not _has(info, "bfloat16"):
        pytest.skip(f"{info.name} has no bfloat16")
    x1 = _round_to(np.array([[3e38, 1e38, -2e38]]), "bfloat16")
    x2 = _round_to(np.array([[1e38, 3e38, 2e38]]), "bfloat16")
    _check_forward(info, info.array(x1, "bfloat16"), info.array(x2, "bfloat16"), eps=0.0, dtype="bfloat16",
                   r1=x1, r2=x2, exact=True)


@attack("wrong_answers", "float64_rows_near_the_maximum")
def _(info: BackendInfo) -> None:
    if not _has(info, "float64"):
        pytest.skip(f"{info.name} does not compute in float64 here (JAX: see test_jax_x64_extremes)")
    x1 = np.array([[1.7e308, 1e308, -0.5e308]])
    x2 = np.array([[1e308, 1.7e308, 1e308]])
    _check_forward(info, info.array(x1, "float64"), info.array(x2, "float64"), eps=0.0, dtype="float64",
                   exact=True)
    _check_vjp(info, np.ones(1), info.array(x1, "float64"), info.array(x2, "float64"), eps=0.0)


@attack("wrong_answers", "gradient_where_the_norm_exceeds_the_maximum")
def _(info: BackendInfo) -> None:
    """Issue 13: the norm (~3.8e38) cast to float32 became inf and the gradient 0; the exact one is ~1e-39."""
    x1 = np.array([[3e38, 1e38, -2e38]], np.float32)
    x2 = np.array([[1e38, 3.4e38, 2e38]], np.float32)
    _check_vjp(info, np.ones(1), info.array(x1, "float32"), info.array(x2, "float32"), eps=0.0, autodiff=True)


@attack("wrong_answers", "integer_and_bool_inputs_promoted_exactly")
def _(info: BackendInfo) -> None:
    xp = _xp(info)
    ints = np.array([[2**40, -3, 7], [1, 0, -1]], np.int64)
    floats = np.array([[1.0, 2.0, 3.0], [0.5, -0.5, 2.0]])
    a = xp.asarray(ints) if info.name not in ("dask",) else info.make(ints, "int64")
    if info.name == "jax":
        a = xp.asarray(ints.astype(np.int32) // 1024)  # JAX without x64 has no int64
        ints = ints.astype(np.int32) // 1024
    default = _backends.get(info.name).default_float(xp, a)
    s = _check_forward(info, a, info.array(floats, _dtname(default)), r1=ints.astype(np.float64))
    assert _dt(s) == _dtname(default)
    b = info.array(np.array([[True, False, True]]), "bool")
    _check_forward(info, b, info.array(floats, _dtname(default)), r1=np.array([[1.0, 0.0, 1.0]]))


def _dtname(dtype: Any) -> str:
    return dtype_name(dtype)


@attack("wrong_answers", "grad_zero_d_broadcast_against_a_vector")
def _(info: BackendInfo) -> None:
    """The kernel once returned zeros here (a 0-d upstream gradient, a broadcast 0-d input)."""
    x1 = info.array(np.array([1.0, 0.0]), "float32")
    x2 = info.array(np.array(1.0), "float32")
    g1, _g2 = _check_vjp(info, np.ones(()), x1, x2, dim=0)
    np.testing.assert_allclose(_np(g1), [0.0, 0.70710677], atol=1e-7)


@attack("wrong_answers", "grad_of_another_dtype_is_cast_to_the_result_dtype")
def _(info: BackendInfo) -> None:
    r = _rng(1)
    x1, x2 = r.standard_normal((4, 5)), r.standard_normal((4, 5))
    a1, a2 = info.array(x1, "float32"), info.array(x2, "float32")
    for gdt in ("float64" if _has(info, "float64") else "float16", "int32", "bool"):
        g = np.array([1, 0, 1, 1]) if gdt == "bool" else np.array([1.0, -2.0, 3.0, 5.0])
        grads = polycos.cosine_similarity_vjp(info.array(g, gdt), a1, a2)
        assert [_dt(d) for d in grads] == ["float32", "float32"]
        assert_vjp_matches_reference(grads, g.astype(np.float64), _np(a1), _np(a2), ulps=4)


@attack("wrong_answers", "negative_bit_view", backends=("torch",))
def _(info: BackendInfo) -> None:
    """``z.conj().imag`` is a real tensor with the negative bit set: read as its values, not its memory."""
    import torch

    z = torch.complex(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
                      torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))
    neg = z.conj().imag
    assert neg.is_neg()
    y = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    _check_forward(info, neg, y, r1=neg.resolve_neg().numpy().astype(np.float64))
    _check_vjp(info, np.ones(3), neg, y, r1=neg.resolve_neg().numpy().astype(np.float64))


@attack("wrong_answers", "byte_swapped_unaligned_readonly", backends=("numpy",))
def _(info: BackendInfo) -> None:
    """The kernel reads raw memory: non-native byte order, unaligned and read-only arrays are values."""
    r = _rng(2)
    x, y = r.standard_normal((4, 5)), r.standard_normal((4, 5))
    buf = np.zeros(x.nbytes + 1, np.uint8)
    unaligned = np.ndarray(x.shape, np.float64, buffer=buf, offset=1)
    unaligned[...] = x
    assert not unaligned.flags.aligned
    readonly = np.frombuffer(x.tobytes()).reshape(x.shape)
    assert not readonly.flags.writeable
    for a in (x.astype(">f8"), unaligned, readonly, x.astype(">f4")):
        b = y.astype(a.dtype)
        _check_forward(info, a, b, r1=x.astype(a.dtype).astype(np.float64), r2=b.astype(np.float64))
        _check_vjp(info, np.ones(4), a, b, r1=x.astype(a.dtype).astype(np.float64), r2=b.astype(np.float64),
                   dtype=a.dtype.newbyteorder("=").name)
    out = polycos.cosine_similarity(readonly, y)
    assert out.flags.writeable
    assert all(g.flags.writeable for g in polycos.cosine_similarity_vjp(np.ones(4), readonly, y))


@attack("wrong_answers", "views_of_every_layout", backends=tuple(n for n in NAMES if n != "jax"))  # JAX has no views
def _(info: BackendInfo) -> None:
    """Transposed, reversed, stride-0 (also along dim) views give the values of contiguous copies."""
    xp = _xp(info)
    r = _rng(3)
    x, y = r.standard_normal((6, 5)), r.standard_normal((6, 5))
    a, b = info.array(x, "float64" if _has(info, "float64") else "float32"), None
    dt = _dt(a)
    b = info.array(y, dt)
    views = [
        ("transposed", a.T, x.T, b.T, y.T, 0),
        ("stride0_along_dim", xp.broadcast_to(a[:, :1], (6, 5)), np.broadcast_to(x[:, :1], (6, 5)), b, y, 1),
        ("stride0_rows", xp.broadcast_to(a[:1, :], (6, 5)), np.broadcast_to(x[:1, :], (6, 5)), b, y, 1),
    ]
    if info.name != "torch":  # torch has no negative strides (flip copies)
        views.append(("reversed", a[::-1, ::-1], x[::-1, ::-1], b, y, 1))
    for _name, v, vx, w, wy, dim in views:
        rv, rw = _round_to(np.ascontiguousarray(vx), dt), _round_to(np.ascontiguousarray(wy), dt)
        _check_forward(info, v, w, dim, r1=rv, r2=rw)
        n = rv.shape[1 - dim]
        _check_vjp(info, np.linspace(-1, 1, n), v, w, dim, r1=rv, r2=rw, autodiff=False)


# =========================================================================== crashes on valid input


@attack("crashes", "broadcast_view_against_a_broadcast_partner")
def _(info: BackendInfo) -> None:
    """Issue 13: broadcast_to(a(1,4,1,8), (3,4,1,8)) vs b(1,1,5,8) once failed 'cannot reshape array of size 20'."""
    xp = _xp(info)
    r = _rng(4)
    a, b = r.standard_normal((1, 4, 1, 8)), r.standard_normal((1, 1, 5, 8))
    x1 = xp.broadcast_to(info.array(a, "float32"), (3, 4, 1, 8))
    x2 = info.array(b, "float32")
    r1, r2 = _round_to(np.broadcast_to(a, (3, 4, 1, 8)), "float32"), _round_to(b, "float32")
    _check_forward(info, x1, x2, -1, r1=r1, r2=r2)
    _check_vjp(info, np.linspace(-1, 1, 60).reshape(3, 4, 5), x1, x2, -1, r1=r1, r2=r2, autodiff=False)


def _many_dims(ndim: int) -> Callable[[BackendInfo], None]:
    """(1, ..., 1, 2, 3) arrays: checked against the reference of the (2, 3) arrays they hold.

    (``polycos.testing.reference`` itself uses ``np.broadcast_shapes``, limited to 32 dimensions.)
    """

    def run(info: BackendInfo) -> None:
        if info.name == "array_api_strict":
            pytest.skip("array-api-strict's own vecdot (np.broadcast_arrays) stops at 32 dimensions")
        shape = (1,) * (ndim - 2) + (2, 3)
        r = _rng(ndim)
        x, y = _round_to(r.standard_normal((2, 3)), "float32"), _round_to(r.standard_normal((2, 3)), "float32")
        a, b = info.array(x.reshape(shape), "float32"), info.array(y.reshape(shape), "float32")
        s = polycos.cosine_similarity(a, b, -1)
        _owned(info, s)
        assert tuple(s.shape) == shape[:-1]
        assert_matches_reference(np.asarray(to_numpy(s)).reshape(2), x, y)
        grads = polycos.cosine_similarity_vjp(info.array(np.ones(shape[:-1]), "float32"), a, b, -1)
        assert [tuple(d.shape) for d in grads] == [shape, shape]
        assert_vjp_matches_reference(tuple(to_numpy(d).reshape(2, 3) for d in grads), np.ones(2), x, y, ulps=4)
        # the matrix product's two spellings: pairwise, and an outer broadcast as wide
        outer = (x[:, None, :], y[None, :, :])
        p = polycos.pairwise_cosine_similarity(a, b)
        assert tuple(p.shape) == (*shape[:-2], 2, 2)
        assert_matches_reference(np.asarray(to_numpy(p)).reshape(2, 2), *outer, -1)
        grads = polycos.pairwise_cosine_similarity_vjp(info.array(np.ones(p.shape), "float32"), a, b)
        assert [tuple(d.shape) for d in grads] == [shape, shape]
        lead = (1,) * (ndim - 3)
        o1, o2 = info.array(x.reshape(*lead, 2, 1, 3), "float32"), info.array(y.reshape(*lead, 1, 2, 3), "float32")
        o = polycos.cosine_similarity(o1, o2, -1)
        assert tuple(o.shape) == (*lead, 2, 2)
        assert_matches_reference(np.asarray(to_numpy(o)).reshape(2, 2), *outer, -1)
        grads = polycos.cosine_similarity_vjp(info.array(np.ones(o.shape), "float32"), o1, o2, -1)
        assert [tuple(d.shape) for d in grads] == [tuple(o1.shape), tuple(o2.shape)]

    return run


attack("crashes", "33_dimensions")(_many_dims(33))
attack("crashes", "64_dimensions")(_many_dims(64))


@attack("crashes", "zero_d_and_scalars")
def _(info: BackendInfo) -> None:
    """0-d pairs give 0-d results; 0-d against a vector broadcasts; NumPy scalars are 0-d arrays."""
    a, b = info.array(np.array(3.0), "float32"), info.array(np.array(-2.0), "float32")
    s = _check_forward(info, a, b, 0)
    assert tuple(s.shape) == ()
    assert float(_np(s)) == -1.0
    _check_vjp(info, np.ones(()), a, b, 0)
    v = info.array(np.array([1.0, 2.0]), "float32")
    _check_forward(info, a, v, -1)
    if info.name == "numpy":
        s = polycos.cosine_similarity(np.float32(2.0), np.float64(-1.0), dim=0)
        assert isinstance(s, np.ndarray)
        assert s.shape == ()
        assert s.dtype == np.float64
        assert float(s) == -1.0


@attack("crashes", "dask_unknown_chunk_sizes", backends=("dask",))
def _(info: BackendInfo) -> None:
    """``y[y[:, 0] > 0]`` has shape (nan, 3); dask's own arithmetic works on it, so must polycos."""
    import dask.array as da

    y = _rng(5).standard_normal((20, 3))
    d = da.from_array(y, chunks=5)
    sel = d[d[:, 0] > 0]
    ys = y[y[:, 0] > 0]
    s = polycos.cosine_similarity(sel, sel * 2.0 + 1.0)
    assert_matches_reference(s.compute(), ys, ys * 2.0 + 1.0)
    g1, _ = polycos.cosine_similarity_vjp(da.ones(1), sel, sel * 2.0 + 1.0)
    assert g1.compute().shape == ys.shape


@attack("crashes", "torch_grad_modes", backends=("torch",))
def _(info: BackendInfo) -> None:
    """inference_mode, no_grad, Parameters, requires_grad inputs to the explicit VJP."""
    import torch

    x = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with torch.inference_mode():
        s = polycos.cosine_similarity(x.detach(), y.detach())
    assert_matches_reference(s, x.detach(), y.detach())
    with torch.no_grad():
        s = polycos.cosine_similarity(x, y)
    assert not s.requires_grad
    s = polycos.cosine_similarity(x, y)
    assert s.requires_grad
    grads = polycos.cosine_similarity_vjp(torch.ones(4, dtype=torch.float64), x, y)
    assert_vjp_matches_reference(grads, np.ones(4), x.detach(), y.detach(), ulps=4)


# =========================================================================== unclear errors


def _two(info: BackendInfo, s1: tuple = (2, 3), s2: tuple = (2, 3), dtype: str = "float32") -> tuple[Any, Any]:
    r = _rng(6)
    return info.array(r.standard_normal(s1), dtype), info.array(r.standard_normal(s2), dtype)


EPS_ERRORS: tuple[tuple[str, Any, type[BaseException], str], ...] = (
    ("huge_int", 10**400, ValueError, r"eps must be finite and >= 0, got eps=1000.*\(401 characters\) \(too large for a float\)"),
    ("huge_fraction", fractions.Fraction(10**400), ValueError, r"eps must be finite.*too large for a float"),
    ("huge_decimal", decimal.Decimal("1e400"), ValueError, r"eps must be finite.*Decimal\('1E\+400'\).*too large"),
    ("decimal_nan", decimal.Decimal("NaN"), ValueError, r"eps must be finite and >= 0, got eps=Decimal\('NaN'\)"),
    ("decimal_snan", decimal.Decimal("sNaN"), ValueError, r"eps must be finite and >= 0, got eps=Decimal\('sNaN'\)"),
    ("longdouble_overflow", np.longdouble("1e4000") if np.finfo(np.longdouble).max > 1e4000 else 10**5000,
     ValueError, r"eps must be finite.*too large for a float"),
    ("negative_tiny", -5e-324, ValueError, r"eps must be finite and >= 0, got eps=-5e-324"),
    ("numpy_nan", np.float32("nan"), ValueError, r"eps must be finite and >= 0, got eps=np.float32\(nan\)"),
    ("numpy_inf", np.float16("inf"), ValueError, r"eps must be finite and >= 0"),
    ("string", "1e-8", TypeError, r"eps must be a real number, got '1e-8' of type str"),
    ("complex", 1e-8 + 0j, TypeError, r"eps must be a real number, got \(1e-08\+0j\) of type complex"),
    ("bool", True, TypeError, r"eps must be a real number, got True"),
    ("none", None, TypeError, r"eps must be a real number, got None"),
    ("list", [1e-8], TypeError, r"eps must be a real number, got \[1e-08\] of type list"),
    ("numpy_1d", np.array([1e-8]), TypeError, r"eps must be a real number, got array\(\[1.e-08\]\)"),
    ("numpy_bool_0d", np.array(True), TypeError, r"eps must be a real number, got array\(True\) of dtype bool"),
    ("numpy_complex_0d", np.array(1j), TypeError, r"eps must be a real number, got array\(0.\+1.j\) of dtype complex128"),
    # float() would parse these; no string is parsed, and a date is not a number
    ("numpy_str", np.str_("1.0"), TypeError, r"eps must be a real number, got np.str_\('1.0'\) of dtype <U3"),
    ("numpy_str_0d", np.array("1.0"), TypeError, r"eps must be a real number, got array\('1.0', dtype='<U3'\)"),
    ("numpy_bytes", np.bytes_(b"1.0"), TypeError, r"eps must be a real number, got np.bytes_\(b'1.0'\) of dtype \|S3"),
    ("numpy_object_0d", np.array(1.0, object), TypeError, r"eps must be a real number, got .* of dtype object"),
    ("timedelta", np.timedelta64(1), TypeError, r"eps must be a real number, got np.timedelta64\(1\) of type timedelta64"),
    ("timedelta_s", np.timedelta64(1, "s"), TypeError, r"eps must be a real number, got np.timedelta64\(1,'s'\)"),
    ("timedelta_0d", np.array(1, "m8[s]"), TypeError, r"eps must be a real number, got .* of dtype timedelta64\[s\]"),
)


@attack("unclear_errors", "eps_values_of_every_kind")
def _(info: BackendInfo) -> None:
    x1, x2 = _two(info)
    for _label, eps, exc, match in EPS_ERRORS:
        _raises(exc, match, polycos.cosine_similarity, x1, x2, eps=eps)
        _raises(exc, match, polycos.pairwise_cosine_similarity, x1, x2, eps=eps)
    # an array of the backend's own library, with dimensions
    _raises(TypeError, r"eps must be a real number, got .* of type", polycos.cosine_similarity, x1, x2,
            eps=info.array(np.array([1e-8]), "float32"))


@attack("unclear_errors", "dim_values_of_every_kind")
def _(info: BackendInfo) -> None:
    x1, x2 = _two(info)
    for dim, exc, match in (
        (True, TypeError, r"dim must be an int, got True of type bool"),
        (1.0, TypeError, r"dim must be an int, got 1.0 of type float"),
        (np.float64(1.0), TypeError, r"dim must be an int, got np.float64\(1.0\)"),
        ("1", TypeError, r"dim must be an int, got '1' of type str"),
        (np.array(1.0), TypeError, r"dim must be an int, got array\(1\.\)"),
        (np.array(True), TypeError, r"dim must be an int, got array\(True\)"),
        (np.array([1]), TypeError, r"dim must be an int, got array\(\[1\]\)"),
        (np.timedelta64(1), TypeError, r"dim must be an int, got np.timedelta64\(1\) of type timedelta64"),
        (np.timedelta64(0, "s"), TypeError, r"dim must be an int, got np.timedelta64\(0,'s'\)"),
        (2, IndexError, r"dim=2 is out of range for inputs broadcast to shape \(2, 3\)"),
        (-3, IndexError, r"dim=-3 is out of range"),
        (2**70, IndexError, r"dim=1180591620717411303424 is out of range"),
    ):
        _raises(exc, match, polycos.cosine_similarity, x1, x2, dim)
    s = polycos.cosine_similarity(x1, x2, np.int64(-1))  # NumPy integers are integers
    assert tuple(s.shape) == (2,)
    # a 0-d integer array of any library is its number, as F.cosine_similarity takes torch.tensor(1)
    for zero_d in (np.array(-1), polycos.testing.from_numpy(x1, np.array(-1, dtype=np.int32))):
        assert tuple(polycos.cosine_similarity(x1, x2, zero_d).shape) == (2,)
    _raises(TypeError, r"give dim or axis, not both \(got dim=1, axis=1\)", polycos.cosine_similarity, x1, x2, 1, axis=1)


@attack("unclear_errors", "values_traced_by_jit_for_eps_and_dim", backends=("jax",))
def _(info: BackendInfo) -> None:
    import jax

    x1, x2 = _two(info)
    with pytest.raises(TypeError, match=r"eps must be a concrete number, got a traced value .*static argument"):
        jax.jit(lambda e: polycos.cosine_similarity(x1, x2, eps=e))(0.5)
    with pytest.raises(TypeError, match=r"dim must be a concrete number, got a traced value .*static argument"):
        jax.jit(lambda d: polycos.cosine_similarity(x1, x2, dim=d))(1)
    # closed over or static: fine
    out = jax.jit(lambda a, b: polycos.cosine_similarity(a, b, dim=0, eps=0.5))(x1, x2)
    assert_matches_reference(out, x1, x2, 0, 0.5)


@attack("unclear_errors", "eps_tensor_that_requires_grad", backends=("torch",))
def _(info: BackendInfo) -> None:
    import torch

    x1, x2 = _two(info)
    eps = torch.tensor(0.5, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _raises(TypeError, r"eps is a tensor that requires grad .*pass float\(eps.detach\(\)\)",
                polycos.cosine_similarity, x1, x2, eps=eps)
    assert_matches_reference(polycos.cosine_similarity(x1, x2, eps=torch.tensor(0.5)), x1, x2, 1, 0.5)
    # a meta tensor has no value: not mistaken for a JIT's tracer
    _raises(TypeError, r"eps is a tensor on the meta device, which holds no value .*pass a Python float",
            polycos.cosine_similarity, x1, x2, eps=torch.tensor(0.5, device="meta"))


@attack("unclear_errors", "not_arrays")
def _(info: BackendInfo) -> None:
    """Python scalars, lists, tuples, None, strings, bytes, memoryviews, scipy.sparse: not arrays."""
    import scipy.sparse

    x1, _ = _two(info)
    for bad in (1.0, 2, [1.0, 2.0, 3.0], (1.0, 2.0, 3.0), None, "abc", b"abc", memoryview(b"abc"),
                scipy.sparse.csr_array(np.ones((2, 3))), scipy.sparse.coo_matrix(np.ones((2, 3)))):
        tname = f"{type(bad).__module__}.{type(bad).__qualname__}".replace(".", r"\.")
        _raises(TypeError, rf"x1 must be an array \(.*\), got {tname}", polycos.cosine_similarity, bad, x1)
        _raises(TypeError, rf"x2 must be an array \(.*\), got {tname}", polycos.cosine_similarity, x1, bad)
        _raises(TypeError, rf"x1 must be an array \(.*\), got {tname}", polycos.pairwise_cosine_similarity, bad)
        _raises(TypeError, r"grad must be an array of the same library", polycos.cosine_similarity_vjp,
                bad, x1, x1)


@attack("unclear_errors", "mixed_libraries_everywhere")
def _(info: BackendInfo) -> None:
    import array_api_strict

    x1, x2 = _two(info)
    other = np.ones((2, 3), np.float32) if info.name != "numpy" else array_api_strict.ones((2, 3))
    lib = type(other).__module__.split(".")[0]
    _raises(TypeError, rf"x1 and x2 must come from the same array library, got .* and {lib}", polycos.cosine_similarity, x1, other)
    _raises(TypeError, r"x1 and x2 must come from the same array library", polycos.pairwise_cosine_similarity, x1, other)
    other_grad = np.ones(2, np.float32) if info.name != "numpy" else array_api_strict.ones(2)
    _raises(TypeError, rf"grad must be an array of the same library as x1 and x2 \({info.name}\), got {lib}",
            polycos.cosine_similarity_vjp, other_grad, x1, x2)


@attack("unclear_errors", "shapes_named_in_errors")
def _(info: BackendInfo) -> None:
    x1, x2 = _two(info, (2, 3), (4, 3))
    _raises(ValueError, r"shapes do not broadcast: x1 with shape \(2, 3\) and x2 with shape \(4, 3\)",
            polycos.cosine_similarity, x1, x2)
    a, b = _two(info, (2, 3), (2, 3))
    _raises(ValueError, r"grad with shape \(3,\) does not broadcast to the result shape \(2,\)",
            polycos.cosine_similarity_vjp, info.array(np.ones(3), "float32"), a, b)
    _raises(ValueError, r"x1 must have at least 2 dimensions \(\.\.\., N, D\), got shape \(3,\)",
            polycos.pairwise_cosine_similarity, info.array(np.ones(3), "float32"))
    _raises(ValueError, r"vector lengths differ: x1 with shape \(2, 3\) has D=3, x2 with shape \(2, 4\) has D=4",
            polycos.pairwise_cosine_similarity, *_two(info, (2, 3), (2, 4)))


@attack("unclear_errors", "bad_grads")
def _(info: BackendInfo) -> None:
    """Complex, string-like and foreign upstream gradients raise, naming grad (never a dropped imaginary part)."""
    a, b = _two(info)
    complex_grad = info.make(np.ones(2), "complex64")
    _raises(TypeError, r"grad has complex dtype .*complex64; only real inputs are supported",
            polycos.cosine_similarity_vjp, complex_grad, a, b)
    if info.name in ("numpy", "dask"):
        mk = (lambda z: z) if info.name == "numpy" else (lambda z: __import__("dask.array").array.from_array(z, chunks=-1))
        for g, match in ((np.array(["1", "1"]), r"grad has dtype <U1, which is not numeric"),
                         (np.array([b"1", b"1"]), r"grad has dtype \|S1, which is not numeric"),
                         (np.array([1.0, None], object), r"grad has dtype object, which is not numeric"),
                         (np.zeros(2, "M8[s]"), r"grad has dtype datetime64\[s\], which is not numeric"),
                         (np.zeros(2, "m8[s]"), r"grad has dtype timedelta64\[s\], which is not numeric")):
            _raises(TypeError, match, polycos.cosine_similarity_vjp, mk(g), a, b)
        if info.name == "numpy":
            _raises(TypeError, r"grad is a numpy masked array", polycos.cosine_similarity_vjp, np.ma.ones(2), a, b)
    if info.name == "torch":
        import torch

        _raises(TypeError, r"grad is a sparse tensor \(layout torch.sparse_coo\)", polycos.cosine_similarity_vjp,
                torch.ones(2).to_sparse(), a, b)
        _raises(TypeError, r"grad has dtype torch.float8_e4m3fn, which polycos does not support",
                polycos.cosine_similarity_vjp, torch.ones(2).to(torch.float8_e4m3fn), a, b)


# =========================================================================== containers and dtypes


def _reject(info: BackendInfo, make: Callable[[], Any], match: str, exc: type[BaseException] = TypeError) -> None:
    """``make()`` as x1, as x2 and as the pairwise x1: rejected, naming the argument."""
    bad = make()
    good = info.array(np.ones(tuple(bad.shape)), "float32")
    _raises(exc, "x1 " + match, polycos.cosine_similarity, bad, good)
    _raises(exc, "x2 " + match, polycos.cosine_similarity, good, bad)
    if len(bad.shape) >= 2:
        _raises(exc, "x1 " + match, polycos.pairwise_cosine_similarity, bad)


NUMPY_NON_NUMERIC = (
    ("object", lambda: np.array([[None, 1.0, 2.0]], object), r"has dtype object, which is not numeric"),
    ("numeric_strings", lambda: np.array([["1", "2", "3"]]), r"has dtype <U1, which is not numeric"),
    ("bytes", lambda: np.array([[b"1", b"2", b"3"]]), r"has dtype \|S1, which is not numeric"),
    ("datetime", lambda: np.zeros((1, 3), "M8[s]"), r"has dtype datetime64\[s\], which is not numeric"),
    ("timedelta", lambda: np.zeros((1, 3), "m8[ns]"), r"has dtype timedelta64\[ns\], which is not numeric"),
    ("void", lambda: np.zeros((1, 3), "V8"), r"has dtype \|V8, which is not numeric"),
    ("structured", lambda: np.zeros((1, 3), [("a", "f8"), ("b", "i4")]),
     r"has dtype \[\('a', '<f8'\), \('b', '<i4'\)\], which is not numeric"),
    ("longdouble", lambda: np.ones((1, 3), np.longdouble),
     rf"has dtype {np.dtype(np.longdouble).name}, which polycos does not support"),
    ("complex", lambda: np.ones((1, 3), np.complex64), r"has complex dtype complex64"),
)


@attack("containers", "numpy_non_numeric_dtypes", backends=("numpy", "dask"))
def _(info: BackendInfo) -> None:
    import dask.array as da

    wrap = (lambda z: z) if info.name == "numpy" else (lambda z: da.from_array(z, chunks=-1))
    for _label, make, match in NUMPY_NON_NUMERIC:
        _reject(info, lambda make=make: wrap(make()), match)
    if info.name == "numpy":
        _reject(info, lambda: np.rec.fromarrays([np.ones(3), np.ones(3)]).reshape(1, 3), r"has dtype .*record.*not numeric")


@attack("containers", "every_ml_dtypes_type", backends=("numpy", "dask"))
def _(info: BackendInfo) -> None:
    """bfloat16 is supported; complex types are complex; every other ml_dtypes type is rejected."""
    import dask.array as da
    import ml_dtypes

    wrap = (lambda z: z) if info.name == "numpy" else (lambda z: da.from_array(z, chunks=-1))
    names = [n for n in dir(ml_dtypes) if not n.startswith("_") and n not in ("finfo", "iinfo", "real", "imag")]
    assert "int4" in names
    assert "float8_e4m3fn" in names
    for n in names:
        t = getattr(ml_dtypes, n)
        if n == "bfloat16":
            x = _round_to(_rng(7).standard_normal((2, 3)), "bfloat16")
            s = _check_forward(info, wrap(x.astype(t)), wrap(np.ones((2, 3), t)), r1=x, dtype="bfloat16")
            assert _dt(s) == "bfloat16"
        elif "complex" in n:
            _reject(info, lambda t=t: wrap(np.ones((2, 3), t)), rf"has complex dtype {n}")
        else:
            _reject(info, lambda t=t: wrap(np.ones((2, 3), t)), rf"has dtype {n} \(ml_dtypes\), which polycos does not support")


@attack("containers", "numpy_subclasses", backends=("numpy",))
def _(info: BackendInfo) -> None:
    """Subclasses compute as plain views (plain ndarray results); masked arrays and np.matrix are rejected."""
    import tempfile

    class Sub(np.ndarray):
        pass

    r = _rng(8)
    x, y = r.standard_normal((3, 4)), r.standard_normal((3, 4))
    with tempfile.TemporaryDirectory() as d:
        mm = np.memmap(Path(d) / "x.dat", dtype=np.float64, mode="w+", shape=(3, 4))
        mm[...] = x
        for a in (x.view(Sub), mm):
            s = _check_forward(info, a, y, r1=x)
            assert type(s) is np.ndarray
            assert all(type(g) is np.ndarray for g in polycos.cosine_similarity_vjp(np.ones(3), a, y))
        del mm
    _reject(info, lambda: np.ma.array(x, mask=x > 0), r"is a numpy masked array; polycos does not apply masks")
    _reject(info, lambda: np.ma.array(x), r"is a numpy masked array")  # even without a mask: one rule
    _reject(info, lambda: np.matrix(x), r"is a numpy.matrix, whose reductions keep two dimensions")


@attack("containers", "dask_masked_chunks", backends=("dask",))
def _(info: BackendInfo) -> None:
    """The mask used to be ignored silently."""
    import dask.array as da

    x = _rng(9).standard_normal((3, 4))
    _reject(info, lambda: da.from_array(np.ma.array(x, mask=x > 0), chunks=-1),
            r"is a dask array of numpy masked arrays; polycos does not apply masks")


@attack("containers", "torch_layouts_and_exotic_tensors", backends=("torch",))
def _(info: BackendInfo) -> None:
    import torch

    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    for layout, make in (("sparse_coo", lambda: x.to_sparse()), ("sparse_csr", lambda: x.to_sparse_csr()),
                         ("sparse_csc", lambda: x.to_sparse_csc()),
                         ("sparse_bsr", lambda: x.to_sparse_bsr((1, 1))),
                         ("sparse_bsc", lambda: x.to_sparse_bsc((1, 1)))):
        _reject(info, make, rf"is a sparse tensor \(layout torch.{layout}\); polycos needs strided tensors")
    for layout in (torch.strided, torch.jagged):
        nested = torch.nested.nested_tensor([torch.ones(3), torch.ones(2)], layout=layout)
        _raises(TypeError, rf"x1 is a nested tensor \(layout {layout}\)", polycos.cosine_similarity, nested, x)
        _raises(TypeError, rf"x2 is a nested tensor \(layout {layout}\)", polycos.cosine_similarity, x, nested)
    _reject(info, lambda: torch.quantize_per_tensor(x, 0.1, 0, torch.qint8),
            r"is a quantized tensor \(dtype torch.qint8\); pass x[12].dequantize\(\)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MaskedTensor is a prototype and says so
        from torch.masked import masked_tensor

        _reject(info, lambda: masked_tensor(x, x > 0), r"is a torch.masked.MaskedTensor; polycos does not apply masks")


@attack("containers", "torch_dtypes", backends=("torch",))
def _(info: BackendInfo) -> None:
    """float8/float4 rejected; bits and sub-byte integers rejected; 8- to 64-bit integers and bool promoted."""
    import torch

    floats = [n for n in dir(torch) if n.startswith(("float8_", "float4_")) and isinstance(getattr(torch, n), torch.dtype)]
    assert "float8_e4m3fn" in floats
    for n in floats:
        dt = getattr(torch, n)
        _reject(info, lambda dt=dt: torch.empty(2, 3, dtype=dt),
                rf"has dtype torch.{n}, which polycos does not support on torch arrays")
    odd = [n for n in dir(torch) if (n.startswith("bits") or (n[:4] in ("uint", "int1", "int2", "int3", "int4", "int5", "int6", "int7")
                                     and n[-1] in "1234567" and n not in ("uint8", "int8")))
           and isinstance(getattr(torch, n), torch.dtype) and n not in ("uint16", "uint32", "uint64", "int16", "int32", "int64")]
    assert "bits8" in odd
    assert "uint4" in odd
    for n in odd:
        dt = getattr(torch, n)
        _reject(info, lambda dt=dt: torch.empty(2, 3, dtype=dt), rf"has dtype torch.{n}, which torch cannot convert")
    for n in ("complex32", "complex64", "complex128"):
        _reject(info, lambda n=n: torch.ones(2, 3, dtype=getattr(torch, n)), rf"has complex dtype torch.{n}")
    y = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    for n in ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64"):
        a = torch.tensor([[1, 0, 1], [1, 1, 0]]).to(getattr(torch, n))
        s = _check_forward(info, a, y, r1=np.array([[1.0, 0, 1], [1, 1, 0]]))
        assert s.dtype == torch.float32


@attack("containers", "torch_subclasses_and_parameters", backends=("torch",))
def _(info: BackendInfo) -> None:
    import torch

    class Sub(torch.Tensor):
        pass

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    y = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    s = _check_forward(info, x.as_subclass(Sub), y, r1=x.numpy().astype(np.float64))
    assert isinstance(s, torch.Tensor)
    _check_forward(info, torch.nn.Parameter(x), y, r1=x.numpy().astype(np.float64))


@attack("containers", "jax_dtypes", backends=("jax",))
def _(info: BackendInfo) -> None:
    """float8/float4 rejected, PRNG keys rejected; JAX's own int2/int4 are integers (promoted, exact)."""
    import jax
    import jax.numpy as jnp

    y = jnp.asarray([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    for n in [n for n in dir(jnp) if n.startswith(("float8_", "float4_"))]:
        _reject(info, lambda n=n: jnp.zeros((2, 3), getattr(jnp, n)), rf"has dtype {n}, which polycos does not support on jax arrays")
    _reject(info, lambda: jax.random.split(jax.random.key(0), 6).reshape(2, 3), r"has dtype key<fry>, which is not numeric")
    _reject(info, lambda: jnp.ones((2, 3), jnp.complex64), r"has complex dtype complex64")
    for n in ("int4", "uint2", "bool"):
        if not hasattr(jnp, n):
            continue
        vals = np.array([[1, 0, 1], [1, 1, 0]])
        a = jnp.asarray(vals, getattr(jnp, n))
        s = _check_forward(info, a, y, r1=vals.astype(np.float64))
        assert s.dtype == jnp.float32


@attack("containers", "array_api_strict_dtypes", backends=("array_api_strict",))
def _(info: BackendInfo) -> None:
    import array_api_strict as xs

    y = xs.asarray([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    _reject(info, lambda: xs.ones((2, 3), dtype=xs.complex128), r"has complex dtype .*complex128")
    for dt in (xs.bool, xs.int8, xs.uint64, xs.int64):
        a = xs.astype(xs.asarray([[1, 0, 1], [1, 1, 0]]), dt)
        s = _check_forward(info, a, y, r1=np.array([[1.0, 0, 1], [1, 1, 0]]))
        assert s.dtype == xs.float64


@attack("containers", "bfloat16_with_float16_promotes_to_float32")
def _(info: BackendInfo) -> None:
    """As torch and JAX promote the pair (NumPy has no rule for it)."""
    if not _has(info, "bfloat16", "float16"):
        pytest.skip(f"{info.name} lacks bfloat16 or float16")
    r = _rng(10)
    x, y = _round_to(r.standard_normal((3, 4)), "bfloat16"), _round_to(r.standard_normal((3, 4)), "float16")
    s = _check_forward(info, info.array(x, "bfloat16"), info.array(y, "float16"), r1=x, r2=y, dtype="float32")
    assert _dt(s) == "float32"
    grads = polycos.cosine_similarity_vjp(info.array(np.ones(3), "float32"), info.array(x, "bfloat16"),
                                          info.array(y, "float16"))
    assert [_dt(g) for g in grads] == ["float32", "float32"]
    assert_vjp_matches_reference(grads, np.ones(3), x, y, ulps=4)


# =========================================================================== devices


@attack("devices", "device_in_device_out")
def _(info: BackendInfo) -> None:
    """Every route returns arrays on the inputs' device (as the backend reports it), of the inputs' library."""
    backend = _backends.get(info.name)
    a, b = _two(info, (4, 3), (4, 3))
    dev = backend.device(a)
    outs = [polycos.cosine_similarity(a, b), *polycos.cosine_similarity_vjp(info.array(np.ones(4), "float32"), a, b),
            polycos.pairwise_cosine_similarity(a, b),
            *polycos.pairwise_cosine_similarity_vjp(info.array(np.ones((4, 4)), "float32"), a, b),
            polycos.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1),
            polycos.cosine_similarity(a[:0, :], b[:0, :]), *polycos.cosine_similarity_vjp(info.array(np.ones(0), "float32"), a[:0, :], b[:0, :]),
            polycos.cosine_similarity(a[0, 0], b[0, 0], dim=0)]
    for out in outs:
        _owned(info, out)
        assert backend.same_device(backend.device(out), dev), f"result on {backend.device(out)}, inputs on {dev}"


@attack("devices", "torch_meta_tensors", backends=("torch",))
def _(info: BackendInfo) -> None:
    import torch

    m1, m2 = torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta")
    s = polycos.cosine_similarity(m1, m2)
    assert s.device.type == "meta"
    assert tuple(s.shape) == (4,)
    g1, g2 = polycos.cosine_similarity_vjp(torch.empty(4, device="meta"), m1, m2)
    assert g1.device.type == g2.device.type == "meta"
    assert tuple(g1.shape) == (4, 3)
    p = polycos.pairwise_cosine_similarity(m1, m2)
    assert p.device.type == "meta"
    assert tuple(p.shape) == (4, 4)
    cpu = torch.ones(4, 3)
    _raises(ValueError, r"x1 and x2 must be on the same device, got meta and cpu", polycos.cosine_similarity, m1, cpu)
    _raises(ValueError, r"x1 and x2 must be on the same device, got cpu and meta", polycos.pairwise_cosine_similarity, cpu, m2)
    with pytest.raises(ValueError, match=r"x1 and grad must be on the same device, got cpu and meta"):
        polycos.cosine_similarity_vjp(torch.ones(4, device="meta"), cpu, cpu)


@attack("devices", "array_api_strict_devices", backends=("array_api_strict",))
def _(info: BackendInfo) -> None:
    """Every device, incl. those without float64: results, gradients and helpers stay on the input's device."""
    import array_api_strict as xs

    devices = xs.__array_namespace_info__().devices()
    assert len(devices) >= 3
    r = _rng(11)
    x, y = r.standard_normal((4, 3)), r.standard_normal((4, 3))
    for dev in devices:
        has64 = "float64" in xs.__array_namespace_info__().dtypes(device=dev, kind="real floating")
        dt = xs.float64 if has64 else xs.float32
        a, b = xs.asarray(x, dtype=dt, device=dev), xs.asarray(y, dtype=dt, device=dev)
        for out in (polycos.cosine_similarity(a, b), *polycos.cosine_similarity_vjp(xs.ones(4, dtype=dt, device=dev), a, b),
                    polycos.pairwise_cosine_similarity(a, b), *polycos.pairwise_cosine_similarity_vjp(xs.ones((4, 4), dtype=dt, device=dev), a, b),
                    polycos.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1),
                    polycos.cosine_similarity(a[:0, :], b[:0, :]), polycos.cosine_similarity(a[0, 0], b[0, 0], dim=0)):
            assert out.device == dev, f"result on {out.device}, inputs on {dev}"
            assert out.dtype == dt
        assert_matches_reference(polycos.cosine_similarity(a, b), _round_to(x, _dtname(dt)), _round_to(y, _dtname(dt)))
        ints = xs.asarray([[1, 2, 3]], device=dev)
        s = polycos.cosine_similarity(ints, ints)
        assert s.device == dev
        assert s.dtype == xs.__array_namespace_info__().default_dtypes(device=dev)["real floating"]
    d0, d1 = devices[0], devices[1]
    a, b = xs.ones((2, 3), device=d0), xs.ones((2, 3), device=d1)
    _raises(ValueError, rf"x1 and x2 must be on the same device, got .*{d0!r}.* and .*{d1!r}".replace("(", r"\(").replace(")", r"\)"),
            polycos.cosine_similarity, a, b)
    with pytest.raises(ValueError, match=r"x1 and grad must be on the same device"):
        polycos.cosine_similarity_vjp(xs.ones(2, device=d1), a, a)


# =========================================================================== extreme values


def _extreme_rows(dtype: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    fi = _finfo(dtype)
    big, tiny, sub = float(fi.max), float(fi.smallest_normal), float(fi.smallest_subnormal)
    if which == "top":
        x1 = [[big, big / 3, -big / 2], [big, big, big], [big, -big, 0.0], [-big, big / 1e3, 0.0], [big / 2, 1.0, 0.0],
              [big, 2 * tiny, 0.0]]
        x2 = [[big / 3, big, big / 2], [big, -big, big], [big, big, big], [big, big, -big], [1.0, big / 2, 0.0],
              [big, 0.0, 3 * tiny]]
    elif which == "normal_bottom":
        x1 = [[tiny, 3 * tiny, -tiny], [tiny, 0.0, 0.0], [4 * tiny, -2 * tiny, tiny]]
        x2 = [[2 * tiny, -tiny, tiny], [tiny, tiny, 0.0], [1.0, 1.0, 1.0]]
    else:  # subnormal
        x1 = [[sub, 2 * sub, -sub], [sub, 0.0, 0.0], [3 * sub, 0.0, 5 * sub]]
        x2 = [[3 * sub, -sub, sub], [sub, sub, 0.0], [sub, sub, sub]]
    while len(x1) < 6:  # one shape for every set: JAX compiles once per dtype and eps
        x1.append([1.0, 2.0, -3.0])
        x2.append([-2.0, 0.5, 1.0])
    return _round_to(np.array(x1), dtype), _round_to(np.array(x2), dtype)


def _assert_tight_where_linear(info: BackendInfo, grads: Any, x1: np.ndarray, x2: np.ndarray, eps: float) -> None:
    """Rows whose norms are both at most ``eps``: the gradient ``g x2 / eps**2`` to a few ulps of itself.

    (``assert_vjp_matches_reference`` scales its tolerance by ``g / max(||x||, eps)``, which
    is far above such a gradient when the rows are tiny.)
    """
    refs = reference_vjp(np.ones(len(x1)), x1, x2, 1, eps)
    n1, n2 = np.linalg.norm(x1, axis=1), np.linalg.norm(x2, axis=1)
    rows = (n1 <= eps) & (n2 <= eps) & (eps > 0)
    for i, (d, ref) in enumerate(zip(grads, refs, strict=True)):
        got, dt = _np(d), _dt(d)
        fi = _finfo(dt)
        tol = 8 * ULP[dt] * np.max(np.abs(ref), axis=1, keepdims=True) + float(fi.smallest_subnormal)
        ok = np.abs(got - ref) <= tol
        if info.grad_flushes_subnormals:  # XLA computes the gradient with subnormal inputs flushed to 0
            ok |= (got == 0) & (np.abs(ref) < float(fi.smallest_normal))
            flushed = reference_vjp(np.ones(len(x1)), _flushed(x1, dt), _flushed(x2, dt), 1, eps)[i]
            ok |= np.abs(got - flushed) <= 8 * ULP[dt] * np.max(np.abs(flushed), axis=1, keepdims=True) + float(
                fi.smallest_subnormal)
        bad = ~ok & rows[:, None] & np.isfinite(ref)
        assert not bad.any(), f"{dt}: gradient {got[bad]} where the exact one is {ref[bad]}"


def _extremes(which: str, eps: float) -> Callable[[BackendInfo], None]:
    def run(info: BackendInfo) -> None:
        for dtype in info.dtypes:
            x1, x2 = _extreme_rows(dtype, which)
            a1, a2 = info.array(x1, dtype), info.array(x2, dtype)
            _check_forward(info, a1, a2, eps=eps, r1=x1, r2=x2, dtype=dtype, exact=True)
            grads = _check_vjp(info, np.ones(len(x1)), a1, a2, eps=eps, r1=x1, r2=x2)
            _assert_tight_where_linear(info, grads, x1, x2, eps)
            # the same rows through the pairwise route (diagonal = the row-wise values)
            p = polycos.pairwise_cosine_similarity(a1, a2, eps=eps)
            diag = np.diagonal(_np(p))
            want = exact_reference(x1, x2, eps=eps)
            ok = np.abs(diag - want) <= ULP[dtype] * (1 + x1.shape[-1] * (dtype == "float64"))
            if info.grad_flushes_subnormals:
                ok |= np.abs(diag - exact_reference(_flushed(x1, dtype), _flushed(x2, dtype), eps=eps)) <= ULP[dtype]
            assert ok.all(), f"{dtype} pairwise diagonal {diag} != {want}"

    return run


attack("extremes", "top_of_the_range_eps0")(_extremes("top", 0.0))
attack("extremes", "top_of_the_range_eps_default")(_extremes("top", 1e-8))
attack("extremes", "smallest_normals_eps0")(_extremes("normal_bottom", 0.0))
attack("extremes", "smallest_normals_below_eps")(_extremes("normal_bottom", 1e-8))
attack("extremes", "subnormals_eps0")(_extremes("subnormal", 0.0))
attack("extremes", "subnormals_below_eps")(_extremes("subnormal", 1e-8))


@attack("extremes", "tiny_rows_below_eps_gradient")
def _(info: BackendInfo) -> None:
    """|x| ~ 1e-30 with eps = 1e-8: the function is linear there; the gradient ~2e-14 is an ordinary number."""
    x1, x2 = np.array([[1e-30, 3e-30, -1e-30]], np.float32), np.array([[2e-30, -1e-30, 1e-30]], np.float32)
    g1, _ = _check_vjp(info, np.ones(1), info.array(x1, "float32"), info.array(x2, "float32"), eps=1e-8, autodiff=True)
    assert np.all(np.abs(_np(g1)) > 1e-15)


@attack("extremes", "eps_edge_values")
def _(info: BackendInfo) -> None:
    """-0.0 is 0.0; subnormal and huge eps; eps as a 0-d array of the library, NumPy scalars, Decimal, Fraction."""
    r = _rng(12)
    x, y = r.standard_normal((3, 4)), r.standard_normal((3, 4))
    x[1] = 0.0
    dt = "float64" if _has(info, "float64") else "float32"
    a, b = info.array(x, dt), info.array(y, dt)
    rx, ry = _round_to(x, dt), _round_to(y, dt)
    zero = to_numpy(polycos.cosine_similarity(a, b, eps=0.0))
    assert to_numpy(polycos.cosine_similarity(a, b, eps=-0.0)).tobytes() == zero.tobytes()
    values = [(5e-324, 5e-324), (1e300, 1e300), (float(np.finfo(np.float64).max), float(np.finfo(np.float64).max)),
              (np.float16(0.5), 0.5), (np.float32(0.25), 0.25), (np.int64(2), 2.0),
              (decimal.Decimal("0.5"), 0.5), (fractions.Fraction(1, 4), 0.25), (info.array(np.array(0.5), dt), 0.5)]
    if _heavy(info):  # eps is static: one compilation per value; the conversions are checked on the others
        values = [values[0], values[2], values[-1]]
    for eps, value in values:
        s = polycos.cosine_similarity(a, b, eps=eps)
        assert_matches_reference(s, rx, ry, 1, value)
        if value >= 1e300:
            assert np.all(np.abs(_np(s)) <= 1e-299)  # every norm below eps: s = <x1, x2> / eps**2
        grads = polycos.cosine_similarity_vjp(info.array(np.ones(3), dt), a, b, eps=eps)
        _assert_grads(info, grads, np.ones(3), rx, ry, 1, value, 4.0)


def _huge_eps(dtypes: tuple[str, ...]) -> Callable[[BackendInfo], None]:
    """``eps`` far beyond the dtype's range (valid: finite): every norm is below it, s ~ <x1, x2> / eps**2.

    Quietly (warnings as errors, ``np.errstate(all="raise")``), on every route, never NaN.
    """

    def run(info: BackendInfo) -> None:
        todo = [d for d in dtypes if d in info.dtypes]
        if not todo:
            pytest.skip(f"{info.name} computes in none of {dtypes}")
        x, y = np.array([[1.0, 2.0, 3.0], [-4.0, 0.5, 6.0]]), np.array([[3.0, -1.0, 2.0], [1.0, 1.0, 1.0]])
        for dtype in todo:
            a, b = info.array(x, dtype), info.array(y, dtype)
            for eps in (1e39, 1e300):
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    with np.errstate(all="raise"):
                        s = _computed(polycos.cosine_similarity(a, b, eps=eps))
                        grads = _computed(polycos.cosine_similarity_vjp(info.array(np.ones(2), dtype), a, b, eps=eps))
                        p = _computed(polycos.pairwise_cosine_similarity(a, b, eps=eps))
                        pg = _computed(polycos.pairwise_cosine_similarity_vjp(info.array(np.ones((2, 2)), dtype), a, b, eps=eps))
                assert_matches_reference(s, x, y, 1, eps)
                _assert_grads(info, grads, np.ones(2), x, y, 1, eps, 4.0)
                assert_matches_reference(p, x[:, None, :], y[None, :, :], -1, eps)
                for d in (*grads, *pg):
                    assert not np.isnan(_np(d)).any()

    return run


attack("extremes", "eps_beyond_the_range_of_half_dtypes",
       )(
    _huge_eps(("float16", "bfloat16")))
attack("extremes", "eps_beyond_the_range_of_float32")(
    _huge_eps(("float32", "float64")))


# =========================================================================== empty results, huge broadcasts


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_growth(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and how far the process's peak resident memory rose above its level before (bytes)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pytest.skip("peak memory needs Linux's /proc/self/clear_refs")
    base = _proc_status("VmRSS")
    out = fn()
    return out, _proc_status("VmHWM") - base


def _computed(out: Any) -> Any:
    return tuple(_computed(o) for o in out) if isinstance(out, tuple) else (out.compute() if hasattr(out, "compute") else out)


SLACK = 48 * 2**20
D, M = 512, 100_000  # a (1, M, D) float32 stride-0 view: 195 MiB if materialised, 390 MiB in float64


def _empty_against_huge(info: BackendInfo) -> tuple[Any, Any, Any, Any, Any, Any]:
    xp = _xp(info)
    x1 = info.array(np.zeros((0, 1, D)), "float32")
    x2 = xp.broadcast_to(info.array(np.ones((1, 1, D)), "float32"), (1, M, D))
    p1 = info.array(np.zeros((0, D)), "float32")
    p2 = xp.broadcast_to(info.array(np.ones((1, D)), "float32"), (M, D))
    g = info.array(np.zeros((0, M)), "float32")
    return xp, x1, x2, p1, p2, g


@attack("broadcasts", "empty_result_against_a_huge_stride0_partner")
def _(info: BackendInfo) -> None:
    """Issue 13: (0, 1, D) against a (1, 10**5, D) broadcast view once allocated the partner in float64."""
    _, x1, x2, p1, p2, _ = _empty_against_huge(info)
    for fn in (lambda: polycos.cosine_similarity(x1, x2, dim=-1), lambda: polycos.pairwise_cosine_similarity(p1, p2),
               lambda: polycos.cosine_similarity(x2, x1, dim=-1), lambda: polycos.pairwise_cosine_similarity(p2, p1)):
        _computed(fn())  # warm: first calls import and compile
        out, grew = _peak_growth(lambda fn=fn: _computed(fn()))
        assert tuple(out.shape) in ((0, M), (M, 0))
        assert _dt(out) == "float32"
        assert grew < SLACK, f"{grew / 2**20:.0f} MiB for an empty result"


@attack("broadcasts", "empty_result_gradients_cost_one_gradient")
def _(info: BackendInfo) -> None:
    """The gradient of the (1, M, D) view is (1, M, D) zeros: at most that much memory, nothing in float64."""
    _, x1, x2, p1, p2, g = _empty_against_huge(info)
    size = M * D * 4
    for fn in (lambda: polycos.cosine_similarity_vjp(g, x1, x2, dim=-1),
               lambda: polycos.pairwise_cosine_similarity_vjp(g, p1, p2)):
        _computed(fn())
        (d1, d2), grew = _peak_growth(lambda fn=fn: _computed(fn()))
        assert tuple(d2.shape) in ((1, M, D), (M, D))
        assert _dt(d2) == "float32"
        assert not np.any(to_numpy(d2))
        assert next(iter(d1.shape)) == 0
        assert grew < 1.25 * size + SLACK, f"{grew / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB gradient"


@attack("broadcasts", "empty_result_autograd_backward", backends=("torch", "jax"),
        )
def _(info: BackendInfo) -> None:
    """Through the library's autodiff, with the broadcast inside the graph: at most one gradient's memory."""
    x1 = info.array(np.zeros((0, 1, D)), "float32")
    one = info.array(np.ones((1, 1, D)), "float32")
    xp = _xp(info)

    def step() -> Any:
        return info.grad_of(lambda a, b: polycos.cosine_similarity(a, xp.broadcast_to(b, (1, M, D)), dim=-1), x1, one)

    step()
    (_d1, d2), grew = _peak_growth(step)
    assert tuple(d2.shape) == (1, 1, D)
    assert not np.any(to_numpy(d2))
    assert grew < 1.25 * M * D * 4 + SLACK, f"{grew / 2**20:.0f} MiB"


@attack("broadcasts", "stride0_inputs_are_not_materialised", backends=("numpy", "torch"))
def _(info: BackendInfo) -> None:
    """Kernel backends read stride-0 rows in place: (N, D) views of one row cost nothing beyond the result.

    (The array-API core computes elementwise products at the broadcast shape by design, so this
    holds for the backends with a native kernel only.)
    """
    xp = _xp(info)
    n = 200_000
    a = xp.broadcast_to(info.array(_rng(13).standard_normal((1, D)), "float32"), (n, D))
    b = xp.broadcast_to(info.array(_rng(14).standard_normal((1, D)), "float32"), (n, D))
    polycos.cosine_similarity(a, b)
    s, grew = _peak_growth(lambda: polycos.cosine_similarity(a, b))
    assert tuple(s.shape) == (n,)
    assert grew < n * 4 * 8 + SLACK, f"{grew / 2**20:.0f} MiB; a materialised input is {n * D * 4 / 2**20:.0f} MiB"
    assert len(set(to_numpy(s).tolist())) == 1


# =========================================================================== threads


@attack("threads", "concurrent_calls_agree_with_serial_ones")
def _(info: BackendInfo) -> None:
    """16 threads (8 on JAX and dask), each a different call (dtypes, routes), started together."""
    r = _rng(15)
    calls: list[Callable[[], Any]] = []
    for i, dtype in enumerate([d for d in ("float32", "float64", "float16") if d in info.dtypes] * 6):
        x, y = info.array(r.standard_normal((4, 3)), dtype), info.array(r.standard_normal((4, 3)), dtype)
        g = info.array(np.linspace(-1, 1, 4), dtype)
        kind = i % 4
        calls.append(
            (lambda x=x, y=y: polycos.cosine_similarity(x, y)) if kind == 0 else
            (lambda x=x, y=y, g=g: polycos.cosine_similarity_vjp(g, x, y)) if kind == 1 else
            (lambda x=x, y=y: polycos.pairwise_cosine_similarity(x, y)) if kind == 2 else
            (lambda x=x, y=y: polycos.cosine_similarity(x[:, None, :], y[None, :, :], dim=-1))
        )
    calls = calls[: 8 if _heavy(info) else 16]
    serial = [_bits(c()) for c in calls]
    got: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(calls))

    def work(i: int) -> None:
        try:
            barrier.wait()
            got[i] = _bits(calls[i]())
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, repr(errors[:2])
    assert got == serial


def _bits(out: Any) -> Any:
    if isinstance(out, tuple):
        return tuple(_bits(o) for o in out)
    return to_numpy(out).tobytes()


# =========================================================================== hygiene under hostile settings


HOSTILE_X = np.array([[1e300, 1e300, 1.0], [0.0, 0.0, 0.0], [np.nan, 1.0, 2.0], [np.inf, 1.0, 0.0],
                      [1e-310, 3e-320, 0.0], [1.0, 2.0, 3.0]])
HOSTILE_Y = np.array([[1e300, 1.0, -1e300], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0],
                      [1e-310, 0.0, 5e-324], [0.0, 0.0, 0.0]])


def _hostile_calls(info: BackendInfo, dtype: str, eps: float) -> list[Any]:
    with np.errstate(all="ignore"):
        x, y = _round_to(HOSTILE_X, dtype), _round_to(HOSTILE_Y, dtype)
    a, b = info.array(x, dtype), info.array(y, dtype)
    big_g = info.array(np.full(6, 1e4 if dtype in ("float16",) else 1.0), dtype)
    out = [
        polycos.cosine_similarity(a, b, eps=eps),
        *polycos.cosine_similarity_vjp(big_g, a, b, eps=eps),
        polycos.pairwise_cosine_similarity(a, b, eps=eps),
        *polycos.pairwise_cosine_similarity_vjp(info.array(np.ones((6, 6)), dtype), a, b, eps=eps),
        polycos.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1, eps=eps),
    ]
    return [to_numpy(o).tobytes() for o in out]


@attack("hygiene", "errstate_raise_and_warnings_as_errors_change_nothing")
def _(info: BackendInfo) -> None:
    """NaN/inf rows, zero rows with eps = 0, 1e300 and subnormal rows: no warning, the same bits."""
    for dtype in info.dtypes:
        for eps in (0.0, 1e-8) if info.examples is None else (0.0,):  # JAX, dask: a compilation / graph per call
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = _hostile_calls(info, dtype, eps)
            for mode in ("raise", "warn", "ignore"):
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    with np.errstate(all=mode):
                        assert _hostile_calls(info, dtype, eps) == base, (dtype, eps, mode)


@attack("hygiene", "float64_grad_beyond_float16_range_is_quiet")
def _(info: BackendInfo) -> None:
    """A float64 upstream gradient of 1e6 for float16 inputs: cast as autograd would hold it (inf), no warning."""
    if not _has(info, "float16"):
        pytest.skip(f"{info.name} has no float16")
    gdt = "float64" if _has(info, "float64") else "float32"
    x, y = _two(info, dtype="float16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            grads = _computed(polycos.cosine_similarity_vjp(info.array(np.full(2, 1e6), gdt), x, y))
    assert [_dt(d) for d in grads] == ["float16", "float16"]


@attack("hygiene", "torch_default_dtype_and_threads", backends=("torch",))
def _(info: BackendInfo) -> None:
    """Integer inputs follow torch.get_default_dtype() (documented); thread counts do not change the bits."""
    import torch

    ints = torch.tensor([[1, 2, 3], [4, -5, 6]])
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    try:
        torch.set_default_dtype(torch.float64)
        s = polycos.cosine_similarity(ints, ints * 2 + 1)
        assert s.dtype == torch.float64
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(old)
    x = torch.randn(4000, 33, generator=torch.Generator().manual_seed(5))
    y = torch.randn(4000, 33, generator=torch.Generator().manual_seed(6))
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append((polycos.cosine_similarity(x, y).numpy().tobytes(),
                         *(g.numpy().tobytes() for g in polycos.cosine_similarity_vjp(torch.ones(4000), x, y))))
    finally:
        torch.set_num_threads(threads)
    assert outs[0] == outs[1]
    assert torch.get_num_threads() == threads


# =========================================================================== the runner


def _params() -> list[Any]:
    out = []
    for a in ATTACKS:
        for info in BACKENDS:
            if a.backends is not None and info.name not in a.backends:
                continue
            marks = [pytest.mark.xfail(strict=True, reason=a.xfail[info.name])] if info.name in a.xfail else []
            out.append(pytest.param(a, info, id=f"{a.cls}-{a.name}-{info.name}", marks=marks))
    return out


@pytest.mark.parametrize(("case", "info"), _params())
def test_attack(case: Attack, info: BackendInfo) -> None:
    case.run(info)


def test_every_class_is_attacked_on_every_backend() -> None:
    """The table's shape: each class has cases, and every installed backend meets every class."""
    for cls in CLASSES:
        cases = [a for a in ATTACKS if a.cls == cls]
        assert cases, f"no attack of class {cls}"
        for info in BACKENDS:
            assert any(a.backends is None or info.name in a.backends for a in cases), (cls, info.name)


#: One fresh JAX interpreter with jax_enable_x64 and two host devices (both set before import),
#: shared by the two tests below; each part reports "ok" or its traceback.
_JAX_FRESH = r"""
import json, traceback
import jax, numpy as np, jax.numpy as jnp, polycos
from polycos.testing import exact_reference
out = {}
try:
    assert jax.config.jax_enable_x64
    x1 = np.array([[1.7e308, 1e308, -0.5e308], [1e-300, 3e-300, -1e-300]])
    x2 = np.array([[1e308, 1.7e308, 1e308], [2e-300, -1e-300, 1e-300]])
    want = exact_reference(x1, x2, eps=0.0)
    for s in (polycos.cosine_similarity(jnp.asarray(x1), jnp.asarray(x2), eps=0.0),
              jax.jit(lambda a, b: polycos.cosine_similarity(a, b, eps=0.0))(jnp.asarray(x1), jnp.asarray(x2))):
        assert s.dtype == np.float64, s.dtype
        np.testing.assert_allclose(np.asarray(s), want, rtol=0, atol=2.0**-52)
    out["x64"] = "ok"
except BaseException:
    out["x64"] = traceback.format_exc()
try:
    d0, d1 = jax.devices()[:2]
    a, b = jax.device_put(jnp.ones((2, 3)), d0), jax.device_put(jnp.ones((2, 3)), d1)
    for fn, args, match in ((polycos.cosine_similarity, (a, b), "x1 and x2 must be on the same device"),
                            (polycos.pairwise_cosine_similarity, (a, b), "x1 and x2 must be on the same device"),
                            (polycos.cosine_similarity_vjp, (jax.device_put(jnp.ones(2), d1), a, a),
                             "x1 and grad must be on the same device")):
        try:
            fn(*args)
        except ValueError as e:
            assert match in str(e), str(e)
            assert str(d0) in str(e) and str(d1) in str(e), str(e)
        else:
            raise AssertionError("no error")
    assert polycos.cosine_similarity(b, b).devices() == {d1}
    assert polycos.cosine_similarity(b, jnp.ones((2, 3))).devices() == {d1}  # uncommitted: JAX moves it
    assert all(g.devices() == {d1} for g in polycos.cosine_similarity_vjp(jnp.ones(2), b, b))
    out["devices"] = "ok"
except BaseException:
    out["devices"] = traceback.format_exc()
print(json.dumps(out))
"""
_JAX_RESULT: dict[str, str] = {}


def _jax_fresh(part: str) -> str:
    import json
    import os
    import subprocess

    if "jax" not in NAMES:
        pytest.skip("JAX is not installed")
    if not _JAX_RESULT:
        env = {**os.environ, "JAX_ENABLE_X64": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        done = subprocess.run([sys.executable, "-c", _JAX_FRESH], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        _JAX_RESULT.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return _JAX_RESULT[part]


def test_jax_x64_extremes_in_a_fresh_interpreter() -> None:
    """JAX with jax_enable_x64: float64 rows near 1.7e308 and near 1e-300, eagerly and under jit."""
    assert _jax_fresh("x64") == "ok"


def test_jax_committed_devices_in_a_fresh_interpreter() -> None:
    """Two host devices: arrays committed to different ones raise naming both; results stay put."""
    assert _jax_fresh("devices") == "ok"
