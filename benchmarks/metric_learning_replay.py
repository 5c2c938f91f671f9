"""Replay pytorch-metric-learning's ``test_batched_distance`` workload: polycos against normalise + matmul.

The PyTorch issue measured that test at 340 s with polycos in place of the
library's cosine matrix (5 s without). Its workload: float64 embeddings,
D = 128, dataset sizes 15, 149, 1501, 3199, 3200, query batches of 32, 33,
99, 121 and 128 rows, each batch against the whole dataset (with and without
a separate reference set), forward only. This script runs exactly those
calls, once with ``polycos.pairwise_cosine_similarity`` and once with what the
library does (``F.normalize`` of both, then ``matmul``), interleaved round by
round, at one thread (``--threads``), and prints both totals and their ratio.
``--backward`` adds a backward pass through each matrix (what training does).

Usage::

    python benchmarks/metric_learning_replay.py             # forward, float64, one thread
    python benchmarks/metric_learning_replay.py --backward --dtype float32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import polycos

DATASET_SIZES = (15, 149, 1501, 3199, 3200)
BATCH_SIZES = (32, 33, 99, 121, 128)
D = 128


def normalise_matmul(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """What pytorch-metric-learning's ``CosineSimilarity`` computes."""
    return F.normalize(q, dim=1) @ F.normalize(r, dim=1).t()


def workload(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (query batch, reference) pair the test computes, in its order."""
    torch.manual_seed(1432)
    calls = []
    for n in DATASET_SIZES:
        emb = torch.randn(n, D, dtype=dtype)
        ref = torch.randn(n, D, dtype=dtype)
        for b in BATCH_SIZES:
            for other in (emb, ref):
                calls += [(emb[i : i + b], other) for i in range(0, n, b)]
    return calls


def replay(fn, calls, backward: bool) -> float:
    start = time.perf_counter()
    for q, r in calls:
        if backward:
            q = q.detach().requires_grad_()
            r = r.detach().requires_grad_()
            fn(q, r).sum().backward()
        else:
            fn(q, r)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--backward", action="store_true", help="also backward through each matrix")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    calls = workload(getattr(torch, args.dtype))
    subjects = {"polycos": polycos.pairwise_cosine_similarity, "normalise+matmul": normalise_matmul}
    for fn in subjects.values():  # warm up (first-call imports, operator registration)
        replay(fn, calls[:20], args.backward)
    times: dict[str, list[float]] = {k: [] for k in subjects}
    ratios = []
    for _ in range(args.rounds):
        for name, fn in subjects.items():
            times[name].append(replay(fn, calls, args.backward))
        ratios.append(times["polycos"][-1] / times["normalise+matmul"][-1])
    print(f"{len(calls)} calls, {args.dtype}, D = {D}, threads = {args.threads}, "
          f"{'forward + backward' if args.backward else 'forward'}, {args.rounds} rounds")
    for name, ts in times.items():
        print(f"  {name:18s} median {statistics.median(ts):.3f} s per replay")
    print(f"  polycos / normalise+matmul: {statistics.median(ratios):.2f}x (median of per-round ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
