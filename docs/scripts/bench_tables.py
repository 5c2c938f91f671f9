"""Print the Markdown tables of docs/benchmarks.md from a ``polycos bench`` JSON.

Usage::

    python docs/scripts/bench_tables.py benchmarks/results/cpu-targets-2core-epyc.json

Prints: the targets at every thread count side by side, the row-wise tables at
the reference shapes (every subject and peer: median, GB/s, x floor,
speed-ups) and the pairwise forward + backward sweep (polycos / peer time at
every size).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}×"


def targets(doc: dict[str, Any]) -> None:
    """One row per target, one column per thread count."""
    by_label: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    settings: list[str] = []
    for t in doc["targets"]:
        if t["status"] == "not measured" and t["value"] is None and t["threads"] is None:
            continue
        by_label[t["label"]][t["threads_setting"]] = t
        if t["threads_setting"] not in settings:
            settings.append(t["threads_setting"])
    runs = {r["threads_setting"]: r["threads"] for r in doc["runs"]}
    head = " | ".join(f"{runs.get(s, s)} thread{'s' if runs.get(s) != 1 else ''}" for s in settings)
    print(f"| workload | target | {head} |")
    print("|---|---|" + "---:|" * len(settings))
    for label, per in by_label.items():
        first = next(iter(per.values()))
        cells = []
        for s in settings:
            t = per.get(s)
            if t is None or t["value"] is None:
                cells.append("—")
                continue
            where = ""
            if t["per_size"]:
                where = f" (worst: {t['shape'][0]}×{t['shape'][1]})"
            mark = "met" if t["status"].startswith("met") else "**missed**"
            cells.append(f"{t['value']:.3g}×{where} {mark}")
        print(f"| {label} | {first['target']} | " + " | ".join(cells) + " |")


def rowwise(doc: dict[str, Any], op: str, shape: list[int], dtype: str) -> None:
    recs = [r for r in doc["results"] if r["op"] == op and r["shape"] == shape and r["dtype"] == dtype
            and r["kind"] in ("polycos", "peer", "floor")]
    if not recs:
        return
    print(f"\n**{op}, {dtype} {shape[0]}×{shape[1]}**\n")
    print("| threads | candidate | median | GB/s | × floor | speed-up over the library's peers |")
    print("|---:|---|---:|---:|---:|---|")
    order = {"polycos": 0, "peer": 1, "floor": 2}
    for r in sorted(recs, key=lambda r: (r["threads"], order[r["kind"]], r["name"])):
        name = f"polycos {r['name']}" if r["kind"] == "polycos" else (
            "machine floor" if r["kind"] == "floor" else f"`{r['name']}`")
        sp = ", ".join(f"{v:.3g}× `{k}`" for k, v in r["speedup"].items() if v is not None)
        gbps = "" if r["gbps"] is None else f"{r['gbps']:.3g}"
        print(f"| {r['threads']} | {name} | {_fmt_time(r['median_s'])} | {gbps} | {_x(r['x_floor'])} | {sp} |")


def pairwise_sweep(doc: dict[str, Any], dtype: str) -> None:
    recs = [r for r in doc["results"] if r["op"] == "pairwise+backward" and r["dtype"] == dtype
            and r["kind"] == "polycos"]
    if not recs:
        return
    sizes = sorted({r["shape"][0] for r in recs})
    print(f"\n**pairwise + backward, {dtype}, D = 128: speed-up over normalise + matmul of the same "
          "library (below 1: polycos slower; the target is ≥ 0.667)**\n")
    print("| threads | subject | " + " | ".join(f"{n}²" for n in sizes) + " |")
    print("|---:|---|" + "---:|" * len(sizes))
    rows: dict[tuple[int, str], dict[int, float]] = defaultdict(dict)
    for r in recs:
        peer = next((v for k, v in r["speedup"].items() if k.startswith("normalise+matmul")), None)
        if peer is not None:
            rows[r["threads"], r["name"]][r["shape"][0]] = peer
    for (threads, name), per in sorted(rows.items()):
        print(f"| {threads} | {name} | " + " | ".join(f"{per[n]:.2f}" if n in per else "" for n in sizes) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    args = parser.parse_args()
    with open(args.json) as f:
        doc = json.load(f)
    m = doc["machine"]
    print(f"<!-- {doc['date']}, {m['processor']}, {m['usable_cpus']} CPUs, {doc['duration_s']:.0f} s, "
          f"versions {doc['versions']} -->\n")
    targets(doc)
    for op in ("forward", "forward+backward"):
        rowwise(doc, op, [32768, 256], "float32")
    rowwise(doc, "forward", [524288, 16], "float32")
    rowwise(doc, "forward+backward", [32768, 256], "float64")
    for dt in ("float32", "float64"):
        pairwise_sweep(doc, dt)


if __name__ == "__main__":
    main()
