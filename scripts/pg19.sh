#!/usr/bin/env bash
# PG-19 (Figs. 5-6): streaming perplexity over the first 10 test books (~600K tokens) on Llama3-8B with a
# 256-token cache, full cache vs StreamingLLM vs LaCache (span 16, overlap 0). The full cache runs out of
# memory on long books; its run stops there and the others go on. Plots: running_ppl.png per run and
# comparison.png.
#   bash scripts/pg19.sh [--gpus N]    ~6 GPU-hours per method
#   bash scripts/pg19.sh --smoke       embedded SmolLM2-135M on the Paul Graham essays, 600 tokens (~3 min CPU)
source "$(dirname "$0")/lib.sh"
parse_common "$@"
if [ $SMOKE = 1 ]; then
    MODEL=smollm2-135m; DATA=(--dataset_name pg-essays); TOKENS=(--num_eval_tokens 600)
else
    MODEL=meta-llama/Meta-Llama-3-8B; DATA=(--dataset_name emozilla/pg19-test --split test); TOKENS=(--num_eval_tokens 600000)
fi
dir=$OUT/pg19/$(basename "$MODEL")
pg_job() {
    "$PY" ppl/run.py --model_name_or_path "$MODEL" "${DATA[@]}" --method "$1" --cache_size 256 --span 16 \
        --overlap 0 --start_size 4 "${TOKENS[@]}" --output_dir "$dir" ||
        { [ "$1" = full ] && echo "note: the full cache stopped (out of memory, as in the paper); its NLLs so far are kept"; }
}
for method in streamingllm lacache full; do queue pg_job $method; done
drain
finish "$dir"
