"""Run the CPU workloads of the spec (section 5) and issue 12, and check them against the targets.

Same code as ``polycos bench`` (:mod:`polycos.bench`): the machine floor, the
subjects and the peers of every installed backend the targets name, interleaved
in one process per thread count. The workloads:

* row-wise float32, D = 256, N = 4096, 16384, 32768 (issue 12's reference),
  131072: forward and forward+backward (the size sweep of the plot);
* row-wise float32, 524288 x 16 (D = 16 at the reference's bytes) and float64
  32768 x 256: forward and forward+backward;
* pairwise N = M = 32 ... 4096, D = 128, float32 and float64: forward and
  forward+backward.

Usage::

    python benchmarks/run_cpu_targets.py --threads 1                    # the reference on 2 cores
    python benchmarks/run_cpu_targets.py --threads 1,all \\
        --json benchmarks/results/cpu-targets-2core-epyc.json \\
        --plot docs/images/cpu-targets-2core-epyc.png

Exit status: 0 when every target is met at the reference thread count (one
thread on machines with at most 2 CPUs, all threads elsewhere:
:func:`polycos.bench._run.reference_threads`), 1 when one is missed there or a
run failed, 2 on bad arguments. The other thread counts are reported beside.
"""

from __future__ import annotations

import argparse
import sys

from polycos.bench._report import print_report, write_json, write_plot
from polycos.bench._run import Config
from polycos.bench._suites import ALLOCATORS, JAX_DISPATCH, subject_names
from polycos.bench._targets import D16_SHAPE, REFERENCE_SHAPE, TARGETS, gate
from polycos.bench.cli import _csv, _output, _positive, _threads

N_SWEEP = (4096, 16384, REFERENCE_SHAPE[0], 131072)
PAIRWISE_N = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def target_subjects() -> list[str]:
    """The installed subjects the CPU targets name, plus ``torch-compile`` (reported beside)."""
    named = {t.subject.removesuffix(" broadcast") for t in TARGETS if t.cpu}
    return [s for s in subject_names() if s in named or s == "torch-compile"]


def main(argv: list[str] | None = None) -> int:
    """Run the spec workloads; print tables and the targets; optionally write JSON and a plot.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when every target is met at the reference thread count, 1 otherwise.
    """
    from rich.console import Console

    from polycos.bench.cli import run_with_progress

    names = subject_names()
    subjects = target_subjects()
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--threads", type=_threads, default=["1", "all"],
        help="thread counts, each in its own process with its own floor (e.g. 1 or 1,all)",
    )
    parser.add_argument("--repeat", type=_positive(int), default=7, help="rounds per case")
    parser.add_argument("--min-time", type=_positive(float), default=0.05,
                        help="seconds one timing sample lasts at least")
    parser.add_argument(
        "--backends", type=_csv("backend", names), default=subjects,
        help=f"subjects (default: those the targets name, installed here: {','.join(subjects)})",
    )
    parser.add_argument("--no-pairwise", action="store_true", help="skip the pairwise workloads")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument(
        "--allocator", choices=ALLOCATORS, default="system",
        help="the C allocator in the measuring processes (see polycos bench --help)",
    )
    parser.add_argument(
        "--jax-dispatch", choices=JAX_DISPATCH, default="async",
        help="where XLA:CPU runs jitted calls (see polycos bench --help)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", type=_output(".json"), metavar="PATH")
    parser.add_argument("--plot", type=_output(".png"), metavar="PATH")
    args = parser.parse_args(argv)
    rowwise = [(n, REFERENCE_SHAPE[1], "float32") for n in N_SWEEP]
    rowwise += [(*D16_SHAPE, "float32"), (*REFERENCE_SHAPE, "float64")]
    pairwise = [] if args.no_pairwise else [
        (n, n, 128, dt) for dt in ("float32", "float64") for n in PAIRWISE_N
    ]
    ops = ["forward", "forward+backward"] + ([] if args.no_pairwise else ["pairwise", "pairwise+backward"])
    config = Config(
        backends=args.backends,
        ops=ops,
        rowwise=rowwise,
        pairwise=pairwise,
        threads=args.threads,
        repeat=args.repeat,
        min_time=args.min_time,
        compile="none" if args.no_compile else "rowwise",
        allocator=args.allocator,
        jax_dispatch=args.jax_dispatch,
        argv=["benchmarks/run_cpu_targets.py", *(argv if argv is not None else sys.argv[1:])],
    )
    console = Console(width=170)
    doc = run_with_progress(config, not args.no_progress)
    print_report(doc, console)
    if args.json:
        write_json(doc, args.json)
        console.print(f"wrote {args.json}", highlight=False)
    if args.plot:
        write_plot(doc, args.plot)
        console.print(f"wrote {args.plot}", highlight=False)
    missed = gate(doc["targets"])
    if doc["reference_threads"] not in config.threads:
        console.print(f"note: the reference thread count ({doc['reference_threads']}) was not run; "
                      "no target decides the exit status", highlight=False)
    for r in missed:
        console.print(f"missed at threads = {r['threads']}: {r['label']} ({r['target']}): "
                      f"{r['value']:.3g}", highlight=False)
    return 1 if missed or doc["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
