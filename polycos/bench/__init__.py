"""``polycos bench``: compare the backends' speed against the bandwidth floor and native peers.

Importing this package is light (no torch, jax or cupy): each framework is
imported only when its suite runs. The pieces, shared by the command and by the
scripts in ``benchmarks/``:

* :mod:`polycos.bench._suites`: what is timed (subjects, peers, floors, byte model);
* :mod:`polycos.bench._timing`: interleaved rounds and per-round ratios;
* :mod:`polycos.bench._run`: the driver returning the JSON document;
* :mod:`polycos.bench._schema`: the document's JSON Schema and a checker;
* :mod:`polycos.bench._targets`: the spec's performance targets;
* :mod:`polycos.bench._report`: tables, JSON file, plot;
* :mod:`polycos.bench.cli`: the ``polycos`` command.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``polycos`` command (see :func:`polycos.bench.cli.main`)."""
    from polycos.bench.cli import main as _main

    return _main(argv)
