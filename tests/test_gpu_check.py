"""The prepared GPU check (``benchmarks/gpu_check.sh``): its dry run works without a GPU.

The dry run hides any GPU (``CUDA_VISIBLE_DEVICES=""``), so these tests behave
the same on every machine: every GPU part must be reported as skipped with its
reason, the CPU dry runs of ``gpu_bench.py`` and ``gpu_sanitize.py`` must pass,
and the exit status must be 0. The summary's verdicts on failing parts are
checked on fabricated results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
GPU_PARTS = (
    "gpu-tests",
    "sanitizer-memcheck-cupy",
    "sanitizer-racecheck-cupy",
    "sanitizer-memcheck-torch",
    "benchmark",
)

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _gpu_bench() -> Any:
    """``benchmarks/gpu_bench.py`` as a module (registered: its dataclasses need it)."""
    name = "polycos_benchmarks_gpu_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu_bench.py")
        assert spec is not None
        assert spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One dry run of the whole script, from a temporary working directory."""
    work = tmp_path_factory.mktemp("gpu-check")
    results = work / "results"
    env = dict(os.environ, PYTHON=sys.executable)
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(results)],
        capture_output=True, text=True, timeout=300, env=env, cwd=work,
    )
    return {"proc": proc, "results": results, "seconds": time.perf_counter() - t0}


def test_dry_run_completes(dry_run: dict[str, Any]) -> None:
    proc = dry_run["proc"]
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    # "well under a minute" on a quiet machine; generous here for loaded CI boxes
    assert dry_run["seconds"] < 150, f"dry run took {dry_run['seconds']:.0f} s"
    for name in ("summary.md", "summary.json", "env.json", "pytest-gpu.xml", "gpu_bench.json", "gpu_bench.png"):
        assert (dry_run["results"] / name).is_file(), f"{name} missing\n{log}"
    assert (dry_run["results"] / "gpu_bench.png").stat().st_size > 10_000


def test_every_gpu_part_skipped_with_reason(dry_run: dict[str, Any]) -> None:
    summary = json.loads((dry_run["results"] / "summary.json").read_text())
    assert summary["exit_code"] == 0
    assert summary["dry_run"] is True
    assert summary["failed"] == []
    parts = {p["name"]: p for p in summary["parts"]}
    assert parts["environment"]["status"] == "ok", parts["environment"]
    for name in GPU_PARTS:
        assert name in parts, f"{name} not reported: {sorted(parts)}"
        assert parts[name]["status"] == "skipped", parts[name]
        assert "GPU" in parts[name]["reason"], parts[name]
    md = (dry_run["results"] / "summary.md").read_text()
    for name in ("environment", *GPU_PARTS):
        assert f"| {name} | " in md


def test_bench_dry_run_exercised_the_machinery(dry_run: dict[str, Any]) -> None:
    doc = json.loads((dry_run["results"] / "gpu_bench.json").read_text())
    assert doc["dry_run"] is True
    assert doc["copy_gbps"] is not None
    measured = {(r["name"], r["op"], r["dtype"]) for r in doc["results"]}
    assert measured, doc["skipped"]
    assert all(r["fraction_of_copy"] is not None for r in doc["results"])
    assert {t["status"] for t in doc["targets"]} <= {"met", "missed", "not measured"}
    assert any(t["spec"] for t in doc["targets"])
    reasons = " ".join(s["reason"] for s in doc["skipped"])
    assert "cupy: skipped" in reasons  # no GPU: the CuPy subject is skipped with its reason
    assert doc["big"]["runs"], doc["big"]


def test_script_is_clean_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("args", [[], ["--bogus", "x"], ["a", "b"]])
def test_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "gpu_check.sh" in out.stderr


def _write_parts(results: Path, rows: list[tuple[str, ...]]) -> None:
    (results / "parts.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))


def test_summary_verdicts_on_fabricated_results(tmp_path: Path) -> None:
    """Sanitizer errors, failing tests and timeouts fail the check; clean logs pass."""
    gb = _gpu_bench()
    (tmp_path / "san-mem.log").write_text(
        "  rows of 8: ok\npolycos-sanitize: done\n========= ERROR SUMMARY: 0 errors\n"
    )
    (tmp_path / "san-race.log").write_text(
        "polycos-sanitize: done\n========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n"
    )
    (tmp_path / "san-torch.log").write_text("========= ERROR SUMMARY: 0 errors\n")  # did not finish
    (tmp_path / "pytest-gpu.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3">'
        '<testcase classname="tests.test_cupy" name="test_a"/>'
        '<testcase classname="tests.test_cupy" name="test_b"><failure message="assert 1 == 2">x</failure></testcase>'
        '<testcase classname="tests.test_cupy" name="test_c"><skipped message="no bfloat16"/></testcase>'
        "</testsuite></testsuites>"
    )
    _write_parts(tmp_path, [
        ("environment", "env", "0", "3", "60", "", ""),
        ("gpu-tests", "pytest", "1", "80", "170", "", ""),
        ("sanitizer-memcheck-cupy", "sanitizer", "0", "20", "75", "san-mem.log", ""),
        ("sanitizer-racecheck-cupy", "sanitizer", "3", "20", "75", "san-race.log", ""),
        ("sanitizer-memcheck-torch", "sanitizer", "0", "20", "60", "san-torch.log", ""),
        ("benchmark", "bench", "124", "200", "200", "", ""),
    ])
    assert gb.main(["summary", "--results", str(tmp_path)]) == 1
    s = json.loads((tmp_path / "summary.json").read_text())
    status = {p["name"]: p["status"] for p in s["parts"]}
    assert status == {
        "environment": "ok",
        "gpu-tests": "failed",
        "sanitizer-memcheck-cupy": "ok",
        "sanitizer-racecheck-cupy": "failed",
        "sanitizer-memcheck-torch": "failed",
        "benchmark": "timeout",
    }
    tests = next(p for p in s["parts"] if p["name"] == "gpu-tests")
    assert tests["details"]["passed"] == 1
    assert "test_b" in tests["reason"]
    # the benchmark running out of time is reported, but only tests and sanitizers fail the check
    assert set(s["failed"]) == {"gpu-tests", "sanitizer-racecheck-cupy", "sanitizer-memcheck-torch"}


def test_summary_all_clean_exits_0(tmp_path: Path) -> None:
    gb = _gpu_bench()
    (tmp_path / "race.log").write_text(
        "polycos-sanitize: done\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    )
    _write_parts(tmp_path, [
        ("sanitizer-racecheck-cupy", "sanitizer", "0", "20", "75", "race.log", ""),
        ("gpu-tests", "pytest", "skip", "0", "0", "", "no test file has a GPU test"),
    ])
    assert gb.main(["summary", "--results", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert [p["status"] for p in s["parts"]] == ["ok", "skipped"]


def test_plan_runs_the_reference_size_first() -> None:
    gb = _gpu_bench()
    cases = gb.plan([20, 22], [128, 256], ["float32", "bfloat16"], [22, 256])
    assert cases[:4] == [
        ("float32", "forward", 1 << 22, 256),
        ("float32", "forward+backward", 1 << 22, 256),
        ("bfloat16", "forward", 1 << 22, 256),
        ("bfloat16", "forward+backward", 1 << 22, 256),
    ]
    assert len(cases) == len(set(cases)) == 2 * 2 * 2 * 2


def test_summary_of_a_measured_benchmark(dry_run: dict[str, Any], tmp_path: Path) -> None:
    """The summary of a benchmark that ran (the dry run's JSON, read as a real run's)."""
    gb = _gpu_bench()
    doc = json.loads((dry_run["results"] / "gpu_bench.json").read_text())
    (tmp_path / "gpu_bench.json").write_text(json.dumps(doc))
    _write_parts(tmp_path, [("benchmark", "bench", "0", "100", "200", "", "")])
    assert gb.main(["summary", "--results", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    (part,) = s["parts"]
    assert part["status"] == "ok", part
    assert part["details"]["copy_gbps"] == doc["copy_gbps"]
    assert part["details"]["at_ref"], part["details"]
    md = (tmp_path / "summary.md").read_text()
    assert "At the reference size" in md
    assert "> 2**31 elements" in md
    # a wrong answer of a polycos subject in the > 2**31 case fails the check
    run = doc["big"]["runs"][0]
    run["checks"]["cupy"] = {"max_error_ulp_one": 7.0, "ok": False}
    (tmp_path / "gpu_bench.json").write_text(json.dumps(doc))
    assert gb.main(["summary", "--results", str(tmp_path)]) == 1
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["parts"][0]["status"] == "failed"
    assert "WRONG" in s["parts"][0]["reason"]


@pytest.mark.parametrize(
    ("log", "verdict"),
    [
        ("========= ERROR SUMMARY: 0 errors\n", "clean"),
        ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", "clean"),
        ("========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 1 error\n", "dirty"),
        ("========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n", "dirty"),
        ("========= Program hit cudaErrorInvalidValue (error 1) due to \"invalid argument\" on CUDA API "
         "call to cudaPointerGetAttributes.\n========= ERROR SUMMARY: 1 error\n", "api-only"),
        ("Traceback (most recent call last):\n", "dirty"),
    ],
)
def test_sanitizer_verdict(log: str, verdict: str) -> None:
    assert _gpu_bench().sanitizer_verdict(log)[0] == verdict
