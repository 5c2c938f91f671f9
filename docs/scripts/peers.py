"""Measure the "peers today" columns of docs/guarantees.md (CPU, float32 unless noted).

Run from a checkout with the test extras installed::

    python docs/scripts/peers.py            # prints a Markdown table
    python docs/scripts/peers.py --simclr   # adds the SimCLR memory measurement (slow)

Each peer is called the way its users call it:

* PyTorch: ``torch.nn.functional.cosine_similarity(x1, x2, dim=-1, eps)``
* scikit-learn: ``sklearn.metrics.pairwise.cosine_similarity`` (row pairs: the
  diagonal of the matrix, one pair at a time)
* SciPy: ``1 - scipy.spatial.distance.cosine(u, v)`` (one pair at a time)
* optax: ``optax.cosine_similarity(x1, x2, epsilon=eps)`` (JAX, float32)
* polycos: ``polycos.cosine_similarity`` on NumPy arrays
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import warnings

import numpy as np

warnings.filterwarnings("ignore")

ULP32 = 2.0**-23


def peers():
    import jax
    import jax.numpy as jnp
    import optax
    import scipy.spatial.distance as ssd
    import sklearn.metrics.pairwise as skp
    import torch
    import torch.nn.functional as F

    import polycos

    jax.config.update("jax_platforms", "cpu")

    def torch_cs(a, b, eps=1e-8):
        return F.cosine_similarity(
            torch.from_numpy(a), torch.from_numpy(b), dim=-1, eps=eps
        ).numpy()

    def sklearn_cs(a, b, eps=1e-8):  # sklearn has no eps
        return np.array(
            [skp.cosine_similarity(a[i : i + 1], b[i : i + 1])[0, 0] for i in range(len(a))]
        )

    def scipy_cs(a, b, eps=1e-8):  # scipy has no eps
        return np.array([1.0 - ssd.cosine(a[i], b[i]) for i in range(len(a))])

    def optax_cs(a, b, eps=1e-8):
        return np.asarray(optax.cosine_similarity(jnp.asarray(a), jnp.asarray(b), epsilon=eps))

    def polycos_cs(a, b, eps=1e-8):
        return polycos.cosine_similarity(a, b, dim=-1, eps=eps)

    return {
        "PyTorch": torch_cs,
        "scikit-learn": sklearn_cs,
        "SciPy": scipy_cs,
        "optax": optax_cs,
        "polycos": polycos_cs,
    }


def exact(a, b):
    from polycos.testing import reference

    return reference(a, b, dim=-1, eps=1e-8)


def g1_identical_rows(f):
    """Fraction of identical float32 rows whose similarity exceeds 1."""
    rng = np.random.default_rng(0)
    n = 2000
    x = rng.standard_normal((n, 128)).astype(np.float32)
    s = np.asarray(f(x, x.copy()), dtype=np.float64)
    return f"{np.mean(np.abs(s) > 1):.0%} (max {np.max(s):.9g})"


def g2_ulp_error(f):
    """Max |error| in ulp(1.0) of float32 at D = 65536 against the exact value."""
    rng = np.random.default_rng(1)
    worst = 0.0
    for offset in (0.0, 1.0):
        for noise in (1e-3, 1.0):
            a = (rng.standard_normal((4, 65536)) + offset).astype(np.float32)
            b = (a + noise * rng.standard_normal(a.shape)).astype(np.float32)
            err = np.max(np.abs(np.asarray(f(a, b), dtype=np.float64) - exact(a, b)))
            worst = max(worst, err / ULP32)
    return f"{worst:.1f} ulp"


def g3_scale(f):
    """s(x * 3e19, y * 3e19) with eps=0, float32 (unscaled value in brackets)."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((1, 16)).astype(np.float32)
    b = (a + 0.5 * rng.standard_normal(a.shape)).astype(np.float32)
    ref = float(exact(a, b)[0])
    big = float(np.asarray(f(a * np.float32(3e19), b * np.float32(3e19), eps=0.0))[0])
    return f"{big:.4g} [{ref:.4g}]"


def g3_fp16(f, torch_only=False):
    """s(x, x) for a float16 row of 60000s."""
    a = np.full((1, 8), 60000, dtype=np.float16)
    try:
        return f"{float(np.asarray(f(a, a.copy()))[0]):.4g}"
    except Exception as e:  # e.g. a peer rejects float16
        return f"error: {type(e).__name__}"


def g4_zero(f):
    """s(0, x) with eps=0."""
    a = np.zeros((1, 4), dtype=np.float32)
    b = np.ones((1, 4), dtype=np.float32)
    return f"{float(np.asarray(f(a, b, eps=0.0))[0]):.4g}"


def g5_torch_gradcheck():
    """torch.autograd.gradcheck of F.cosine_similarity with norms below eps (float64)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x1 = (1e-3 * torch.randn(3, 5, generator=g, dtype=torch.float64)).requires_grad_()
    x2 = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    ok = torch.autograd.gradcheck(
        lambda a, b: F.cosine_similarity(a, b, dim=1, eps=0.1), (x1, x2), raise_exception=False
    )
    return "passes" if ok else "fails"


def simclr_child(lib: str, n: int, d: int) -> None:
    """Run one SimCLR forward+backward and print peak RSS growth (MiB) and seconds."""
    import time

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    z = torch.randn(n, d, requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if lib == "torch":
        s = F.cosine_similarity(z[None, :, :], z[:, None, :], dim=2)
    elif lib == "polycos-numpy":
        import polycos

        a = z.detach().numpy()
        s = polycos.cosine_similarity(a[None, :, :], a[:, None, :], dim=2)
        polycos.cosine_similarity_vjp(np.ones_like(s), a[None, :, :], a[:, None, :], dim=2)
        dt = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"{(peak - base) / 1024:.0f} MiB, {dt:.2f} s")
        return
    else:
        import polycos

        s = polycos.cosine_similarity(z[None, :, :], z[:, None, :], dim=2)
    s.sum().backward()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{(peak - base) / 1024:.0f} MiB, {dt:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--simclr", action="store_true")
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        simclr_child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    fs = peers()
    rows = [
        ("G1 identical rows with s > 1", g1_identical_rows),
        ("G2 max error, D = 65536", g2_ulp_error),
        ("G3 float32 scaled by 3e19, eps=0 [exact]", g3_scale),
        ("G3 float16 rows of 60000", g3_fp16),
        ("G4 zero vector, eps=0", g4_zero),
    ]
    print("| check | " + " | ".join(fs) + " |")
    print("|---" * (len(fs) + 1) + "|")
    for name, fn in rows:
        cells = []
        for f in fs.values():
            try:
                cells.append(fn(f))
            except Exception as e:
                cells.append(f"error: {type(e).__name__}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nG5 torch gradcheck below eps: {g5_torch_gradcheck()}")
    if args.simclr:
        for n, d in ((1024, 128),):
            for lib in ("torch", "polycos", "polycos-numpy"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", lib, str(n), str(d)],
                    capture_output=True,
                    text=True,
                )
                print(
                    f"SimCLR N={n} D={d} {lib}: {out.stdout.strip() or out.stderr.strip()[-300:]}"
                )


if __name__ == "__main__":
    main()
