#!/usr/bin/env bash
# The one script to run on the GPU machine: install offline, build the CUDA backend, run the tests, the
# benchmark and the end-to-end run, writing a few small logs and result files into OUT.
#
#   bench/gpu_run.sh OUT
#
# Environment:
#   BENCH_ARGS    arguments of `python -m bench` (default: --quick)
#   CHARLM_ARGS   arguments of `python -m bench.charlm` (default: none: 300 steps in bfloat16)
#   RUN_BUDGET    seconds the whole script may take (default 540: the device tool stops a command at 600);
#                 each step gets at most what is left, so a slow step cannot cost the results of the others
#   SANITIZE_TOOLS  compute-sanitizer tools to run bench/sanitize.py under (default: racecheck)
#   PYTEST_BENCH  set to 1 to also run `pytest bench/` (pytest-benchmark, a few minutes) into OUT/pytest-bench.json
#   STEPS         the steps to run (default: install build tests bench charlm sanitize), to split the work over
#                 several device calls, e.g. STEPS="install tests" TEST_ARGS=tests/test_triton.py, then STEPS="bench"
#   TEST_ARGS     what the tests step passes to pytest (default: tests)
#   TESTS_LIMIT   seconds the tests step may take (default 200)
#
# Keeps going after a failing step, records it in OUT/summary.log and exits 1 at the end if any step failed.
# Commit what comes back under bench/results/<date>-<gpu>/.
set -u
set -f  # no globbing: BENCH_ARGS may hold patterns such as lstm-*, meant for the runner

OUT=${1:?usage: bench/gpu_run.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BENCH_ARGS=${BENCH_ARGS:---quick}
CHARLM_ARGS=${CHARLM_ARGS:-}
RUN_BUDGET=${RUN_BUDGET:-540}
SANITIZE_TOOLS=${SANITIZE_TOOLS:-racecheck}
STEPS=" ${STEPS:-install build tests bench charlm sanitize} "
TEST_ARGS=${TEST_ARGS:-tests}
TESTS_LIMIT=${TESTS_LIMIT:-200}
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda  # torch otherwise guesses /usr/local and cannot link cudart
fi
export PYTHONUNBUFFERED=1

SUMMARY="$OUT/summary.log"
: >"$SUMMARY"
FAILED=()

wanted() { [[ "$STEPS" == *" $1 "* ]]; }

# step NAME LIMIT_SECONDS COMMAND...: run COMMAND into OUT/NAME.log within min(LIMIT, what is left of the budget).
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((RUN_BUDGET - SECONDS - 5))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 15 ]; then
        echo "== $name: skipped, no time left in the ${RUN_BUDGET} s budget" | tee -a "$SUMMARY"
        FAILED+=("$name(no time)")
        return 0
    fi
    echo "== $name (limit ${limit} s): $*" | tee -a "$SUMMARY"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "   $name: rc=$rc after $((SECONDS - t0)) s" | tee -a "$SUMMARY"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name(rc=$rc)")
        tail -n 15 "$OUT/$name.log"
    fi
    return 0
}

versions() {
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi || true
    nvcc --version || true
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), "sm", p.major, p.minor, "SMs", p.multi_processor_count)
for mod in ("pytest", "pytest_benchmark", "matplotlib", "tqdm", "numpy", "ninja"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except ImportError:
        print(mod, "not installed")
EOF
}

versions >"$OUT/env.log" 2>&1
echo "== env: versions in env.log" | tee -a "$SUMMARY"
wanted install && step install 120 "$PY" -m pip install --no-deps --no-build-isolation -e .
if [ -f rnnfast/build.py ] && wanted build; then
    step build 300 "$PY" -m rnnfast.build
fi
# -rfE: the failures' names at the end of the log, even when the run is cut short by the step's timeout.
wanted tests && step tests "$TESTS_LIMIT" "$PY" -m pytest -q -rfE --durations=15 -p no:cacheprovider $TEST_ARGS
# Leave about 100 s for the steps after it. The runner measures nothing new past --time-limit and writes what
# it has (also when `timeout` sends it SIGTERM), so its results survive a slow run.
limit=$((RUN_BUDGET - SECONDS - 130))
if [ "$limit" -gt 300 ]; then limit=300; fi
if [ "$limit" -lt 30 ]; then limit=30; fi
wanted bench && step bench "$((limit + 60))" "$PY" -m bench $BENCH_ARGS --time-limit "$limit" --out "$OUT"
wanted charlm && step charlm 90 "$PY" -m bench.charlm $CHARLM_ARGS --out "$OUT"
if [ "${PYTEST_BENCH:-0}" = 1 ]; then
    step pytest-bench 240 "$PY" -m pytest -q -p no:cacheprovider bench --benchmark-json "$OUT/pytest-bench.json"
fi
if [ -f bench/sanitize.py ] && command -v compute-sanitizer >/dev/null && wanted sanitize; then
    for tool in $SANITIZE_TOOLS; do
        step "sanitize-$tool" 90 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" -m bench.sanitize
    done
fi

echo "== total $SECONDS s" | tee -a "$SUMMARY"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}" | tee -a "$SUMMARY"
    exit 1
fi
echo "all steps passed" | tee -a "$SUMMARY"
