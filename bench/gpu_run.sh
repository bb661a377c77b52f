#!/usr/bin/env bash
# One GPU lease's work in one command, within a time budget, writing at most 8 small files into OUT:
#
#   bench/gpu_run.sh OUT
#
# The device tool gets the line in bench/gpu_command.txt (README, "Benchmarks"; `python -m bench.lease` prints it
# with the tool's limits). Phases, in order, each under its own time limit and never past what is left of
# RUN_BUDGET, all logging to OUT/run.log:
#
#   env      versions: GPU, driver, CUDA, cuDNN, torch, triton, Python, tools
#   install  python3 -m pip install --no-deps --no-build-isolation -e .  (offline: no network, no dependencies;
#            with --no-index --disable-pip-version-check, so that pip does not try the network at all)
#   imports  where rnnfast is imported from and which backends loaded
#   cuda     the CUDA library: python -m rnnfast.build, for sm_90 only, into build/cuda; a build already there (left
#            by an earlier call on the same machine, or carried) is used as is. If this fails, the smoke tests and
#            the benchmark leave the cuda backend out rather than build it again.
#   smoke    bench/test_smoke.py under bench.watchdog: at most SMOKE_LIMIT s, each test at most CASE_TIMEOUT s
#   bench    python -m bench on the "lease" group against cuDNN in the same process, with the grid-barrier cost
#            and the dispatch table: bench.json, bench.md, two plots, dispatch_table.json
#   results  checks that OUT's files all come back, then prints the short table last
#
# Environment:
#   RUN_BUDGET    seconds the whole run may take (default 480: the tool allows 600 a command, and a 15-minute
#                 lease must also hold the machine start and one rerun after a fix)
#   PHASES        the optional phases to run (default "install cuda smoke bench"; env, imports and results always
#                 run), e.g. PHASES=bench for a rerun on the same machine
#   SMOKE_LIMIT   seconds for the smoke phase (default 180); CASE_TIMEOUT: seconds per smoke test (default 60)
#   SMOKE_ARGS    what pytest gets in the smoke phase (default bench/test_smoke.py)
#   BENCH_ARGS    what python -m bench gets (default: the lease group; see below)
#   CUDA_LIB_CMD  the command that provides the CUDA library (default: python -m rnnfast.build)
#   RNNFAST_DRY_RUN=1  the CPU dry run (CI: tests/test_gpu_run.py): every phase in its CPU form. No install (a
#                 check of what it needs), no build (a check of its entry point), the smoke tests and a tiny
#                 benchmark on the CPU with the Triton interpreter.
#
# Exit status 1 when a phase failed or had no time left (each is named at the end), else 0.
# Commit what comes back under bench/results/<date>-<gpu>/.
set -u
set -f  # no globbing: BENCH_ARGS may hold patterns such as 'cuda*', meant for the runner

OUT=${1:?usage: bench/gpu_run.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

PY=${PYTHON:-python3}
DRY=${RNNFAST_DRY_RUN:-0}
RUN_BUDGET=${RUN_BUDGET:-480}
PHASES=" ${PHASES:-install cuda smoke bench} "
SMOKE_LIMIT=${SMOKE_LIMIT:-180}
CASE_TIMEOUT=${CASE_TIMEOUT:-60}
SMOKE_ARGS=${SMOKE_ARGS:-bench/test_smoke.py}
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the CPU forms, even on a machine with a GPU
    tiny="--budget 0.01 --min-reps 2 --max-reps 3 --warmup 1"
    BENCH_ARGS=${BENCH_ARGS:---configs cpu-lease --device cpu --exclude-providers reference,torch $tiny}
    CUDA_LIB_CMD=${CUDA_LIB_CMD:-$PY -m rnnfast.build --help}
else
    # The reference (a Python loop) and torch (the baseline's own call) would only spend the lease.
    BENCH_ARGS=${BENCH_ARGS:---configs lease --exclude-providers reference,torch --budget 0.2}
    CUDA_LIB_CMD=${CUDA_LIB_CMD:-$PY -m rnnfast.build}
fi
export RNNFAST_BUILD_DIR=${RNNFAST_BUILD_DIR:-$REPO/build/cuda}
export RNNFAST_CUDA_ARCHS=${RNNFAST_CUDA_ARCHS:-9.0}
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda  # torch otherwise guesses /usr/local and cannot link cudart
fi
export PYTHONUNBUFFERED=1

LOG=$OUT/run.log
SUMMARY=$OUT/summary.txt
: >"$LOG"
: >"$SUMMARY"
RESERVE=15   # seconds kept back for the results phase (and the last phase's kill delay)
MIN_PHASE=10 # a phase with less time than this is not started
FAILED=()

say() { echo "$*" | tee -a "$SUMMARY"; }  # stdout is what the device tool returns
wanted() { [[ "$PHASES" == *" $1 "* ]]; }

# phase NAME LIMIT COMMAND...: COMMAND appended to run.log, stopped after LIMIT seconds or when the budget less
# RESERVE runs out, whichever comes first. Returns COMMAND's status.
phase() {
    local name=$1 limit=$2 left start offset rc
    shift 2
    left=$((RUN_BUDGET - SECONDS - RESERVE))
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt "$MIN_PHASE" ]; then
        say "== $name: skipped, $((RUN_BUDGET - SECONDS)) s left of the ${RUN_BUDGET} s budget"
        FAILED+=("$name(no time)")
        return 1
    fi
    say "== $name (limit ${limit} s): $*"
    printf '\n===== %s (limit %s s, at %s s): %s\n' "$name" "$limit" "$SECONDS" "$*" >>"$LOG"
    start=$SECONDS
    offset=$(wc -c <"$LOG")
    timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "   $name: stopped at its ${limit} s limit (rc=$rc)"
    else
        say "   $name: rc=$rc after $((SECONDS - start)) s"
    fi
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name(rc=$rc)")
        tail -c +"$((offset + 1))" "$LOG" | tail -n 12 | sed 's/^/   | /'
    fi
    return "$rc"
}

say "== gpu_run.sh in $REPO, budget ${RUN_BUDGET} s$([ "$DRY" = 1 ] && echo ', DRY RUN on the CPU'), out $OUT"
phase env 60 "$PY" -m bench.lease env

if wanted install; then
    if [ "$DRY" = 1 ]; then
        phase install 30 "$PY" -m bench.lease install-check
    else
        # --no-index and no version check: with no network, pip would otherwise retry PyPI before giving up.
        phase install 120 "$PY" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check \
            -e .
    fi
fi
phase imports 60 "$PY" -m bench.lease imports

CUDA_LEFT_OUT=0
if wanted cuda; then
    cached=$(find "$RNNFAST_BUILD_DIR" -maxdepth 2 -name 'librnnfast_cuda.so' 2>/dev/null | head -n 1)
    say "   CUDA library: ${cached:+a build is there already ($cached); }RNNFAST_BUILD_DIR=$RNNFAST_BUILD_DIR" \
        "RNNFAST_CUDA_ARCHS=$RNNFAST_CUDA_ARCHS"
    # shellcheck disable=SC2086  # a command line, split into words on purpose
    if ! phase cuda 200 $CUDA_LIB_CMD; then
        CUDA_LEFT_OUT=1
        say "   the smoke tests and the benchmark leave the cuda backend out"
    fi
fi

if wanted smoke; then
    if [ "$CUDA_LEFT_OUT" = 1 ]; then
        export RNNFAST_SMOKE_BACKENDS=triton  # every kernel backend but cuda
    fi
    # -v: each test's outcome is in the log as it ends, even if the phase is stopped before pytest's summary.
    # shellcheck disable=SC2086
    phase smoke "$SMOKE_LIMIT" "$PY" -m bench.watchdog --case-timeout "$CASE_TIMEOUT" -- $SMOKE_ARGS -v -rfEs \
        -p no:cacheprovider
fi

if wanted bench; then
    left=$((RUN_BUDGET - SECONDS - RESERVE))
    # The runner starts nothing new after --time-limit and then writes what it has: 30 s for that.
    measure=$((left - 30))
    if [ "$measure" -lt 10 ]; then measure=10; fi
    EXTRA=()
    if [ "$CUDA_LEFT_OUT" = 1 ]; then EXTRA=(--exclude-providers 'cuda*'); fi
    # shellcheck disable=SC2086
    phase bench "$left" "$PY" -m bench $BENCH_ARGS ${EXTRA[@]+"${EXTRA[@]}"} --time-limit "$measure" --out "$OUT" \
        --table "$OUT/dispatch_table.json"
fi

say "== results"
files=$(timeout 20 "$PY" -m bench.lease check-out "$OUT" 2>&1)
rc=$?
say "$files"
if [ "$rc" -ne 0 ]; then FAILED+=("results(rc=$rc)"); fi
say "== total ${SECONDS} s of the ${RUN_BUDGET} s budget"
if [ "${#FAILED[@]}" -gt 0 ]; then
    say "FAILED: ${FAILED[*]}"
else
    say "all phases passed"
fi
echo | tee -a "$SUMMARY"
timeout 20 "$PY" -m bench.summary "$OUT" --write "$SUMMARY"
[ "${#FAILED[@]}" -eq 0 ]
