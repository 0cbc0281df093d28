#!/usr/bin/env bash
# Table 4: LongBench (21 datasets) on SmolLM2-1.7B-Instruct (8K context, 7500-token inputs), full cache vs
# StreamingLLM vs LaCache at 50% and 25%, span 9, overlap 7 at both budgets (official settings); the
# tokenizer's chat template.
#   bash scripts/table4_longbench_smollm2.sh [--gpus N]   ~2 GPU-hours per run on one GPU
#   bash scripts/table4_longbench_smollm2.sh --smoke      embedded SmolLM2-135M-Instruct, synthetic samples (~5 min CPU)
source "$(dirname "$0")/lib.sh"
parse_common "$@"
if [ $SMOKE = 1 ]; then
    MODEL=smollm2-135m-instruct; DATA=(--data_dir "$OUT/data/longbench_synthetic" --datasets passage_retrieval_en,passage_count
        --max_length 1500 --num_samples 2)
    "$PY" longbench/synthetic.py --output_dir "$OUT/data/longbench_synthetic" --num_samples 2
else
    MODEL=smollm2-1.7b-instruct; DATA=()
fi
RUN=$(launcher)
dir=$OUT/table4
common=(--model "$MODEL" "${DATA[@]}" --output_dir "$dir")
$RUN longbench/pred.py "${common[@]}" --method full
for budget in 0.5 0.25; do
    $RUN longbench/pred.py "${common[@]}" --method streamingllm,lacache --budget $budget --span 9 --overlap 7
done
"$PY" longbench/eval.py --path "$dir"/pred/* --output_dir "$dir"
finish "$dir (tables: $dir/comparison.md and result.md in each run folder)"
