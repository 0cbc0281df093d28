#!/usr/bin/env bash
# Table 3: LongBench (21 datasets) on Llama2-7B-Chat and Llama2-13B-Chat, full cache vs StreamingLLM vs
# LaCache at 50% (span 16, overlap 0) and 25% (span 9, overlap 3) of the 3500-token input; 128 start
# tokens by the official rule; the official repository's prompts (--chat_template lacache: no
# [INST] wrapper for meta-llama/Llama-2-*-chat-hf, see docs/benchmarks.md). Then scoring and the paper-side table.
#   bash scripts/table3_longbench.sh [--gpus N]   samples sharded over N GPUs with torchrun; ~4 GPU-hours per run
#   bash scripts/table3_longbench.sh --smoke      embedded SmolLM2-135M, offline synthetic samples (~5 min CPU)
source "$(dirname "$0")/lib.sh"
parse_common "$@"
if [ $SMOKE = 1 ]; then
    MODELS=(smollm2-135m-instruct); DATA=(--data_dir "$OUT/data/longbench_synthetic" --datasets passage_retrieval_en,passage_count
        --max_length 1500 --num_samples 2)
    "$PY" longbench/synthetic.py --output_dir "$OUT/data/longbench_synthetic" --num_samples 2
else
    MODELS=(llama2-7b-chat-4k llama2-13b-chat-4k); DATA=()
fi
RUN=$(launcher)
dir=$OUT/table3
for model in "${MODELS[@]}"; do
    common=(--model "$model" "${DATA[@]}" --chat_template lacache --output_dir "$dir")
    $RUN longbench/pred.py "${common[@]}" --method full
    $RUN longbench/pred.py "${common[@]}" --method streamingllm,lacache --budget 0.5 --span 16 --overlap 0
    $RUN longbench/pred.py "${common[@]}" --method streamingllm,lacache --budget 0.25 --span 9 --overlap 3
done
"$PY" longbench/eval.py --path "$dir"/pred/* --output_dir "$dir"
finish "$dir (tables: $dir/comparison.md and result.md in each run folder)"
