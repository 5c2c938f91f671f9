"""The ``polycos`` command (``polycos bench``; also ``python -m polycos``).

Examples
--------
.. code-block:: bash

    polycos bench --quick                               # < 1 min: every installed backend
    polycos bench --threads 1,all --json out.json --plot out.png
    polycos bench --backends numpy,torch --ops forward --sizes 32768x256 --dtypes float32,float64
    polycos bench --ops pairwise+backward --pairwise-sizes 32x128,2048x128
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from polycos.bench._suites import ALLOCATORS, DTYPES, JAX_DISPATCH, OPS

__all__ = ["DEFAULTS", "QUICK", "build_parser", "main"]

T = TypeVar("T")

_F32, _F64 = "float32", "float64"
_PAIRWISE_N = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: The full grid (``polycos bench`` with no size options): a float32 sweep of N at
#: D = 256 (issue 12's 32768 x 256 among them), D = 16 rows of the same bytes as
#: 32768 x 256, a float64 sweep, and pairwise N = M from 32 to 4096 at D = 128.
DEFAULTS: dict[str, Any] = {
    "rowwise": [(n, 256, _F32) for n in (4096, 16384, 32768, 131072)]
    + [(524288, 16, _F32)]
    + [(n, 256, _F64) for n in (8192, 32768)],
    "pairwise": [(n, n, 128, dt) for dt in (_F32, _F64) for n in _PAIRWISE_N],
    "repeat": 7,
    "min_time": 0.02,
    "slow": 1.0,
    "slow_rounds": 3,
    "compile": "rowwise",
}
#: ``--quick``: two sizes per op (a line, not a point), fewer rounds, ``torch.compile``
#: only at the larger row-wise size (not pairwise): under a minute on 2 cores,
#: imports and ``torch.compile`` / ``jax.jit`` warm-up included.
QUICK: dict[str, Any] = {
    "rowwise": [(4096, 256, _F32), (16384, 256, _F32)],
    "pairwise": [(64, 64, 128, _F32), (256, 256, 128, _F32)],
    "repeat": 5,
    "min_time": 0.005,
    "slow": 0.2,
    "slow_rounds": 1,
    "compile": "largest",
}


def _csv(kind: str, choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: comma-separated names from ``choices`` (or ``all``)."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty list of {kind}s")
        if items == ["all"]:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(map(repr, bad))} (choose from {', '.join(choices)} or all)"
            )
        return list(dict.fromkeys(items))

    return parse


def _dims(text: str, lengths: tuple[int, ...], example: str) -> tuple[int, ...]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = tuple(int(p.replace("_", "")) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) not in lengths or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r} (expected {example}, positive integers)"
        )
    return dims


def _sizes(text: str) -> list[tuple[int, int]]:
    """argparse type for ``--sizes``: ``NxD[,NxD...]``."""
    return [_dims(t.strip(), (2,), "NxD, e.g. 32768x256") for t in text.split(",")]  # type: ignore[misc]


def _pairwise_sizes(text: str) -> list[tuple[int, int, int]]:
    """argparse type for ``--pairwise-sizes``: ``NxMxD`` or ``NxD`` (M = N)."""
    out = []
    for t in text.split(","):
        dims = _dims(t.strip(), (2, 3), "NxMxD or NxD, e.g. 2048x128")
        out.append(dims if len(dims) == 3 else (dims[0], dims[0], dims[1]))
    return out  # type: ignore[return-value]


def _threads(text: str) -> list[str]:
    """argparse type for ``--threads``: ``1``, ``all``, or a comma-separated list (``1,all``)."""
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t != "all" and not (t.isdigit() and int(t) >= 1)]
    if not items or bad:
        raise argparse.ArgumentTypeError(
            f"invalid thread count {', '.join(map(repr, bad or [text]))} "
            "(expected a positive integer or 'all', comma-separated, e.g. 1,all)"
        )
    return list(dict.fromkeys(str(int(t)) if t != "all" else t for t in items))


def _positive(cast: Callable[[str], T]) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r} (expected a positive number)"
            ) from None
        if not value > 0:  # type: ignore[operator]
            raise argparse.ArgumentTypeError(f"invalid value {text!r} (must be > 0)")
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise argparse.ArgumentTypeError(f"invalid value {text!r} (must be finite)")
        return value

    return parse


def _output(suffix: str) -> Callable[[str], Path]:
    def parse(text: str) -> Path:
        path = Path(text)
        if not path.parent.is_dir():
            raise argparse.ArgumentTypeError(
                f"cannot write {text!r}: directory {str(path.parent)!r} does not exist"
            )
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: it is a directory")
        if suffix and path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(
                f"invalid file name {text!r} (expected a {suffix} file)"
            )
        # Try it now, not after a run of minutes: open for append (an existing file is left
        # as it is) and remove what this made. os.access cannot tell (root passes it, and
        # /proc refuses new files to root too).
        existed = path.is_symlink() or path.exists()  # a link, even dangling, is the user's: kept
        try:
            with open(path, "a"):
                pass
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: {exc.strerror}") from None
        if not existed:
            path.unlink(missing_ok=True)
        return path

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``polycos`` argument parser (subcommand ``bench``)."""
    import polycos
    from polycos.bench._run import default_threads, usable_cpus
    from polycos.bench._suites import subject_names

    names = subject_names()
    parser = argparse.ArgumentParser(prog="polycos", description="polycos command-line tools.")
    parser.add_argument("--version", action="version", version=f"polycos {polycos.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser(
        "bench",
        help="compare the backends' speed against the machine floor and the native peers",
        description=(
            "Time polycos on every installed backend against the machine floor (the fastest "
            "any installed library streams the bytes the op must read and write, measured in "
            "the same process at the same thread count) and against the native peers, "
            "interleaved round by round; ratios are medians of per-round quotients."
        ),
    )
    bench.add_argument(
        "--backends",
        type=_csv("backend", names),
        default=list(names),
        help=f"polycos subjects, comma-separated, from: {', '.join(names)}; default: all (those "
        "not installed, and GPU ones without a GPU, are skipped with a note)",
    )
    bench.add_argument(
        "--ops",
        type=_csv("op", OPS),
        default=list(OPS),
        help=f"comma-separated, from: {', '.join(OPS)}; default: all",
    )
    bench.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="row-wise sizes NxD, comma-separated, each run in every --dtypes (default grid: "
        "float32 Nx256 for N = 4096, 16384, 32768, 131072 and 524288x16; float64 8192x256 and "
        "32768x256)",
    )
    bench.add_argument(
        "--pairwise-sizes",
        type=_pairwise_sizes,
        default=None,
        help="pairwise sizes NxMxD or NxD (M = N), each run in every --dtypes "
        "(default grid: N = M = 32 ... 4096, D = 128, float32 and float64)",
    )
    bench.add_argument(
        "--dtypes",
        type=_csv("dtype", DTYPES),
        default=None,
        help=f"comma-separated, from: {', '.join(DTYPES)} (default: the grid's; float32 with --sizes)",
    )
    bench.add_argument(
        "--threads",
        type=_threads,
        default=None,
        help="thread counts, each measured in its own process with its own floor: a positive "
        f"integer or 'all', comma-separated, e.g. 1,all (default here: "
        f"{','.join(default_threads())}: one thread on machines with <= 2 CPUs, this one has "
        f"{usable_cpus()}, all elsewhere)",
    )
    bench.add_argument(
        "--repeat", type=_positive(int), default=None, help="rounds per case (default 7; 5 with --quick)"
    )
    bench.add_argument(
        "--min-time",
        type=_positive(float),
        default=None,
        help="seconds one timing sample lasts at least (default 0.02; 0.005 with --quick)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help=f"row-wise {_fmt(QUICK['rowwise'])}, pairwise {_fmt(QUICK['pairwise'])}, 5 rounds, "
        "torch.compile only at the larger row-wise size: under a minute",
    )
    bench.add_argument(
        "--no-compile",
        action="store_true",
        help="leave out the torch.compile subject and peer (each compiles for seconds)",
    )
    bench.add_argument(
        "--json", type=_output(".json"), metavar="PATH", help="write the results as JSON"
    )
    bench.add_argument(
        "--plot", type=_output(".png"), metavar="PATH",
        help="write a PNG: x floor bars per backend and op, and time against size",
    )
    bench.add_argument(
        "--allocator", choices=ALLOCATORS, default="system",
        help="the C allocator in the measuring processes: 'system' (default), the environment as "
        "it is; 'reuse', glibc serves every thread from one heap and keeps freed blocks of up to "
        "256 MiB for reuse (GLIBC_TUNABLES), so no library's new arrays first-touch fresh pages "
        "where another's reuse memory",
    )
    bench.add_argument(
        "--jax-dispatch", choices=JAX_DISPATCH, default="async",
        help="where XLA:CPU runs each jitted call and allocates its outputs: 'async' (default, "
        "JAX's), on a worker thread; 'sync' (jax_cpu_enable_async_dispatch off), on the calling "
        "thread, like NumPy and torch",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _fmt(sizes: Sequence[tuple[Any, ...]]) -> str:
    return ",".join("x".join(str(v) for v in s if isinstance(v, int)) for s in sizes)


def grid(args: argparse.Namespace) -> tuple[list[tuple[int, int, str]], list[tuple[int, int, int, str]]]:
    """The row-wise and pairwise problems of the parsed arguments."""
    base = QUICK if args.quick else DEFAULTS
    rowwise, pairwise = list(base["rowwise"]), list(base["pairwise"])
    if args.sizes or args.dtypes:
        dtypes = args.dtypes or [_F32]
        shapes = args.sizes or list(dict.fromkeys((n, d) for n, d, dt in rowwise if dt == _F32))
        rowwise = [(n, d, dt) for dt in dtypes for n, d in shapes]
    if args.pairwise_sizes or args.dtypes:
        dtypes = args.dtypes or [_F32]
        shapes3 = args.pairwise_sizes or list(
            dict.fromkeys((n, m, d) for n, m, d, dt in pairwise if dt == _F32)
        )
        pairwise = [(n, m, d, dt) for dt in dtypes for n, m, d in shapes3]
    return rowwise, pairwise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``polycos`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0; 1 when the run at a thread count failed, no polycos
        subject was measured, or an output could not be written. Bad
        arguments (an output path that cannot be written among them) exit
        with status 2 through argparse.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_attach_sizes(argv))
    return _bench(args, argv)


_SIZE_OPTIONS = ("--sizes", "--pairwise-sizes")


def _attach_sizes(argv: list[str]) -> list[str]:
    """``--sizes -5x256`` as ``--sizes=-5x256``: argparse takes a value that starts with ``-``
    (and is no plain negative number) for an option and says only "expected one argument";
    attached, the value reaches the size check, which names what is wrong with it."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            out += [arg, *it]
            break
        if arg in _SIZE_OPTIONS:
            value = next(it, None)
            if value is not None and value[:1] == "-" and value[1:2].isdigit():
                out.append(f"{arg}={value}")
                continue
            out += [arg] if value is None else [arg, value]
            continue
        out.append(arg)
    return out


def config_from_args(args: argparse.Namespace, argv: list[str], prog: str = "polycos") -> Any:
    """The :class:`~polycos.bench._run.Config` of parsed ``bench`` arguments."""
    from polycos.bench._run import Config, default_threads

    base = QUICK if args.quick else DEFAULTS
    rowwise, pairwise = grid(args)
    return Config(
        backends=args.backends,
        ops=args.ops,
        rowwise=rowwise,
        pairwise=pairwise,
        threads=args.threads or default_threads(),
        repeat=args.repeat or base["repeat"],
        min_time=args.min_time or base["min_time"],
        quick=args.quick,
        compile="none" if args.no_compile else base["compile"],
        slow=base["slow"],
        slow_rounds=base["slow_rounds"],
        allocator=args.allocator,
        jax_dispatch=args.jax_dispatch,
        argv=[prog, *argv],
    )


def run_with_progress(config: Any, show: bool) -> dict[str, Any]:
    """:func:`polycos.bench._run.run` under a rich progress bar (on stderr)."""
    from polycos.bench._run import run

    if not show:
        return run(config)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[progress.description]{task.description:<48}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("polycos bench: starting", total=None)

        def on_case(i: int, total: int, desc: str) -> None:
            progress.update(task, completed=i, total=total, description=desc)

        return run(config, on_case=on_case)


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        from rich.console import Console
    except ImportError:  # pragma: no cover - rich is in the bench extra
        print("polycos bench needs rich: pip install 'polycos[bench]'", file=sys.stderr)
        return 1
    from polycos.bench._report import print_report, write_json, write_plot

    config = config_from_args(args, argv)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not wrap the tables at 80 columns
        console = Console(width=160)
    doc = run_with_progress(config, not args.no_progress)
    print_report(doc, console)
    failed = bool(doc["errors"])
    # Each output on its own: one that cannot be written (disk full, removed directory)
    # is reported in a line, and the other is still written.
    for option, path, write in (("--json", args.json, write_json), ("--plot", args.plot, write_plot)):
        if path is None:
            continue
        try:
            write(doc, path)
        except OSError as exc:
            print(f"polycos bench: error: {option}: cannot write {path}: {exc.strerror or exc}",
                  file=sys.stderr)
            failed = True
        else:
            console.print(f"wrote {path}", highlight=False)
    if not any(r["kind"] == "polycos" for r in doc["results"]):
        print("polycos bench: error: no polycos subject was measured (see the skipped cases above)",
              file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
