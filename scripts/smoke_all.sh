#!/usr/bin/env bash
# Every table script in --smoke mode (offline, embedded SmolLM2-135M, 2-core CPU), then RESULTS.md.
# Prints each script's wall time. Resumable: rerun to finish an interrupted pass.
#   bash scripts/smoke_all.sh [--out DIR]     (about 40 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a 135M model on a small CPU: threads cost more than they give
for script in table1_ppl table2_ppl_80 pg19 table3_longbench table4_longbench_smollm2 ablation_overlap niah table5_ruler; do
    start=$(date +%s)
    bash "scripts/$script.sh" --smoke "$@"
    echo "== $script --smoke: $(( $(date +%s) - start )) s"
done
"$PY" scripts/make_tables.py --root outputs/smoke outputs --out RESULTS.md
