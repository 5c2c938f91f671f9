"""The benchmark driver: plan the grid, time every case, return the JSON document.

Shared by ``polycos bench`` (:mod:`polycos.bench.cli`) and the scripts in
``benchmarks/``; see :mod:`polycos.bench._schema` for the document's layout.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from polycos.bench._suites import (
    DASK_MAX_ELEMENTS,
    GPU_SUITES,
    PAIRWISE,
    SUITES,
    Case,
    Unavailable,
    build_case,
    suite_of,
)
from polycos.bench._timing import calibrate, interleaved, median_ratio

__all__ = ["Config", "measure_case", "plan", "run"]

SCHEMA_ID = "polycos-bench/1"


@dataclass
class Config:
    """What to run.

    Attributes
    ----------
    backends : list of str
        polycos subjects (``numpy``, ``torch``, ``torch-compile``, ``jax``, ``dask``,
        ``cupy``, ``torch-cuda``).
    ops : list of str
        ``forward``, ``forward+backward``, ``pairwise``, ``pairwise+backward``.
    sizes : list of (int, int)
        ``(N, D)`` for the row-wise ops.
    pairwise_sizes : list of (int, int, int)
        ``(N, M, D)`` for the pairwise ops.
    dtypes : list of str
        ``float32``, ``float64``, ``float16``, ``bfloat16``.
    repeat : int
        Rounds per case (samples per candidate); medians are over these.
    min_time : float
        Seconds one sample should last at least (calls are repeated to reach it).
    quick : bool
        Recorded in the output; the CLI chooses small sizes for it.
    threads : int or None
        Intra-op threads for torch and XLA (``None``: the libraries' defaults).
        NumPy's reductions are single-threaded either way.
    """

    backends: list[str]
    ops: list[str]
    sizes: list[tuple[int, int]]
    pairwise_sizes: list[tuple[int, int, int]]
    dtypes: list[str]
    repeat: int = 7
    min_time: float = 0.02
    quick: bool = False
    threads: int | None = None
    #: candidates slower than this (seconds per call) are sampled in 3 rounds only
    slow: float = 1.0
    #: rounds for those slow candidates
    slow_rounds: int = 3
    argv: list[str] = field(default_factory=list)


def plan(config: Config) -> list[tuple[str, str, tuple[int, ...], str, list[str]]]:
    """The cases to run: ``(suite, op, shape, dtype, subjects)``, suites in a fixed order."""
    by_suite: dict[str, list[str]] = {}
    for backend in config.backends:
        by_suite.setdefault(suite_of(backend), []).append(backend)
    cases = []
    for suite in SUITES:
        if suite not in by_suite:
            continue
        for op in config.ops:
            shapes: Sequence[tuple[int, ...]] = (
                config.pairwise_sizes if op in PAIRWISE else config.sizes
            )
            if suite == "dask":  # dask runs small: shrink N to fit, keep D
                shapes = list(dict.fromkeys(_small(s) for s in shapes))
            for shape in shapes:
                for dtype in config.dtypes:
                    cases.append((suite, op, tuple(shape), dtype, by_suite[suite]))
    return cases


def _small(shape: Sequence[int]) -> tuple[int, ...]:
    d = shape[-1]
    return (max(1, min(shape[0], DASK_MAX_ELEMENTS // d)), *shape[1:])


def apply_threads(threads: int | None) -> None:
    """Set torch's and XLA's intra-op thread counts (XLA: only before jax is imported)."""
    if threads is None:
        return
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
            f"intra_op_parallelism_threads={threads}"
        ).strip()
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(threads)


def measure_case(
    case: Case, repeat: int, min_time: float, *, slow: float = 1.0, slow_rounds: int = 3
) -> tuple[list[dict[str, Any]], list[str]]:
    """Warm up, calibrate and time the candidates of one case, interleaved.

    Parameters
    ----------
    case : Case
        From :func:`polycos.bench._suites.build_case`.
    repeat : int
        Rounds.
    min_time : float
        Seconds per sample at least.
    slow : float, optional
        Candidates slower than this many seconds per call run ``slow_rounds`` rounds only.
    slow_rounds : int, optional
        Rounds for slow candidates.

    Returns
    -------
    (list of dict, list of str)
        One record per candidate that ran (see :mod:`polycos.bench._schema`), and notes
        for the candidates that failed.
    """
    notes: list[str] = []
    fns: dict[str, Callable[[], Any]] = {}
    warm: dict[str, float] = {}
    numbers: dict[str, int] = {}
    first: dict[str, float] = {}
    kinds = {c.name: c.kind for c in case.candidates}
    for cand in case.candidates:
        try:
            with warnings.catch_warnings():  # tracer chatter (dynamo, jax) is not a result
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                case.timer(cand.fn, 1)  # first call: includes compilation
                warm[cand.name] = time.perf_counter() - t0
                numbers[cand.name], first[cand.name] = calibrate(case.timer, cand.fn, min_time)
        except Exception as exc:
            if cand.kind == "floor":
                raise
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            notes.append(f"{cand.name}: failed, {type(exc).__name__}: {msg}")
            continue
        fns[cand.name] = cand.fn
    timings = interleaved(
        case.timer, fns, numbers, repeat, first=first, slow=slow, min_rounds_slow=slow_rounds
    )
    floor = timings["floor"]
    records = []
    for name, tm in timings.items():
        med = tm.median
        rec: dict[str, Any] = {
            "suite": case.suite,
            "name": name,
            "kind": kinds[name],
            "op": case.op,
            "shape": list(case.shape),
            "dtype": case.dtype,
            "device": case.device,
            "bytes": case.nbytes,
            "number": tm.number,
            "warmup_s": warm[name],
            "times_s": tm.times,
            "median_s": med,
            "gbps": case.nbytes / med / 1e9 if med > 0 else math.inf,
            "x_floor": median_ratio(tm.samples, floor.samples),
            "speedup": {},
        }
        if rec["kind"] == "polycos":
            rec["speedup"] = {
                peer: median_ratio(ptm.samples, tm.samples)
                for peer, ptm in timings.items()
                if kinds[peer] == "peer"
            }
        records.append(rec)
    return records, notes


def machine_info() -> dict[str, Any]:
    """Machine, Python and load, for the JSON document."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpus": _gpus(),
    }
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpus() -> list[str]:
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if "cupy" in sys.modules:
        cp = sys.modules["cupy"]
        try:
            return [
                cp.cuda.runtime.getDeviceProperties(i)["name"].decode()
                for i in range(cp.cuda.runtime.getDeviceCount())
            ]
        except Exception:
            return []
    return []


def versions() -> dict[str, str]:
    """Versions of polycos and of every benchmarked library that was imported."""
    import polycos

    out = {"polycos": polycos.__version__}
    for mod in ("numpy", "torch", "jax", "jaxlib", "optax", "dask", "cupy", "sklearn"):
        if mod in sys.modules:
            out[mod] = str(getattr(sys.modules[mod], "__version__", "unknown"))
    return out


def run(
    config: Config,
    *,
    on_case: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole grid and return the JSON document.

    Parameters
    ----------
    config : Config
        What to run.
    on_case : callable, optional
        ``on_case(index, total, description)`` before each case (progress bars).

    Returns
    -------
    dict
        The document described in :mod:`polycos.bench._schema`.
    """
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    apply_threads(config.threads)
    cases = plan(config)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    dead_suites: dict[str, str] = {}
    for i, (suite, op, shape, dtype, subjects) in enumerate(cases):
        desc = f"{suite} {op} {'x'.join(map(str, shape))} {dtype}"
        if on_case is not None:
            on_case(i, len(cases), desc)
        where = {"suite": suite, "op": op, "shape": list(shape), "dtype": dtype}
        if suite in dead_suites:
            continue
        try:
            case = build_case(suite, op, shape, dtype, subjects)
        except Unavailable as exc:
            reason = str(exc)
            if _suite_wide(reason) or (suite in GPU_SUITES and "CUDA" in reason):
                dead_suites[suite] = reason
                skipped.append(
                    {**where, "op": None, "shape": None, "dtype": None, "reason": reason}
                )
            else:
                skipped.append({**where, "reason": reason})
            continue
        records, notes = measure_case(
            case, config.repeat, config.min_time, slow=config.slow, slow_rounds=config.slow_rounds
        )
        results.extend(records)
        for note in case.notes + notes:
            skipped.append({**where, "reason": note})
    if on_case is not None:
        on_case(len(cases), len(cases), "done")
    return {
        "schema": SCHEMA_ID,
        "date": started.isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - t0,
        "command": list(config.argv),
        "machine": machine_info(),
        "versions": versions(),
        "config": {k: v for k, v in asdict(config).items() if k != "argv"},
        "results": results,
        "skipped": skipped,
    }


def _suite_wide(reason: str) -> bool:
    return reason.endswith("is not installed") or "no CUDA device" in reason
