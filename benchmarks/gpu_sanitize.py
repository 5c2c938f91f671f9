#!/usr/bin/env python3
"""Launch every polycos CUDA kernel variant once, small, for ``compute-sanitizer``.

``benchmarks/gpu_check.sh`` runs this under ``compute-sanitizer --tool memcheck``
and ``--tool racecheck``::

    compute-sanitizer --tool memcheck --error-exitcode 3 python benchmarks/gpu_sanitize.py --part cupy
    compute-sanitizer --tool racecheck --error-exitcode 3 python benchmarks/gpu_sanitize.py --part cupy
    compute-sanitizer --tool memcheck --error-exitcode 3 python benchmarks/gpu_sanitize.py --part torch

``--part cupy``: ``polycos.cosine_similarity`` and ``cosine_similarity_vjp`` on
CuPy arrays (the hand-written kernels), every dtype CuPy holds, and one layout
per launch shape of ``polycos._kernels.cuda_launch.choose_group`` (see
docs/backends/cupy.md, "Launch heuristic"): 1 thread per row (``dim`` not last,
neighbouring rows adjacent, >= 4096 rows), 8 lanes (D <= 16), a warp
(D <= 1024), a block (long rows); plus strided, broadcast (stride 0), batched,
empty, zero and rescaled (G3) rows, and ``eps = 0``.
``--part torch``: polycos on torch CUDA tensors, forward, backward and double
backward (float32, bfloat16).

Prints ``polycos-sanitize: done`` at the end (the check looks for it). Without a
GPU it prints ``SKIP: <why>`` and exits 77; ``--dry-run`` builds and runs the
same cases with NumPy and torch on the CPU instead (to catch mistakes before a
GPU run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXIT_SKIP = 77
DTYPES = ("float16", "bfloat16", "float32", "float64")

#: (name, shape, dim, launch shape the heuristic should pick); D is shape[dim]
LAYOUTS: tuple[tuple[str, tuple[int, ...], int, str], ...] = (
    ("rows of 8, dim 1", (67, 8), 1, "GROUP 8"),
    ("rows of 300, dim 1", (70, 300), 1, "GROUP 32 (a warp)"),
    ("rows of 1024, odd row count", (33, 1024), 1, "GROUP 32"),
    ("3 long rows of 5000", (3, 5000), 1, "GROUP 256 (a block)"),
    ("dim 0, 4100 adjacent rows", (8, 4100), 0, "GROUP 1 (coalesced across rows)"),
    ("batched (4, 33, 5), dim 1", (4, 33, 5), 1, "strided rows, batch dims"),
    ("empty (0, 8)", (0, 8), 1, "no launch"),
)


def _skip(why: str) -> int:
    print(f"SKIP: {why}", flush=True)
    return EXIT_SKIP


def _cases(xp: Any, dtypes: tuple[str, ...], make: Callable[[Any, str], Any]) -> Iterator[tuple[str, Any, Any, int, float]]:
    """``(label, x1, x2, dim, eps)`` for every dtype and layout, plus the special rows."""
    import numpy as np

    rng = np.random.default_rng(0)
    for dtype in dtypes:
        for name, shape, dim, _group in LAYOUTS:
            a, b = rng.standard_normal(shape), rng.standard_normal(shape)
            if a.size:
                np.moveaxis(a, dim, -1)[(0,) * (a.ndim - 1)] = 0.0  # one zero vector (G4)
            yield f"{dtype} {name}", make(a, dtype), make(b, dtype), dim, 1e-8
        a, b = rng.standard_normal((40, 96)), rng.standard_normal((40, 96))
        x1, x2 = make(a, dtype), make(b, dtype)
        yield f"{dtype} strided x1[:, ::2]", x1[:, ::2], x2[:, ::2], 1, 1e-8
        yield f"{dtype} transposed, dim 0", x1.T, x2.T, 0, 1e-8
        yield f"{dtype} broadcast row (stride 0)", x1, x2[:1], 1, 1e-8
        yield f"{dtype} eps = 0 with a zero row", make(np.vstack([np.zeros((1, 96)), a[1:]]), dtype), x2, 1, 0.0
        big, small = {"float16": (6e4, 1e-7), "bfloat16": (1e30, 1e-30), "float32": (1e36, 1e-30),
                      "float64": (1e200, 1e-200)}[dtype]
        for scale in (big, small):  # rows that need the rescaling pass (G3), next to rows that do not
            s = np.ones((40, 1))
            s[::3] = scale
            yield f"{dtype} rows scaled by {scale:g}", make(a / np.abs(a).max() * s, dtype), x2, 1, 0.0


def run_cupy(dry_run: bool) -> int:
    import numpy as np

    import polycos

    if dry_run:
        xp = np
        dtypes = ("float16", "float32", "float64")

        def make(a: Any, dtype: str) -> Any:
            return np.asarray(a, dtype=dtype)

        def ones_like(s: Any) -> Any:
            return np.ones_like(s)

    else:
        try:
            import cupy as xp
        except ImportError:
            return _skip("CuPy is not installed")
        try:
            if xp.cuda.runtime.getDeviceCount() < 1:
                return _skip("CuPy sees no CUDA device")
        except Exception as exc:
            return _skip(f"CuPy sees no CUDA device ({type(exc).__name__}: {exc})")
        dtypes = DTYPES
        try:
            xp.zeros(1, dtype="bfloat16")
        except Exception as exc:
            print(f"bfloat16 not run: this CuPy has no bfloat16 ({type(exc).__name__})", flush=True)
            dtypes = tuple(d for d in DTYPES if d != "bfloat16")

        def make(a: Any, dtype: str) -> Any:
            if dtype == "bfloat16":
                import ml_dtypes

                return xp.asarray(np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16))
            return xp.asarray(a, dtype=dtype)

        def ones_like(s: Any) -> Any:
            return xp.ones_like(s)

    launches, failed = 0, []
    for label, x1, x2, dim, eps in _cases(xp, dtypes, make):
        try:
            with np.errstate(all="ignore"):
                s = polycos.cosine_similarity(x1, x2, dim, eps)
                g1, g2 = polycos.cosine_similarity_vjp(ones_like(s), x1, x2, dim, eps)
            if g1.shape != x1.shape or g2.shape != x2.shape:
                raise AssertionError(f"gradient shapes {g1.shape}, {g2.shape} for inputs {x1.shape}, {x2.shape}")
        except Exception as exc:
            failed.append(label)
            print(f"  {label}: FAILED, {type(exc).__name__}: {exc}", flush=True)
            continue
        launches += 2
        print(f"  {label}: ok", flush=True)
    if not dry_run:
        xp.cuda.runtime.deviceSynchronize()
    print(f"cupy part: {launches} forward/VJP calls{' (dry run, NumPy)' if dry_run else ''}, "
          f"{len(failed)} failed", flush=True)
    return 1 if failed else 0


def run_torch(dry_run: bool) -> int:
    try:
        import torch
    except ImportError:
        return _skip("torch is not installed")
    if not dry_run and not torch.cuda.is_available():
        return _skip("torch sees no CUDA device")
    import polycos

    dev = "cpu" if dry_run else "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    calls, failed = 0, []
    for dtype in (torch.float32, torch.bfloat16):
        for shape, dim in (((67, 300), 1), ((8, 4100), 0), ((3, 5000), 1)):
            label = f"torch {dtype} {shape} dim {dim}"
            try:
                x1 = torch.randn(shape, generator=gen, device=dev, dtype=dtype).requires_grad_()
                x2 = torch.randn(shape, generator=gen, device=dev, dtype=dtype).requires_grad_()
                s = polycos.cosine_similarity(x1, x2, dim=dim)
                s.sum().backward()
                calls += 1
                if dtype == torch.float32:  # double backward
                    s = polycos.cosine_similarity(x1, x2, dim=dim)
                    (g1,) = torch.autograd.grad(s.square().sum(), x1, create_graph=True)
                    g1.sum().backward()
                    calls += 1
            except Exception as exc:
                failed.append(label)
                print(f"  {label}: FAILED, {type(exc).__name__}: {exc}", flush=True)
                continue
            print(f"  {label}: ok", flush=True)
    if not dry_run:
        torch.cuda.synchronize()
    print(f"torch part: {calls} forward/backward calls{' (dry run, CPU)' if dry_run else ''}, "
          f"{len(failed)} failed", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("cupy", "torch", "all"), default="all")
    parser.add_argument("--dry-run", action="store_true", help="the same cases with NumPy/torch on the CPU")
    args = parser.parse_args(argv)
    codes = []
    if args.part in ("cupy", "all"):
        codes.append(run_cupy(args.dry_run))
    if args.part in ("torch", "all"):
        codes.append(run_torch(args.dry_run))
    if all(c == EXIT_SKIP for c in codes):
        return EXIT_SKIP
    print("polycos-sanitize: done", flush=True)  # the tool's verdict is read after this line
    return 1 if any(c == 1 for c in codes) else 0


if __name__ == "__main__":
    sys.exit(main())
