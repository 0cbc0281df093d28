#!/usr/bin/env bash
# Table 1: WikiText-2 streaming perplexity (token by token) at 1K..16K tokens, full cache vs
# StreamingLLM vs LaCache at cache 512 and 256, for Llama2-7B, Llama2-7B-Chat, Llama2-13B, Llama3-8B.
# Ladder: span 16, overlap 0 (the official README's perplexity setting), 4 start tokens.
#   bash scripts/table1_ppl.sh [--gpus N]     one GPU per model; ~1 GPU-hour per model (A100/H100)
#   bash scripts/table1_ppl.sh --smoke        embedded SmolLM2-135M, offline Wikipedia sample, 600 tokens (~4 min CPU)
source "$(dirname "$0")/lib.sh"
parse_common "$@"
if [ $SMOKE = 1 ]; then
    MODELS=(smollm2-135m); DATA=(--dataset_name wiki); TOKENS=600; CACHES=(256 128)
else
    MODELS=(meta-llama/Llama-2-7b-hf meta-llama/Llama-2-7b-chat-hf meta-llama/Llama-2-13b-hf meta-llama/Meta-Llama-3-8B)
    DATA=(--dataset_name wikitext --task wikitext-2-raw-v1 --split test); TOKENS=16384; CACHES=(512 256)
fi
# one job per model: full cache once, then StreamingLLM and LaCache at each budget
model_job() {
    "$PY" ppl/run.py --model_name_or_path "$1" "${DATA[@]}" --method full --num_eval_tokens $TOKENS --output_dir "$2"
    for c in "${CACHES[@]}"; do
        "$PY" ppl/run.py --model_name_or_path "$1" "${DATA[@]}" --method streamingllm,lacache --cache_size "$c" \
            --span 16 --overlap 0 --start_size 4 --num_eval_tokens $TOKENS --output_dir "$2"
    done
}
for model in "${MODELS[@]}"; do
    queue model_job "$model" "$OUT/table1/$(basename "$model")"
done
drain
finish "$OUT/table1 (make the tables: $PY scripts/make_tables.py --root $OUT)"
