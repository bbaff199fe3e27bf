#!/usr/bin/env bash
# One-call GPU verification of resbm_kernels on a lent GPU machine (no network).
#
#   bash bench/gpu_session.sh            # from the repository root; writes under $OUT
#
# Phases, each under its own `timeout`, each logged; a failing phase is
# recorded and the next one still runs; the whole session stays under
# $RESBM_SESSION_S seconds (default 575, for a device call with timeout_s=600):
#
#   info      nvidia-smi, toolchain and Python package versions      -> session.log
#   install   pip install --no-build-isolation --no-deps .  (CUDA_HOME=/usr/local/cuda,
#             RESBM_CUDA_ARCHS=90a, exported for the tests too; RESBM_CUDA=1 first, so a
#             failing CUDA build shows; then RESBM_CUDA=0)                       -> install.log
#   tests     pytest tests -n <cores> --dist worksteal --tb=short --durations=30, GPU visible
#             (RESBM_BACKEND=auto, RESBM_TRITON_AUTOTUNE=0); not tests/test_triton_static.py and
#             tests/test_sanitizers.py, CPU-only checks that CI runs; each finished test is also written to
#             tests-report.txt as it ends (summarised in session.log by summarize_tests.py,
#             also when the cap stops pytest); xdist workers get cores/workers torch threads
#                                                                  -> tests.log, tests-report.txt
#   sanitize  compute-sanitizer on bench/sanitize_cuda.py, the tools in RESBM_SANITIZERS
#             (default memcheck: every native, CUDA and Triton kernel; with the tests phase
#             it runs beside the test suite, niced, the others after it); racecheck (the CUDA
#             passes first: the shared-memory kernels), synccheck and initcheck (native, CUDA)
#             when named, e.g. in a second call
#             (it works on the Firecracker H100 machines, not on gVisor: name the kind) -> sanitizer.log
#   profile   (only when named in RESBM_PHASES, e.g. a second call "profile" on the warm
#             machine) Nsight Compute (ncu, --clock-control none) on one call of each pass
#             and backend at N=16384, d=4096, k=128, int8 (bench/profile_kernels.py):
#             throughput vs peak, memory (with its tables where ncu has them: bank conflicts,
#             sectors per request), pipes, occupancy, warp stalls (each reason apart)
#                                                                    -> profile.log, profile.csv
#   sweep     (only when named in RESBM_PHASES) bench/sweep_configs.py: every Triton kernel
#             under a wide grid of launch configs, timed in its pass; compiles in parallel
#             first (nproc - 1 workers), then times within the time left      -> sweep.log, sweep.json
#   bench     the kernel (and wire) benchmarks, --benchmark-json=$OUT/kernels.json, with an
#             internal time budget (and SIGTERM handled) so the JSON is always written;
#             Triton untuned unless RESBM_BENCH_AUTOTUNE=1; each Triton item records the
#             launch configs it ran with (extra_info triton_configs)                 -> bench.log
#
# Measured on an H200 (2026-11-26, bench/results/logs/): install 28-31 s; the test suite
# reported 1148 of ~1390 tests in 250 s on 16 workers (so ~300 s for all; the cap is 390 s,
# what is left after install and the benchmarks' share, since memcheck no longer runs after it);
# memcheck 44-51 s; racecheck is slow (80 cases in 40 s); the benchmarks' target shapes
# (every backend) fit 150 s. The benchmarks get what is left (at least RESBM_BENCH_MIN_S).
# Autotuning compiles every config of every kernel key (k, bits, flags): for tuned numbers
# use a second call at once, while the machine is still warm (the install stays):
#
#   RESBM_PHASES=bench RESBM_SESSION_S=280 RESBM_BENCH_AUTOTUNE=1 \
#       RESBM_BENCH_ARGS="-k triton-N16384-d4096" bash bench/gpu_session.sh
#
# At most 8 files come back from a device call: this writes session.log,
# install.log, tests.log, tests-report.txt, sanitizer.log, bench.log and kernels.json
# (with the profile or sweep phase, run those in a call of their own).
# Environment: OUT (default /tmp/resbm-gpu-session), PYTHON (default python3),
# RESBM_SESSION_S, RESBM_BENCH_MIN_S (default 130: kept for the benchmarks by the earlier
# phases), RESBM_PHASES (default "info install tests sanitize bench"),
# RESBM_BENCH_ARGS (extra pytest arguments for the bench phase, split on spaces, e.g.
# "-k encode_forward"), RESBM_BENCH_AUTOTUNE (default 0), RESBM_SANITIZERS (default
# "memcheck"; all: "memcheck racecheck synccheck initcheck"), RESBM_SWEEP_ARGS (extra
# sweep_configs.py arguments), RESBM_PROFILE_ARGS (extra profile_kernels.py arguments,
# e.g. "--k 32,128 --backends triton").
#
# Afterwards, on the development machine: copy kernels.json to
# bench/results/<card>-<date>.json, run `python bench/render.py` and
# `python bench/rank_backends.py bench/results/<card>-<date>.json` (the ranking
# `auto` follows), commit them with the logs' verdicts (see bench/README.md).

set -u

cd "$(dirname "$0")/.." || exit 2
REPO="$PWD"
OUT="${OUT:-/tmp/resbm-gpu-session}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TOTAL_S="${RESBM_SESSION_S:-575}"
PHASES="${RESBM_PHASES:-info install tests sanitize bench}"
RESERVE_S=15 # kept back for the final summary
BENCH_MIN_S="${RESBM_BENCH_MIN_S:-130}" # earlier phases leave at least this much for the benchmarks
START_S=$(date +%s)
LOG="$OUT/session.log"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
# the one arch of the lent GPUs (a shorter build); exported, so the tests that check the
# library's kernels per arch check the archs it was built for
export RESBM_CUDA_ARCHS="${RESBM_CUDA_ARCHS:-90a}"
export PATH="$CUDA_HOME/bin:$PATH"
export PYTHONUNBUFFERED=1
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET
SUMMARY=()
FAILED=0

say() { echo "[$(date -u +%H:%M:%S) +$(($(date +%s) - START_S))s] $*" | tee -a "$LOG"; }
left_s() { echo $((TOTAL_S - ($(date +%s) - START_S))); }
wanted() { case " $PHASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run_phase NAME CAP_S LOGFILE CMD...: run CMD under timeout min(CAP_S, time left), log, record
run_phase() {
    local name=$1 cap=$2 log=$3
    shift 3
    local avail=$(($(left_s) - RESERVE_S))
    if [[ $name != bench ]] && wanted bench; then avail=$((avail - BENCH_MIN_S)); fi
    local t=$((cap < avail ? cap : avail))
    if ((t < 5)); then
        SUMMARY+=("$name: NOT RUN (session time used up)")
        say "$name: not run, no time left"
        FAILED=1
        return 1
    fi
    say "$name: start (timeout ${t}s): $*"
    echo "### $name: $* (timeout ${t}s)" >>"$log"
    local t0 rc status
    t0=$(date +%s)
    # SIGINT, not SIGTERM: pytest then ends like Ctrl-C and still prints its summary of failures
    timeout -s INT -k 10 "$t" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT after ${t}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [[ $rc -ne 0 ]] && FAILED=1
    SUMMARY+=("$name: $status ($(($(date +%s) - t0))s, log $(basename "$log"))")
    say "$name: $status"
    return $rc
}

# Python flag that keeps the source tree off sys.path, so the installed package is tested (3.11+)
PYP=("$PY")
if "$PY" -P -c pass 2>/dev/null; then PYP=("$PY" -P); fi

say "resbm_kernels GPU session: repo $REPO, OUT $OUT, budget ${TOTAL_S}s, phases: $PHASES"

# ---- info ------------------------------------------------------------------------------
if wanted info; then
    {
        echo "### date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "### git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo 'no git') $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed files"
        echo "### nvidia-smi"
        timeout 20 nvidia-smi || echo "nvidia-smi failed"
        timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,persistence_mode,compute_mode --format=csv || true
        echo "### toolchain"
        "$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -2 || echo "no nvcc at $CUDA_HOME"
        command -v compute-sanitizer && compute-sanitizer --version 2>&1 | head -3
        cmake --version 2>&1 | head -1
        ninja --version 2>&1
        "$PY" --version
        timeout 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0)); print('triton', triton.__version__)" 2>&1
        timeout 30 "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pytest|pytest-benchmark|nvidia-ml-py|numpy|hypothesis|setuptools|matplotlib) ' || true
    } >>"$LOG" 2>&1
    SUMMARY+=("info: ok (session.log)")
fi

# ---- install ----------------------------------------------------------------------------
if wanted install; then
    if ! run_phase install 150 "$OUT/install.log" env RESBM_CUDA=1 "$PY" -m pip install -v \
        --no-build-isolation --no-deps "$REPO"; then
        say "install with RESBM_CUDA=1 failed: retrying without the CUDA library"
        run_phase install-retry 90 "$OUT/install.log" env RESBM_CUDA=0 "$PY" -m pip install -v --no-build-isolation \
            --no-deps "$REPO"
    fi
    (cd /tmp && timeout 60 "$PY" -c "
import resbm_kernels, resbm_kernels.native as n
print('installed resbm_kernels at', resbm_kernels.__file__)
print('native cpu library:', n.available('cpu'), '| native cuda library:', n.available('cuda'))
from resbm_kernels.backends import _load
for b in ('triton', 'cuda'):
    m, why = _load(b)
    print('backend', b, 'imports' if m else 'unavailable: ' + why)
") >>"$LOG" 2>&1
fi

if ! (cd /tmp && "${PYP[@]}" -c "import resbm_kernels") 2>/dev/null; then
    say "resbm_kernels is not installed: later phases use the source tree"
    PYP=("$PY")
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" # scripts under bench/ import it too
fi

# ---- compute-sanitizer (run below; memcheck beside the tests) -------------------------------
SANITIZERS="${RESBM_SANITIZERS:-memcheck}"
sanitize_tool() {  # sanitize_tool TOOL CAP_S: compute-sanitizer TOOL on bench/sanitize_cuda.py, then its verdict
    local tool=$1 cap=$2 backends="cuda,native" quick="cuda"
    [[ $tool == memcheck ]] && backends="native,cuda,triton" quick="triton"
    # API errors inside torch or Triton are not ours; our launches check their own status
    run_phase "sanitize-$tool" "$cap" "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        RESBM_TRITON_AUTOTUNE=0 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
        --report-api-errors no "${PYP[@]}" bench/sanitize_cuda.py --backends "$backends" --quick "$quick"
    local rc=$?
    # this tool's verdict only: the lines after its own header
    awk -v h="### sanitize-$tool:" 'index($0, h) == 1 {on = 1; next} on' "$OUT/sanitizer.log" |
        grep -E "^summary:|ERROR SUMMARY|RACECHECK SUMMARY" | tail -2 | sed "s/^/    $tool: /" | tee -a "$LOG"
    return $rc
}
HAVE_SANITIZER=0
command -v compute-sanitizer >/dev/null && HAVE_SANITIZER=1

# ---- tests ------------------------------------------------------------------------------
if wanted tests; then
    # memcheck runs beside the test suite, niced (mostly GPU work; the suite is bound by its workers'
    # CPU time), so the two take the wall time of the longer one; its verdict is collected below
    MEMCHECK_PID="" MEMCHECK_NOTE="$(mktemp)"
    if wanted sanitize && ((HAVE_SANITIZER)) && [[ " $SANITIZERS " == *" memcheck "* ]]; then
        (
            renice -n 10 -p $BASHPID >/dev/null 2>&1 || true
            sanitize_tool memcheck 150
            rc=$?
            echo "${SUMMARY[-1]}" >"$MEMCHECK_NOTE"
            exit $rc
        ) &
        MEMCHECK_PID=$!
        SANITIZERS="${SANITIZERS//memcheck/}"
    fi
    # the image has pytest-xdist: one worker per core (the Triton JIT compiles are CPU-bound)
    XDIST=()
    "${PYP[@]}" -c "import xdist" 2>/dev/null && XDIST=(-n "$(nproc)")
    # --dist worksteal (pytest-xdist >= 3.2): idle workers take queued tests from busy ones, so the
    # long multi-process pipeline tests do not all end up at the tail of one worker
    "${PYP[@]}" -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" \
        2>/dev/null && XDIST+=(--dist worksteal)
    # one config per Triton kernel shape (test_every_gpu_block_size runs each config): a third of the compiles;
    # no --maxfail: a backend failing everywhere must not stop the other backends' tests (the cap bounds time)
    # RESBM_TEST_REPORT: a line per finished test as it ends (tests/conftest.py), kept if the cap cuts pytest;
    # compute-sanitizer runs in the sanitize phase; CI runs the CPU-only static compile check and sanitizer build
    run_phase tests 390 "$OUT/tests.log" env RESBM_BACKEND=auto RESBM_TRITON_AUTOTUNE=0 \
        RESBM_TEST_REPORT="$OUT/tests-report.txt" "${PYP[@]}" -m pytest tests "${XDIST[@]}" \
        -q -rfEs --tb=short --durations=30 -p no:cacheprovider -k "not compute_sanitizer" \
        --ignore=tests/test_triton_static.py --ignore=tests/test_sanitizers.py
    grep -E "passed|failed|error" "$OUT/tests.log" | tail -1 | sed 's/^/    tests: /' | tee -a "$LOG"
    "$PY" bench/summarize_tests.py "$OUT/tests-report.txt" 2>&1 | sed 's/^/    /' | tee -a "$LOG"
    if [[ -n $MEMCHECK_PID ]]; then
        wait "$MEMCHECK_PID" || FAILED=1
        SUMMARY+=("$(cat "$MEMCHECK_NOTE") [beside the tests]")
    fi
    rm -f "$MEMCHECK_NOTE"
fi

# ---- compute-sanitizer: the tools not yet run -----------------------------------------------
if wanted sanitize; then
    if ((HAVE_SANITIZER)); then
        for tool in $SANITIZERS; do
            cap=40
            [[ $tool == racecheck ]] && cap=50
            [[ $tool == memcheck ]] && cap=80
            sanitize_tool "$tool" $cap
        done
    else
        SUMMARY+=("sanitize: NOT RUN (compute-sanitizer not found)")
        FAILED=1
    fi
fi

# ---- Nsight Compute profile (opt-in) -------------------------------------------------------
if wanted profile; then
    NCU="$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu "$CUDA_HOME"/bin/ncu 2>/dev/null | tail -1)"
    if [[ -n $NCU ]]; then
        # the memory tables (shared-memory bank conflicts, L1 / L2 sectors per request) and the
        # pipes' utilisation too, where this ncu has those sections (an unknown one is an error)
        SECTIONS=()
        for section in SpeedOfLight MemoryWorkloadAnalysis MemoryWorkloadAnalysis_Tables ComputeWorkloadAnalysis \
                Occupancy LaunchStats WarpStateStats; do
            "$NCU" --list-sections 2>/dev/null | grep -qw -- "$section" && SECTIONS+=(--section "$section")
        done
        # and each warp-stall reason apart (WarpStateStats' details page gives only their sum):
        # warps stalled per issue cycle, for the reasons this ncu knows on this GPU
        KNOWN="$("$NCU" --query-metrics 2>/dev/null)"
        STALLS=()
        for reason in barrier long_scoreboard short_scoreboard mio_throttle lg_throttle math_pipe_throttle \
                wait not_selected selected dispatch_stall no_instruction branch_resolving membar drain \
                imc_miss tex_throttle sleeping misc; do
            metric="smsp__average_warps_issue_stalled_${reason}_per_issue_active"
            grep -qw -- "$metric" <<<"$KNOWN" && STALLS+=("$metric.ratio")
        done
        if (( ${#STALLS[@]} )); then
            SECTIONS+=(--metrics "$(IFS=,; echo "${STALLS[*]}")")
        fi
        run_phase profile 120 "$OUT/profile.log" env RESBM_TRITON_AUTOTUNE="${RESBM_BENCH_AUTOTUNE:-0}" "$NCU" \
            --clock-control none --profile-from-start off "${SECTIONS[@]}" --csv --page details \
            --log-file "$OUT/profile.csv" "${PYP[@]}" bench/profile_kernels.py ${RESBM_PROFILE_ARGS:-}
    else
        SUMMARY+=("profile: NOT RUN (ncu not found)")
        FAILED=1
    fi
fi

# ---- Triton launch-config sweep (opt-in) -------------------------------------------------------
if wanted sweep; then
    # a third of the time left compiles (in parallel), the rest times; the JSON is written at the end
    # (a 70 s session once left the timing -9 s: it compiled, then timed nothing)
    avail=$(($(left_s) - RESERVE_S - 20))
    if ((avail * 2 / 3 - 30 >= 30)); then
        run_phase sweep $((avail + 15)) "$OUT/sweep.log" "${PYP[@]}" bench/sweep_configs.py --jobs "$(($(nproc) - 1))" \
            --compile-budget-s $((avail / 3)) --budget-s $((avail * 2 / 3 - 30)) --out "$OUT/sweep.json" \
            ${RESBM_SWEEP_ARGS:-}
    else
        SUMMARY+=("sweep: NOT RUN (${avail}s left: under 30 s to time; RESBM_SESSION_S >= 125)")
        FAILED=1
    fi
fi

# ---- kernel benchmarks --------------------------------------------------------------------
if wanted bench; then
    # the suite stops starting new items after its budget, leaving time to write the JSON
    budget=$(($(left_s) - RESERVE_S - 60))
    if ((budget > 30)); then
        # shellcheck disable=SC2086
        run_phase bench $(($(left_s) - RESERVE_S)) "$OUT/bench.log" env RESBM_TRITON_AUTOTUNE="${RESBM_BENCH_AUTOTUNE:-0}" \
            "${PYP[@]}" -m pytest bench/test_bench_wire.py bench/test_bench_kernels.py --benchmark-only -q -rs \
            -p no:cacheprovider --benchmark-json="$OUT/kernels.json" --resbm-budget-s="$budget" ${RESBM_BENCH_ARGS:-}
        [[ -s "$OUT/kernels.json" ]] || say "bench: no kernels.json written"
        grep -E "passed|failed|error" "$OUT/bench.log" | tail -1 | sed 's/^/    bench: /' | tee -a "$LOG"
    else
        SUMMARY+=("bench: NOT RUN (only ${budget}s left)")
        FAILED=1
    fi
fi

# ---- summary --------------------------------------------------------------------------------
{
    echo "### nvidia-smi at the end"
    timeout 10 nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv 2>&1 || true
} >>"$LOG" 2>&1
say "summary ($(($(date +%s) - START_S))s of ${TOTAL_S}s):"
for line in "${SUMMARY[@]}"; do say "  $line"; done
exit $FAILED
