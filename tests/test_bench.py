"""``polycos bench``: the command's output, the machine floor per thread count, the targets logic.

Nothing here times anything for its own sake: one subprocess run of the
command at tiny sizes (one child process per thread count, as users run it)
feeds most tests; the rest check arguments, planning and the targets on
synthetic records. Well under a minute on 2 cores.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from polycos import _backends
from polycos.bench import cli
from polycos.bench._run import (
    REUSE_TUNABLES,
    Config,
    allocator_env,
    apply_jax_dispatch,
    default_threads,
    plan,
    reference_threads,
    run,
    thread_env,
    usable_cpus,
)
from polycos.bench._schema import validate
from polycos.bench._suites import io_shapes, model_bytes, subject_names
from polycos.bench._targets import REFERENCE_SHAPE, check, gate
from polycos.bench._timing import floor_samples, median_ratio

pytest.importorskip("rich")

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--sizes", "64x8", "--pairwise-sizes", "8x4", "--repeat", "2", "--min-time", "0.0002",
        "--no-compile", "--no-progress"]
INSTALLED = _backends.installed()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def command_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """``python -m polycos bench`` in a fresh interpreter: NumPy, torch and JAX, threads 1 and all.

    (dask and array-api-strict are slow to time even at tiny sizes; their cases are
    built and called once in :func:`test_backends_without_a_driver_are_measured`.)
    """
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench")
    backends = [b for b in ("numpy", "torch", "jax") if b in INSTALLED]
    proc = subprocess.run(
        [sys.executable, "-m", "polycos", "bench", "--backends", ",".join(backends),
         "--threads", "1,all", "--ops", "forward,pairwise+backward", "--allocator", "reuse",
         "--jax-dispatch", "sync", *TINY,
         "--json", str(out / "r.json"), "--plot", str(out / "r.png")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "r.json").read_text()), proc.stdout, out


def _cases(doc: dict[str, Any]) -> set[tuple]:
    return {(r["threads_setting"], r["op"], tuple(r["shape"]), r["dtype"]) for r in doc["results"]}


# --------------------------------------------------------------------------- the command's output


def test_json_matches_schema(command_run: tuple[dict[str, Any], str, Path]) -> None:
    doc, _, _ = command_run
    assert validate(doc) == []
    assert doc["schema"] == "polycos-bench/2"
    assert doc["config"]["rowwise"] == [[64, 8, "float32"]]
    assert doc["config"]["pairwise"] == [[8, 8, 4, "float32"]]
    assert doc["config"]["allocator"] == "reuse"
    assert doc["config"]["jax_dispatch"] == "sync"
    for r in doc["runs"]:  # what the children ran with
        assert {"glibc.malloc.arena_max=1", f"glibc.malloc.mmap_threshold={256 << 20}"} <= set(
            r["env"]["GLIBC_TUNABLES"].split(":"))
        assert r["jax_async_dispatch"] is (False if "jax" in INSTALLED else None)
    assert doc["errors"] == []


def test_schema_rejects_broken_documents(command_run: tuple[dict[str, Any], str, Path]) -> None:
    doc, _, _ = command_run
    for mutate in (
        lambda d: d["results"][0].pop("median_s"),
        lambda d: d["results"][0].pop("threads"),
        lambda d: d["results"][0].update(kind="mystery"),
        lambda d: d["results"][0].update(threads=0),
        lambda d: d["config"].update(repeat=0),
        lambda d: d["config"].update(allocator="jemalloc"),
        lambda d: d["config"].update(jax_dispatch="eager"),
        lambda d: d["runs"][0].update(jax_async_dispatch="yes"),
        lambda d: d.update(schema="polycos-bench/1"),
        lambda d: d["targets"][0].update(status="almost"),
    ):
        broken = copy.deepcopy(doc)
        mutate(broken)
        assert validate(broken), mutate


def test_one_floor_per_case_and_thread_count(command_run: tuple[dict[str, Any], str, Path]) -> None:
    """The machine's floor, not a library's: one per case and thread count, from every installed library."""
    doc, _, _ = command_run
    cases = _cases(doc)
    assert {c[0] for c in cases} == {"1", "all"}
    assert {c[1] for c in cases} == {"forward", "pairwise+backward"}
    for case in cases:
        recs = [r for r in doc["results"]
                if (r["threads_setting"], r["op"], tuple(r["shape"]), r["dtype"]) == case]
        floors = [r for r in recs if r["kind"] == "floor"]
        assert len(floors) == 1, case
        floor = floors[0]
        assert floor["backend"] is None
        assert floor["x_floor"] == 1.0
        reads = {r["name"] for r in recs if r["kind"] == "floor-read"}
        writes = {r["name"] for r in recs if r["kind"] == "floor-write"}
        assert set(floor["floor_parts"]["read"]) == reads
        assert set(floor["floor_parts"]["write"]) == writes
        assert {"numpy.sum"} | ({"torch.sum"} if "torch" in INSTALLED else set()) | (
            {"jnp.sum (jit)"} if "jax" in INSTALLED else set()) == reads, case
        assert {"ndarray.fill", "np.copyto"} | (
            {"torch.Tensor.fill_"} if "torch" in INSTALLED else set()) == writes, case
        # the floor of a round is its fastest reader plus its fastest writer: never above any pair
        best_read = min(r["median_s"] for r in recs if r["kind"] == "floor-read")
        best_write = min(r["median_s"] for r in recs if r["kind"] == "floor-write")
        assert floor["median_s"] <= (best_read + best_write) * 1.0001
        # every subject of the case is measured against this floor
        for r in recs:
            if r["kind"] in ("polycos", "peer"):
                assert r["x_floor"] is not None
                assert r["x_floor"] > 0
                assert r["bytes"] == floor["bytes"]


def test_records_carry_the_thread_count(command_run: tuple[dict[str, Any], str, Path]) -> None:
    doc, out, _ = command_run
    runs = {r["threads_setting"]: r for r in doc["runs"]}
    assert set(runs) == {"1", "all"}
    assert runs["1"]["threads"] == 1
    assert runs["all"]["threads"] == usable_cpus()
    assert runs["1"]["env"]["POLYCOS_NUM_THREADS"] == "1"
    assert len(runs["1"]["cpus"]) == 1  # pinned: XLA sizes its pool by the CPUs it may use
    assert len(runs["all"]["cpus"]) == usable_cpus()
    assert runs["all"]["env"]["POLYCOS_NUM_THREADS"] == str(usable_cpus())
    if "torch" in INSTALLED:
        assert runs["1"]["threads_by_library"]["torch"] == 1
    for r in doc["results"]:
        assert r["threads"] == runs[r["threads_setting"]]["threads"]
    for s in doc["skipped"]:
        assert s["threads_setting"] in runs
    for t in doc["targets"]:
        assert t["threads_setting"] in runs
    # every table says its thread count
    assert "threads = 1;" in out
    assert f"threads = {usable_cpus()} (all" in out


def test_subjects_come_from_the_registry(command_run: tuple[dict[str, Any], str, Path]) -> None:
    doc, _, _ = command_run
    subjects = {(r["name"], r["backend"]) for r in doc["results"] if r["kind"] == "polycos"}
    backends = {b for _, b in subjects}
    assert backends == {b for b in ("numpy", "torch", "jax") if b in INSTALLED}
    # pairwise ops also time the outer-product broadcast through the public API
    pw = {r["name"] for r in doc["results"] if r["kind"] == "polycos" and r["op"] == "pairwise+backward"}
    assert "numpy broadcast" in pw
    assert "numpy" in pw
    # every registry backend with something to import is a subject name the command accepts
    names = subject_names()
    for entry in _backends.ENTRIES:
        if entry.requires:
            assert entry.name in names


def _expected_peers() -> dict[str, set[str]]:
    expected = {
        "forward": {"numpy normalise+dot"},
        "forward+backward": {"numpy normalise+dot"},
        "pairwise": {"normalise+matmul (numpy)"},
        "pairwise+backward": {"normalise+matmul (numpy)"},
    }
    if "torch" in INSTALLED:
        for op in ("forward", "forward+backward"):
            expected[op] |= {"F.cosine_similarity", "torch.compile(F.cosine_similarity)"}
        for op in ("pairwise", "pairwise+backward"):
            expected[op] |= {"normalise+matmul (torch)", "F.cosine_similarity broadcast"}
    if "jax" in INSTALLED:
        for op in ("pairwise", "pairwise+backward"):
            expected[op].add("normalise+matmul (jax)")
        if _has("optax"):
            for op in ("forward", "forward+backward"):
                expected[op].add("optax.cosine_similarity")
    if _has("sklearn"):
        expected["pairwise"].add("sklearn cosine_similarity")
    return expected


@pytest.mark.parametrize("op", ["forward", "forward+backward", "pairwise", "pairwise+backward"])
def test_peers_present_where_installed(op: str) -> None:
    """Each installed library's peers are built (nothing is called: no compilation here)."""
    from polycos.bench._suites import build_case

    shape = (16, 4) if op in ("forward", "forward+backward") else (6, 6, 4)
    subjects = [s for s in ("numpy", "torch", "torch-compile", "jax") if s.split("-")[0] in INSTALLED]
    case = build_case(op, shape, "float32", subjects, compile=True)
    peers = {c.name: c for c in case.candidates if c.kind == "peer"}
    assert _expected_peers()[op] <= set(peers), (set(peers), case.notes)
    polycos_names = {c.name for c in case.candidates if c.kind == "polycos"}
    expected = set(subjects)
    if op.startswith("pairwise"):  # the outer-product broadcast too (eager and jit)
        expected |= {f"{s} broadcast" for s in subjects if s != "torch-compile"}
    assert polycos_names == expected, case.notes


def test_speedups_are_over_the_subjects_own_peers(command_run: tuple[dict[str, Any], str, Path]) -> None:
    doc, _, _ = command_run
    names = {r["name"] for r in doc["results"] if r["kind"] == "peer" and r["op"] == "forward"}
    assert _expected_peers()["forward"] - {"torch.compile(F.cosine_similarity)"} <= names
    for r in doc["results"]:
        if r["kind"] == "polycos" and r["backend"] == "numpy" and r["op"] == "forward":
            assert set(r["speedup"]) == {"numpy normalise+dot"}
            assert r["speedup"]["numpy normalise+dot"] > 0
        if r["kind"] == "polycos" and r["name"] == "torch" and r["op"] == "forward":
            assert set(r["speedup"]) == {"F.cosine_similarity"}
        if r["kind"] == "polycos" and r["name"] == "jax" and r["op"] == "forward" and _has("optax"):
            assert set(r["speedup"]) == {"optax.cosine_similarity"}


@pytest.mark.parametrize("backend", ["dask", "array_api_strict"])
def test_backends_without_a_driver_are_measured(backend: str) -> None:
    """Registry backends the bench knows nothing special about run through the public API."""
    if backend not in INSTALLED:
        pytest.skip(f"{backend} is not installed")
    import numpy as np

    from polycos.bench._suites import build_case

    ops = [("forward", (16, 4)), ("forward+backward", (16, 4)), ("pairwise+backward", (6, 5, 4))]
    be = _backends.get(backend)
    for op, shape in ops if backend != "dask" else ops[:2]:  # dask's pairwise graph is slow to run
        case = build_case(op, shape, "float32", [backend], compile=False)
        subjects = {c.name: c for c in case.candidates if c.kind == "polycos"}
        expected = {backend, f"{backend} broadcast"} if op.startswith("pairwise") else {backend}
        assert set(subjects) == expected, case.notes
        assert {c.backend for c in subjects.values()} == {backend}
        assert {c.kind for c in case.candidates} >= {"floor-read", "floor-write"}
        for c in subjects.values():  # lazy results are materialised: NumPy arrays come back
            outs = c.fn()
            assert outs
            assert all(isinstance(o, np.ndarray) if be.lazy else be.owns(o) for o in outs)
    if backend == "dask":
        case = build_case("forward", (16, 4), "float32", ["dask"], compile=False)
        assert "dask normalise+dot" in {c.name for c in case.candidates if c.kind == "peer"}


def test_a_dtype_the_library_lacks_is_named_in_the_skip_note() -> None:
    if "array_api_strict" not in INSTALLED:
        pytest.skip("array_api_strict is not installed")
    from polycos.bench._suites import build_case

    case = build_case("forward", (16, 4), "float16", ["numpy", "array_api_strict"], compile=False)
    notes = [n for n in case.notes if n.startswith("array_api_strict:")]
    assert notes == ["array_api_strict: skipped, array_api_strict has no float16 arrays"]


def test_bytes_and_gbps(command_run: tuple[dict[str, Any], str, Path]) -> None:
    doc, _, _ = command_run
    for r in doc["results"]:
        if r["kind"] == "polycos" and r["name"] == "numpy":
            if r["op"] == "forward":
                n, d = r["shape"]
                elements = 2 * n * d + n
            else:  # pairwise+backward reads x1, x2 twice (forward, then backward), G once
                n, m, d = r["shape"]
                elements = 2 * (n + m) * d + n * m + n * m + (n + m) * d
            assert r["bytes"] == 4 * elements
            assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9, rel=1e-4)  # 6 digits kept
            assert len(r["times_s"]) >= 1
            assert r["number"] >= 1


def test_plot_written(command_run: tuple[dict[str, Any], str, Path]) -> None:
    _, _, out = command_run
    data = (out / "r.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_targets_in_the_document(command_run: tuple[dict[str, Any], str, Path]) -> None:
    doc, _, _ = command_run
    assert doc["reference_threads"] == reference_threads()
    gating = [t for t in doc["targets"] if t["gate"]]
    assert gating
    assert {t["threads_setting"] for t in gating} == {reference_threads()}
    by_label = {t["label"]: t for t in gating}
    # 64 x 8 rows are not the targets' D = 256 or 16, and 8 x 8 pairwise is below 32 x 32
    assert by_label["NumPy forward"]["status"] == "not measured"
    assert by_label["NumPy pairwise fwd+bwd"]["status"] == "not measured"
    if "jax" in INSTALLED and _has("optax"):  # speed-ups are judged at the largest size of the D
        assert by_label["JAX forward vs optax"]["status"] == "not measured"


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "argument", "value"),
    [
        (["--sizes", "12y4"], "--sizes", "12y4"),
        (["--sizes", "0x4"], "--sizes", "0x4"),
        (["--pairwise-sizes", "1x2x3x4"], "--pairwise-sizes", "1x2x3x4"),
        (["--backends", "numpy,tensorflow"], "--backends", "tensorflow"),
        (["--ops", "backward"], "--ops", "backward"),
        (["--dtypes", "float128"], "--dtypes", "float128"),
        (["--repeat", "0"], "--repeat", "0"),
        (["--repeat", "many"], "--repeat", "many"),
        (["--threads", "0"], "--threads", "0"),
        (["--threads", "1,some"], "--threads", "some"),
        (["--min-time", "-1"], "--min-time", "-1"),
        (["--allocator", "jemalloc"], "--allocator", "jemalloc"),
        (["--jax-dispatch", "eager"], "--jax-dispatch", "eager"),
        (["--min-time", "inf"], "--min-time", "inf"),
        (["--min-time", "1e999"], "--min-time", "1e999"),
        (["--json", "/nonexistent-dir/x.json"], "--json", "/nonexistent-dir"),
        (["--json", "/proc/x.json"], "--json", "/proc/x.json"),  # a directory nothing can be created in
        (["--plot", "/proc/x.png"], "--plot", "/proc/x.png"),
        (["--plot", "plot.svg"], "--plot", "plot.svg"),
        (["--sizes", "-5x256"], "--sizes", "-5x256"),  # not taken for an option
        (["--pairwise-sizes", "-8x4", "--ops", "pairwise"], "--pairwise-sizes", "-8x4"),
    ],
)
def test_bad_arguments_exit_2_naming_them(
    args: list[str], argument: str, value: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "_bench", lambda args, argv: pytest.fail("accepted: the run would start"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argument}" in err
    assert value in err


def test_output_paths_are_checked_without_a_trace(tmp_path: Path) -> None:
    """Checking that an output can be written creates nothing and changes nothing."""
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    args = cli.build_parser().parse_args(
        ["bench", "--json", str(tmp_path / "new.json"), "--plot", str(tmp_path / "new.png")])
    assert args.json == tmp_path / "new.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]
    cli.build_parser().parse_args(["bench", "--json", str(kept)])
    assert kept.read_text() == "{}"


def _bench_on(doc: dict[str, Any], monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, list]:
    """``polycos bench`` with ``argv``, the run replaced by ``doc``; the plots it wrote."""
    from polycos.bench import _report

    plots: list = []
    monkeypatch.setattr(cli, "run_with_progress", lambda config, show: doc)
    monkeypatch.setattr(_report, "print_report", lambda doc, console: None)
    monkeypatch.setattr(_report, "write_plot", lambda doc, path: plots.append(path))
    return cli.main(["bench", "--no-progress", *argv]), plots


_MEASURED = {"results": [{"kind": "floor"}, {"kind": "polycos"}], "errors": []}


def test_a_failed_write_is_reported_and_the_other_output_still_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from polycos.bench import _report

    def full(doc: dict[str, Any], path: Any) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(_report, "write_json", full)
    rc, plots = _bench_on(_MEASURED, monkeypatch, ["--json", str(tmp_path / "r.json"),
                                                   "--plot", str(tmp_path / "r.png")])
    out, err = capsys.readouterr()
    assert rc == 1
    assert plots == [tmp_path / "r.png"]  # the plot is not lost
    assert "Traceback" not in err
    assert f"--json: cannot write {tmp_path / 'r.json'}: No space left on device" in err
    assert f"wrote {tmp_path / 'r.png'}" in out


def test_nothing_measured_exits_nonzero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    assert _bench_on({"results": [{"kind": "floor"}], "errors": []}, monkeypatch, [])[0] == 1
    assert "no polycos subject was measured" in capsys.readouterr().err
    assert _bench_on(_MEASURED, monkeypatch, [])[0] == 0


def test_version_is_single_sourced(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    import polycos

    assert importlib.metadata.version("polycos") == polycos.__version__
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"polycos {polycos.__version__}"


def test_no_subcommand_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_targets_script_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_cpu_targets.py"), "--threads", "x"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "argument --threads" in proc.stderr
    assert "'x'" in proc.stderr


def test_default_threads_and_grid() -> None:
    assert default_threads(2) == ["1"]
    assert default_threads(1) == ["1"]
    assert default_threads(8) == ["all"]
    args = cli.build_parser().parse_args(["bench", "--threads", "all,1,all"])
    assert args.threads == ["all", "1"]
    args = cli.build_parser().parse_args(["bench", "--sizes", "100x4", "--dtypes", "float32,float64"])
    rowwise, _ = cli.grid(args)
    assert rowwise == [(100, 4, "float32"), (100, 4, "float64")]
    args = cli.build_parser().parse_args(["bench"])
    assert args.allocator == "system"  # the environment as users run it, unless asked
    assert args.jax_dispatch == "async"  # JAX's default
    rowwise, pairwise = cli.grid(args)
    assert (*REFERENCE_SHAPE, "float32") in rowwise
    assert (524288, 16, "float32") in rowwise
    assert (*REFERENCE_SHAPE, "float64") in rowwise
    assert [p[0] for p in pairwise if p[3] == "float32"] == [32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert {p[3] for p in pairwise} == {"float32", "float64"}


def test_quick_plan_compiles_once_per_op() -> None:
    args = cli.build_parser().parse_args(["bench", "--quick"])
    config = cli.config_from_args(args, ["bench", "--quick"])
    cases = plan(config)
    compiled = [(op, shape) for dev, op, shape, dtype, comp in cases if comp and dev == "cpu"]
    assert compiled == [("forward", (16384, 256)), ("forward+backward", (16384, 256))]
    assert len({shape for _, op, shape, _, _ in cases if op == "forward"}) >= 2  # a line, not a point


def test_thread_environment() -> None:
    env = thread_env("1", {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true --xla_dump_to=/x"})
    for var in ("POLYCOS_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert env[var] == "1"
    assert env["XLA_FLAGS"].split() == [
        "--xla_dump_to=/x", "--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"
    ]
    env = thread_env("all", {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "POLYCOS_NUM_THREADS": "1"})
    assert env["POLYCOS_NUM_THREADS"] == str(usable_cpus())
    assert "XLA_FLAGS" not in env


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5"])
def test_a_bad_thread_count_fails_at_every_size(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``POLYCOS_NUM_THREADS`` (which the bench sets per thread count) is checked for small
    work too, not only where the CPU kernel would start threads."""
    import numpy as np

    from polycos import _kernels

    if not _kernels.available():
        pytest.skip("the CPU kernel is not built")
    import polycos

    small, large = np.ones((8, 4)), np.ones((1024, 128))
    monkeypatch.setenv("POLYCOS_NUM_THREADS", value)
    for x in (small, large):
        with pytest.raises(ValueError, match=f"POLYCOS_NUM_THREADS must be a positive integer, got '{value}'"):
            polycos.pairwise_cosine_similarity(x)
        with pytest.raises(ValueError, match="POLYCOS_NUM_THREADS"):
            polycos.cosine_similarity(x, x)
    monkeypatch.setenv("POLYCOS_NUM_THREADS", "1")  # read again on the next call
    assert polycos.pairwise_cosine_similarity(small).shape == (8, 8)
    assert polycos.pairwise_cosine_similarity(large).shape == (1024, 1024)


def test_jax_dispatch_setting() -> None:
    with pytest.raises(ValueError, match=r"jax_dispatch must be one of .*'eager'"):
        apply_jax_dispatch("eager")
    if "jax" in INSTALLED:  # in a fresh interpreter: the setting must come before JAX's CPU client
        code = ("from polycos.bench._run import apply_jax_dispatch as a; import jax, jax.numpy as jnp; "
                "print(a('async'), a('sync'), jnp.ones(3).sum())")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split()[:2] == ["True", "False"]


def test_allocator_environment() -> None:
    reuse = allocator_env("reuse", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0:glibc.malloc.tcache_count=0"})
    tunables = reuse["GLIBC_TUNABLES"].split(":")
    assert "glibc.malloc.trim_threshold=0" in tunables  # what the user set is kept
    assert "glibc.malloc.tcache_count=0" in tunables
    assert f"glibc.malloc.mmap_threshold={256 << 20}" in tunables
    assert sum(t.startswith("glibc.malloc.trim_threshold=") for t in tunables) == 1
    assert allocator_env("reuse", {})["GLIBC_TUNABLES"] == ":".join(f"{k}={v}" for k, v in REUSE_TUNABLES)
    assert allocator_env("system", {"GLIBC_TUNABLES": "x=1", "A": "b"}) == {"GLIBC_TUNABLES": "x=1", "A": "b"}
    with pytest.raises(ValueError, match=r"allocator must be one of .*'jemalloc'"):
        allocator_env("jemalloc", {})


_WORKER_FAULTS = """
import resource, threading, numpy as np
faults = []
def work():
    for _ in range(6):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        np.empty(48 << 20, np.uint8).fill(1)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
t = threading.Thread(target=work)
t.start(); t.join()
print(min(faults[1:]))
"""


@pytest.mark.skipif(sys.platform != "linux" or __import__("platform").libc_ver()[0] != "glibc",
                    reason="GLIBC_TUNABLES is glibc's")
def test_reuse_allocator_gives_a_worker_thread_its_freed_blocks_back() -> None:
    """What ``--allocator reuse`` is for: a 48 MiB array allocated and freed again and again on a
    thread other than the main one (as XLA allocates its outputs; above glibc's largest dynamic map
    threshold, and more than half a thread heap) is mapped afresh and first-touched every time under
    glibc's defaults, and reused, without a single page fault, under the tunables."""
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    faults = {}
    for mode in ("system", "reuse"):
        proc = subprocess.run([sys.executable, "-c", _WORKER_FAULTS], capture_output=True, text=True,
                              timeout=60, env=allocator_env(mode, base))
        assert proc.returncode == 0, proc.stderr
        faults[mode] = int(proc.stdout.split()[-1])
    assert faults["system"] >= 24, faults  # 48 MiB in 2 MiB huge pages at the least
    assert faults["reuse"] <= 2, faults


def test_a_failed_child_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` command")
    monkeypatch.setattr(sys, "executable", false)  # the child exits 1 at once
    config = Config(backends=["numpy"], ops=["forward"], rowwise=[(8, 4, "float32")], pairwise=[],
                    threads=["1"], repeat=1, min_time=0.0001)
    doc = run(config)
    assert doc["errors"]
    assert "threads=1" in doc["errors"][0]
    assert doc["results"] == []
    assert any("failed" in s["reason"] for s in doc["skipped"])
    assert validate(doc) == []


def test_import_polycos_bench_is_light() -> None:
    code = (
        "import sys, polycos, polycos.bench, polycos.bench.cli, polycos.bench._run, "
        "polycos.bench._targets, polycos.bench._schema; polycos.bench.cli.build_parser(); "
        "heavy = [m for m in ('torch', 'jax', 'cupy', 'dask', 'matplotlib', 'sklearn', 'optax') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- model, timing, targets


def test_byte_model_counts_the_second_read() -> None:
    reads, writes = io_shapes("forward+backward", (10, 3))
    assert reads == [(10, 3), (10, 3), (10,), (10, 3), (10, 3)]
    assert writes == [(10,), (10, 3), (10, 3)]
    assert model_bytes("forward+backward", (10, 3), 8) == 8 * (6 * 30 + 2 * 10)
    assert model_bytes("pairwise+backward", (4, 5, 3), 4) == 4 * (2 * (12 + 15) + 20 + 20 + 12 + 15)


def test_floor_and_ratios_are_per_round() -> None:
    # A drifting machine: every sample doubles from round to round; the ratio stays 3.
    assert median_ratio([3.0, 6.0, 12.0], [1.0, 2.0, 4.0]) == 3.0
    assert median_ratio([3.0, None, 12.0], [1.0, 2.0, 4.0]) == 3.0
    # per round: the fastest reader plus the fastest writer, whichever library they are
    assert floor_samples([[2.0, 1.0, 5.0], [1.5, 3.0, 4.0]], [[1.0, 2.0, 1.0], [0.5, 9.0, None]]) == [
        2.0, 3.0, 5.0]


def _rec(name: str, op: str, shape: list[int], threads: str = "1", dtype: str = "float32",
         x_floor: float | None = 1.0, speedup: dict | None = None) -> dict[str, Any]:
    return {"name": name, "kind": "polycos", "op": op, "shape": shape, "dtype": dtype,
            "threads": 1 if threads == "1" else 2, "threads_setting": threads,
            "x_floor": x_floor, "speedup": speedup or {}}


def test_targets_met_and_missed() -> None:
    ref = list(REFERENCE_SHAPE)
    recs = [
        _rec("numpy", "forward", ref, x_floor=1.25),
        _rec("numpy", "forward", [131072, 256], x_floor=9.0),  # not the reference size: ignored
        _rec("torch", "forward", ref, x_floor=1.4),
        _rec("numpy", "forward+backward", ref, dtype="float64", x_floor=1.9),
        _rec("numpy", "forward", [524288, 16], x_floor=2.1),
        _rec("torch", "forward+backward", ref, x_floor=1.0,
             speedup={"F.cosine_similarity": 12.0, "torch.compile(F.cosine_similarity)": 1.1}),
        _rec("jax", "forward", [4096, 256], x_floor=1.0),  # the reference size was not run
        # pairwise: every size from 32 up; 16 is below the range and ignored
        *[_rec("numpy", "pairwise+backward", [n, n, 128], speedup={"normalise+matmul (numpy)": v})
          for n, v in ((16, 0.1), (32, 0.9), (4096, 0.7))],
        *[_rec("torch", "pairwise+backward", [n, n, 128], speedup={"normalise+matmul (torch)": v})
          for n, v in ((32, 0.9), (64, 0.6), (4096, 1.2))],
        _rec("numpy", "forward", ref, threads="all", x_floor=3.0),
    ]
    rows = {(r["label"], r["threads_setting"]): r for r in check(recs, reference="1")}
    status = {k: r["status"] for k, r in rows.items()}
    assert status["NumPy forward", "1"] == "met"
    assert rows["NumPy forward", "1"]["shape"] == ref
    assert rows["NumPy forward", "1"]["at_reference"]
    assert status["torch eager forward", "1"] == "missed"
    assert status["NumPy float64 forward + vjp", "1"] == "met"
    assert status["NumPy D = 16 forward", "1"] == "missed"
    assert status["torch fwd+bwd vs F.cosine_similarity", "1"] == "met"
    assert status["torch fwd+bwd vs torch.compile(F.cosine_similarity)", "1"] == "missed"
    jax = rows["JAX jit forward", "1"]
    assert jax["status"] == "met"
    assert jax["at_reference"] is False
    assert jax["shape"] == [4096, 256]
    assert status["JAX D = 16 forward", "1"] == "not measured"  # no D = 16 record: not the 4096 x 256 one
    npw = rows["NumPy pairwise fwd+bwd", "1"]
    assert npw["status"] == "met"
    assert npw["value"] == 0.7
    assert len(npw["per_size"]) == 2
    tpw = rows["torch pairwise fwd+bwd", "1"]
    assert tpw["status"] == "missed"
    assert tpw["shape"] == [64, 64, 128]
    assert status["CuPy forward (>= 80% bandwidth)", "1"] == "not measured"
    # the other thread count is reported, and does not gate
    assert status["NumPy forward", "all"] == "missed"
    assert not rows["NumPy forward", "all"]["gate"]
    missed = {r["label"] for r in gate(list(rows.values()))}
    assert missed == {"torch eager forward", "NumPy D = 16 forward",
                      "torch fwd+bwd vs torch.compile(F.cosine_similarity)", "torch pairwise fwd+bwd"}


@pytest.mark.skipif(importlib.util.find_spec("resource") is None, reason="no getrusage here")
def test_interleaved_counts_page_faults_per_call() -> None:
    """Each round records the minor page faults per call: a call that first-touches new memory
    has some, one that touches nothing has none (what the records' ``page_faults`` reports)."""
    import mmap

    from polycos.bench._timing import cpu_timer, interleaved

    def touch() -> None:
        with mmap.mmap(-1, 1 << 22) as m:  # new anonymous memory: every page faults on first write
            for at in range(0, 1 << 22, mmap.PAGESIZE):
                m[at] = 1

    out = interleaved(cpu_timer(None), {"touch": touch, "none": lambda: None}, {"touch": 2, "none": 50}, 3)
    assert len(out["touch"].faults) == len(out["none"].faults) == 3
    assert min(out["touch"].faults) >= 1
    assert statistics.median(out["none"].faults) < 1


def test_first_touch_notes_name_the_subjects_the_floor_did_not_pay_for() -> None:
    """A case whose winning floor writer reused memory (0 faults per call) while a polycos subject
    first-touched >= 256 pages per call is reported, naming that subject and only it; a case whose
    floor writer faulted too is not."""
    from polycos.bench._report import first_touch_notes

    def case(writer_faults: float, op: str) -> list[dict[str, Any]]:
        base = {"threads_setting": "1", "op": op, "shape": [32768, 256], "dtype": "float32", "device": "cpu"}
        return [
            {**base, "kind": "floor", "name": "floor", "floor_parts": {"write": {"ndarray.fill": 5, "np.copyto": 2}}},
            {**base, "kind": "floor-write", "name": "ndarray.fill", "page_faults": writer_faults},
            {**base, "kind": "floor-write", "name": "np.copyto", "page_faults": 0.0},
            {**base, "kind": "polycos", "name": "jax", "page_faults": 1567.0},
            {**base, "kind": "polycos", "name": "numpy", "page_faults": 0.0},
            {**base, "kind": "polycos", "name": "torch", "page_faults": 255.0},
            {**base, "kind": "peer", "name": "optax.cosine_similarity", "page_faults": 41347.0},
        ]

    notes = first_touch_notes({"results": case(0.0, "forward+backward") + case(1056.0, "forward")})
    assert len(notes) == 1, notes
    assert notes[0].startswith("thr 1 forward+backward 32768x256 float32: the floor's writes (ndarray.fill)")
    assert "jax 1567" in notes[0]
    for other in ("numpy", "torch", "optax"):  # no first touches, too few, a peer
        assert other not in notes[0]


def test_floor_writers_return_every_written_array_alive_at_once() -> None:
    """An op returns all its outputs together, so the floor's writers hold every array they fill until
    the call ends (a writer that dropped each array before allocating the next could write two
    gradients into one recycled block)."""
    from polycos.bench._suites import build_case, io_shapes

    case = build_case("forward+backward", (64, 8), "float32", ["numpy"], compile=False)
    writers = [c for c in case.candidates if c.kind == "floor-write"]
    assert writers
    want = [tuple(s) for s in io_shapes("forward+backward", (64, 8))[1]]
    for cand in writers:
        out = cand.fn()
        assert [tuple(getattr(a, "shape", ())) for a in out] == want, cand.name
        assert len({id(a) for a in out}) == len(out), cand.name
        assert all(float(abs(a).max()) == 0.0 for a in out), cand.name  # filled: zeros


def test_cpu_timer_frees_each_result_before_the_next_call() -> None:
    """Each call runs with the previous call's outputs freed (as the GPU timers' are), so no candidate
    allocates its outputs while the last ones still hold memory."""
    import weakref

    from polycos.bench._timing import cpu_timer

    class Result:
        pass

    last: list[weakref.ref] = []
    alive_at_call: list[bool] = []

    def fn() -> Result:
        alive_at_call.append(bool(last) and last[-1]() is not None)
        r = Result()
        last.append(weakref.ref(r))
        return r

    synced: list[Result] = []
    cpu_timer(lambda r: synced.append(type(r)))(fn, 5)  # sync sees each result, keeps only its type
    assert alive_at_call == [False] * 5
    assert synced == [Result] * 5
