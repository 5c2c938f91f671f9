"""Output: rich tables (one per thread count and op), the targets, the JSON file and the plot."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from polycos.bench._suites import OPS, PAIRWISE, ROWWISE

__all__ = ["dumps", "fmt_time", "print_report", "write_json", "write_plot"]

_KIND_ORDER = {"polycos": 0, "peer": 1, "floor": 2, "floor-read": 3, "floor-write": 4}


def fmt_time(seconds: float) -> str:
    """Seconds with a unit that keeps 3 significant digits.

    Examples
    --------
    >>> fmt_time(0.0123), fmt_time(2.5e-6), fmt_time(3.0)
    ('12.3 ms', '2.50 µs', '3.00 s')
    """
    if seconds is None or not math.isfinite(seconds):
        return "-"
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


def _shape(shape: Iterable[int] | None) -> str:
    return "x".join(str(s) for s in shape) if shape else "-"


def _settings(doc: dict[str, Any]) -> list[str]:
    seen = [r["threads_setting"] for r in doc["results"]]
    return list(dict.fromkeys([*doc["config"]["threads"], *seen]))


def _threads_label(doc: dict[str, Any], setting: str) -> str:
    run = next((r for r in doc["runs"] if r["threads_setting"] == setting), None)
    if run is None:
        return f"threads = {setting}"
    n = run["threads"]
    libs = run.get("threads_by_library", {})
    extra = ", ".join(f"{k} {v}" for k, v in libs.items())
    head = f"threads = {n}" + (f" (all {n} usable CPUs)" if setting == "all" else "")
    return f"{head}; {extra}" if extra else head


def _allocator(doc: dict[str, Any]) -> str:
    return str(doc["config"].get("allocator", "system"))  # (documents before the option: the system's)


def _jax_dispatch(doc: dict[str, Any]) -> str:
    return str(doc["config"].get("jax_dispatch", "async"))  # (documents before the option: JAX's default)


def _floor_label(rec: dict[str, Any]) -> str:
    parts = rec.get("floor_parts") or {}
    best = [max(p, key=p.get) for p in (parts.get("read", {}), parts.get("write", {})) if p]
    return "machine floor" + (f" ({' + '.join(best)})" if best else "")


#: A subject that first-touches at least this many pages per call (1 MiB of 4 KiB
#: pages) where the floor's writer touched none is flagged by :func:`first_touch_notes`.
FIRST_TOUCH_PAGES = 256


def first_touch_notes(doc: dict[str, Any]) -> list[str]:
    """Cases where the floor wrote reused memory but a polycos subject first-touched new pages.

    Under glibc's defaults the floor's fill can get its freed blocks back while
    another library's new arrays are fresh pages (``--allocator``, see
    :func:`polycos.bench._run.allocator_env`); the × floor of such a subject
    then includes zeroing pages that the floor did not pay for. One line per
    case, naming the subjects and their page faults per call.
    """
    by_case: dict[tuple, list[dict[str, Any]]] = {}
    for r in doc["results"]:
        key = (r["threads_setting"], r["op"], tuple(r["shape"]), r["dtype"], r["device"])
        by_case.setdefault(key, []).append(r)
    notes = []
    for (setting, op, shape, dtype, _), recs in by_case.items():
        floor = next((r for r in recs if r["kind"] == "floor"), None)
        wins = ((floor or {}).get("floor_parts") or {}).get("write") or {}
        best = max(wins, key=wins.__getitem__) if wins else None  # the writer that won most rounds
        writer = next((r for r in recs if r["kind"] == "floor-write" and r["name"] == best), None)
        if writer is None or writer.get("page_faults") is None or writer["page_faults"] >= 1:
            continue
        touched = [
            f"{r['name']} {r['page_faults']:.0f}" for r in sorted(recs, key=lambda r: r["name"])
            if r["kind"] == "polycos" and (r.get("page_faults") or 0) >= FIRST_TOUCH_PAGES
        ]
        if touched:
            notes.append(
                f"thr {setting} {op} {_shape(shape)} {dtype}: the floor's writes ({writer['name']}) "
                f"reused memory (0 page faults per call); first-touched pages per call: "
                f"{', '.join(touched)} (the C allocator's choice; --allocator reuse measures without it)"
            )
    return notes


def print_report(doc: dict[str, Any], console: Any) -> None:
    """Print one table per thread count and op, the skip notes and the targets.

    Parameters
    ----------
    doc : dict
        The benchmark document (:func:`polycos.bench._run.run`).
    console : rich.console.Console
        Where to print.
    """
    from rich.table import Table

    results = doc["results"]
    for setting in _settings(doc):
        label = _threads_label(doc, setting)
        for op in OPS:
            recs = [
                r for r in results
                if r["op"] == op and r["threads_setting"] == setting and r["kind"] in ("polycos", "peer", "floor")
            ]
            if not recs:
                continue
            table = Table(
                title=f"[bold]{op}[/], {label}  (× floor = time / machine floor time; "
                "speed-up = peer time / polycos time; medians of per-round ratios)",
                title_justify="left",
                header_style="bold",
            )
            for col, just in (
                ("thr", "right"),
                ("subject", "left"),
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
                groups.setdefault((r["device"], tuple(r["shape"]), r["dtype"]), []).append(r)
            for gi, ((device, shape, dtype), grp) in enumerate(groups.items()):
                if gi:
                    table.add_section()
                for r in sorted(grp, key=lambda r: (_KIND_ORDER[r["kind"]], r["name"])):
                    style = {"polycos": "bold", "peer": "", "floor": "dim"}[r["kind"]]
                    name = {
                        "polycos": f"polycos {r['name']}",
                        "peer": f"  peer: {r['name']}",
                        "floor": f"  {_floor_label(r)}",
                    }[r["kind"]] + (" [cuda]" if device == "cuda" else "")
                    speed = "  ".join(f"{_fmt_x(v)} {p}" for p, v in r["speedup"].items())
                    gbps = "-" if r["gbps"] is None else f"{r['gbps']:.3g}"
                    table.add_row(
                        str(r["threads"]), name, _shape(shape), dtype, fmt_time(r["median_s"]),
                        gbps, _fmt_x(r["x_floor"]), speed, style=style,
                    )
            console.print(table)
    notes = first_touch_notes(doc)
    if notes:
        console.print("[bold]first touches[/]")
        for line in notes:
            console.print(f"  {line}", markup=False, highlight=False)
    if doc["skipped"]:
        console.print("[bold]skipped[/]")
        seen = set()
        for s in doc["skipped"]:
            where = " ".join(
                str(x)
                for x in (
                    f"thr {s['threads']}",
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
    print_targets(doc, console)
    m = doc["machine"]
    load = f", load {m['loadavg'][0]:.2f}" if m.get("loadavg") else ""
    console.print(
        f"{m['processor']}, {m['usable_cpus']} usable CPUs{load} | GPUs: {', '.join(m['gpus']) or 'none'}"
        f" | allocator: {_allocator(doc)} | JAX dispatch: {_jax_dispatch(doc)} | {doc['duration_s']:.1f} s",
        highlight=False,
    )
    for err in doc.get("errors", []):
        console.print(f"[red]error:[/] {err}", highlight=False)


def print_targets(doc: dict[str, Any], console: Any) -> None:
    """The spec's targets at every thread count measured (gating rows first)."""
    from rich.table import Table

    rows = [r for r in doc["targets"] if r["status"] != "not measured"]
    if not rows:
        return
    table = Table(
        title=f"[bold]spec §5 targets[/] (the exit status of run_cpu_targets.py is decided at "
        f"threads = {doc['reference_threads']}; other thread counts are reported beside)",
        title_justify="left",
    )
    for col in ("workload", "target", "dtype", "thr", "shape", "measured", "status"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: not r["gate"]):
        colour = "green" if r["status"] == "met" else "red"
        shape = _shape(r["shape"])
        if r["per_size"]:
            shape = f"worst of {len(r['per_size'])} sizes: {shape}"
        elif r["at_reference"] is False:
            shape += " (reference size not run)"
        table.add_row(
            r["label"], r["target"], r["dtype"], str(r["threads"]), shape, _fmt_x(r["value"]),
            f"[{colour}]{r['status']}[/]" + ("" if r["gate"] else " (beside)"),
        )
    console.print(table)


def _finite(obj: Any) -> Any:
    """Replace NaN/inf by ``None`` so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _round(obj: Any, digits: int = 6) -> Any:
    """Floats to ``digits`` significant digits (timings are not more precise than that)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v, digits) for v in obj]
    return obj


def dumps(doc: dict[str, Any]) -> str:
    """Strict JSON, one line per item of each top-level list of objects (diffable, compact).

    Examples
    --------
    >>> print(dumps({"a": 1, "results": [{"x": 1.0}, {"x": 2.5}]}))
    {
     "a": 1,
     "results": [
      {"x": 1.0},
      {"x": 2.5}
     ]
    }
    <BLANKLINE>
    """
    parts = []
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n  ".join(json.dumps(v, allow_nan=False, ensure_ascii=False) for v in value)
            text = f"[\n  {items}\n ]"
        else:
            text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        parts.append(f"{json.dumps(key)}: {text}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def write_json(doc: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Write the document as strict JSON (non-finite numbers become ``null``, floats keep
    6 significant digits, one line per record); return what was written."""
    clean = _round(_finite(doc))
    Path(path).write_text(dumps(clean), encoding="utf-8")
    return clean


# --------------------------------------------------------------------------- plot


def _bar_shape(results: list[dict[str, Any]], op: str) -> tuple[tuple[int, ...], str] | None:
    """The shape the bars of an op show: issue 12's 32768 x 256 float32 if run, else the largest float32."""
    from polycos.bench._targets import REFERENCE_SHAPE

    recs = [r for r in results if r["op"] == op and r["kind"] == "polycos"]
    if not recs:
        return None
    f32 = [r for r in recs if r["dtype"] == "float32"] or recs
    if op in ROWWISE and any(tuple(r["shape"]) == REFERENCE_SHAPE for r in f32):
        return REFERENCE_SHAPE, f32[0]["dtype"]
    best = max(f32, key=lambda r: math.prod(r["shape"]))
    return tuple(best["shape"]), best["dtype"]


def _sweep(results: list[dict[str, Any]], op: str) -> tuple[str, int | None]:
    """The dtype and (row-wise) D of the op's longest size sweep."""
    count: Counter[tuple[str, int | None]] = Counter()
    for r in results:
        if r["op"] == op and r["kind"] == "floor":
            count[(r["dtype"], r["shape"][-1] if op in ROWWISE else None)] += 1
    if not count:
        return "float32", None
    return max(count, key=lambda k: (count[k], k[0] == "float32"))


def write_plot(doc: dict[str, Any], path: str | Path) -> None:
    """PNG: (a) × floor per subject and peer, per op, one bar per thread count; (b) time against size.

    Panel row (a) shows each op at one size (issue 12's 32768 x 256 float32 for
    the row-wise ops when measured, else the largest float32 size), bars on a
    log scale with the floor at 1 and the op's targets as lines. The rows (b),
    one per thread count, plot the median time against N for the op's size
    sweep: polycos subjects solid, native peers dashed, the machine floor black
    and dotted.

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

    results = [r for r in doc["results"] if r["kind"] in ("polycos", "peer", "floor")]
    ops = [op for op in OPS if any(r["op"] == op for r in results)] or ["forward"]
    settings = _settings(doc) or ["1"]
    fig, axes = plt.subplots(
        1 + len(settings), len(ops), figsize=(5.6 * len(ops), 4.4 * (1 + len(settings))), squeeze=False
    )
    cmap = plt.get_cmap("tab20")
    names = sorted({r["name"] for r in results if r["kind"] != "floor"},
                   key=lambda n: (not any(r["name"] == n and r["kind"] == "polycos" for r in results), n))
    colour = {n: cmap(i % 20) for i, n in enumerate(names)}
    limits = {"forward": (1.3, 2.0), "forward+backward": (1.5, 2.0)}
    for col, op in enumerate(ops):
        _bars(axes[0][col], results, op, settings, colour, limits.get(op, ()))
        for row, setting in enumerate(settings, start=1):
            _lines(axes[row][col], results, op, setting, colour, doc)
    m = doc["machine"]
    fig.suptitle(
        f"polycos bench — {m['processor']}, {m['usable_cpus']} usable CPUs, {doc['date']}, "
        f"allocator: {_allocator(doc)}, JAX dispatch: {_jax_dispatch(doc)}; "
        "bars: time / machine floor (lower is better); lines: time against N",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.07, top=0.91, wspace=0.22, hspace=0.75)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(ax: Any, results: list[dict[str, Any]], op: str, settings: list[str],
          colour: dict[str, Any], limits: tuple[float, ...]) -> None:
    chosen = _bar_shape(results, op)
    if chosen is None:
        ax.set_axis_off()
        return
    shape, dtype = chosen
    recs = [r for r in results if r["op"] == op and tuple(r["shape"]) == shape and r["dtype"] == dtype
            and r["kind"] != "floor" and r["x_floor"] is not None]
    names = list(dict.fromkeys(r["name"] for r in sorted(recs, key=lambda r: (_KIND_ORDER[r["kind"]], r["name"]))))
    width = 0.8 / max(1, len(settings))
    for si, setting in enumerate(settings):
        for ni, name in enumerate(names):
            rec = next((r for r in recs if r["name"] == name and r["threads_setting"] == setting), None)
            if rec is None:
                continue
            x = ni + (si - (len(settings) - 1) / 2) * width
            peer = rec["kind"] == "peer"
            ax.bar(x, rec["x_floor"], width * 0.95, color=colour.get(name, "grey"),
                   hatch="//" if peer else None, alpha=0.55 if si else 0.95, edgecolor="black", lw=0.5)
            ax.text(x, rec["x_floor"], f"{rec['x_floor']:.2g}", ha="center", va="bottom", fontsize=6,
                    rotation=90 if len(names) * len(settings) > 12 else 0)
    ax.axhline(1.0, color="black", lw=1, ls=":")
    _few_ticks(ax)
    for lim in limits:
        ax.axhline(lim, color="red", lw=0.8, ls="--", alpha=0.6)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
    threads = ", ".join(f"thr {s}" + (" (light)" if i else "") for i, s in enumerate(settings))
    ax.set_title(f"{op}: × floor at {_shape(shape)} {dtype}\n{threads}; hatched: peers", fontsize=9)
    ax.set_ylabel("time / machine floor")
    ax.grid(True, axis="y", which="major", alpha=0.3)


def _few_ticks(ax: Any) -> None:
    """No minor ticks: with a dozen log axes, laying them out takes seconds."""
    from matplotlib.ticker import NullLocator

    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_locator(NullLocator())


def _lines(ax: Any, results: list[dict[str, Any]], op: str, setting: str,
           colour: dict[str, Any], doc: dict[str, Any]) -> None:
    dtype, d = _sweep(results, op)
    recs = [r for r in results if r["op"] == op and r["threads_setting"] == setting and r["dtype"] == dtype
            and (d is None or r["shape"][-1] == d)]
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in recs:
        series.setdefault((r["kind"], r["name"]), []).append((r["shape"][0], r["median_s"]))
    for (kind, name), pts in sorted(series.items(), key=lambda kv: (_KIND_ORDER[kv[0][0]], kv[0][1])):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if kind == "polycos":
            ax.plot(xs, ys, "-o", color=colour.get(name), lw=2, ms=4, label=f"polycos {name}")
        elif kind == "peer":
            ax.plot(xs, ys, "--x", color=colour.get(name), lw=1, ms=4, alpha=0.8, label=name)
        else:
            ax.plot(xs, ys, ":", color="black", lw=2, marker=".", label="machine floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _few_ticks(ax)
    what = f"N x {d}" if op in ROWWISE else "N x N x D" if op in PAIRWISE else "N"
    ax.set_title(f"{op}, {dtype}, threads = {_threads_of(doc, setting)}: time against {what}", fontsize=9)
    ax.set_xlabel("N (rows)" if op in ROWWISE else "N = M (rows of each side)")
    ax.set_ylabel("median time [s]")
    ax.grid(True, which="major", alpha=0.3)
    if series:
        ax.legend(fontsize=6, ncol=2, loc="upper left")


def _threads_of(doc: dict[str, Any], setting: str) -> str:
    run = next((r for r in doc["runs"] if r["threads_setting"] == setting), None)
    return f"{run['threads']}" + (" (all)" if setting == "all" else "") if run else setting
