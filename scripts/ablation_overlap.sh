#!/usr/bin/env bash
# Table 6: overlap ablation. LaCache at O = 0, S/4, S/2 on the QA group (narrativeqa, qasper,
# multifieldqa_en, multifieldqa_zh) and the synthetic group (passage_count, passage_retrieval_en/zh).
# The paper names neither model nor budget; we use Llama2-7B-Chat at 50% with span 16 (O = 0, 4, 8).
#   bash scripts/ablation_overlap.sh [--gpus N]   ~3 GPU-hours
#   bash scripts/ablation_overlap.sh --smoke      embedded SmolLM2-135M, synthetic samples, span 8 (O = 0, 2, 4)
source "$(dirname "$0")/lib.sh"
parse_common "$@"
if [ $SMOKE = 1 ]; then
    MODEL=smollm2-135m-instruct; SPAN=8; SETS=(passage_retrieval_en,passage_count)
    DATA=(--data_dir "$OUT/data/longbench_synthetic" --max_length 1500 --num_samples 2)
    "$PY" longbench/synthetic.py --output_dir "$OUT/data/longbench_synthetic" --num_samples 2
else
    MODEL=llama2-7b-chat-4k; SPAN=16; SETS=(narrativeqa,qasper,multifieldqa_en,multifieldqa_zh,passage_count,passage_retrieval_en,passage_retrieval_zh)
    DATA=(--chat_template lacache)
fi
RUN=$(launcher)
dir=$OUT/ablation_overlap
for overlap in 0 $((SPAN / 4)) $((SPAN / 2)); do
    $RUN longbench/pred.py --model $MODEL "${DATA[@]}" --datasets "${SETS[0]}" --method lacache --budget 0.5 \
        --span $SPAN --overlap $overlap --output_dir "$dir"
done
"$PY" longbench/eval.py --path "$dir"/pred/* --output_dir "$dir"
finish "$dir (table: $dir/comparison.md)"
