#!/usr/bin/env bash
# Run the test suite in every environment scripts/setup.sh made (5.24, and with --all 4.57, 4.48, 4.43.4, 4.33).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for env in .venv .venv-tf457 .venv-tf448 .venv-tf443 .venv-tf433; do
    [ -x "$env/bin/python" ] || continue
    echo "== $env: transformers $("$env/bin/python" -c 'import transformers; print(transformers.__version__)')"
    "$env/bin/python" -m pytest -q -p no:cacheprovider tests "$@" || status=1
done
exit $status
