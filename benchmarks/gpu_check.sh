#!/usr/bin/env bash
# polycos GPU check: everything CUDA in one run of under 8 minutes (one H100/H200).
#
#   bash benchmarks/gpu_check.sh [--dry-run] RESULTS_DIR
#
# Parts (each under `timeout`; one failing does not stop the others):
#   environment               nvidia-smi, driver, CUDA, python/torch/cupy/jax/numpy versions -> env.json, env.log
#   gpu-tests                 python -m pytest -m gpu (the files holding GPU tests) -> pytest-gpu.xml, .log
#   sanitizer-memcheck-cupy   compute-sanitizer --tool memcheck  on benchmarks/gpu_sanitize.py --part cupy
#   sanitizer-racecheck-cupy  compute-sanitizer --tool racecheck on benchmarks/gpu_sanitize.py --part cupy
#   benchmark                 benchmarks/gpu_bench.py bench -> gpu_bench.json, gpu_bench.png, bench.log
#   sanitizer-memcheck-torch  compute-sanitizer --tool memcheck  on benchmarks/gpu_sanitize.py --part torch
# then summary.md and summary.json (status ok / failed / timeout / skipped + why, durations, key figures).
#
# Exit status: 0 when every part that could run passed or was skipped; 1 when a
# test or sanitizer failed or ran out of time, or the benchmark failed or found a
# wrong result (missed speed targets and a benchmark cut short by its time limit
# are reported, not failures); 2 on bad usage.
# Without a GPU (or with --dry-run, which hides the GPU) the GPU parts are
# reported as skipped, and the scripts run their CPU dry runs instead (about
# 40 s on a 2-core machine).
#
# Installs nothing: the checkout goes on PYTHONPATH. Environment knobs:
#   PYTHON                  interpreter (python3)
#   GPU_CHECK_BUDGET_S      total seconds (450)
#   HYPOTHESIS_PROFILE      hypothesis profile of the GPU tests (ci)
#   CUPY_CACHE_DIR          NVRTC kernel cache (RESULTS_DIR/cupy-kernel-cache: a fresh compile)
set -uo pipefail

usage() {
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

DRY=0
RESULTS=""
while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *)
            if [[ -n $RESULTS ]]; then
                echo "gpu_check.sh: one RESULTS_DIR only (got '$RESULTS' and '$1')" >&2
                exit 2
            fi
            RESULTS=$1
            ;;
    esac
    shift
done
if [[ -z $RESULTS ]]; then
    echo "gpu_check.sh: missing RESULTS_DIR" >&2
    usage >&2
    exit 2
fi
mkdir -p "$RESULTS" || exit 2
RESULTS=$(cd "$RESULTS" && pwd) || exit 2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2
cd "$ROOT" || exit 2

PY=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$SECONDS
PARTS="$RESULTS/parts.tsv"
: >"$PARTS"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export PYTHONUNBUFFERED=1
export MPLBACKEND=Agg
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}  # share the GPU with torch/CuPy
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
export HYPOTHESIS_STORAGE_DIRECTORY="$RESULTS/hypothesis"  # keep the checkout's database untouched
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-$RESULTS/cupy-kernel-cache}
if ((DRY)); then
    export CUDA_VISIBLE_DEVICES=""  # hide any GPU: every part behaves as on a machine without one
fi

if command -v timeout >/dev/null 2>&1; then
    HAVE_TIMEOUT=1
else
    HAVE_TIMEOUT=0
    echo "gpu_check.sh: 'timeout' not found; parts run without a time limit" >&2
fi

banner() { printf '\n==== %s ====\n' "$*"; }

# Seconds a part may take: its CAP, but leave RESERVE seconds for the parts after it.
limit_for() {
    local cap=$1 reserve=$2 left
    left=$((BUDGET - (SECONDS - START) - reserve))
    if ((left < cap)); then echo "$left"; else echo "$cap"; fi
}

# record NAME KIND RC DURATION LIMIT LOG NOTE   (one line of parts.tsv)
record() {
    local note=${7//$'\t'/ }
    note=${note//$'\n'/ }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$note" >>"$PARTS"
}

# run_part NAME KIND LIMIT LOG NOTE CMD...: run CMD under LIMIT seconds, output to the screen and LOG.
# A part with less than 10 s left is skipped. SIGINT first (pytest still writes its XML), KILL 15 s later.
run_part() {
    local name=$1 kind=$2 limit=$3 log=$4 note=$5 t0 rc
    shift 5
    if ((limit < 10)); then
        echo "-- $name: skipped, no time left in the ${BUDGET} s budget"
        record "$name" "$kind" skip 0 "$limit" "" "no time left in the ${BUDGET} s budget"
        return 0
    fi
    echo "-- $name (limit ${limit} s): $*"
    t0=$SECONDS
    if ((HAVE_TIMEOUT)); then
        timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee "$RESULTS/$log"
        rc=${PIPESTATUS[0]}
    else
        "$@" 2>&1 | tee "$RESULTS/$log"
        rc=${PIPESTATUS[0]}
    fi
    echo "-- $name: exit $rc after $((SECONDS - t0)) s"
    record "$name" "$kind" "$rc" "$((SECONDS - t0))" "$limit" "$log" "$note"
    return 0
}

find_sanitizer() {
    local c nvcc d
    c=$(command -v compute-sanitizer 2>/dev/null) && { echo "$c"; return 0; }
    local dirs=()
    [[ -n ${CUDA_HOME:-} ]] && dirs+=("$CUDA_HOME/bin")
    [[ -n ${CUDA_PATH:-} ]] && dirs+=("$CUDA_PATH/bin")
    dirs+=(/usr/local/cuda/bin /usr/local/cuda/compute-sanitizer)
    if nvcc=$(command -v nvcc 2>/dev/null); then
        dirs+=("$(dirname "$nvcc")" "$(dirname "$(readlink -f "$nvcc")")")
    fi
    for d in /usr/local/cuda-*/bin /opt/cuda/bin /opt/nvidia/*/bin; do
        [[ -d $d ]] && dirs+=("$d")
    done
    for d in "${dirs[@]}"; do
        if [[ -x $d/compute-sanitizer ]]; then
            echo "$d/compute-sanitizer"
            return 0
        fi
    done
    return 1
}

banner "polycos GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)$( ((DRY)) && echo ' (DRY RUN)')"
echo "checkout: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
echo "results:  $RESULTS"
echo "python:   $PY; budget ${BUDGET} s"

# --------------------------------------------------------------------------- 1. environment
banner "1. environment"
SANITIZER=$(find_sanitizer) || SANITIZER=""
export POLYCOS_SANITIZER=$SANITIZER
{
    echo "## nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 20 nvidia-smi 2>&1 || echo "nvidia-smi failed"
    else
        echo "nvidia-smi: not found"
    fi
    echo "## nvcc"
    command -v nvcc >/dev/null 2>&1 && nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not found"
    echo "## compute-sanitizer: ${SANITIZER:-not found}"
    [[ -n $SANITIZER ]] && "$SANITIZER" --version 2>&1 | tail -n 1
} 2>&1 | tee "$RESULTS/nvidia-smi.log"
run_part environment env "$(limit_for 60 300)" env.log "" \
    "$PY" benchmarks/gpu_bench.py env --out "$RESULTS/env.json"

if GPU_WHY=$("$PY" benchmarks/gpu_bench.py probe 2>/dev/null); then HAVE_GPU=1; else HAVE_GPU=0; fi
GPU_WHY=$(tail -n 1 <<<"$GPU_WHY")
NO_GPU_NOTE=""
if ((!HAVE_GPU)); then
    NO_GPU_NOTE="${GPU_WHY:-no usable CUDA GPU}"
fi
echo "GPU: $GPU_WHY"

# --------------------------------------------------------------------------- 2. GPU tests
banner "2. GPU tests (pytest -m gpu)"
mapfile -t GPU_TEST_FILES < <(grep -lE 'mark\.gpu\b' tests/test_*.py 2>/dev/null)
if ((${#GPU_TEST_FILES[@]} == 0)); then
    echo "no test file holds a GPU test"
    record gpu-tests pytest skip 0 0 "" "no test file in tests/ has a pytest.mark.gpu test"
elif ! missing=$("$PY" -c 'import pytest, hypothesis' 2>&1); then
    echo "cannot run the tests: $missing"
    record gpu-tests pytest skip 0 0 "" "pytest and hypothesis are needed: $(tail -n 1 <<<"$missing")"
else
    # test_compute_sanitizer is deselected: part 3 runs compute-sanitizer itself, with time limits.
    run_part gpu-tests pytest "$(limit_for 170 200)" pytest-gpu.log "$NO_GPU_NOTE" \
        "$PY" -m pytest -m gpu -p no:cacheprovider -k "not test_compute_sanitizer" \
        --junitxml="$RESULTS/pytest-gpu.xml" -q -rfEs --durations=15 \
        --continue-on-collection-errors "${GPU_TEST_FILES[@]}"
fi

# --------------------------------------------------------------------------- 3. compute-sanitizer
banner "3. compute-sanitizer (memcheck, racecheck) on benchmarks/gpu_sanitize.py"
SAN_PARTS=(memcheck:cupy racecheck:cupy)
if ((!HAVE_GPU)) || [[ -z $SANITIZER ]]; then
    why=""
    ((HAVE_GPU)) || why="$NO_GPU_NOTE"
    if [[ -z $SANITIZER ]]; then
        why="${why:+$why; }compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin, next to nvcc)"
    fi
    # Still run the script once, without the tool: a dry run of its cases (NumPy/torch on the CPU)
    # or, with a GPU but no sanitizer, a plain run of the kernels.
    dry=()
    ((HAVE_GPU)) || dry=(--dry-run)
    run_part sanitizer-script-only script "$(limit_for 60 200)" sanitizer-script.log "" \
        "$PY" benchmarks/gpu_sanitize.py --part all "${dry[@]}"
    # the script's own line is replaced by one skipped line per sanitizer part
    last=$(tail -n 1 "$PARTS")
    sed -i '$d' "$PARTS"
    IFS=$'\t' read -r _ _ src_rc src_dur src_lim src_log _ <<<"$last"
    for p in "${SAN_PARTS[@]}" memcheck:torch; do
        record "sanitizer-${p%%:*}-${p##*:}" sanitizer "$src_rc" "$src_dur" "$src_lim" "$src_log" \
            "$why; gpu_sanitize.py ran once without the tool"
    done
else
    for p in "${SAN_PARTS[@]}"; do
        tool=${p%%:*} part=${p##*:}
        run_part "sanitizer-$tool-$part" sanitizer "$(limit_for 75 180)" "sanitizer-$tool-$part.log" "" \
            "$SANITIZER" --tool "$tool" --error-exitcode 3 --print-limit 30 \
            "$PY" benchmarks/gpu_sanitize.py --part "$part"
    done
fi

# --------------------------------------------------------------------------- 4. benchmark
banner "4. benchmark (benchmarks/gpu_bench.py)"
if ((HAVE_GPU)); then
    lim=$(limit_for 260 70)
    run_part benchmark bench "$lim" bench.log "" \
        "$PY" benchmarks/gpu_bench.py bench --out "$RESULTS" --budget "$((lim > 40 ? lim - 25 : 15))"
else
    run_part benchmark bench "$(limit_for 90 20)" bench.log "$NO_GPU_NOTE" \
        "$PY" benchmarks/gpu_bench.py bench --out "$RESULTS" --dry-run --budget 60
fi

# --------------------------------------------------------------------------- 5. sanitizer on the torch path
if ((HAVE_GPU)) && [[ -n $SANITIZER ]]; then
    banner "5. compute-sanitizer memcheck on polycos with torch CUDA tensors"
    run_part sanitizer-memcheck-torch sanitizer "$(limit_for 60 5)" sanitizer-memcheck-torch.log "" \
        "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 30 \
        "$PY" benchmarks/gpu_sanitize.py --part torch
fi

# --------------------------------------------------------------------------- summary
banner "summary"
summary_args=(--results "$RESULTS" --duration "$((SECONDS - START))")
if ((DRY || !HAVE_GPU)); then summary_args+=(--dry-run); fi
"$PY" benchmarks/gpu_bench.py summary "${summary_args[@]}"
rc=$?
if ((rc != 0 && rc != 1)); then
    # The summary itself failed: a plain one from parts.tsv, and the exit status from the exit codes.
    echo "gpu_check.sh: the summary script failed (exit $rc); plain summary from parts.tsv" >&2
    rc=0
    {
        echo "# polycos GPU check (plain summary: gpu_bench.py summary failed)"
        echo
        echo "| part | exit | time [s] | note |"
        echo "|---|---|---|---|"
    } >"$RESULTS/summary.md"
    while IFS=$'\t' read -r name _ prc dur _ _ note; do
        echo "| $name | $prc | $dur | $note |" >>"$RESULTS/summary.md"
        if [[ $prc != skip && $prc != 0 && $prc != 77 ]]; then rc=1; fi
    done <"$PARTS"
    cat "$RESULTS/summary.md"
fi
echo "results in $RESULTS (summary.md, summary.json); exit $rc"
exit "$rc"
