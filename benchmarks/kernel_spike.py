"""The CPU kernel against the machine floor: the measured spike behind docs/kernels.md.

For each workload the kernel (``polycos._kernels``, pointer level, outputs
preallocated) is timed interleaved with the machine floor of the same bytes:
the fastest reader (``numpy.sum`` / ``torch.sum`` over the inputs) plus the
fastest writer (``ndarray.fill`` / ``Tensor.fill_`` over the outputs). Every
candidate runs once per round, in a rotated order; a ratio is the median over
rounds of the per-round quotient (as ``polycos bench``), so a busy machine
moves both sides together.

Reported per workload, ISA clone and thread count: forward (writing the
result and the residuals), backward (reading the residuals, writing both
gradients), forward + backward. Also: the NumPy-level calls (which allocate
their outputs: page faults included), the per-call overhead of the ctypes
entry, and with ``--native`` a whole-library ``-march=native`` build for
comparison with the run-time dispatch.

Usage::

    taskset -c 1 python benchmarks/kernel_spike.py                 # one thread (the reference)
    python benchmarks/kernel_spike.py --threads 1,all --rounds 15
    python benchmarks/kernel_spike.py --native --json spike.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from polycos import _kernels as K

N, D = 32768, 256


def _timer(fn: Callable[[], Any], number: int) -> float:
    t = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t) / number


def interleaved(cands: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every candidate, one sample per round, rotated order."""
    for fn in cands.values():  # warm-up (page faults, caches, lazy init)
        fn()
    number = {k: max(1, int(0.02 / max(_timer(f, 1), 1e-7))) for k, f in cands.items()}
    names = list(cands)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            out[k].append(_timer(cands[k], number[k]))
    return out


def ratio(samples: dict[str, list[float]], num: list[str], den: list[list[str]]) -> float:
    """Median over rounds of sum(num) / sum(min over each group of den)."""
    rounds = len(next(iter(samples.values())))
    q = []
    for r in range(rounds):
        top = sum(samples[k][r] for k in num)
        bottom = sum(min(samples[k][r] for k in group) for group in den)
        q.append(top / bottom)
    return statistics.median(q)


def _op(x: np.ndarray) -> K.Operand:
    return (x.ctypes.data, x.shape, tuple(s // x.itemsize for s in x.strides))


def _np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


WORKLOADS = [
    # (label, dtype, shape, axis)
    ("float32 N x 256, dim=1", "float32", (N, D), 1),
    ("float32 N x 16, dim=1", "float32", (N, 16), 1),
    ("float32 16N x 16, dim=1 (the reference's bytes)", "float32", (16 * N, 16), 1),
    ("float32 256 x N, dim=0 (column)", "float32", (D, N), 0),
    ("float64 N x 256, dim=1", "float64", (N, D), 1),
    ("float64 256 x N, dim=0 (column)", "float64", (D, N), 0),
    ("float16 N x 256, dim=1", "float16", (N, D), 1),
    ("bfloat16 N x 256, dim=1", "bfloat16", (N, D), 1),
    ("float32 N x 256, acc float32 (JAX x64 off)", "float32/float32", (N, D), 1),
]


def run_workload(label: str, dtype: str, shape: tuple, axis: int, isas: list[str], threads: int,
                 rounds: int, torch: Any, jax: Any) -> list[dict]:
    dtype, acc = ([*dtype.split("/"), None])[:2]
    acc = acc or K.DEFAULT_ACC[dtype]
    dt = _np_dtype(dtype)
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal(shape, dtype=np.float32).astype(dt)
    x2 = rng.standard_normal(shape, dtype=np.float32).astype(dt)
    m = shape[1 - axis]
    out = np.empty(m, dt)
    res = np.empty((m, 5), _np_dtype(acc))
    g = np.ones(m, dt)
    d1, d2 = np.empty_like(x1), np.empty_like(x2)
    o1, o2, oo, og, od1, od2 = map(_op, (x1, x2, out, g, d1, d2))
    rp = res.ctypes.data

    # Readers stream the same bytes; 2-byte dtypes are read as float32 pairs
    # (NumPy and torch sum half types through slow conversions).
    r1, r2 = (x.view(np.float32) if x.itemsize == 2 else x for x in (x1, x2))
    w_out = out.view(np.uint16) if out.itemsize == 2 else out
    w1, w2 = (x.view(np.uint16) if x.itemsize == 2 else x for x in (d1, d2))

    def read_numpy() -> None:
        with np.errstate(all="ignore"):
            np.sum(r1)
            np.sum(r2)

    cands: dict[str, Callable[[], Any]] = {
        "read numpy": read_numpy,
        "write out numpy": lambda: (w_out.fill(0), res.fill(0)),
        "write grads numpy": lambda: (w1.fill(0), w2.fill(0)),
    }
    if torch is not None:
        t1, t2, tout, tres, td1, td2 = map(torch.from_numpy, (r1, r2, w_out.view(np.int16) if out.itemsize == 2 else w_out, res, *(w.view(np.int16) if w.itemsize == 2 else w for w in (w1, w2))))
        cands["read torch"] = lambda: (t1.sum(), t2.sum())
        cands["write out torch"] = lambda: (tout.fill_(0), tres.fill_(0))
        cands["write grads torch"] = lambda: (td1.fill_(0), td2.fill_(0))

    def fwd() -> None:
        K.forward_ptr(dtype, acc, o1, o2, axis, 1e-8, oo, rp, threads)

    def bwd() -> None:
        K.backward_ptr(dtype, acc, dtype, og, o1, o2, axis, 1e-8, rp, od1, od2, threads)

    for isa in isas:
        cands[f"fwd {isa}"] = lambda i=isa: (K.set_isa(i), fwd())
        cands[f"bwd {isa}"] = lambda i=isa: (K.set_isa(i), bwd())
    if jax is not None and dtype == "float32" and acc == K._jax_acc(np.float32).name:
        import jax.numpy as jnp

        jx1, jx2, jg = jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(g)
        jf = jax.jit(lambda a, b: K.jax_forward(a, b, axis, 1e-8, nthreads=threads))
        jres = jf(jx1, jx2)[1]
        jb = jax.jit(lambda gg, a, b, r: K.jax_backward(gg, a, b, r, axis, 1e-8, nthreads=threads))
        cands["jax fwd"] = lambda: jax.block_until_ready(jf(jx1, jx2))
        cands["jax bwd"] = lambda: jax.block_until_ready(jb(jg, jx1, jx2, jres))
    if dtype in ("float32", "float64"):  # NumPy level: allocates its outputs
        cands["numpy fwd"] = lambda: K.forward(x1, x2, axis, 1e-8, acc_dtype=acc, nthreads=threads)
        _, r_np = K.forward(x1, x2, axis, 1e-8, acc_dtype=acc)
        cands["numpy bwd"] = lambda: K.backward(g, x1, x2, axis, 1e-8, r_np, nthreads=threads)
    try:
        s = interleaved(cands, rounds)
    finally:
        K.set_isa(None)
    reads = [k for k in s if k.startswith("read")]
    wout = [k for k in s if k.startswith("write out")]
    wgrad = [k for k in s if k.startswith("write grads")]
    rows = []
    for isa in isas:
        rows.append({
            "workload": label, "isa": isa, "threads": threads,
            "fwd": ratio(s, [f"fwd {isa}"], [reads, wout]),
            "bwd": ratio(s, [f"bwd {isa}"], [reads, wgrad]),
            "fwd+bwd": ratio(s, [f"fwd {isa}", f"bwd {isa}"], [reads, wout, reads, wgrad]),
            "fwd ms": statistics.median(s[f"fwd {isa}"]) * 1e3,
            "floor read ms": statistics.median(min(s[k][r] for k in reads) for r in range(rounds)) * 1e3,
        })
    for name, prefix in (("numpy API (allocates)", "numpy"), ("JAX jit (XLA FFI)", "jax")):
        if f"{prefix} fwd" not in s:
            continue
        rows.append({
            "workload": label, "isa": name, "threads": threads,
            "fwd": ratio(s, [f"{prefix} fwd"], [reads, wout]),
            "bwd": ratio(s, [f"{prefix} bwd"], [reads, wgrad]),
            "fwd+bwd": ratio(s, [f"{prefix} fwd", f"{prefix} bwd"], [reads, wout, reads, wgrad]),
            "fwd ms": statistics.median(s[f"{prefix} fwd"]) * 1e3,
            "floor read ms": float("nan"),
        })
    return rows


def call_overhead() -> dict[str, float]:
    """Microseconds per call on a 1 x 8 input: the ctypes entry and the NumPy-level wrapper."""
    x1 = np.ones((1, 8), np.float32)
    x2 = np.ones((1, 8), np.float32)
    out, res = np.empty(1, np.float32), np.empty((1, 5))
    o1, o2, oo = _op(x1), _op(x2), _op(out)
    ptr = min(_timer(lambda: K.forward_ptr("float32", "float64", o1, o2, 1, 1e-8, oo, res.ctypes.data, 1), 2000)
              for _ in range(5))
    api = min(_timer(lambda: K.forward(x1, x2, 1, 1e-8, nthreads=1), 2000) for _ in range(5))
    return {"forward_ptr us": ptr * 1e6, "forward (NumPy) us": api * 1e6}


def native_build(tmp: Path) -> Path:
    """cpu.cpp compiled whole with -march=native (what a non-portable build would give)."""
    src = Path(K.__file__).with_name("cpu.cpp")
    lib = tmp / "_polycos_cpu_native.so"
    subprocess.run(
        ["g++", "-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno",
         "-fvisibility=hidden", "-fPIC", "-shared", "-pthread", "-Wno-psabi",
         "-isystem", str(src.parent / "third_party"), str(src), "-o", str(lib)],
        check=True,
    )
    return lib


def print_table(rows: list[dict]) -> None:
    print("| workload | ISA | threads | forward | backward | fwd + bwd | fwd ms | floor read ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['isa']} | {r['threads']} | {r['fwd']:.2f} | {r['bwd']:.2f} | "
              f"{r['fwd+bwd']:.2f} | {r['fwd ms']:.2f} | {r['floor read ms']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1", help="comma list of thread counts; 'all' = every CPU")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--isa", default="all", help="comma list of clones (baseline, avx2) or 'all'")
    p.add_argument("--only", default="", help="run workloads whose label contains this text")
    p.add_argument("--native", action="store_true", help="also time a -march=native build")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--no-torch", action="store_true", help="floor from NumPy alone")
    p.add_argument("--jax", action="store_true", help="also time the XLA FFI handlers under jax.jit")
    args = p.parse_args(argv)
    if not K.available():
        print(f"CPU kernel unavailable: {K.unavailable_reason()}", file=sys.stderr)
        return 1
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
    jax = None
    if args.jax:
        import jax
    isas = [i for i in K.ISAS if K.isa_available(i)] if args.isa == "all" else args.isa.split(",")
    rows: list[dict] = []
    for spec in args.threads.split(","):
        threads = K.num_threads() if spec == "all" else int(spec)
        if torch is not None:
            torch.set_num_threads(threads)
        for label, dtype, shape, axis in WORKLOADS:
            if args.only and args.only not in label:
                continue
            new = run_workload(label, dtype, shape, axis, isas, threads, args.rounds, torch, jax)
            rows += new
            print_table(new)
            sys.stdout.flush()
    print("\nAll rows (ratios: median over rounds of kernel time / floor time)\n")
    print_table(rows)
    overhead = call_overhead()
    print(f"\nper-call overhead, 1 x 8 float32: {overhead}")
    result: dict[str, Any] = {"rows": rows, "overhead": overhead, "cpu": os.cpu_count()}
    if args.native:
        with tempfile.TemporaryDirectory() as tmp:
            lib = native_build(Path(tmp))
            env = dict(os.environ, POLYCOS_CPU_LIBRARY=str(lib))
            cmd = [sys.executable, __file__, "--threads", args.threads, "--rounds", str(args.rounds),
                   "--isa", "avx2"]
            if args.no_torch:
                cmd.append("--no-torch")
            if args.jax:
                cmd.append("--jax")
            if args.only:
                cmd += ["--only", args.only]
            print("\n-march=native build (every loop compiled for this CPU; the 'avx2' rows):")
            subprocess.run(cmd, env=env, check=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
