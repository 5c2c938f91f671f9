#!/usr/bin/env python3
"""GPU benchmark of polycos, and the helpers of ``benchmarks/gpu_check.sh``.

Subcommands (``python benchmarks/gpu_bench.py SUBCOMMAND --help``):

``bench --out DIR``
    Forward and forward+backward, float32 and bfloat16, N = 2**20 … 2**24 rows,
    D = 128/256/1024 (sizes that do not fit in free memory are skipped), timed
    with CUDA events, warm-up and medians over interleaved rounds
    (:mod:`polycos.bench._timing`). Subjects: ``polycos.cupy`` on CuPy arrays
    (``cupy``) and ``polycos.cosine_similarity`` + autograd on torch CUDA
    tensors (``torch-cuda``); peers: torch ``F.cosine_similarity`` eager,
    ``torch.compile(F.cosine_similarity)`` and ``optax.cosine_similarity``
    under ``jax.jit``. Each is reported as achieved GB/s (the byte model of
    :func:`polycos.bench._suites.model_bytes`), as a fraction of the device's
    bandwidth measured in the same run by a device-to-device copy, and as
    speed-ups over the peers; then the > 2**31-element case (forward, checked
    against a float64 reference on sampled rows) and the spec's GPU targets.
    Writes ``gpu_bench.json`` and ``gpu_bench.png``. ``--dry-run`` runs the
    same machinery on the CPU at tiny sizes (no GPU needed).
``env --out FILE``
    Device, driver, CUDA and library versions (and the packages missing).
``probe``
    One line saying whether torch or CuPy can use a CUDA GPU; exit 0 if so.
``summary --results DIR``
    ``summary.json`` and ``summary.md`` from the parts recorded by
    ``gpu_check.sh`` (``parts.tsv``); exit status 0, or 1 if a part failed.

Exit status of ``bench``: 0 when it ran (targets missed are reported, not an
error), 77 when no GPU subject could run, 1 on an unexpected error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout, as gpu_check.sh's PYTHONPATH
    sys.path.insert(0, str(ROOT))

SCHEMA_BENCH = "polycos-gpu-bench/1"
SCHEMA_SUMMARY = "polycos-gpu-check/1"
EXIT_SKIP = 77

#: polycos subjects (named as in ``polycos bench`` and ``polycos.bench._targets``).
CUPY, TORCH = "cupy", "torch-cuda"
SUBJECTS = (CUPY, TORCH)
#: native peers; EAGER is the name the spec's targets use.
EAGER = "torch CUDA F.cosine_similarity"
COMPILED = "torch.compile(F.cosine_similarity)"
OPTAX = "optax.cosine_similarity (jax.jit)"
PEERS = (EAGER, COMPILED, OPTAX)
OPS = ("forward", "forward+backward")
ULP_ONE = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
#: peak memory of a case, in units of one (N, D) input array, all frameworks' pools together
MEMORY_FACTOR = {"forward": 4.0, "forward+backward": 10.0}
#: parts of gpu_check.sh that need a GPU (each is skipped, with the reason, without one)
GPU_PARTS = (
    "gpu-tests",
    "sanitizer-memcheck-cupy",
    "sanitizer-racecheck-cupy",
    "sanitizer-memcheck-torch",
    "benchmark",
)
#: packages a GPU machine usually has; the ones missing are reported
EXPECTED_PACKAGES = (
    "numpy", "torch", "cupy", "jax", "jaxlib", "optax", "pytest", "hypothesis",
    "matplotlib", "ml_dtypes", "array_api_compat",
)
OPTIONAL_PACKAGES = ("array_api_strict", "scipy", "dask", "sklearn", "rich", "expecttest", "psutil")


class Unavailable(Exception):
    """A subject, peer or input view that cannot run here; the message says why."""


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _short(exc: BaseException, limit: int = 240) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit] if text else ''}".rstrip(": ")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# =========================================================================== the stack


@dataclass
class Stack:
    """The frameworks this run can use, on ``device`` ("cuda", or "cpu" in a dry run)."""

    device: str
    torch: Any = None
    cupy: Any = None
    jax: Any = None
    jax_device: Any = None
    optax: Any = None
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self) -> None:
        """Wait for every framework's queued work."""
        if not self.cuda:
            return
        if self.torch is not None:
            self.torch.cuda.synchronize()
        if self.cupy is not None:
            self.cupy.cuda.Device().synchronize()

    def free_bytes(self) -> int:
        """Free device memory (call :meth:`release` first to count the frameworks' caches as free)."""
        if not self.cuda:
            return 1 << 34
        if self.torch is not None:
            return int(self.torch.cuda.mem_get_info()[0])
        return int(self.cupy.cuda.runtime.memGetInfo()[0])

    def total_bytes(self) -> int | None:
        if not self.cuda:
            return None
        if self.torch is not None:
            return int(self.torch.cuda.mem_get_info()[1])
        return int(self.cupy.cuda.runtime.memGetInfo()[1])

    def release(self) -> None:
        """Hand cached device blocks back (a full ``gc`` pass costs 0.3 s: only on the GPU)."""
        if not self.cuda:
            return
        gc.collect()
        if self.torch is not None:
            self.torch.cuda.empty_cache()
        if self.cupy is not None:
            self.cupy.get_default_memory_pool().free_all_blocks()


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install failing at import
        raise Unavailable(
            f"{name} is not installed" if isinstance(exc, ModuleNotFoundError) else f"cannot import {name} ({_short(exc)})"
        ) from None


def load_stack(dry_run: bool) -> Stack:
    """Import what is there; record why each missing framework is missing."""
    stack = Stack("cpu" if dry_run else "cuda")
    try:
        torch = _import("torch")
        if stack.cuda and not torch.cuda.is_available():
            raise Unavailable(
                "torch sees no CUDA device"
                + (" (CPU-only build)" if torch.version.cuda is None else "")
            )
        stack.torch = torch
    except Unavailable as exc:
        stack.reasons["torch"] = str(exc)
    if dry_run:
        stack.reasons["cupy"] = "dry run: no GPU (CuPy runs only on a GPU)"
    else:
        try:
            cupy = _import("cupy")
            try:
                count = cupy.cuda.runtime.getDeviceCount()
            except Exception as exc:
                raise Unavailable(f"CuPy sees no CUDA device ({_short(exc)})") from None
            if count < 1:
                raise Unavailable("CuPy sees no CUDA device")
            stack.cupy = cupy
        except Unavailable as exc:
            stack.reasons["cupy"] = str(exc)
    try:
        jax = _import("jax")
        try:
            stack.jax_device = jax.devices("gpu" if stack.cuda else "cpu")[0]
        except Exception as exc:
            raise Unavailable(f"jax sees no GPU ({_short(exc, 120)})") from None
        stack.jax = jax
        stack.optax = _import("optax")
    except Unavailable as exc:
        stack.reasons["jax"] = str(exc)
    return stack


# =========================================================================== inputs


class Inputs:
    """``x1``, ``x2`` (N, D) and the upstream gradient ``g`` (N,), viewed by each framework.

    Made once (by torch, else by CuPy) and shared without copies through DLPack,
    so every subject reads the same bytes.
    """

    def __init__(self, stack: Stack, n: int, d: int, dtype: str, seed: int = 0) -> None:
        self.stack, self.dtype, self.shape = stack, dtype, (n, d)
        self._views: dict[str, Any] = {}
        self._errors: dict[str, str] = {}
        if stack.torch is not None:
            torch = stack.torch
            dev = "cuda" if stack.cuda else "cpu"
            gen = torch.Generator(device=dev).manual_seed(seed)
            dt = getattr(torch, dtype)
            self.torch = tuple(
                torch.randn(s, generator=gen, device=dev, dtype=dt) for s in ((n, d), (n, d), (n,))
            )
        elif stack.cupy is not None:
            cp = stack.cupy
            if dtype == "bfloat16":
                raise Unavailable("bfloat16 inputs need torch (CuPy has no bfloat16 random numbers)")
            rs = cp.random.RandomState(seed)
            self._views["cupy"] = tuple(
                rs.standard_normal(s, dtype=cp.float32).astype(dtype) for s in ((n, d), (n, d), (n,))
            )
            self.torch = None
        else:
            raise Unavailable("neither torch (with CUDA) nor CuPy is usable")

    def _view(self, name: str, make: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...]:
        if name in self._errors:
            raise Unavailable(self._errors[name])
        if name not in self._views:
            try:
                self._views[name] = make()
            except Unavailable as exc:
                self._errors[name] = str(exc)
                raise
            except Exception as exc:
                self._errors[name] = f"no {name} view of {self.dtype} inputs ({_short(exc, 160)})"
                raise Unavailable(self._errors[name]) from None
        return self._views[name]

    def cupy(self) -> tuple[Any, ...]:
        cp = self.stack.cupy
        if cp is None:
            raise Unavailable(self.stack.reasons.get("cupy", "no CuPy"))
        return self._view("cupy", lambda: tuple(cp.from_dlpack(t) for t in self.torch))

    def jax(self) -> tuple[Any, ...]:
        if self.stack.jax is None:
            raise Unavailable(self.stack.reasons.get("jax", "no jax"))
        jnp = importlib.import_module("jax.numpy")
        jax = self.stack.jax

        def make() -> tuple[Any, ...]:
            src = self.torch if self.torch is not None else self._views["cupy"]
            try:
                return tuple(jnp.from_dlpack(a) for a in src)
            except Exception:  # no DLPack exchange: draw jax's own inputs on its device
                keys = jax.random.split(jax.random.PRNGKey(0), 3)
                shapes = (self.shape, self.shape, self.shape[:1])
                with jax.default_device(self.stack.jax_device):
                    return tuple(
                        jax.random.normal(k, s, dtype=getattr(jnp, self.dtype))
                        for k, s in zip(keys, shapes, strict=True)
                    )

        return self._view("jax", make)


# =========================================================================== timers


Timer = Callable[[Callable[[], Any], int], float]


def _jax_timer(stack: Stack) -> Timer:
    """Wall clock around ``number`` calls, waiting for the last result (XLA runs them in order).

    XLA launches on its own streams, which CUDA events recorded by torch or CuPy
    do not see; the other frameworks' queues are drained first.
    """

    def timer(fn: Callable[[], Any], number: int) -> float:
        stack.sync()
        t0 = time.perf_counter()
        out = None
        for _ in range(number):
            out = fn()  # only the last result stays alive
        stack.jax.block_until_ready(out)
        return (time.perf_counter() - t0) / number

    return timer


def _timers(stack: Stack) -> dict[str, Timer]:
    from polycos.bench._suites import _cupy_timer, _torch_cuda_timer
    from polycos.bench._timing import cpu_timer

    out: dict[str, Timer] = {}
    if stack.torch is not None:
        out["torch"] = _torch_cuda_timer() if stack.cuda else cpu_timer(None)
    if stack.cupy is not None:
        out["cupy"] = _cupy_timer()
    if stack.jax is not None:
        out["jax"] = _jax_timer(stack)
    return out


# =========================================================================== copy bandwidth


def copy_bandwidth(stack: Stack, timers: dict[str, Timer], nbytes: int) -> list[dict[str, Any]]:
    """Device-to-device copy of ``nbytes`` (read + write = 2 * nbytes), per library that can."""
    from polycos.bench._timing import calibrate

    out = []
    jobs: list[tuple[str, str, Callable[[], Callable[[], Any]]]] = []
    if stack.torch is not None:

        def torch_copy() -> Callable[[], Any]:
            dev = "cuda" if stack.cuda else "cpu"
            src = stack.torch.empty(nbytes, dtype=stack.torch.uint8, device=dev).fill_(1)
            dst = stack.torch.empty_like(src)
            return lambda: dst.copy_(src)

        jobs.append(("torch copy_", "torch", torch_copy))
    if stack.cupy is not None:

        def cupy_copy() -> Callable[[], Any]:
            cp = stack.cupy
            src = cp.ones(nbytes, dtype=cp.uint8)
            dst = cp.empty_like(src)
            return lambda: dst.data.copy_from_device_async(src.data, nbytes)

        jobs.append(("cupy memcpy", "cupy", cupy_copy))
    for name, lib, make in jobs:
        try:
            fn = make()
            timer = timers[lib]
            timer(fn, 2)
            number, _ = calibrate(timer, fn, 0.05, max_number=100)
            times = [timer(fn, number) for _ in range(7)]
            med = statistics.median(times)
            out.append({"name": name, "bytes": nbytes, "median_s": med, "gbps": 2 * nbytes / med / 1e9})
        except Exception as exc:
            out.append({"name": name, "bytes": nbytes, "error": _short(exc)})
        finally:
            fn = None  # type: ignore[assignment]
            stack.release()
    return out


# =========================================================================== candidates


@dataclass
class Cand:
    name: str
    kind: str  #: "polycos" or "peer"
    fn: Callable[[], Any]
    timer: Timer


_COMPILED: dict[str, Any] = {}
_JITTED: dict[str, Any] = {}


def _torch_fn(stack: Stack, inp: Inputs, op: str, f: Callable[[Any, Any], Any]) -> Callable[[], Any]:
    torch = stack.torch
    if inp.torch is None:
        raise Unavailable("no torch inputs")
    t1, t2, tg = inp.torch
    if op == "forward":
        return lambda: f(t1, t2)
    a1, a2 = t1.detach().requires_grad_(), t2.detach().requires_grad_()

    def run() -> Any:  # forward + autograd backward with upstream g (what .backward() computes)
        s = f(a1, a2)
        return s, torch.autograd.grad(s, (a1, a2), tg)

    return run


def build_candidates(
    stack: Stack, inp: Inputs, op: str, timers: dict[str, Timer], *, peers: bool = True
) -> tuple[list[Cand], list[str]]:
    """The subjects and peers of one case; a candidate that cannot run becomes a note."""
    cands: list[Cand] = []
    notes: list[str] = []

    def add(name: str, kind: str, lib: str, make: Callable[[], Callable[[], Any]]) -> None:
        try:
            if lib not in timers:
                raise Unavailable(stack.reasons.get(lib, f"{lib} unavailable"))
            cands.append(Cand(name, kind, make(), timers[lib]))
        except Unavailable as exc:
            notes.append(f"{name}: skipped, {exc}")
        except Exception as exc:
            notes.append(f"{name}: failed to build, {_short(exc)}")

    def cupy_subject() -> Callable[[], Any]:
        pc = importlib.import_module("polycos.cupy")
        c1, c2, cg = inp.cupy()
        if op == "forward":
            return lambda: pc.cosine_similarity(c1, c2)
        return lambda: (pc.cosine_similarity(c1, c2), pc.cosine_similarity_vjp(cg, c1, c2))

    def torch_subject() -> Callable[[], Any]:
        polycos = importlib.import_module("polycos")
        return _torch_fn(stack, inp, op, polycos.cosine_similarity)

    add(CUPY, "polycos", "cupy", cupy_subject)
    add(TORCH, "polycos", "torch", torch_subject)
    if not peers:
        return cands, notes
    if stack.torch is not None:
        F = importlib.import_module("torch.nn.functional")
        add(EAGER, "peer", "torch", lambda: _torch_fn(stack, inp, op, F.cosine_similarity))

        def compiled() -> Callable[[], Any]:
            if "f" not in _COMPILED:
                dyn = importlib.import_module("torch._dynamo").config
                for knob in ("cache_size_limit", "recompile_limit"):  # dtypes x ops x shapes
                    if hasattr(dyn, knob):
                        setattr(dyn, knob, max(64, getattr(dyn, knob)))
                # dynamic shapes from the start: one compilation per dtype and op instead of one
                # more per shape change (a cold inductor compile costs 10-30 s of the budget);
                # it is where the default (automatic dynamic) settles after the first recompile
                # (the CPU dry run traces with dynamo only, backend "eager": inductor's C++
                # compilation would take minutes on a small machine)
                _COMPILED["f"] = stack.torch.compile(
                    F.cosine_similarity, dynamic=True, **({} if stack.cuda else {"backend": "eager"})
                )
            return _torch_fn(stack, inp, op, _COMPILED["f"])

        add(COMPILED, "peer", "torch", compiled)

    def optax_peer() -> Callable[[], Any]:
        if stack.optax is None:
            raise Unavailable(stack.reasons.get("jax", "optax is not installed"))
        jax, optax = stack.jax, stack.optax
        jnp = importlib.import_module("jax.numpy")
        x1, x2, g = inp.jax()
        if op not in _JITTED:

            def f(u: Any, v: Any) -> Any:
                return optax.cosine_similarity(u, v, epsilon=1e-8)

            _JITTED["forward"] = jax.jit(f)
            _JITTED["forward+backward"] = jax.jit(
                jax.value_and_grad(lambda u, v, w: jnp.sum(f(u, v) * w), argnums=(0, 1))
            )
        jf = _JITTED[op]
        return (lambda: jf(x1, x2)) if op == "forward" else (lambda: jf(x1, x2, g))

    add(OPTAX, "peer", "jax", optax_peer)
    return cands, notes


# =========================================================================== measuring


def measure(
    stack: Stack, cands: list[Cand], repeat: int, min_time: float
) -> tuple[dict[str, Any], list[str]]:
    """Warm up, calibrate and time the candidates, interleaved; per-round samples by name."""
    from polycos.bench._timing import calibrate, interleaved

    notes: list[str] = []
    fns: dict[str, Callable[[], Any]] = {}
    numbers: dict[str, int] = {}
    first: dict[str, float] = {}
    warm: dict[str, float] = {}
    by_id: dict[int, Cand] = {}
    for c in cands:
        try:
            t0 = time.perf_counter()
            c.timer(c.fn, 1)  # first call: compilation (NVRTC, inductor, XLA)
            warm[c.name] = time.perf_counter() - t0
            c.timer(c.fn, 1)
            numbers[c.name], first[c.name] = calibrate(c.timer, c.fn, min_time, max_number=200)
        except Exception as exc:
            notes.append(f"{c.name}: failed, {_short(exc)}")
            stack.release()
            continue
        fns[c.name] = c.fn
        by_id[id(c.fn)] = c
    failed: dict[str, str] = {}

    def timer(fn: Callable[[], Any], number: int) -> float:
        c = by_id[id(fn)]
        if c.name in failed:
            return math.inf
        try:
            return c.timer(fn, number)
        except Exception as exc:  # e.g. out of memory in a later round
            failed[c.name] = _short(exc)
            stack.release()
            return math.inf

    timings = interleaved(timer, fns, numbers, repeat, first=first, slow=2.0, min_rounds_slow=3)
    for name, msg in failed.items():
        notes.append(f"{name}: failed during timing, {msg}")
        timings.pop(name, None)
    return {"timings": timings, "warm": warm}, notes


def case_records(
    meas: dict[str, Any], cands: list[Cand], op: str, shape: tuple[int, int], dtype: str, device: str
) -> list[dict[str, Any]]:
    from polycos.bench._suites import model_bytes
    from polycos.bench._timing import median_ratio

    timings = meas["timings"]
    kinds = {c.name: c.kind for c in cands}
    nbytes = model_bytes(op, shape, ITEMSIZE[dtype])
    records = []
    for name, tm in timings.items():
        med = tm.median
        rec: dict[str, Any] = {
            "name": name,
            "kind": kinds[name],
            "op": op,
            "shape": list(shape),
            "dtype": dtype,
            "device": device,
            "bytes": nbytes,
            "number": tm.number,
            "warmup_s": meas["warm"].get(name),
            "times_s": tm.times,
            "median_s": med,
            "gbps": nbytes / med / 1e9 if med > 0 else math.inf,
            "speedup": {},
        }
        if rec["kind"] == "polycos":
            rec["speedup"] = {
                p: median_ratio(ptm.samples, tm.samples)
                for p, ptm in timings.items()
                if kinds[p] == "peer"
            }
        records.append(rec)
    return records


def two_pass_bytes(op: str, shape: Sequence[int], itemsize: int) -> int:
    """Bytes of a forward and a separate backward: the backward reads ``x1`` and ``x2`` again.

    Autograd runs the backward after the forward has returned, so it must read
    the inputs a second time: ``6 N D`` element moves. The byte model
    (:func:`polycos.bench._suites.model_bytes`) now counts exactly these, so
    ``fraction_two_pass`` equals ``fraction_of_copy`` (kept for the JSON's readers).
    """
    from polycos.bench._suites import model_bytes

    return model_bytes(op, shape, itemsize)


def add_fractions(records: list[dict[str, Any]], copy_gbps: float | None) -> None:
    """Fraction of the copy bandwidth, ``x_floor`` (its inverse, as in ``polycos bench``),
    and ``fraction_two_pass`` (the fraction for the bytes of :func:`two_pass_bytes`)."""
    for r in records:
        if copy_gbps and r.get("gbps") and math.isfinite(r["gbps"]):
            r["fraction_of_copy"] = r["gbps"] / copy_gbps
            r["x_floor"] = copy_gbps / r["gbps"]
            extra = two_pass_bytes(r["op"], r["shape"], ITEMSIZE[r["dtype"]]) / r["bytes"]
            r["fraction_two_pass"] = r["fraction_of_copy"] * extra
        else:
            r["fraction_of_copy"] = r["x_floor"] = r["fraction_two_pass"] = None


# =========================================================================== the > 2**31 case


def big_case(
    stack: Stack, timers: dict[str, Timer], n: int, d: int, dtypes: Sequence[str], repeat: int, min_time: float
) -> dict[str, Any]:
    """Forward on N*D > 2**31 elements: timing, and sampled rows against a float64 reference."""
    import numpy as np

    from polycos.testing import reference, to_numpy

    out: dict[str, Any] = {"shape": [n, d], "elements": n * d, "over_2_31": n * d > 2**31, "runs": []}
    rng = np.random.default_rng(1)
    edge = 2**31 // d
    rows = sorted(
        {r for r in (0, 1, n - 2, n - 1, edge - 1, edge, edge + 1, (2**32) // d) if 0 <= r < n}
        | {int(r) for r in rng.integers(0, n, 8)}
    )
    out["rows_checked"] = rows
    for dtype in dtypes:
        run: dict[str, Any] = {"dtype": dtype, "records": [], "checks": {}, "notes": []}
        out["runs"].append(run)
        need = 2.2 * n * d * ITEMSIZE[dtype]
        free = stack.free_bytes()
        if need > 0.9 * free:
            run["skipped"] = f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
            continue
        inp = None
        try:
            inp = Inputs(stack, n, d, dtype, seed=2)
            cands, notes = build_candidates(stack, inp, "forward", timers)
            cands = [c for c in cands if c.name in (CUPY, TORCH, EAGER)]
            run["notes"] += [m for m in notes if m.split(":")[0] in (CUPY, TORCH, EAGER)]
            meas, notes = measure(stack, cands, repeat, min_time)
            run["notes"] += notes
            run["records"] = case_records(meas, cands, "forward", (n, d), dtype, stack.device)
            x1 = to_numpy(_take(inp.torch[0] if inp.torch is not None else inp.cupy()[0], rows, stack))
            x2 = to_numpy(_take(inp.torch[1] if inp.torch is not None else inp.cupy()[1], rows, stack))
            ref = reference(x1.astype(np.float64), x2.astype(np.float64))
            for c in cands:
                if c.name not in meas["timings"]:
                    continue
                s = to_numpy(_take(c.fn(), rows, stack)).astype(np.float64)
                err = float(np.max(np.abs(s - ref))) if len(rows) else math.nan
                ok = bool(np.all(np.abs(s) <= 1.0) and err <= ULP_ONE[dtype])
                run["checks"][c.name] = {"max_error_ulp_one": err / ULP_ONE[dtype], "ok": ok}
        except Unavailable as exc:
            run["skipped"] = str(exc)
        except Exception as exc:
            run["error"] = _short(exc)
            run["traceback"] = traceback.format_exc(limit=6)
        finally:
            inp = None
            stack.release()
    return out


def _take(a: Any, rows: list[int], stack: Stack) -> Any:
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        return a[stack.torch.as_tensor(rows, device=a.device)]
    if mod == "cupy":
        return a[stack.cupy.asarray(rows)]
    return a[list(rows)]


# =========================================================================== targets


def evaluate_targets(records: list[dict[str, Any]], dtypes: Sequence[str]) -> list[dict[str, Any]]:
    """The spec's CUDA targets (``polycos.bench._targets``) for each polycos GPU subject and dtype.

    ``x_floor`` targets are stated as a fraction of the copy bandwidth
    (``<= 1.25x floor`` is ``>= 80 %``). Each is judged at the largest size
    where it was measured; the spec's own rows are ``cupy`` float32.
    """
    from polycos.bench._targets import TARGETS

    gpu = [t for t in TARGETS if t.subject == CUPY]
    out = []
    for subject in SUBJECTS:
        for dtype in dtypes:
            for t in gpu:
                per_size = []
                for r in records:
                    if (r["name"], r["op"], r["dtype"], r["kind"]) != (subject, t.op, dtype, "polycos"):
                        continue
                    v = r.get("fraction_of_copy") if t.metric == "x_floor" else r["speedup"].get(t.metric)
                    if v is not None and math.isfinite(v):
                        per_size.append({"shape": r["shape"], "value": v})
                per_size.sort(key=lambda p: math.prod(p["shape"]))
                if t.metric == "x_floor":
                    bound, text = 1.0 / t.bound, f">= {100 / t.bound:.0f} % of copy bandwidth"
                else:
                    bound, text = t.bound, t.describe()
                row: dict[str, Any] = {
                    "label": f"{subject} {dtype} {t.op}: {text}",
                    "subject": subject,
                    "dtype": dtype,
                    "op": t.op,
                    "target": text,
                    "bound": bound,
                    "spec": subject == CUPY and dtype == "float32",
                    "per_size": per_size,
                    "shape": per_size[-1]["shape"] if per_size else None,
                    "value": per_size[-1]["value"] if per_size else None,
                }
                if row["value"] is None:
                    row["status"] = "not measured"
                else:
                    row["status"] = "met" if row["value"] >= bound else "missed"
                out.append(row)
    return out


# =========================================================================== plot


_SHORT = {CUPY: "polycos.cupy", TORCH: "polycos torch-cuda", EAGER: "torch eager",
          COMPILED: "torch.compile", OPTAX: "optax (jit)"}


def write_plot(doc: dict[str, Any], path: Path) -> None:
    """Bars: fraction of copy bandwidth per subject, op and dtype; lines: time against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in doc["results"] if r.get("fraction_of_copy") is not None]
    groups = [(op, dt) for dt in doc["config"]["dtypes"] for op in OPS if any(
        r["op"] == op and r["dtype"] == dt for r in recs)]
    ncol = max(1, len(groups))
    fig, axes = plt.subplots(2, ncol, figsize=(4.6 * ncol, 8.5), squeeze=False)
    ref = doc["config"]["ref"]
    names = [*SUBJECTS, *PEERS]
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    if not groups:
        for ax in axes.ravel():
            ax.axis("off")
        text = "\n".join(textwrap.fill(r, 90) for r in doc.get("skipped_reasons", []))
        axes[0][0].text(0.02, 0.5, "no measurements\n" + text[:1200], fontsize=8, va="center",
                        transform=axes[0][0].transAxes)
    for j, (op, dt) in enumerate(groups):
        ax = axes[0][j]
        mine = [r for r in recs if r["op"] == op and r["dtype"] == dt]
        at_ref = [r for r in mine if r["shape"] == ref] or mine
        biggest = max(math.prod(r["shape"]) for r in at_ref)
        bars = [r for r in at_ref if math.prod(r["shape"]) == biggest]
        bars.sort(key=lambda r: names.index(r["name"]) if r["name"] in names else 99)
        drawn = ax.bar(range(len(bars)), [r["fraction_of_copy"] for r in bars],
                       color=[colors.get(r["name"], "gray") for r in bars])
        ax.bar_label(drawn, labels=[f"{100 * r['fraction_of_copy']:.0f} %" for r in bars], fontsize=7)
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([_SHORT.get(r["name"], r["name"]) for r in bars], rotation=30, ha="right", fontsize=7)
        ax.axhline(0.8, color="red", ls="--", lw=1, label="target 80 %")
        ax.axhline(1.0, color="black", ls=":", lw=1)
        ax.set_ylabel("fraction of copy bandwidth")
        ax.set_title(f"{op} {dt}, N x D = {bars[0]['shape'][0]} x {bars[0]['shape'][1]}", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[1][j]
        d_ref = ref[1]
        for name in names:
            pts = sorted((r["shape"][0], r["median_s"]) for r in mine if r["name"] == name and r["shape"][1] == d_ref)
            if pts:
                style = "-o" if name in SUBJECTS else "--x"
                ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], style, color=colors[name],
                        label=_SHORT[name], ms=4)
        copy = doc.get("copy_gbps")
        if copy:
            from polycos.bench._suites import model_bytes

            ns = sorted({r["shape"][0] for r in mine if r["shape"][1] == d_ref})
            if ns:
                ax.plot(ns, [model_bytes(op, (n, d_ref), ITEMSIZE[dt]) / (copy * 1e9) * 1e3 for n in ns],
                        ":", color="black", label="copy floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"N (D = {d_ref})")
        ax.set_ylabel("median time [ms]")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    dev = doc.get("device", {}).get("name") or doc.get("device", {}).get("kind", "")
    fig.suptitle(f"polycos GPU bench — {dev} — copy {doc.get('copy_gbps') or 0:.0f} GB/s — {doc['date']}"
                 + (" — DRY RUN (CPU)" if doc["dry_run"] else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# =========================================================================== bench command


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _dtypes(text: str) -> list[str]:
    vals = [v for v in text.split(",") if v]
    bad = [v for v in vals if v not in ITEMSIZE]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"dtypes must be among {', '.join(ITEMSIZE)}; got {text!r}")
    return vals


def _pair(text: str) -> list[int]:
    vals = _ints(text)
    if len(vals) != 2:
        raise argparse.ArgumentTypeError(f"expected LOG2N,D, got {text!r}")
    return vals


def plan(log2_n: Sequence[int], dims: Sequence[int], dtypes: Sequence[str], ref: Sequence[int]) -> list[tuple[str, str, int, int]]:
    """(dtype, op, N, D): the reference size of every dtype and op first, then the grid by D and N."""
    ref_n, ref_d = 1 << ref[0], ref[1]
    first = [(dt, op, ref_n, ref_d) for dt in dtypes for op in OPS]
    rest = [
        (dt, op, 1 << k, d)
        for d in dims
        for k in log2_n
        for dt in dtypes
        for op in OPS
        if (dt, op, 1 << k, d) not in first
    ]
    return first + rest


def device_info(stack: Stack) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": stack.device}
    if stack.cuda and stack.torch is not None:
        t = stack.torch
        p = t.cuda.get_device_properties(0)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_bytes=p.total_memory,
                    sms=p.multi_processor_count, torch_cuda=t.version.cuda)
    elif stack.cuda and stack.cupy is not None:
        p = stack.cupy.cuda.runtime.getDeviceProperties(0)
        info.update(name=p["name"].decode(), capability=f"{p['major']}.{p['minor']}",
                    memory_bytes=p["totalGlobalMem"], sms=p["multiProcessorCount"])
    else:
        info["name"] = f"CPU ({platform.processor() or platform.machine()}), dry run"
    return info


def cmd_bench(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    # SIGINT/SIGTERM (gpu_check.sh's time limit) end the run with the JSON written, even where a
    # parent left SIGINT ignored (Python then installs no KeyboardInterrupt handler of its own)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    deadline = t_start + args.budget
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    if dry:  # tiny CPU sizes, few samples: the machinery, not the numbers
        args.log2_n = args.log2_n_dry
        args.dims = args.dims_dry
        args.ref = args.ref_dry
        args.big = args.big_dry
        args.repeat = min(args.repeat, 2)
        args.min_time = min(args.min_time, 0.002)
    stack = load_stack(dry)
    timers = _timers(stack)
    doc: dict[str, Any] = {
        "schema": SCHEMA_BENCH,
        "date": _now(),
        "dry_run": dry,
        "command": [sys.executable, *sys.argv],
        "config": {
            "log2_n": args.log2_n, "dims": args.dims, "dtypes": args.dtypes, "ops": list(OPS),
            "ref": [1 << args.ref[0], args.ref[1]], "big": [1 << args.big[0], args.big[1]],
            "repeat": args.repeat, "min_time": args.min_time, "budget_s": args.budget,
            "memory_factor": MEMORY_FACTOR,
            "torch_compile": "torch.compile(F.cosine_similarity, dynamic=True): one compilation per dtype and op",
            "timers": "CUDA events around back-to-back calls (torch, CuPy); wall clock + block_until_ready (JAX)",
            "byte_model": "polycos.bench._suites.model_bytes: every element read and written; forward+backward reads x1, x2 twice",
        },
        "frameworks": {k: ("ok" if getattr(stack, k) is not None else stack.reasons.get(k, "missing"))
                       for k in ("torch", "cupy", "jax")},
        "device": {},
        "copy": [],
        "copy_gbps": None,
        "results": [],
        "skipped": [],
        "big": None,
        "targets": [],
        "skipped_reasons": [],
    }
    _say(f"gpu_bench: {'DRY RUN on the CPU' if dry else 'CUDA'}; budget {args.budget:.0f} s")
    for k, v in doc["frameworks"].items():
        _say(f"  {k:6s} {v}")
    can_run = (stack.cupy is not None) or (stack.torch is not None)
    if not can_run:
        why = "; ".join(f"{k}: {v}" for k, v in stack.reasons.items())
        doc["skipped_reasons"].append(f"no GPU subject can run ({why})")
        doc["device"] = {"kind": stack.device}
        _finish(doc, out_dir, args)
        _say(f"gpu_bench: skipped, {doc['skipped_reasons'][0]}")
        return EXIT_SKIP
    doc["device"] = device_info(stack)
    try:
        from polycos.bench._report import write_json  # noqa: F401  (fail early on a broken import)
    except Exception as exc:
        _say(f"gpu_bench: cannot import polycos.bench ({_short(exc)})")
        raise
    stack.release()
    free = stack.free_bytes()
    copy_bytes = (1 << 25) if dry else int(min(4 << 30, max(256 << 20, free // 8)))
    doc["copy"] += [dict(c, when="start") for c in copy_bandwidth(stack, timers, copy_bytes)]
    _print_copy(doc["copy"])
    copy_start = max((c["gbps"] for c in doc["copy"] if c.get("gbps")), default=None)
    cases = plan(args.log2_n, args.dims, args.dtypes, args.ref)
    _say(f"{len(cases)} cases planned (reference size first); free memory {free / 2**30:.1f} GiB")
    try:
        _run_cases(stack, timers, args, cases, doc, deadline, copy_start)
    except KeyboardInterrupt:  # gpu_check.sh's time limit (SIGINT): keep what was measured
        doc["interrupted"] = "stopped by SIGINT (a time limit): the cases not yet run are missing"
        _say(f"gpu_bench: {doc['interrupted']}")
        stack.release()
    if "interrupted" not in doc:
        doc["copy"] += [dict(c, when="end") for c in copy_bandwidth(stack, timers, copy_bytes)]
    _finish(doc, out_dir, args)
    _print_targets(doc)
    _say(f"gpu_bench: done in {time.perf_counter() - t_start:.0f} s; wrote {out_dir / 'gpu_bench.json'}")
    if not dry and not any(r["kind"] == "polycos" for r in doc["results"]):
        return EXIT_SKIP
    return 0


def _run_cases(
    stack: Stack,
    timers: dict[str, Timer],
    args: argparse.Namespace,
    cases: list[tuple[str, str, int, int]],
    doc: dict[str, Any],
    deadline: float,
    copy: float | None,
) -> None:
    """Run the planned cases (the big case after the reference ones) while time and memory last."""
    ran_big = False
    slowest = 0.0
    for i, (dtype, op, n, d) in enumerate(cases):
        if not ran_big and i == 2 * len(args.dtypes):  # after the reference cases: the big case
            ran_big = True
            doc["big"] = _run_big(stack, timers, args, deadline)
        where = {"op": op, "shape": [n, d], "dtype": dtype}
        left = deadline - time.perf_counter()
        if left < max(args.reserve, 1.5 * slowest):
            doc["skipped"].append({**where, "reason": f"time budget ({args.budget:.0f} s) used up"})
            continue
        need = MEMORY_FACTOR[op] * n * d * ITEMSIZE[dtype]
        free = stack.free_bytes()
        if need > 0.9 * free:
            doc["skipped"].append(
                {**where, "reason": f"needs about {need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"}
            )
            continue
        t0 = time.perf_counter()
        inp = cands = meas = None
        try:
            inp = Inputs(stack, n, d, dtype)
            cands, notes = build_candidates(stack, inp, op, timers)
            if not any(c.kind == "polycos" for c in cands):
                doc["skipped"].append({**where, "reason": "; ".join(notes) or "no polycos subject"})
                continue
            meas, more = measure(stack, cands, args.repeat, args.min_time)
            recs = case_records(meas, cands, op, (n, d), dtype, stack.device)
            doc["results"] += recs
            doc["skipped"] += [{**where, "reason": m} for m in notes + more]
            _print_case(where, recs, time.perf_counter() - t0, copy)
        except Unavailable as exc:
            doc["skipped"].append({**where, "reason": str(exc)})
        except Exception as exc:
            doc["skipped"].append({**where, "reason": f"error: {_short(exc)}"})
            _say(traceback.format_exc(limit=6))
        finally:
            inp = cands = meas = None
            stack.release()
            slowest = max(slowest, time.perf_counter() - t0)
    if not ran_big:
        doc["big"] = _run_big(stack, timers, args, deadline)


def _run_big(stack: Stack, timers: dict[str, Timer], args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    n, d = 1 << args.big[0], args.big[1]
    if deadline - time.perf_counter() < args.reserve:
        return {"shape": [n, d], "skipped": "time budget used up", "runs": []}
    _say(f"> 2**31 elements case: N = {n}, D = {d} ({n * d:,} elements), forward")
    big = big_case(stack, timers, n, d, args.big_dtypes, args.repeat, args.min_time)
    for run in big["runs"]:
        what = run.get("skipped") or run.get("error") or ", ".join(
            f"{k}: {'ok' if v['ok'] else 'WRONG'} ({v['max_error_ulp_one']:.2g} ulp(1))"
            for k, v in run["checks"].items())
        _say(f"  {run['dtype']}: {what}")
    return big


def _finish(doc: dict[str, Any], out_dir: Path, args: argparse.Namespace) -> None:
    """Copy bandwidth, fractions, targets; write the JSON and the plot."""
    from polycos.bench._report import write_json

    good = [c["gbps"] for c in doc["copy"] if c.get("gbps")]
    doc["copy_gbps"] = max(good) if good else None
    big_recs = [r for run in (doc["big"] or {}).get("runs", []) for r in run.get("records", [])]
    add_fractions(doc["results"] + big_recs, doc["copy_gbps"])
    doc["targets"] = evaluate_targets(doc["results"], args.dtypes)
    write_json(doc, out_dir / "gpu_bench.json")
    try:
        write_plot(doc, out_dir / "gpu_bench.png")
        doc["plot"] = "gpu_bench.png"
    except Exception as exc:
        doc["plot_error"] = _short(exc)
        _say(f"gpu_bench: plot failed: {_short(exc)}")
        write_json(doc, out_dir / "gpu_bench.json")


def _print_copy(copies: list[dict[str, Any]]) -> None:
    for c in copies:
        if "gbps" in c:
            _say(f"  copy bandwidth ({c['name']}, {c['bytes'] / 2**20:.0f} MiB): {c['gbps']:.0f} GB/s")
        else:
            _say(f"  copy bandwidth ({c['name']}): failed, {c['error']}")


def _print_case(where: dict[str, Any], recs: list[dict[str, Any]], took: float, copy: float | None) -> None:
    n, d = where["shape"]
    _say(f"{where['op']:17s} {where['dtype']:8s} N=2^{int(math.log2(n))} D={d}  ({took:.1f} s)")
    for r in recs:
        sp = ", ".join(f"{v:.2f}x vs {_SHORT.get(k, k)}" for k, v in r["speedup"].items() if v == v)
        frac = f"{100 * r['gbps'] / copy:4.0f} %" if copy else "   - "
        _say(f"    {_SHORT.get(r['name'], r['name']):20s} {r['median_s'] * 1e3:9.3f} ms {r['gbps']:8.1f} GB/s {frac}  {sp}")


def _print_targets(doc: dict[str, Any]) -> None:
    copy = doc["copy_gbps"]
    _say(f"copy bandwidth (best of the run): {copy:.0f} GB/s" if copy else "copy bandwidth: not measured")
    _say("targets (spec: cupy float32; the others for information)" + (" — DRY RUN, meaningless" if doc["dry_run"] else ""))
    for t in doc["targets"]:
        v = t["value"]
        shown = "-" if v is None else (f"{100 * v:.0f} %" if "bandwidth" in t["target"] else f"{v:.2f}x")
        mark = "*" if t["spec"] else " "
        _say(f"  {mark} {t['status']:12s} {shown:>8s}  {t['label']}")


# =========================================================================== env / probe


#: packages imported for their version (and to find broken installs); the rest are looked up
IMPORTED_FOR_VERSION = ("numpy", "torch", "cupy", "jax", "jaxlib")


@functools.cache
def _distributions() -> dict[str, list[str]]:
    from importlib import metadata

    return metadata.packages_distributions()


def _version(name: str) -> str:
    """Version of an importable package: ``missing``, ``broken (why)`` or the version."""
    try:
        if importlib.util.find_spec(name) is None:
            return "missing"
    except Exception as exc:
        return f"broken ({_short(exc, 120)})"
    if name not in IMPORTED_FOR_VERSION:  # metadata only: importing dask, scipy... costs seconds
        from importlib import metadata

        dists = _distributions().get(name, [])
        for dist in dists:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    try:
        mod = importlib.import_module(name)
    except Exception as exc:
        return f"broken ({_short(exc, 120)})"
    return str(getattr(mod, "__version__", "installed"))


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).is_file():
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except Exception as exc:
        return f"failed: {_short(exc)}"
    return (out.stdout + out.stderr).strip()


def probe() -> tuple[bool, str]:
    """Whether torch or CuPy can use a CUDA GPU, and why not."""
    why = []
    smi = _run(["nvidia-smi", "-L"])
    why.append("nvidia-smi: not found" if smi is None else f"nvidia-smi: {smi.splitlines()[0] if smi else 'no output'}")
    try:
        cupy = _import("cupy")
        n = cupy.cuda.runtime.getDeviceCount()
        if n > 0:
            return True, f"CuPy sees {n} CUDA device(s)"
        why.append("CuPy sees no CUDA device")
    except Unavailable as exc:
        why.append(str(exc))
    except Exception as exc:
        why.append(f"CuPy sees no CUDA device ({_short(exc, 100)})")
    try:
        torch = _import("torch")
        if torch.cuda.is_available():
            return True, f"torch sees {torch.cuda.device_count()} CUDA device(s)"
        why.append("torch: CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device")
    except Unavailable as exc:
        why.append(str(exc))
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        why.append("CUDA_VISIBLE_DEVICES is empty (dry run)")
    return False, "no usable CUDA GPU: " + "; ".join(why)


def collect_env() -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _now(),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "packages": {},
        "missing": [],
    }
    for name in (*EXPECTED_PACKAGES, *OPTIONAL_PACKAGES):
        env["packages"][name] = _version(name)
    env["missing"] = [n for n in EXPECTED_PACKAGES if env["packages"][n] == "missing"]
    env["broken"] = [n for n, v in env["packages"].items() if v.startswith("broken")]
    try:
        import polycos

        env["polycos"] = {"version": polycos.__version__, "path": str(Path(polycos.__file__).parent)}
        spec = importlib.util.find_spec("polycos._kernels")
        if spec is None:
            env["polycos"]["cpu_kernels"] = "not built (polycos falls back to the array-API core)"
        else:
            try:
                importlib.import_module("polycos._kernels")
                env["polycos"]["cpu_kernels"] = "importable"
            except Exception as exc:
                env["polycos"]["cpu_kernels"] = f"present but not importable ({_short(exc, 120)}); falls back"
    except Exception as exc:
        env["polycos"] = {"error": _short(exc)}
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,pci.bus_id",
                "--format=csv,noheader"])
    env["nvidia_smi"] = smi
    head = _run(["nvidia-smi"])
    env["cuda_driver_version"] = None
    if head and "CUDA Version" in head:
        env["cuda_driver_version"] = head.split("CUDA Version:")[1].split()[0]
    nvcc = _run(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-2] if nvcc and len(nvcc.splitlines()) > 1 else nvcc
    san = os.environ.get("POLYCOS_SANITIZER")
    env["compute_sanitizer"] = {"path": san or None,
                                "version": (_run([san, "--version"]) or "").splitlines()[-1:] if san else None}
    env["gpu"] = dict(zip(("present", "reason"), probe(), strict=True))
    t = env["packages"].get("torch", "missing")
    if not t.startswith(("missing", "broken")):
        import torch

        env["torch"] = {"cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
        if torch.cuda.is_available():
            env["torch"]["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            env["torch"]["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    c = env["packages"].get("cupy", "missing")
    if not c.startswith(("missing", "broken")):
        import cupy

        info: dict[str, Any] = {}
        try:
            info["runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            info["driver"] = cupy.cuda.runtime.driverGetVersion()
            info["devices"] = cupy.cuda.runtime.getDeviceCount()
            p = cupy.cuda.runtime.getDeviceProperties(0)
            info["device0"] = {"name": p["name"].decode(), "capability": f"{p['major']}.{p['minor']}",
                               "memory_bytes": p["totalGlobalMem"]}
        except Exception as exc:
            info["error"] = _short(exc)
        env["cupy"] = info
    j = env["packages"].get("jax", "missing")
    if not j.startswith(("missing", "broken")):
        try:
            import jax

            env["jax"] = {"backend": jax.default_backend(), "devices": [str(dv) for dv in jax.devices()]}
        except Exception as exc:
            env["jax"] = {"error": _short(exc)}
    return env


def cmd_env(args: argparse.Namespace) -> int:
    env = collect_env()
    Path(args.out).write_text(json.dumps(env, indent=1, default=str) + "\n")
    _say(f"python      {env['python']} ({env['executable']})")
    for k, v in env["packages"].items():
        _say(f"{k:17s}{v}")
    _say(f"polycos     {env.get('polycos')}")
    _say(f"nvidia-smi  {env['nvidia_smi'] or 'not found'}")
    _say(f"CUDA (driver) {env['cuda_driver_version']}; nvcc: {env['nvcc']}")
    for k in ("torch", "cupy", "jax"):
        if k in env:
            _say(f"{k:12s}{env[k]}")
    _say(f"GPU         {'yes' if env['gpu']['present'] else 'no'}: {env['gpu']['reason']}")
    if env["missing"]:
        _say(f"MISSING     {', '.join(env['missing'])} (the parts that need them are skipped)")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    ok, why = probe()
    _say(why)
    return 0 if ok else 1


# =========================================================================== summary


def _tsv(results: Path) -> list[dict[str, str]]:
    cols = ("name", "kind", "rc", "duration_s", "limit_s", "log", "note")
    rows = []
    path = results / "parts.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                vals = (line.split("\t") + [""] * len(cols))[: len(cols)]
                rows.append(dict(zip(cols, vals, strict=True)))
    return rows


def junit_counts(path: Path) -> dict[str, Any] | None:
    """Counts, failing tests and skip reasons from a pytest JUnit XML file."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable JUnit XML ({exc})"}
    out: dict[str, Any] = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "skip_reasons": {}}
    for case in root.iter("testcase"):
        out["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag, key in (("failure", "failures"), ("error", "errors")):
            el = case.find(tag)
            if el is not None:
                out[key] += 1
                out["failed"].append(f"{name}: {(el.get('message') or '').splitlines()[0][:200] if el.get('message') else tag}")
        sk = case.find("skipped")
        if sk is not None:
            out["skipped"] += 1
            reason = (sk.get("message") or "").strip()[:160]
            out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def sanitizer_verdict(log: str) -> tuple[str, str]:
    """The tool's verdict from its log: ``clean``, ``api-only`` or ``dirty``, and a one-line text.

    ``clean``: the summary line reports 0 errors (memcheck) or 0 hazards
    (racecheck). ``api-only``: every error counted is a failed CUDA API call
    (``Program hit cudaError...``), as libraries' own probing calls can cause;
    no kernel touched memory out of bounds. Anything else is ``dirty``.
    """
    lines = [ln.strip("= ").strip() for ln in log.splitlines()
             if "SUMMARY" in ln and ("ERROR" in ln or "RACECHECK" in ln)]
    text = "; ".join(lines) or "no summary line found"
    if not lines:
        return "dirty", text
    errors = sum(int(m.group(1)) for ln in lines if (m := re.match(r"ERROR SUMMARY: (\d+) error", ln)))
    hazards = sum(int(m.group(1)) for ln in lines if (m := re.match(r"RACECHECK SUMMARY: (\d+) hazard", ln)))
    if not any(ln.startswith(("ERROR SUMMARY:", "RACECHECK SUMMARY:")) for ln in lines):
        return "dirty", text
    if errors == 0 and hazards == 0:
        return "clean", text
    api = [ln.split("Program hit", 1)[1].strip() for ln in log.splitlines() if "Program hit" in ln]
    if hazards == 0 and 0 < errors <= len(api):
        return "api-only", text + "; failed CUDA API calls: " + "; ".join(sorted(set(api))[:3])
    return "dirty", text


def _part(row: dict[str, str], results: Path) -> dict[str, Any]:
    name, kind, rc_text, note = row["name"], row["kind"], row["rc"], row["note"]
    part: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "rc": None if rc_text in ("", "skip") else int(rc_text),
        "duration_s": float(row["duration_s"] or 0),
        "limit_s": float(row["limit_s"]) if row["limit_s"] else None,
        "log": row["log"] or None,
        "status": "ok",
        "reason": "",
        "details": {},
    }
    rc = part["rc"]
    log_path = results / row["log"] if row["log"] else None
    log = log_path.read_text(errors="replace") if log_path and log_path.is_file() else ""
    if rc_text == "skip":
        part.update(status="skipped", reason=note or "not run")
        return part
    if rc == 124:
        part.update(status="timeout", reason=f"stopped after its limit of {row['limit_s']} s")
    if kind == "pytest":
        counts = junit_counts(results / "pytest-gpu.xml")
        part["details"] = counts or {}
        if rc == 124:
            pass
        elif rc == 5:
            part.update(status="skipped", reason="no GPU test collected")
        elif rc == 0 and counts and "tests" in counts and counts["tests"] == counts["skipped"]:
            reasons = "; ".join(f"{k} ({v})" for k, v in counts["skip_reasons"].items())
            part.update(status="skipped", reason=(note + "; " if note else "") + f"all {counts['tests']} GPU tests skipped: {reasons}")
        elif rc == 0:
            part["reason"] = f"{counts['passed']} passed, {counts['skipped']} skipped" if counts else "passed"
        else:
            bits = []
            if counts and "tests" in counts:
                bits.append(f"{counts['failures']} failed, {counts['errors']} errors, {counts['passed']} passed")
                bits += counts["failed"][:5]
            part.update(status="failed", reason=f"pytest exit {rc}: " + "; ".join(bits))
    elif kind == "sanitizer":
        if note:  # no sanitizer run; the script itself ran once, without the tool
            if rc in (0, EXIT_SKIP):
                part.update(status="skipped", reason=note)
            else:
                part.update(status="failed", reason=f"{note}; but gpu_sanitize.py itself failed (exit {rc})")
        elif rc == EXIT_SKIP:
            part.update(status="skipped", reason=_last_line(log, "SKIP:") or "gpu_sanitize.py skipped")
        elif rc != 124:
            verdict, text = sanitizer_verdict(log)
            fails = [ln.strip() for ln in log.splitlines() if ": FAILED," in ln][:3]
            script_ok = "polycos-sanitize: done" in log and not fails
            part["details"] = {"summary": text, "verdict": verdict, "script_finished_ok": script_ok}
            if verdict == "clean" and rc == 0 and script_ok:
                part.update(status="ok", reason="clean: " + text)
            elif verdict == "api-only" and rc in (0, 3) and script_ok:
                part.update(status="ok", reason="no memory errors or races in any kernel; the tool also "
                            "counted failed CUDA API calls (a library probing, not a kernel): " + text)
            elif verdict != "dirty":
                part.update(status="failed", reason=f"tool clean ({text}), but gpu_sanitize.py failed "
                            f"(exit {rc}): " + ("; ".join(fails) or "it did not finish; see the log"))
            else:
                part.update(status="failed", reason=f"NOT clean (exit {rc}): {text}")
    elif kind == "bench":
        bench = _load(results / "gpu_bench.json")
        part["details"] = _bench_figures(bench) if bench else {}
        if note:
            if rc in (0, EXIT_SKIP) and bench:
                part.update(status="skipped", reason=note + "; the CPU dry run of gpu_bench.py passed")
            elif rc in (0, EXIT_SKIP):
                part.update(status="skipped", reason=note)
            else:
                part.update(status="failed", reason=f"{note}; but the dry run of gpu_bench.py failed (exit {rc})")
        elif rc == EXIT_SKIP:
            part.update(status="skipped", reason="; ".join((bench or {}).get("skipped_reasons", [])) or "no GPU subject could run")
        elif rc not in (0, 124):
            part.update(status="failed", reason=f"gpu_bench.py exit {rc}: " + (_last_line(log, "") or ""))
        elif rc == 0:
            figures = part["details"]
            missed = [t["label"] for t in figures.get("targets", []) if t["spec"] and t["status"] == "missed"]
            bits = ["spec targets missed: " + "; ".join(missed) if missed else "spec targets met or not measured"]
            if figures.get("subject_failures"):
                bits.append(f"{len(figures['subject_failures'])} polycos subject failures: "
                            + "; ".join(figures["subject_failures"][:3]))
            wrong = figures.get("big_wrong", [])
            if wrong:  # a wrong answer is a failed test, not a slow one
                part["status"] = "failed"
                bits.insert(0, "WRONG results in the > 2**31-element case: " + ", ".join(wrong))
            part["reason"] = "; ".join(bits)
    elif rc not in (0, None, 124):
        part.update(status="failed", reason=f"exit {rc}: " + (_last_line(log, "") or ""))
    return part


def _last_line(log: str, prefix: str) -> str:
    for ln in reversed(log.strip().splitlines()):
        if ln.strip().startswith(prefix):
            return ln.strip()[:300]
    return ""


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except Exception:
        return None


def _bench_figures(bench: dict[str, Any]) -> dict[str, Any]:
    """The key figures: copy bandwidth, targets, and each subject at the reference size."""
    ref = bench.get("config", {}).get("ref")
    rows = []
    for r in bench.get("results", []):
        if r["shape"] == ref:
            rows.append({k: r.get(k) for k in ("name", "op", "dtype", "median_s", "gbps", "fraction_of_copy",
                                               "fraction_two_pass", "speedup")})
    big = bench.get("big") or {}
    big_rows = []
    for run in big.get("runs", []):
        big_rows.append({"dtype": run["dtype"], "skipped": run.get("skipped"), "error": run.get("error"),
                         "checks": run.get("checks", {}),
                         "gbps": {r["name"]: r["gbps"] for r in run.get("records", [])}})
    failures = [
        f"{'x'.join(map(str, x['shape']))} {x['dtype']} {x['op']}: {x['reason']}"
        for x in bench.get("skipped", [])
        if x.get("shape") and (x["reason"].startswith((f"{CUPY}: failed", f"{TORCH}: failed")) or x["reason"].startswith("error:"))
    ]
    wrong = [f"{run['dtype']} {name}" for run in big.get("runs", []) for name, c in run.get("checks", {}).items()
             if name in SUBJECTS and not c.get("ok")]
    return {
        "subject_failures": failures,
        "big_wrong": wrong,
        "dry_run": bench.get("dry_run"),
        "device": bench.get("device"),
        "copy_gbps": bench.get("copy_gbps"),
        "ref": ref,
        "at_ref": rows,
        "targets": [{k: t[k] for k in ("label", "value", "status", "spec", "shape")} for t in bench.get("targets", [])],
        "big": {"shape": big.get("shape"), "over_2_31": big.get("over_2_31"), "runs": big_rows, "skipped": big.get("skipped")},
        "cases_measured": len({(r["op"], r["dtype"], tuple(r["shape"])) for r in bench.get("results", [])}),
        "cases_skipped": len(bench.get("skipped", [])),
    }


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{100 * v:.0f} %" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))


def cmd_summary(args: argparse.Namespace) -> int:
    results = Path(args.results)
    parts = [_part(row, results) for row in _tsv(results)]
    env = _load(results / "env.json") or {}
    # a benchmark that ran out of time is reported, not failed; tests and sanitizers must finish
    failed = [p["name"] for p in parts
              if p["status"] == "failed" or (p["status"] == "timeout" and p["kind"] != "bench")]
    summary = {
        "schema": SCHEMA_SUMMARY,
        "date": _now(),
        "results_dir": str(results),
        "dry_run": args.dry_run,
        "gpu": env.get("gpu"),
        "device": {"nvidia_smi": env.get("nvidia_smi"), "cuda_driver_version": env.get("cuda_driver_version"),
                   "nvcc": env.get("nvcc")},
        "versions": {"python": env.get("python"), **env.get("packages", {})},
        "missing_packages": env.get("missing", []),
        "duration_s": args.duration,
        "parts": parts,
        "failed": failed,
        "exit_code": 1 if failed else 0,
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    md = _summary_md(summary)
    (results / "summary.md").write_text(md)
    print(md)
    return summary["exit_code"]


def _summary_md(s: dict[str, Any]) -> str:
    v = s["versions"]
    lines = [
        f"# polycos GPU check — {s['date']}" + (" (DRY RUN: no GPU used)" if s["dry_run"] else ""),
        "",
        f"* device: {s['device']['nvidia_smi'] or 'none (nvidia-smi not found)'}",
        f"* CUDA (driver): {s['device']['cuda_driver_version']}; nvcc: {s['device']['nvcc']}",
        f"* GPU usable: {(s['gpu'] or {}).get('reason', 'unknown')}",
        "* versions: " + ", ".join(f"{k} {v.get(k)}" for k in ("python", "numpy", "torch", "cupy", "jax", "optax", "pytest", "hypothesis")),
    ]
    if s["missing_packages"]:
        lines.append(f"* missing packages: {', '.join(s['missing_packages'])}")
    lines += [f"* total time: {_fmt(s['duration_s'])} s; exit code {s['exit_code']}", "",
              "| part | status | time [s] | notes |", "|---|---|---|---|"]
    for p in s["parts"]:
        reason = str(p["reason"]).replace("|", "/").replace("\n", " ")
        lines.append(f"| {p['name']} | {p['status']} | {p['duration_s']:.0f} | {reason} |")
    bench = next((p["details"] for p in s["parts"] if p["kind"] == "bench" and p["details"]), None)
    if bench:
        lines += ["", f"## Benchmark{' (dry run on the CPU: machinery only, numbers meaningless)' if bench.get('dry_run') else ''}", "",
                  f"copy bandwidth: {_fmt(bench['copy_gbps'])} GB/s; {bench['cases_measured']} cases measured, "
                  f"{bench['cases_skipped']} candidates/cases skipped (see gpu_bench.json)", "",
                  "| target | status | value | at N x D |", "|---|---|---|---|"]
        for t in bench["targets"]:
            pct = "bandwidth" in t["label"]
            val = _fmt(t["value"], pct) if pct else (f"{t['value']:.2f}x" if t["value"] is not None else "-")
            lines.append(f"| {'**' if t['spec'] else ''}{t['label']}{'**' if t['spec'] else ''} | {t['status']} | {val} | "
                         f"{'x'.join(map(str, t['shape'])) if t['shape'] else '-'} |")
        if bench["at_ref"]:
            lines += ["", f"At the reference size N x D = {bench['ref'][0]} x {bench['ref'][1]}:", "",
                      "| subject | op | dtype | ms | GB/s | of copy bw | two-pass | speed-ups |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in bench["at_ref"]:
                sp = ", ".join(f"{_fmt(x)}x {k}" for k, x in (r.get("speedup") or {}).items())
                lines.append(f"| {r['name']} | {r['op']} | {r['dtype']} | {_fmt((r['median_s'] or 0) * 1e3)} | "
                             f"{_fmt(r['gbps'])} | {_fmt(r['fraction_of_copy'], True)} | "
                             f"{_fmt(r.get('fraction_two_pass'), True) if r['op'] != 'forward' else ''} | {sp} |")
        big = bench["big"]
        if big and big.get("shape"):
            lines += ["", f"> 2**31 elements: N x D = {big['shape'][0]} x {big['shape'][1]} "
                          f"({'over' if big.get('over_2_31') else 'NOT over (dry run)'} 2**31), forward"]
            if big.get("skipped"):
                lines.append(f"  skipped: {big['skipped']}")
            for run in big["runs"]:
                what = run["skipped"] or run["error"] or ", ".join(
                    f"{k}: {'ok' if c['ok'] else 'WRONG'} ({_fmt(c['max_error_ulp_one'])} ulp(1)), "
                    f"{_fmt(run['gbps'].get(k))} GB/s" for k, c in run["checks"].items())
                lines.append(f"* {run['dtype']}: {what}")
    lines += ["", "Files: summary.json, env.json/env.log, pytest-gpu.xml/pytest-gpu.log, sanitizer-*.log, "
              "gpu_bench.json, gpu_bench.png, bench.log.", ""]
    return "\n".join(lines)


# =========================================================================== main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="the GPU benchmark (or --dry-run on the CPU)")
    b.add_argument("--out", required=True, help="results folder (gpu_bench.json, gpu_bench.png)")
    b.add_argument("--dry-run", action="store_true", help="tiny CPU run of the machinery, no GPU")
    b.add_argument("--budget", type=float, default=240.0, help="seconds; later cases are skipped (240)")
    b.add_argument("--reserve", type=float, default=15.0, help="seconds kept for the end (15)")
    b.add_argument("--log2-n", type=_ints, default=[20, 22, 24], help="log2 of N (20,22,24)")
    b.add_argument("--dims", type=_ints, default=[128, 256, 1024], help="D (128,256,1024)")
    b.add_argument("--dtypes", type=_dtypes, default=["float32", "bfloat16"], help="(float32,bfloat16)")
    b.add_argument("--ref", type=_pair, default=[22, 256], help="reference LOG2N,D, run first (22,256)")
    b.add_argument("--big", type=_pair, default=[23, 320], help="> 2**31-element case LOG2N,D (23,320)")
    b.add_argument("--big-dtypes", type=_dtypes, default=["bfloat16", "float16"])
    b.add_argument("--repeat", type=int, default=5, help="interleaved rounds (5)")
    b.add_argument("--min-time", type=float, default=0.02, help="seconds per sample at least (0.02)")
    b.set_defaults(log2_n_dry=[10], dims_dry=[64], ref_dry=[10, 64], big_dry=[8, 320])
    e = sub.add_parser("env", help="versions and device")
    e.add_argument("--out", required=True)
    sub.add_parser("probe", help="is there a usable CUDA GPU?")
    s = sub.add_parser("summary", help="summary.json/md from gpu_check.sh's parts.tsv")
    s.add_argument("--results", required=True)
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--duration", type=float, default=None)
    args = parser.parse_args(argv)
    return {"bench": cmd_bench, "env": cmd_env, "probe": cmd_probe, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
