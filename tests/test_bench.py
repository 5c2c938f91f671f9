"""``polycos bench``: runs on a tiny size, writes schema-valid JSON and a PNG, rejects bad arguments."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polycos.bench import cli
from polycos.bench._schema import validate
from polycos.bench._targets import check
from polycos.bench._timing import median_ratio

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--sizes",
    "64x8",
    "--pairwise-sizes",
    "8x4",
    "--repeat",
    "2",
    "--min-time",
    "0.0001",
    "--no-progress",
]

pytest.importorskip("rich")


@pytest.fixture(scope="module")
def numpy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One in-process run on NumPy (row-wise ops), with JSON and plot."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench")
    code = cli.main(
        [
            "bench",
            "--backends",
            "numpy",
            "--ops",
            "forward,forward+backward",
            *TINY,
            "--json",
            str(out / "r.json"),
            "--plot",
            str(out / "r.png"),
        ]
    )
    assert code == 0
    return json.loads((out / "r.json").read_text()), out


def test_json_matches_schema(numpy_run: tuple[dict, Path]) -> None:
    doc, _ = numpy_run
    assert validate(doc) == []
    assert doc["config"]["sizes"] == [[64, 8]]
    assert doc["config"]["backends"] == ["numpy"]


def test_records_cover_subject_peer_and_floor(numpy_run: tuple[dict, Path]) -> None:
    doc, _ = numpy_run
    for op in ("forward", "forward+backward"):
        recs = {r["kind"]: r for r in doc["results"] if r["op"] == op}
        assert set(recs) == {"polycos", "peer", "floor"}, op
        subject, floor = recs["polycos"], recs["floor"]
        assert subject["name"] == "numpy"
        assert subject["shape"] == [64, 8]
        assert floor["x_floor"] == pytest.approx(1.0)
        assert subject["x_floor"] > 0
        assert set(subject["speedup"]) == {"numpy naive"}
        assert subject["speedup"]["numpy naive"] > 0
        assert len(subject["times_s"]) == 2
        # bytes: 2 inputs read + 1 output written (forward), 4 N*D arrays + 2 N vectors (fwd+bwd)
        expected = 4 * (2 * 64 * 8 + 64) if op == "forward" else 4 * (4 * 64 * 8 + 2 * 64)
        assert subject["bytes"] == expected
        assert subject["gbps"] == pytest.approx(expected / subject["median_s"] / 1e9)


def test_pairwise_skipped_or_measured_with_a_note(numpy_run: tuple[dict, Path]) -> None:
    doc, _ = numpy_run
    assert all(r["op"] in ("forward", "forward+backward") for r in doc["results"])
    assert not any(s["op"] in ("pairwise", "pairwise+backward") for s in doc["skipped"])


def test_png_written(numpy_run: tuple[dict, Path]) -> None:
    _, out = numpy_run
    data = (out / "r.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1000


def test_schema_rejects_broken_documents(numpy_run: tuple[dict, Path]) -> None:
    doc, _ = numpy_run
    broken = copy.deepcopy(doc)
    del broken["results"][0]["median_s"]
    assert any("median_s" in e for e in validate(broken))
    broken = copy.deepcopy(doc)
    broken["results"][0]["kind"] = "mystery"
    assert validate(broken)
    broken = copy.deepcopy(doc)
    broken["config"]["repeat"] = 0
    assert validate(broken)
    broken = copy.deepcopy(doc)
    broken["schema"] = "polycos-bench/0"
    assert validate(broken)


def test_subprocess_python_m_polycos(tmp_path: Path) -> None:
    """``python -m polycos bench`` works as a command (fresh interpreter), NumPy only."""
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "polycos",
            "bench",
            "--backends",
            "numpy",
            "--ops",
            "forward",
            *TINY,
            "--json",
            str(tmp_path / "s.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert "polycos numpy" in proc.stdout
    assert "floor" in proc.stdout
    doc = json.loads((tmp_path / "s.json").read_text())
    assert validate(doc) == []
    assert {r["kind"] for r in doc["results"]} == {"polycos", "peer", "floor"}


def test_torch_suite_runs_if_installed(tmp_path: Path) -> None:
    """The torch suite builds and times its eager peers (polycos.torch if it exists)."""
    pytest.importorskip("torch")
    code = cli.main(
        [
            "bench",
            "--backends",
            "torch",
            "--ops",
            "forward",
            *TINY,
            "--json",
            str(tmp_path / "t.json"),
        ]
    )
    assert code == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert validate(doc) == []
    names = {r["name"] for r in doc["results"]}
    skipped = " ".join(s["reason"] for s in doc["skipped"])
    assert "torch" in names or "torch" in skipped
    if "torch" in names:
        assert "F.cosine_similarity" in names
        assert "floor" in names


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
        (["--json", "/nonexistent-dir/x.json"], "--json", "/nonexistent-dir"),
        (["--plot", "plot.svg"], "--plot", "plot.svg"),
    ],
)
def test_bad_arguments_exit_2_naming_them(
    args: list[str], argument: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argument}" in err
    assert value in err


def test_no_subcommand_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_median_ratio_is_per_round() -> None:
    # A drifting machine: every sample doubles from round to round; the ratio stays 3.
    assert median_ratio([3.0, 6.0, 12.0], [1.0, 2.0, 4.0]) == 3.0
    assert median_ratio([3.0, None, 12.0], [1.0, 2.0, 4.0]) == 3.0


def test_targets_check_met_and_missed() -> None:
    recs = [
        {
            "name": "numpy",
            "kind": "polycos",
            "op": "forward",
            "dtype": "float32",
            "shape": [8, 4],
            "x_floor": 2.9,
            "speedup": {},
        },
        {
            "name": "numpy",
            "kind": "polycos",
            "op": "forward",
            "dtype": "float32",
            "shape": [64, 4],
            "x_floor": 3.1,
            "speedup": {},
        },
        {
            "name": "torch",
            "kind": "polycos",
            "op": "forward+backward",
            "dtype": "float32",
            "shape": [64, 4],
            "x_floor": 1.0,
            "speedup": {"F.cosine_similarity": 12.0},
        },
    ]
    rows = {r["label"]: r for r in check(recs)}
    assert rows["NumPy forward"]["status"] == "missed"  # the largest size counts
    assert rows["NumPy forward"]["shape"] == [64, 4]
    assert rows["torch fwd+bwd vs F.cosine_similarity"]["status"] == "met"
    assert rows["torch eager forward + backward"]["status"] == "met"
    assert rows["JAX jit forward"]["status"] == "not measured"


def test_import_polycos_bench_is_light() -> None:
    code = (
        "import sys, polycos, polycos.bench, polycos.bench.cli; "
        "heavy = [m for m in ('torch', 'jax', 'cupy', 'dask', 'matplotlib', 'sklearn') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
