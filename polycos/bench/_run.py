"""The benchmark driver: plan the grid, time every case at each thread count, return the document.

Shared by ``polycos bench`` (:mod:`polycos.bench.cli`) and
``benchmarks/run_cpu_targets.py``; :mod:`polycos.bench._schema` describes the
document.

Each thread count runs in a fresh Python process (``python -m
polycos.bench._run --child``), because XLA and BLAS fix their thread pools when
they are loaded: the child gets ``POLYCOS_NUM_THREADS``, ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` (and, for one thread,
``--xla_cpu_multi_thread_eigen=false`` in ``XLA_FLAGS``) before anything is
imported, pins itself to that many CPUs when the machine has more (XLA sizes
its CPU pool by the CPUs it may use, whatever the flags say: :func:`pin`),
then sets ``torch.set_num_threads`` and dask's scheduler. The machine
floor, the subjects and the peers of a thread count are all measured in its
child, interleaved, so every ratio is taken at one thread count.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from polycos.bench._suites import (
    ALLOCATORS,
    JAX_DISPATCH,
    PAIRWISE,
    ROWWISE,
    Case,
    Unavailable,
    build_case,
    cuda_available,
    subject_device,
)
from polycos.bench._timing import calibrate, floor_samples, interleaved, median_ratio

__all__ = [
    "Config",
    "default_threads",
    "measure_case",
    "pin",
    "plan",
    "reference_threads",
    "run",
    "thread_env",
    "usable_cpus",
]

SCHEMA_ID = "polycos-bench/2"
PROGRESS = "@@polycos-bench-progress "
#: Environment variables a thread count sets (read by the libraries when they load).
THREAD_VARS = ("POLYCOS_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
XLA_ONE_THREAD = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")
#: ``--allocator reuse``: glibc's malloc serves every thread from one heap and keeps
#: freed blocks of up to 256 MiB there for the next request instead of mapping
#: each one afresh (see :func:`allocator_env`).
REUSE_TUNABLES = (
    ("glibc.malloc.mmap_threshold", 256 << 20),
    ("glibc.malloc.trim_threshold", 1 << 30),
    ("glibc.malloc.arena_max", 1),
)


@dataclass
class Config:
    """What to run.

    Attributes
    ----------
    backends : list of str
        polycos subjects (:func:`polycos.bench._suites.subject_names`).
    ops : list of str
        ``forward``, ``forward+backward``, ``pairwise``, ``pairwise+backward``.
    rowwise : list of (int, int, str)
        ``(N, D, dtype)`` problems of the row-wise ops.
    pairwise : list of (int, int, int, str)
        ``(N, M, D, dtype)`` problems of the pairwise ops.
    threads : list of str
        Thread counts, each ``"all"`` or a positive integer as text; one child process each.
    repeat : int
        Rounds per case; medians are over these.
    min_time : float
        Seconds one sample lasts at least (fast calls are repeated).
    quick : bool
        Recorded in the output (the CLI picks the sizes).
    compile : str
        Where the ``torch.compile`` subject and peer run (each compiles for
        seconds): ``"rowwise"``, every row-wise case; ``"all"``, pairwise ones
        too (about 10 s of compilation per pairwise case on 2 cores);
        ``"largest"``, only the largest float32 row-wise size; ``"none"``.
    slow : float
        Candidates slower than this (seconds per call) run ``slow_rounds`` rounds only.
    slow_rounds : int
        Rounds for those.
    isolate : bool
        Run each thread count in a child process (``False``: in this process,
        for tests; XLA's threads then stay as they were).
    allocator : str
        The C allocator's setting in the child processes (:func:`allocator_env`):
        ``"system"`` (the environment as it is) or ``"reuse"``.
    jax_dispatch : str
        ``"async"`` (JAX's default: XLA:CPU runs each jitted call, and allocates
        its outputs, on a worker thread) or ``"sync"`` (on the calling thread,
        as NumPy and torch do; :func:`apply_jax_dispatch`).
    """

    backends: list[str]
    ops: list[str]
    rowwise: list[tuple[int, int, str]]
    pairwise: list[tuple[int, int, int, str]]
    threads: list[str]
    repeat: int = 7
    min_time: float = 0.02
    quick: bool = False
    compile: str = "rowwise"
    slow: float = 1.0
    slow_rounds: int = 3
    isolate: bool = True
    allocator: str = "system"
    jax_dispatch: str = "async"
    argv: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- threads


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def reference_threads(cpus: int | None = None) -> str:
    """The thread count the spec's targets are judged at: ``"1"`` on machines with <= 2 CPUs.

    On 2-core machines a parallel region waits for a second thread that other
    processes deschedule for whole scheduler ticks, which drowns every ratio
    (spec section 5); elsewhere the libraries run as users run them.

    Examples
    --------
    >>> reference_threads(2), reference_threads(16)
    ('1', 'all')
    """
    cpus = usable_cpus() if cpus is None else cpus
    return "1" if cpus <= 2 else "all"


def default_threads(cpus: int | None = None) -> list[str]:
    """``polycos bench``'s default ``--threads``: the reference thread count only."""
    return [reference_threads(cpus)]


def resolve_threads(setting: str) -> int:
    """``"all"`` -> the usable CPUs; ``"3"`` -> 3."""
    return usable_cpus() if setting == "all" else int(setting)


def thread_env(setting: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child measuring at ``setting`` threads.

    Examples
    --------
    >>> e = thread_env("1", {"XLA_FLAGS": "--xla_dump_to=/tmp/x"})
    >>> e["POLYCOS_NUM_THREADS"], e["OPENBLAS_NUM_THREADS"]
    ('1', '1')
    >>> e["XLA_FLAGS"]
    '--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
    """
    out = dict(os.environ if env is None else env)
    n = resolve_threads(setting)
    for var in THREAD_VARS:
        out[var] = str(n)
    flags = [
        f for f in out.get("XLA_FLAGS", "").split()
        if not f.startswith(("--xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads"))
    ]
    if n == 1:
        flags += XLA_ONE_THREAD
    out["XLA_FLAGS"] = " ".join(flags)
    if not out["XLA_FLAGS"]:
        del out["XLA_FLAGS"]
    return out


def allocator_env(mode: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child whose C allocator runs in ``mode``.

    ``"system"`` leaves the environment as it is. ``"reuse"`` makes glibc's
    malloc serve every thread from one heap and keep freed blocks of up to
    256 MiB there (``GLIBC_TUNABLES``: ``mmap_threshold``, ``trim_threshold``,
    ``arena_max``; tunables the environment already sets are kept).

    Under glibc's defaults, whether a new array of 32 MiB or more is memory
    used before or fresh pages, each first-touched with a page fault, depends
    on the allocation history and on the thread: glibc raises its map
    threshold only up to 32 MiB, so such a block is mapped afresh unless a
    free chunk of the heap happens to fit it, and a thread other than the
    main one (where XLA allocates its outputs) has heaps of at most 64 MiB.
    In one run the floor's fill and NumPy reused their blocks (0 faults per
    call at 32768 x 256) while torch's gradients took 396 and XLA's 1567.
    ``"reuse"`` measures without these effects: every library,
    the floor included, writes memory it has used before. Other C libraries
    ignore ``GLIBC_TUNABLES``.

    Examples
    --------
    >>> allocator_env("reuse", {})["GLIBC_TUNABLES"].split(":")
    ['glibc.malloc.mmap_threshold=268435456', 'glibc.malloc.trim_threshold=1073741824', 'glibc.malloc.arena_max=1']
    >>> allocator_env("reuse", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})["GLIBC_TUNABLES"].split(":")
    ['glibc.malloc.trim_threshold=0', 'glibc.malloc.mmap_threshold=268435456', 'glibc.malloc.arena_max=1']
    >>> allocator_env("system", {"A": "1"})
    {'A': '1'}
    """
    if mode not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {mode!r}")
    out = dict(os.environ if env is None else env)
    if mode == "reuse":
        given = [t for t in out.get("GLIBC_TUNABLES", "").split(":") if t]
        keys = {t.split("=", 1)[0] for t in given}
        given += [f"{k}={v}" for k, v in REUSE_TUNABLES if k not in keys]
        out["GLIBC_TUNABLES"] = ":".join(given)
    return out


def apply_jax_dispatch(mode: str) -> bool | None:
    """Set JAX's CPU dispatch for this process (before its CPU client exists); return the setting in force.

    ``None`` without JAX. ``"async"`` changes nothing (JAX's default, or what
    the process chose); ``"sync"`` turns ``jax_cpu_enable_async_dispatch`` off.
    """
    if mode not in JAX_DISPATCH:
        raise ValueError(f"jax_dispatch must be one of {JAX_DISPATCH}, got {mode!r}")
    if importlib.util.find_spec("jax") is None:
        return None
    import jax

    if mode == "sync":
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return bool(jax.config.values["jax_cpu_enable_async_dispatch"])


def _apply_threads(n: int, isolated: bool) -> dict[str, Any]:
    """Set what can be set in this process; return what each library will use."""
    info: dict[str, Any] = {}
    os.environ["POLYCOS_NUM_THREADS"] = str(n)
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(n)
        info["torch"] = torch.get_num_threads()
    if importlib.util.find_spec("dask") is not None:
        import dask

        if n == 1:
            dask.config.set(scheduler="synchronous")
        else:
            dask.config.set(scheduler="threads", num_workers=n)
        info["dask"] = n
    if not isolated and importlib.util.find_spec("threadpoolctl") is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    try:
        from polycos import _kernels

        info["polycos_kernel"] = _kernels.num_threads() if _kernels.available() else None
    except Exception:  # pragma: no cover - a broken kernel build is reported by the subjects
        info["polycos_kernel"] = None
    xla = os.environ.get("XLA_FLAGS", "")
    info["xla"] = 1 if "--xla_cpu_multi_thread_eigen=false" in xla else "XLA's default pool"
    if not isolated and "jax" in sys.modules:
        info["xla"] = "as jax was loaded (in-process run)"
    return info


# --------------------------------------------------------------------------- plan


def plan(config: Config) -> list[tuple[str, str, tuple[int, ...], str, bool]]:
    """The cases: ``(device, op, shape, dtype, compile)``, CPU first, ops in the given order."""
    devices = list(dict.fromkeys(subject_device(b) for b in config.backends))
    devices.sort(key=lambda d: d != "cpu")
    largest = max(
        (n * d for n, d, dt in config.rowwise if dt == "float32"), default=None
    )
    cases = []
    for device in devices:
        for op in config.ops:
            if op in ROWWISE:
                for n, d, dtype in config.rowwise:
                    comp = config.compile in ("all", "rowwise") or (
                        config.compile == "largest" and dtype == "float32" and n * d == largest
                    )
                    cases.append((device, op, (n, d), dtype, comp))
            elif op in PAIRWISE:
                for n, m, d, dtype in config.pairwise:
                    cases.append((device, op, (n, m, d), dtype, config.compile == "all"))
    return cases


# --------------------------------------------------------------------------- one case


def measure_case(
    case: Case, repeat: int, min_time: float, *, slow: float = 1.0, slow_rounds: int = 3
) -> tuple[list[dict[str, Any]], list[str]]:
    """Warm up, calibrate and time the candidates of one case, interleaved with the floor.

    Parameters
    ----------
    case : Case
        From :func:`polycos.bench._suites.build_case`.
    repeat : int
        Rounds.
    min_time : float
        Seconds per sample at least.
    slow : float, optional
        Candidates slower than this many seconds per call run ``slow_rounds`` rounds only
        (the floor's parts always run every round).
    slow_rounds : int, optional
        Rounds for slow candidates.

    Returns
    -------
    (list of dict, list of str)
        The records (see :mod:`polycos.bench._schema`; without the thread fields,
        which the caller adds), and notes for the candidates that failed.

    Raises
    ------
    Unavailable
        When no reader or no writer of the floor could run.
    """
    notes: list[str] = []
    fns: dict[str, Callable[[], Any]] = {}
    warm: dict[str, float] = {}
    numbers: dict[str, int] = {}
    first: dict[str, float] = {}
    cands = {c.name: c for c in case.candidates}
    for cand in case.candidates:
        try:
            with warnings.catch_warnings():  # tracer chatter (dynamo, jax) is not a result
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                t1 = cand.timer(cand.fn, 1)  # first call: includes compilation
                warm[cand.name] = time.perf_counter() - t0
                if cand.compiles or cand.kind.startswith("floor") or t1 <= slow:
                    numbers[cand.name], t1 = calibrate(cand.timer, cand.fn, min_time)
                else:  # slow, and nothing compiled: the first call was a fair sample
                    numbers[cand.name] = 1
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            notes.append(f"{cand.name}: failed, {type(exc).__name__}: {msg}")
            continue
        if not cand.kind.startswith("floor"):
            first[cand.name] = t1
        fns[cand.name] = cand.fn
    reads = [n for n in fns if cands[n].kind == "floor-read"]
    writes = [n for n in fns if cands[n].kind == "floor-write"]
    if not reads or not writes:
        raise Unavailable("the floor could not run: " + "; ".join(notes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = interleaved(
            {n: cands[n].timer for n in fns}, fns, numbers, repeat,
            first=first, slow=slow, min_rounds_slow=slow_rounds,
        )
    floor = floor_samples([timings[n].samples for n in reads], [timings[n].samples for n in writes])
    floor_times = [t for t in floor if t is not None]

    def base(name: str, kind: str, backend: str | None) -> dict[str, Any]:
        return {
            "name": name, "kind": kind, "backend": backend, "op": case.op,
            "shape": list(case.shape), "dtype": case.dtype, "device": case.device,
            "bytes": case.nbytes,
        }

    def won(names: list[str]) -> dict[str, int]:
        wins = dict.fromkeys(names, 0)
        for r in range(repeat):
            row = [(timings[n].samples[r], n) for n in names if timings[n].samples[r] is not None]
            if row:
                wins[min(row)[1]] += 1
        return wins

    fmed = _median(floor_times)
    records = [
        {
            **base("floor", "floor", None),
            "call": "per round: the fastest reader plus the fastest writer",
            "number": None,
            "warmup_s": 0.0,
            "times_s": floor_times,
            "median_s": fmed,
            "gbps": case.nbytes / fmed / 1e9 if fmed > 0 else None,
            "x_floor": 1.0,
            "speedup": {},
            "floor_parts": {"read": won(reads), "write": won(writes)},
        }
    ]
    for name, tm in timings.items():
        c = cands[name]
        med = tm.median
        rec: dict[str, Any] = {
            **base(name, c.kind, c.backend),
            "call": c.call,
            "number": tm.number,
            "warmup_s": warm[name],
            "times_s": tm.times,
            "median_s": med,
            "gbps": case.nbytes / med / 1e9 if med > 0 else None,
            "x_floor": median_ratio(tm.samples, floor),
            "speedup": {},
        }
        if tm.faults:  # what first-touching new memory cost in calls (see docs/benchmarks.md)
            rec["page_faults"] = _median(tm.faults)
        if c.kind == "polycos":
            rec["speedup"] = {
                p: median_ratio(ptm.samples, tm.samples)
                for p, ptm in timings.items()
                if cands[p].kind == "peer" and (case.device == "cuda" or cands[p].backend == c.backend)
            }
        records.append(rec)
    return records, notes


def _median(xs: Sequence[float]) -> float:
    import statistics

    return statistics.median(xs) if xs else math.nan


# --------------------------------------------------------------------------- one thread count


def run_threads(
    config: Config, setting: str, on_case: Callable[[int, int, str], None] | None = None
) -> dict[str, Any]:
    """Every case at one thread count, in this process: ``{"run", "results", "skipped"}``."""
    t0 = time.perf_counter()
    n = resolve_threads(setting)
    load0 = _loadavg()
    libs = _apply_threads(n, config.isolate)
    async_dispatch = apply_jax_dispatch(config.jax_dispatch)
    tag = {"threads": n, "threads_setting": setting}
    prewarm(config)
    cases = plan(config)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    if any(c[0] == "cuda" for c in cases):
        why = cuda_available()
        if why is not None:
            gpu = [b for b in config.backends if subject_device(b) == "cuda"]
            skipped.append({**tag, "device": "cuda", "op": None, "shape": None, "dtype": None,
                            "reason": f"{', '.join(gpu)}: skipped, {why}"})
            cases = [c for c in cases if c[0] != "cuda"]
    for i, (device, op, shape, dtype, comp) in enumerate(cases):
        desc = f"{setting} thr {device} {op} {'x'.join(map(str, shape))} {dtype}"
        if on_case is not None:
            on_case(i, len(cases), desc)
        where = {**tag, "device": device, "op": op, "shape": list(shape), "dtype": dtype}
        try:
            case = build_case(op, shape, dtype, config.backends, device=device, compile=comp)
            records, notes = measure_case(
                case, config.repeat, config.min_time, slow=config.slow, slow_rounds=config.slow_rounds
            )
        except Unavailable as exc:
            skipped.append({**where, "reason": str(exc)})
            continue
        results.extend({**r, **tag} for r in records)
        for note in case.notes + notes:
            skipped.append({**where, "reason": note})
        if case.nbytes > 1 << 28:  # big arrays held in reference cycles (jit closures): free now
            del case
            gc.collect()  # about 0.7 s with torch and jax loaded: not after every case
    if on_case is not None:
        on_case(len(cases), len(cases), f"{setting} thr done")
    return {
        "run": {
            **tag,
            "threads_by_library": libs,
            "env": {k: os.environ.get(k) for k in (*THREAD_VARS, "XLA_FLAGS", "GLIBC_TUNABLES")},
            "isolated": config.isolate,
            "jax_async_dispatch": async_dispatch,
            "duration_s": time.perf_counter() - t0,
            "loadavg": [load0, _loadavg()],
            "kernel": _kernel_info(),
        },
        "results": results,
        "skipped": skipped,
    }


def prewarm(config: Config) -> None:
    """Call every subject and peer that compiles nothing once on tiny rows.

    A library's first call pays one-time costs (imports, operator registration,
    loading the kernel: seconds for the first polycos call on torch), which
    would otherwise land in the first case's warm-up and make
    :func:`measure_case` take a fast candidate for a slow one.
    """
    for op in ("forward", "forward+backward"):
        if op not in config.ops:
            continue
        try:
            case = build_case(op, (4, 2), "float32", config.backends, compile=False)
        except Unavailable:
            continue
        for cand in case.candidates:
            if cand.compiles:
                continue
            # a failure here is reported by measure_case, with the case's real inputs
            with warnings.catch_warnings(), contextlib.suppress(Exception):
                warnings.simplefilter("ignore")
                cand.fn()


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _kernel_info() -> dict[str, Any]:
    try:
        from polycos import _kernels

        if _kernels.available():
            return {"available": True, "isa": _kernels.isa()}
        return {"available": False, "reason": _kernels.unavailable_reason()}
    except Exception as exc:  # pragma: no cover
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}


def _run_child(
    config: Config, setting: str, on_case: Callable[[int, int, str], None] | None
) -> dict[str, Any]:
    """:func:`run_threads` in a fresh interpreter with the thread count's environment."""
    with tempfile.TemporaryDirectory(prefix="polycos-bench-") as tmp:
        cfg, out = os.path.join(tmp, "config.json"), os.path.join(tmp, "out.json")
        with open(cfg, "w") as f:
            json.dump({**asdict(config), "isolate": True}, f)
        proc = subprocess.Popen(
            [sys.executable, "-m", "polycos.bench._run", "--child", setting, cfg, out],
            env=allocator_env(config.allocator, thread_env(setting)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        tail: list[str] = []
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith(PROGRESS):
                if on_case is not None:
                    p = json.loads(line[len(PROGRESS):])
                    on_case(p["i"], p["n"], p["desc"])
            else:
                tail = [*tail[-30:], line.rstrip()]
        rc = proc.wait()
        if rc != 0 or not os.path.exists(out):
            raise ChildFailed(setting, rc, tail)
        with open(out) as f:
            return json.load(f)


class ChildFailed(RuntimeError):
    """The process measuring one thread count failed."""

    def __init__(self, setting: str, rc: int, tail: list[str]) -> None:
        self.setting, self.rc, self.tail = setting, rc, tail
        lines = [t for t in tail if t.strip()][-12:]
        super().__init__(
            f"the run at threads={setting} failed (exit status {rc}):\n" + "\n".join(lines)
        )


def pin(n: int) -> list[int] | None:
    """Restrict this process to ``n`` of its CPUs (the first ones), if it may use more.

    Thread counts alone do not bound every library: XLA's CPU client splits
    reductions over a pool sized by the CPUs it may run on, even with
    ``--xla_cpu_multi_thread_eigen=false`` (a ``jnp.sum`` of 32 MiB used 2 CPUs
    "at one thread" on the 2-core EPYC). Called before any library is imported.

    Returns
    -------
    list of int or None
        The CPUs now allowed, or ``None`` when nothing was changed.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return None
    if n >= len(cpus):
        return None
    os.sched_setaffinity(0, cpus[:n])
    return cpus[:n]


def _child_main(argv: list[str]) -> int:
    setting, cfg_path, out_path = argv
    pinned = pin(resolve_threads(setting))
    with open(cfg_path) as f:
        raw = json.load(f)
    raw["rowwise"] = [tuple(x) for x in raw["rowwise"]]
    raw["pairwise"] = [tuple(x) for x in raw["pairwise"]]
    config = Config(**raw)

    def progress(i: int, n: int, desc: str) -> None:
        print(PROGRESS + json.dumps({"i": i, "n": n, "desc": desc}), file=sys.stderr, flush=True)

    part = run_threads(config, setting, progress)
    part["run"]["cpus"] = pinned if pinned is not None else sorted(os.sched_getaffinity(0))
    from polycos.bench._report import _finite

    with open(out_path, "w") as f:
        json.dump(_finite(part), f)
    return 0


# --------------------------------------------------------------------------- the run


def run(
    config: Config,
    *,
    on_case: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Run the grid at every thread count and return the JSON document.

    Parameters
    ----------
    config : Config
        What to run.
    on_case : callable, optional
        ``on_case(index, total, description)`` before each case (progress bars);
        the index counts within one thread count.

    Returns
    -------
    dict
        The document described in :mod:`polycos.bench._schema`, with the spec's
        targets evaluated at every thread count (``targets``).
    """
    from polycos.bench._targets import check

    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    runs, results, skipped, errors = [], [], [], []
    for setting in config.threads:
        try:
            part = (
                _run_child(config, setting, on_case) if config.isolate
                else run_threads(config, setting, on_case)
            )
        except ChildFailed as exc:
            errors.append(str(exc))
            skipped.append({
                "threads": resolve_threads(setting), "threads_setting": setting, "device": None,
                "op": None, "shape": None, "dtype": None, "reason": str(exc),
            })
            continue
        runs.append(part["run"])
        results += part["results"]
        skipped += part["skipped"]
    return {
        "schema": SCHEMA_ID,
        "date": started.isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - t0,
        "command": list(config.argv),
        "machine": machine_info(),
        "versions": versions(),
        "config": json.loads(json.dumps({k: v for k, v in asdict(config).items() if k != "argv"})),
        "reference_threads": reference_threads(),
        "runs": runs,
        "results": results,
        "skipped": skipped,
        "targets": check(results, reference=reference_threads()),
        "errors": errors,
    }


def machine_info() -> dict[str, Any]:
    """Machine, Python and load, for the JSON document."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "python": sys.version.split()[0],
        "loadavg": _loadavg(),
        "gpus": _gpus(),
    }


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
    """GPU names from ``nvidia-smi`` (no framework import in the parent process)."""
    import shutil

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def versions() -> dict[str, str]:
    """Versions of polycos and of every installed library the bench uses (without importing them)."""
    from importlib import metadata

    import polycos

    out = {"polycos": polycos.__version__}
    dists = {"numpy": "numpy", "torch": "torch", "jax": "jax", "jaxlib": "jaxlib", "optax": "optax",
             "dask": "dask", "array-api-strict": "array_api_strict", "scikit-learn": "sklearn",
             "cupy-cuda13x": "cupy", "cupy-cuda12x": "cupy", "cupy": "cupy"}
    for dist, module in dists.items():
        if importlib.util.find_spec(module) is None:  # only what this run could import
            continue
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


if __name__ == "__main__":  # the child of one thread count
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        raise SystemExit(_child_main(sys.argv[2:]))
    raise SystemExit("usage: python -m polycos.bench._run --child THREADS CONFIG.json OUT.json")
