"""The ``polycos`` command (``polycos bench``; also ``python -m polycos``).

Examples
--------
.. code-block:: bash

    polycos bench --quick                               # < 1 min: every installed backend
    polycos bench --backends numpy,torch --ops forward --sizes 65536x256 --json out.json
    polycos bench --ops pairwise+backward --pairwise-sizes 2048x128 --plot pairwise.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from polycos.bench._suites import BACKENDS, DTYPES, OPS

__all__ = ["DEFAULTS", "QUICK", "build_parser", "main"]

T = TypeVar("T")

#: The full grid (``polycos bench`` with no size options).
DEFAULTS: dict[str, Any] = {
    "sizes": [(4096, 128), (16384, 256), (65536, 256)],
    "pairwise_sizes": [(512, 512, 128), (2048, 2048, 128)],
    "dtypes": ["float32"],
    "repeat": 7,
    "min_time": 0.02,
    "slow": 1.0,
    "slow_rounds": 3,
}
#: ``--quick``: one mid-size problem per op, fewer rounds (under a minute on 2 cores,
#: torch.compile and jax.jit warm-up included).
QUICK: dict[str, Any] = {
    "sizes": [(65536, 128)],  # 32 MiB per float32 input: larger than this machine's L3
    "pairwise_sizes": [(256, 256, 128)],
    "dtypes": ["float32"],
    "repeat": 5,
    "min_time": 0.005,
    "slow": 0.2,
    "slow_rounds": 1,
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
    return [_dims(t.strip(), (2,), "NxD, e.g. 65536x256") for t in text.split(",")]  # type: ignore[misc]


def _pairwise_sizes(text: str) -> list[tuple[int, int, int]]:
    """argparse type for ``--pairwise-sizes``: ``NxMxD`` or ``NxD`` (M = N)."""
    out = []
    for t in text.split(","):
        dims = _dims(t.strip(), (2, 3), "NxMxD or NxD, e.g. 2048x128")
        out.append(dims if len(dims) == 3 else (dims[0], dims[0], dims[1]))
    return out  # type: ignore[return-value]


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
        return path

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``polycos`` argument parser (subcommand ``bench``)."""
    import polycos

    parser = argparse.ArgumentParser(prog="polycos", description="polycos command-line tools.")
    parser.add_argument("--version", action="version", version=f"polycos {polycos.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser(
        "bench",
        help="compare the backends' speed against the bandwidth floor and the native peers",
        description=(
            "Time polycos on every installed backend against the memory-bandwidth floor "
            "(the time to stream the bytes the op must read and write, measured in the same "
            "process) and against the native peers, interleaved, median of --repeat rounds."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument(
        "--backends",
        type=_csv("backend", BACKENDS),
        default=list(BACKENDS),
        help=f"comma-separated, from: {', '.join(BACKENDS)}; GPU ones are skipped without a GPU",
    )
    bench.add_argument(
        "--ops",
        type=_csv("op", OPS),
        default=list(OPS),
        help=f"comma-separated, from: {', '.join(OPS)}",
    )
    bench.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help=f"row-wise sizes NxD, comma-separated (default {_fmt(DEFAULTS['sizes'])})",
    )
    bench.add_argument(
        "--pairwise-sizes",
        type=_pairwise_sizes,
        default=None,
        help=f"pairwise sizes NxMxD or NxD (M = N) (default {_fmt(DEFAULTS['pairwise_sizes'])})",
    )
    bench.add_argument(
        "--dtypes",
        type=_csv("dtype", DTYPES),
        default=None,
        help=f"comma-separated, from: {', '.join(DTYPES)} (default float32)",
    )
    bench.add_argument(
        "--repeat",
        type=_positive(int),
        default=None,
        help="rounds per case (default 7; 5 with --quick)",
    )
    bench.add_argument(
        "--min-time",
        type=_positive(float),
        default=None,
        help="seconds one timing sample lasts at least (default 0.02)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help=f"one size per op ({_fmt(QUICK['sizes'])}, pairwise {_fmt(QUICK['pairwise_sizes'])}), 5 rounds: under a minute",
    )
    bench.add_argument(
        "--threads",
        type=_positive(int),
        default=None,
        help="intra-op threads for torch and XLA (default: their own); 1 compares every backend on one core",
    )
    bench.add_argument(
        "--json", type=_output(".json"), metavar="PATH", help="write the results as JSON"
    )
    bench.add_argument(
        "--plot", type=_output(".png"), metavar="PATH", help="write a log-log plot (PNG)"
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _fmt(sizes: list[tuple[int, ...]]) -> str:
    return ",".join("x".join(map(str, s)) for s in sizes)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``polycos`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status (0). Bad arguments exit with status 2 through argparse.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return _bench(args, argv)


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:  # pragma: no cover - rich is in the bench extra
        print("polycos bench needs rich: pip install 'polycos[bench]'", file=sys.stderr)
        return 1
    from polycos.bench._report import print_report, write_json, write_plot
    from polycos.bench._run import Config, run

    base = QUICK if args.quick else DEFAULTS
    config = Config(
        backends=args.backends,
        ops=args.ops,
        sizes=args.sizes or base["sizes"],
        pairwise_sizes=args.pairwise_sizes or base["pairwise_sizes"],
        dtypes=args.dtypes or base["dtypes"],
        repeat=args.repeat or base["repeat"],
        min_time=args.min_time or base["min_time"],
        quick=args.quick,
        threads=args.threads,
        slow=base["slow"],
        slow_rounds=base["slow_rounds"],
        argv=["polycos", *argv],
    )
    console = Console()
    if not console.is_terminal:  # piped or captured: do not wrap the tables at 80 columns
        console = Console(width=140)
    if args.no_progress:
        doc = run(config)
    else:
        with Progress(
            TextColumn("[progress.description]{task.description:<42}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as progress:
            task = progress.add_task("polycos bench", total=None)

            def on_case(i: int, total: int, desc: str) -> None:
                progress.update(task, completed=i, total=total, description=desc)

            doc = run(config, on_case=on_case)
    print_report(doc, console)
    if args.json is not None:
        write_json(doc, args.json)
        console.print(f"wrote {args.json}", highlight=False)
    if args.plot is not None:
        write_plot(doc, args.plot)
        console.print(f"wrote {args.plot}", highlight=False)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
