"""Run the CPU workloads of the spec (§5) and check them against its targets.

Same code as ``polycos bench`` (:mod:`polycos.bench`), fixed to the spec's
reference problems:

* row-wise, float32, N = 65536, D = 256: forward and forward+backward for
  NumPy, torch eager, ``torch.compile`` and JAX ``jit``;
* pairwise, float32, N = M = 2048, D = 128: forward+backward (and forward).

Usage::

    python benchmarks/run_cpu_targets.py                      # libraries' default threads
    python benchmarks/run_cpu_targets.py --threads 1 --json cpu.json --plot cpu.png
"""

from __future__ import annotations

import argparse
import sys

from polycos.bench._report import print_report, write_json, write_plot
from polycos.bench._run import Config, run
from polycos.bench.cli import _output, _positive

SUBJECTS = ["numpy", "torch", "torch-compile", "jax"]


def main(argv: list[str] | None = None) -> int:
    """Run the spec workloads; print tables and the targets; optionally write JSON and a plot.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when every measured target is met, 1 otherwise.
    """
    from rich.console import Console

    from polycos.bench._targets import check

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=_positive(int), default=None, help="torch/XLA intra-op threads"
    )
    parser.add_argument("--repeat", type=_positive(int), default=7, help="rounds per case")
    parser.add_argument(
        "--backends", default=",".join(SUBJECTS), help="subset of " + ",".join(SUBJECTS)
    )
    parser.add_argument("--no-pairwise", action="store_true", help="skip the pairwise workload")
    parser.add_argument("--json", type=_output(".json"), metavar="PATH")
    parser.add_argument("--plot", type=_output(".png"), metavar="PATH")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in SUBJECTS]
    if bad:
        parser.error(
            f"argument --backends: unknown backend {', '.join(bad)} (choose from {', '.join(SUBJECTS)})"
        )
    ops = ["forward", "forward+backward"] + (
        [] if args.no_pairwise else ["pairwise", "pairwise+backward"]
    )
    config = Config(
        backends=backends,
        ops=ops,
        sizes=[(65536, 256)],
        pairwise_sizes=[(2048, 2048, 128)],
        dtypes=["float32"],
        repeat=args.repeat,
        min_time=0.05,
        threads=args.threads,
        argv=["benchmarks/run_cpu_targets.py", *(argv if argv is not None else sys.argv[1:])],
    )
    console = Console(width=160)
    doc = run(
        config,
        on_case=lambda i, n, desc: console.print(f"[{i}/{n}] {desc}", style="dim", highlight=False),
    )
    print_report(doc, console)
    if args.json:
        write_json(doc, args.json)
    if args.plot:
        write_plot(doc, args.plot)
    missed = [r for r in check(doc["results"]) if r["status"] == "missed"]
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
