# Shared by the table scripts: flag parsing, the Python to use, and a job queue over GPUs.
#   --smoke      the same pipeline offline on the embedded SmolLM2-135M, sized for a 2-core CPU
#   --gpus N     run up to N jobs at once, one per GPU (CUDA_VISIBLE_DEVICES=0..N-1); LongBench and
#                RULER shard their samples with torchrun instead
#   --out DIR    results root (default outputs/, smoke runs under outputs/smoke/)
# Every job resumes: rerunning a script skips finished runs and samples.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SMOKE=0
GPUS=1
OUT=""
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

parse_common() {
    while [ $# -gt 0 ]; do
        case $1 in
            --smoke) SMOKE=1 ;;
            --gpus) GPUS=${2:?--gpus needs a number}; shift ;;
            --out) OUT=${2:?--out needs a folder}; shift ;;
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
            *) echo "error: unknown flag $1 (valid: --smoke, --gpus N, --out DIR)" >&2; exit 2 ;;
        esac
        shift
    done
    if ! [[ $GPUS =~ ^[1-9][0-9]*$ ]]; then echo "error: --gpus must be an integer >= 1, got $GPUS" >&2; exit 2; fi
    if [ -z "$OUT" ]; then OUT=outputs; [ $SMOKE = 1 ] && OUT=outputs/smoke; fi
    if [ -e "$OUT" ] && [ ! -d "$OUT" ]; then echo "error: --out $OUT is a file, not a folder" >&2; exit 2; fi
    mkdir -p "$OUT"
    START=$(date +%s)
}

# queue CMD...: run CMD on a free GPU (at most $GPUS at once, each pinned with CUDA_VISIBLE_DEVICES);
# `drain` waits for all and fails if any failed. With one GPU (or CPU) jobs simply run in turn.
declare -a _pid=()
_failed=0
queue() {
    if [ "$GPUS" = 1 ]; then "$@"; return; fi
    while true; do
        for ((s = 0; s < GPUS; s++)); do
            if [ -z "${_pid[$s]:-}" ] || ! jobs -rp | grep -qx "${_pid[$s]}"; then
                [ -n "${_pid[$s]:-}" ] && { wait "${_pid[$s]}" || _failed=1; }
                CUDA_VISIBLE_DEVICES=$s "$@" &
                _pid[$s]=$!
                return
            fi
        done
        sleep 2
    done
}
drain() {
    for p in "${_pid[@]:-}"; do [ -n "$p" ] && { wait "$p" || _failed=1; }; done
    _pid=()
    if [ "$_failed" != 0 ]; then echo "error: a job failed (see its output above); rerun to resume" >&2; exit 1; fi
}

# launcher for data-parallel harnesses (longbench/pred.py, ruler/pred.py)
launcher() {
    if [ "$GPUS" -gt 1 ]; then echo "$PY -m torch.distributed.run --standalone --nproc_per_node $GPUS"; else echo "$PY"; fi
}

finish() {
    echo "done in $(( $(date +%s) - START )) s; outputs under $1"
}
