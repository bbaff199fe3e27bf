#!/usr/bin/env bash
# session 34's one device call: tests + memcheck, CUDA benches, graph replay, ncu, autotuned Triton
set -u
export PYTHONPATH=$PWD RESBM_TRITON_AUTOTUNE=0 PYTHONUNBUFFERED=1 CUDA_HOME=/usr/local/cuda
export PATH=/usr/local/cuda/bin:$PATH
T0=$(date +%s); END=${END_S:-540}
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( END - $(el) )); }
log() { echo "[+$(el)s] $*"; }
git log -1 --format='device copy HEAD %h' 2>/dev/null; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader
log "1. gpu_session info tests sanitize"
RESBM_PHASES="info tests sanitize" RESBM_SESSION_S=235 OUT=$OUT/s bash bench/gpu_session.sh >/dev/null 2>&1
log "session rc=$?"; sed -n '/verdict\|VERDICT\|Summary\|SUMMARY/,$p' $OUT/s/session.log | tail -25
grep -E "^(FAILED|ERROR)" $OUT/s/tests.log | head -30
B="python3 -P -m pytest bench/test_bench_kernels.py --benchmark-only -q -p no:cacheprovider"
log "2. CUDA benches"
timeout 40 $B -k cuda-N16384-d4096 --benchmark-json=$OUT/cuda.json 2>&1 | tail -1
timeout 50 $B -k cuda-N4096 --benchmark-json=$OUT/cuda-n4096.json 2>&1 | tail -1
RESBM_CUDA_WGMMA=1 timeout 40 $B -k cuda-N16384-d4096 --benchmark-json=$OUT/cuda-wgmma.json 2>&1 | tail -1
log "3. graph replay"
for b in triton cuda; do timeout 75 python3 -P bench/graph_replay.py --backend $b --tokens 256,4096,16384 2>&1; done | tee $OUT/graph_replay.log
log "4. ncu"
timeout 45 ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats --csv --page details --log-file $OUT/prof.csv python3 -P bench/profile_kernels.py --k 32,128 --backends cuda --passes encode_forward,decode_backward 2>&1 | tail -2
L=$(left); log "5. autotuned Triton, ${L}s left"
if (( L > 60 )); then
  RESBM_TRITON_AUTOTUNE=1 timeout $((L - 5)) $B -k triton-N16384-d4096 --resbm-budget-s $((L - 25)) --benchmark-json=$OUT/triton-autotuned.json 2>&1 | tail -3
fi
(cd $OUT && tar czf s.tgz s && rm -rf s)
log "done"
