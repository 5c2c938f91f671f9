"""``python -m polycos``: the ``polycos`` command (``python -m polycos bench --quick``)."""

from __future__ import annotations

from polycos.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
