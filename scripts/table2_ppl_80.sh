#!/usr/bin/env bash
# Table 2: Llama3-8B, cache of 80 tokens, WikiText-2 streaming perplexity from 1K to 128K tokens,
# full cache vs StreamingLLM vs LaCache (span 16, overlap 0, 4 start tokens).
#   bash scripts/table2_ppl_80.sh [--gpus N]   methods spread over GPUs; ~10 GPU-hours (128K tokens, one at a time)
#   bash scripts/table2_ppl_80.sh --smoke      embedded SmolLM2-135M, cache 80, 600 tokens (~3 min CPU)
source "$(dirname "$0")/lib.sh"
parse_common "$@"
if [ $SMOKE = 1 ]; then
    MODEL=smollm2-135m; DATA=(--dataset_name wiki); TOKENS=600
else
    MODEL=meta-llama/Meta-Llama-3-8B; DATA=(--dataset_name wikitext --task wikitext-2-raw-v1 --split test); TOKENS=131072
fi
dir=$OUT/table2/$(basename "$MODEL")
for method in full streamingllm lacache; do
    queue "$PY" ppl/run.py --model_name_or_path "$MODEL" "${DATA[@]}" --method $method --cache_size 80 --span 16 \
        --overlap 0 --start_size 4 --num_eval_tokens $TOKENS --output_dir "$dir"
done
drain
finish "$dir"
