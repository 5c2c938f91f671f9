"""The performance targets of the spec (§5), checked against benchmark records.

Each target names a subject, an op and either a bound on ``x_floor`` or a lower
bound on the speed-up over a peer. It is checked on the float32 record of the
largest size measured for that (subject, op); the spec's reference sizes are
N = 65536, D = 256 (row-wise) and N = M = 2048, D = 128 (pairwise), which
``benchmarks/run_cpu_targets.py`` runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["TARGETS", "Target", "check"]


@dataclass(frozen=True)
class Target:
    """One line of the spec's performance table."""

    label: str
    subject: str
    op: str
    #: "x_floor" (the measured value must be <= bound) or a peer name (speed-up >= bound)
    metric: str
    bound: float

    def describe(self) -> str:
        """The target as the spec states it."""
        if self.metric == "x_floor":
            return f"<= {self.bound:g}x floor"
        if self.bound < 1:
            return f"within {1 / self.bound:.3g}x of {self.metric}"
        return f">= {self.bound:g}x faster than {self.metric}"


TARGETS: tuple[Target, ...] = (
    Target("NumPy forward", "numpy", "forward", "x_floor", 3.0),
    Target("torch eager forward", "torch", "forward", "x_floor", 3.0),
    Target("NumPy forward + vjp", "numpy", "forward+backward", "x_floor", 4.0),
    Target("torch eager forward + backward", "torch", "forward+backward", "x_floor", 4.0),
    Target("JAX jit forward", "jax", "forward", "x_floor", 2.0),
    Target("torch.compile forward", "torch-compile", "forward", "x_floor", 2.0),
    Target("JAX jit forward + backward", "jax", "forward+backward", "x_floor", 2.5),
    Target("torch.compile forward + backward", "torch-compile", "forward+backward", "x_floor", 2.5),
    Target(
        "torch fwd+bwd vs F.cosine_similarity",
        "torch",
        "forward+backward",
        "F.cosine_similarity",
        10.0,
    ),
    Target("JAX fwd+bwd vs optax", "jax", "forward+backward", "optax.cosine_similarity", 3.0),
    Target("NumPy pairwise fwd+bwd", "numpy", "pairwise+backward", "normalise+matmul", 1 / 1.5),
    Target("torch pairwise fwd+bwd", "torch", "pairwise+backward", "normalise+matmul", 1 / 1.5),
    Target("JAX pairwise fwd+bwd", "jax", "pairwise+backward", "normalise+matmul", 1 / 1.5),
    Target("CuPy forward (>= 80% bandwidth)", "cupy", "forward", "x_floor", 1.25),
    Target(
        "CuPy forward + backward (>= 80% bandwidth)", "cupy", "forward+backward", "x_floor", 1.25
    ),
    Target(
        "CuPy fwd+bwd vs torch CUDA eager",
        "cupy",
        "forward+backward",
        "torch CUDA F.cosine_similarity",
        3.0,
    ),
)


def _size(rec: dict[str, Any]) -> int:
    return math.prod(rec["shape"])


def check(results: list[dict[str, Any]], dtype: str = "float32") -> list[dict[str, Any]]:
    """Evaluate every target on the measured records.

    Parameters
    ----------
    results : list of dict
        The ``results`` of a benchmark document.
    dtype : str, optional
        The dtype the targets are stated for.

    Returns
    -------
    list of dict
        Per target: ``label``, ``target`` (text), ``shape`` (or ``None``), ``value``
        (the measured ``x_floor`` or speed-up, or ``None``) and ``status``
        (``"met"``, ``"missed"`` or ``"not measured"``).

    Examples
    --------
    >>> rec = {"name": "numpy", "kind": "polycos", "op": "forward", "dtype": "float32",
    ...        "shape": [8, 4], "x_floor": 2.5, "speedup": {}}
    >>> [r["status"] for r in check([rec]) if r["label"] == "NumPy forward"]
    ['met']
    """
    out = []
    for t in TARGETS:
        recs = [
            r
            for r in results
            if r["kind"] == "polycos"
            and r["name"] == t.subject
            and r["op"] == t.op
            and r["dtype"] == dtype
        ]
        row: dict[str, Any] = {
            "label": t.label,
            "target": t.describe(),
            "shape": None,
            "value": None,
        }
        if recs:
            rec = max(recs, key=_size)
            value = rec["x_floor"] if t.metric == "x_floor" else rec["speedup"].get(t.metric)
            row["shape"] = rec["shape"]
            row["value"] = value
        value = row["value"]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            row["status"] = "not measured"
        elif t.metric == "x_floor":
            row["status"] = "met" if value <= t.bound else "missed"
        else:
            row["status"] = "met" if value >= t.bound else "missed"
        out.append(row)
    return out
