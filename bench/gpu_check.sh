#!/usr/bin/env bash
# The whole GPU check of issue 22 as one run (../shared/GPU.md): correctness, then real-size latency with the text
# encoders and VAE (text -> 1.x -> image), then where a step's time goes. Each step has its own timeout; results
# go to $OUT as JSON/Markdown and a short log, and a failed step does not stop the others.
#
#   OUT=/path bench/gpu_check.sh                                  # on the GPU machine (defaults below)
#   OUT=/tmp/dry DEVICE=cpu ARCH=tiny-sd3 DTYPE=fp32 RES=128 REPEATS=1 bench/gpu_check.sh   # dry run on a CPU
#
# WHEELS (optional): a folder of wheels the GPU machine lacks (diffusers, importlib_metadata), installed with
# --no-deps into $OUT/../site, put first on PYTHONPATH.
set -u
OUT=${OUT:?set OUT to the folder for the results}
DEVICE=${DEVICE:-cuda}
ARCH=${ARCH:-sd3-medium}
DTYPE=${DTYPE:-bf16}
RES=${RES:-1024}
REPEATS=${REPEATS:-5}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
if [ -n "${WHEELS:-}" ]; then
    SITE="$OUT/../site"
    "$PYTHON" -m pip install -q --no-deps --target "$SITE" "$WHEELS"/*.whl >> "$LOG" 2>&1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

failed=0
step() {  # step NAME SECONDS COMMAND...: run with a timeout, log its time and exit status
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.out" 2>&1
    rc=$?
    echo "$name: exit $rc in $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed=1
}

common=(--arch "$ARCH" --device "$DEVICE" --dtype "$DTYPE" --resolution "$RES")
graph=()
[ "$DEVICE" = cpu ] || graph=(--cuda-graph)
if [ "$DEVICE" != cpu ]; then
    step gpu-tests 120 "$PYTHON" -m pytest -q tests/gpu
fi
# text -> 1.x -> image: the transformer schedules plus SD3's three encoders and VAE at real size (--components)
step latency 300 "$PYTHON" -m bench.latency "${common[@]}" "${graph[@]}" --components --batch 1 \
    --warmup 1 --repeats "$REPEATS" --out "$OUT/latency"
# where a step's time goes: GEMM, attention, elementwise, norms, against the measured GEMM rate
step step-profile 180 "$PYTHON" -m bench.step_profile "${common[@]}" --repeats "$REPEATS" --out "$OUT/step-profile"
rm -f "$OUT"/latency/*.png "$OUT"/step-profile/*.png  # the figures stay behind: 8 files come back
exit $failed
