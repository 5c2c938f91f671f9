"""The performance targets of the spec (section 5) and issue 12, checked against benchmark records.

Each target names a polycos subject, an op, a dtype, and either a bound on
``x_floor`` (the time over the machine floor, at most ``bound``) or a lower
bound on the speed-up over a peer. Row-wise targets are judged at their
reference shape (float32 N = 32768, D = 256 as issue 12 measures; D = 16 rows at
the same bytes, N = 524288); when a run did not measure that shape, at the
largest shape it measured (the row says so). Pairwise targets hold at every
size measured from 32 x 32 up; the worst size is reported.

The targets are evaluated at every thread count a run measured. The exit
status of ``benchmarks/run_cpu_targets.py`` is decided at the reference thread
count (:func:`polycos.bench._run.reference_threads`: one thread on machines
with at most 2 CPUs, as the spec says to measure there; all threads
elsewhere); the other thread counts are reported beside it.

The CUDA rows (``cupy``) are evaluated by ``benchmarks/gpu_bench.py`` against
the device's copy bandwidth; on a CPU run they are "not measured".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["REFERENCE_SHAPE", "TARGETS", "Target", "check", "gate"]

#: issue 12's row-wise problem (float32; float64 uses the same N x D).
REFERENCE_SHAPE: tuple[int, int] = (32768, 256)
#: D = 16 rows: the same bytes as the reference problem, 16x the rows.
D16_SHAPE: tuple[int, int] = (524288, 16)
#: Pairwise targets hold from this N (and M) up.
PAIRWISE_MIN = 32


@dataclass(frozen=True)
class Target:
    """One line of the spec's performance table."""

    label: str
    subject: str
    op: str
    #: "x_floor" (the measured value must be <= bound) or a peer name (speed-up >= bound)
    metric: str
    bound: float
    dtype: str = "float32"
    #: the shape the target is stated at (row-wise); None: every size (pairwise)
    shape: tuple[int, ...] | None = REFERENCE_SHAPE
    #: False for the GPU rows, which a CPU run never measures
    cpu: bool = True

    def describe(self) -> str:
        """The target as the spec states it."""
        if self.metric == "x_floor":
            return f"<= {self.bound:g}x floor"
        if self.bound < 1:
            return f"within {1 / self.bound:.3g}x of {self.metric}"
        return f">= {self.bound:g}x faster than {self.metric}"

    def ok(self, value: float) -> bool:
        """Whether a measured value meets the target."""
        return value <= self.bound if self.metric == "x_floor" else value >= self.bound


def _pairwise(label: str, subject: str, peer: str) -> Target:
    return Target(label, subject, "pairwise+backward", peer, 1 / 1.5, shape=None)


TARGETS: tuple[Target, ...] = (
    Target("NumPy forward", "numpy", "forward", "x_floor", 1.3),
    Target("torch eager forward", "torch", "forward", "x_floor", 1.3),
    Target("JAX jit forward", "jax", "forward", "x_floor", 1.3),
    Target("NumPy forward + vjp", "numpy", "forward+backward", "x_floor", 1.5),
    Target("torch eager forward + backward", "torch", "forward+backward", "x_floor", 1.5),
    Target("JAX jit forward + backward", "jax", "forward+backward", "x_floor", 1.5),
    Target("NumPy float64 forward + vjp", "numpy", "forward+backward", "x_floor", 2.0, "float64"),
    Target("torch float64 forward + backward", "torch", "forward+backward", "x_floor", 2.0, "float64"),
    Target("JAX float64 forward + backward", "jax", "forward+backward", "x_floor", 2.0, "float64"),
    Target("NumPy D = 16 forward", "numpy", "forward", "x_floor", 2.0, shape=D16_SHAPE),
    Target("torch D = 16 forward", "torch", "forward", "x_floor", 2.0, shape=D16_SHAPE),
    Target("JAX D = 16 forward", "jax", "forward", "x_floor", 2.0, shape=D16_SHAPE),
    Target("torch fwd+bwd vs F.cosine_similarity", "torch", "forward+backward",
           "F.cosine_similarity", 10.0),
    Target("torch fwd+bwd vs torch.compile(F.cosine_similarity)", "torch", "forward+backward",
           "torch.compile(F.cosine_similarity)", 1.2),
    Target("JAX forward vs optax", "jax", "forward", "optax.cosine_similarity", 1.2),
    Target("JAX fwd+bwd vs optax", "jax", "forward+backward", "optax.cosine_similarity", 1.2),
    _pairwise("NumPy pairwise fwd+bwd", "numpy", "normalise+matmul (numpy)"),
    _pairwise("torch pairwise fwd+bwd", "torch", "normalise+matmul (torch)"),
    _pairwise("JAX pairwise fwd+bwd", "jax", "normalise+matmul (jax)"),
    _pairwise("NumPy outer-broadcast fwd+bwd", "numpy broadcast", "normalise+matmul (numpy)"),
    _pairwise("torch outer-broadcast fwd+bwd", "torch broadcast", "normalise+matmul (torch)"),
    _pairwise("JAX outer-broadcast fwd+bwd", "jax broadcast", "normalise+matmul (jax)"),
    Target("CuPy forward (>= 80% bandwidth)", "cupy", "forward", "x_floor", 1.25, cpu=False),
    Target("CuPy forward + backward (>= 80% bandwidth)", "cupy", "forward+backward", "x_floor", 1.25,
           cpu=False),
    Target("CuPy fwd+bwd vs torch CUDA eager", "cupy", "forward+backward",
           "torch CUDA F.cosine_similarity", 3.0, cpu=False),
)


def _value(t: Target, rec: dict[str, Any]) -> float | None:
    v = rec.get("x_floor") if t.metric == "x_floor" else rec.get("speedup", {}).get(t.metric)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def _evaluate(t: Target, recs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"shape": None, "value": None, "at_reference": None, "per_size": None}
    if t.shape is None:  # every size from PAIRWISE_MIN up; report the worst
        recs = [r for r in recs if min(r["shape"][:2]) >= PAIRWISE_MIN]
        per = sorted(
            ((r["shape"], _value(t, r)) for r in recs), key=lambda sv: math.prod(sv[0])
        )
        per = [(s, v) for s, v in per if v is not None]
        if per:
            worst = min(per, key=lambda sv: sv[1]) if t.metric != "x_floor" else max(per, key=lambda sv: sv[1])
            row.update(shape=worst[0], value=worst[1], at_reference=True,
                       per_size=[{"shape": s, "value": v} for s, v in per])
            row["status"] = "met" if all(t.ok(v) for _, v in per) else "missed"
            return row
    else:
        recs = [r for r in recs if r["shape"][-1] == t.shape[-1]]  # the target's D only
    if t.shape is not None and recs:
        ref = [r for r in recs if tuple(r["shape"]) == t.shape]
        if ref:
            rec, row["at_reference"] = ref[0], True
        else:  # the run did not measure the reference shape: its largest of the same D
            rec, row["at_reference"] = max(recs, key=lambda r: math.prod(r["shape"])), False
        row.update(shape=rec["shape"], value=_value(t, rec))
        if row["value"] is not None:
            row["status"] = "met" if t.ok(row["value"]) else "missed"
            return row
    row["status"] = "not measured"
    return row


def check(
    results: Sequence[dict[str, Any]], reference: str | None = None
) -> list[dict[str, Any]]:
    """Evaluate every target at every thread count measured.

    Parameters
    ----------
    results : sequence of dict
        The ``results`` of a benchmark document (records carry ``threads_setting``;
        records without it count as one run).
    reference : str, optional
        The thread setting whose rows decide the exit status (``gate`` is True on them).

    Returns
    -------
    list of dict
        Per target and thread setting: ``label``, ``target`` (text), ``subject``, ``op``,
        ``dtype``, ``threads``, ``threads_setting``, ``gate``, ``shape``, ``at_reference``,
        ``value`` (the measured ``x_floor`` or speed-up; the worst size for pairwise),
        ``per_size`` (pairwise) and ``status`` (``"met"``, ``"missed"`` or ``"not measured"``).

    Examples
    --------
    >>> rec = {"name": "numpy", "kind": "polycos", "op": "forward", "dtype": "float32",
    ...        "shape": [32768, 256], "x_floor": 1.2, "speedup": {}, "threads": 1,
    ...        "threads_setting": "1"}
    >>> [(r["status"], r["gate"]) for r in check([rec], reference="1") if r["label"] == "NumPy forward"]
    [('met', True)]
    """
    settings: dict[str, int | None] = {}
    for r in results:
        settings.setdefault(r.get("threads_setting", "?"), r.get("threads"))
    if not settings:
        settings = {reference or "?": None}
    out = []
    for setting, threads in settings.items():
        for t in TARGETS:
            recs = [
                r for r in results
                if r["kind"] == "polycos" and r["name"] == t.subject and r["op"] == t.op
                and r["dtype"] == t.dtype and r.get("threads_setting", "?") == setting
            ]
            row = {
                "label": t.label,
                "target": t.describe(),
                "subject": t.subject,
                "op": t.op,
                "dtype": t.dtype,
                "threads": threads,
                "threads_setting": setting,
                "gate": t.cpu and (reference is None or setting == reference),
                **_evaluate(t, recs),
            }
            out.append(row)
    return out


def gate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that decide the exit status and were missed."""
    return [r for r in rows if r["gate"] and r["status"] == "missed"]
