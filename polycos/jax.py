r"""JAX: :func:`cosine_similarity` and :func:`pairwise_cosine_similarity` for ``jax.Array``.

The definition is documented once, at :func:`polycos.cosine_similarity`. Here it
is a :func:`jax.custom_jvp` function whose primal is the fused CPU kernel inside
``jit`` (``jax.ffi``) on CPU and the array-API core elsewhere, and whose tangent
rule is a linear primitive: forward mode evaluates the core's JVP, reverse mode
transposes it into one call of the kernel's backward. ``jit``, ``vmap``,
``grad``, ``jvp``, ``jacfwd``, ``jacrev`` and ``hessian`` all work
(docs/backends/jax.md).

Examples
--------
>>> import jax
>>> import jax.numpy as jnp
>>> from polycos.jax import cosine_similarity
>>> a = jnp.array([[1.0, 2.0], [3.0, 4.0]])
>>> b = jnp.array([[5.0, 6.0], [7.0, 8.0]])
>>> [round(v, 4) for v in cosine_similarity(a, b, dim=1).tolist()]
[0.9734, 0.9972]
>>> loss = jax.jit(lambda a, b: cosine_similarity(a, b).sum())
>>> jax.grad(loss)(a, b).round(4)
Array([[ 0.0916, -0.0458],
       [ 0.012 , -0.009 ]], dtype=float32)
>>> jax.jvp(lambda a: cosine_similarity(a, b), (a,), (jnp.ones_like(a),))[1].round(4)
Array([0.0458, 0.003 ], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from polycos import _backends, _validate

__all__ = ["cosine_similarity", "export_safety_checks", "pairwise_cosine_similarity"]


def _as_jax(**xs: Any) -> list[Any]:
    out = []
    for name, x in xs.items():
        if isinstance(x, np.ndarray | np.generic):  # as jax.numpy functions accept them,
            # after NumPy's input policy (masked arrays, np.matrix, dtypes), with its messages
            (x,) = _backends.get("numpy").accept(np, ((name, x),))
            x = jax.numpy.asarray(x)
        if not isinstance(x, jax.Array):
            t = type(x)
            raise TypeError(
                f"{name} must be a jax.Array for polycos.jax, got {t.__module__}.{t.__qualname__} "
                "(polycos.cosine_similarity accepts every array library)"
            )
        out.append(x)
    return out


def _static_eps(eps: Any) -> None:
    if isinstance(eps, jax.core.Tracer):
        raise _validate.traced_error("eps", eps)


def cosine_similarity(
    x1: jax.Array,
    x2: jax.Array,
    dim: int | None = None,
    eps: float = 1e-8,
    *,
    axis: int | None = None,
) -> jax.Array:
    """:func:`polycos.cosine_similarity` for JAX arrays (same arguments, same definition).

    NumPy inputs are converted, as ``jax.numpy`` functions do; ``dim`` and
    ``eps`` are static (Python numbers). With ``jax_enable_x64`` off, float64
    requests give float32, as JAX promotes.
    """
    x1, x2 = _as_jax(x1=x1, x2=x2)
    _static_eps(eps)
    call = _validate.validate(x1, x2, dim, eps, axis=axis)
    return call.backend.forward(call)


def pairwise_cosine_similarity(x1: jax.Array, x2: jax.Array | None = None, *, eps: float = 1e-8) -> jax.Array:
    """:func:`polycos.pairwise_cosine_similarity` for JAX arrays (a ``jax.custom_jvp``: forward and reverse mode)."""
    (x1,) = _as_jax(x1=x1)
    if x2 is not None:
        (x2,) = _as_jax(x2=x2)
    _static_eps(eps)
    call = _validate.validate_pairwise(x1, x2, eps)
    return call.backend.pairwise(call)


def export_safety_checks() -> list[Any]:
    """The :class:`jax.export.DisabledSafetyCheck` list that :func:`jax.export.export` needs for polycos.

    On CPU the kernel is an XLA FFI custom call, which JAX only serialises when
    told that its target needs no compatibility guarantee: the exported code
    runs where polycos (the same version) is installed, as any FFI extension's.

    >>> import jax, jax.numpy as jnp
    >>> from jax import export
    >>> from polycos.jax import cosine_similarity, export_safety_checks
    >>> rows = jax.ShapeDtypeStruct(export.symbolic_shape("n, 8"), jnp.float32)
    >>> exp = export.export(jax.jit(cosine_similarity), disabled_checks=export_safety_checks())(rows, rows)
    >>> exp.call(jnp.ones((3, 8)), jnp.ones((3, 8))).tolist()
    [1.0, 1.0, 1.0]
    """
    from jax import export

    from polycos._kernels import _FFI_TARGETS

    return [export.DisabledSafetyCheck.custom_call(name) for name in _FFI_TARGETS]
