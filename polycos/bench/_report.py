"""Output: rich tables, the targets table, the JSON file and the log-log plot."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from polycos.bench._suites import OPS
from polycos.bench._targets import check

__all__ = ["print_report", "write_json", "write_plot"]

_KIND_ORDER = {"polycos": 0, "peer": 1, "floor": 2}


def fmt_time(seconds: float) -> str:
    """Seconds with a unit that keeps 3 significant digits.

    Examples
    --------
    >>> fmt_time(0.0123), fmt_time(2.5e-6), fmt_time(3.0)
    ('12.3 ms', '2.50 µs', '3.00 s')
    """
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return (
                f"{seconds / scale:.3g} {unit}"
                if seconds / scale >= 100
                else f"{seconds / scale:#.3g} {unit}"
            )
    return f"{seconds / 1e-9:.3g} ns"


def _fmt_x(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.3g}×" if value < 100 else f"{value:,.0f}×"


def _shape(shape: Iterable[int]) -> str:
    return "x".join(str(s) for s in shape)


def print_report(doc: dict[str, Any], console: Any) -> None:
    """Print one table per op, the skip notes and the spec-target table.

    Parameters
    ----------
    doc : dict
        The benchmark document (:func:`polycos.bench._run.run`).
    console : rich.console.Console
        Where to print.
    """
    from rich.table import Table

    results = doc["results"]
    for op in OPS:
        recs = [r for r in results if r["op"] == op]
        if not recs:
            continue
        table = Table(
            title=f"[bold]{op}[/]  (× floor = time / floor time; speed-up = peer time / polycos time)",
            title_justify="left",
            header_style="bold",
        )
        for col, just in (
            ("backend", "left"),
            ("shape", "right"),
            ("dtype", "left"),
            ("median", "right"),
            ("GB/s", "right"),
            ("× floor", "right"),
            ("speed-up over peers", "left"),
        ):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in recs:
            groups.setdefault((r["suite"], tuple(r["shape"]), r["dtype"]), []).append(r)
        for gi, ((suite, shape, dtype), grp) in enumerate(groups.items()):
            if gi:
                table.add_section()
            for r in sorted(grp, key=lambda r: _KIND_ORDER[r["kind"]]):
                name = r["name"]
                style = {"polycos": "bold", "peer": "", "floor": "dim"}[r["kind"]]
                label = {
                    "polycos": f"polycos {name}",
                    "peer": f"  peer: {name}",
                    "floor": f"  floor ({suite})",
                }[r["kind"]]
                speed = "  ".join(f"{_fmt_x(v)} {p}" for p, v in r["speedup"].items())
                gbps = "-" if r["gbps"] is None else f"{r['gbps']:.3g}"
                table.add_row(
                    label,
                    _shape(shape),
                    dtype,
                    fmt_time(r["median_s"]),
                    gbps,
                    _fmt_x(r["x_floor"]),
                    speed,
                    style=style,
                )
        console.print(table)
    if doc["skipped"]:
        console.print("[bold]skipped[/]")
        seen = set()
        for s in doc["skipped"]:
            where = " ".join(
                str(x)
                for x in (
                    s["suite"],
                    s["op"],
                    _shape(s["shape"]) if s["shape"] else None,
                    s["dtype"],
                )
                if x
            )
            line = f"  {where}: {s['reason']}"
            if line not in seen:
                seen.add(line)
                console.print(line, markup=False, highlight=False)
    rows = [r for r in check(results) if r["status"] != "not measured"]
    if rows:
        table = Table(
            title="[bold]spec §5 targets[/] (float32, largest size measured)", title_justify="left"
        )
        for col in ("workload", "target", "shape", "measured", "status"):
            table.add_column(col)
        for r in rows:
            colour = "green" if r["status"] == "met" else "red"
            table.add_row(
                r["label"],
                r["target"],
                _shape(r["shape"]),
                _fmt_x(r["value"]),
                f"[{colour}]{r['status']}[/]",
            )
        console.print(table)
    m = doc["machine"]
    console.print(
        f"{m['processor']}, {m['cpu_count']} CPUs, load {m['loadavg'][0]:.2f}"
        if m.get("loadavg")
        else m["processor"],
        f"| GPUs: {', '.join(m['gpus']) or 'none'} | {doc['duration_s']:.1f} s",
        highlight=False,
    )


def _finite(obj: Any) -> Any:
    """Replace NaN/inf by ``None`` so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(doc: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Write the document as strict JSON (non-finite numbers become ``null``); return what was written."""
    clean = _finite(doc)
    Path(path).write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n")
    return clean


def write_plot(doc: dict[str, Any], path: str | Path) -> None:
    """Log-log plot of median time against bytes moved, one panel per op.

    polycos subjects are solid lines, native peers dashed, each suite's
    bandwidth floor a dotted black line.

    Parameters
    ----------
    doc : dict
        The benchmark document.
    path : str or Path
        PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    ops = [op for op in OPS if any(r["op"] == op for r in results)] or ["forward"]
    fig, axes = plt.subplots(1, len(ops), figsize=(5.5 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops, strict=True):
        series: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
        for r in results:
            if r["op"] != op:
                continue
            name = f"floor ({r['suite']})" if r["kind"] == "floor" else r["name"]
            series.setdefault((r["kind"], name, r["dtype"]), []).append((r["bytes"], r["median_s"]))
        for (kind, name, dtype), pts in sorted(
            series.items(), key=lambda kv: _KIND_ORDER[kv[0][0]]
        ):
            pts.sort()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            label = f"{name} ({dtype})" if len(doc["config"]["dtypes"]) > 1 else name
            if kind == "polycos":
                ax.plot(xs, ys, "-o", lw=2, ms=5, label=f"polycos {label}")
            elif kind == "peer":
                ax.plot(xs, ys, "--x", lw=1, ms=4, alpha=0.7, label=label)
            else:
                ax.plot(xs, ys, ":", color="black", lw=1.5, marker=".", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("bytes the op must read + write")
        ax.set_ylabel("median time [s]")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = doc["machine"]
    fig.suptitle(
        f"polycos bench — {m['processor']}, {m['cpu_count']} CPUs, {doc['date']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
