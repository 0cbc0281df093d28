#!/usr/bin/env bash
# Needle / passkey retrieval (Figs. 8-9): the official passkey protocol (--protocol lacache: the LaCache
# repository's niah/pred.py construction, filler sized in characters, key per test index, 11 depths,
# 50 tests per cell, 64 start tokens, cache = budget x prompt length, its official.csv).
#   Llama-3.2-3B-Instruct (128K): 16K..128K by 16K, budget 0.5, span 14, overlap 0 (official settings)
#   LongChat-7b-v1.5-32k: 4K..32K by 4K, budget 0.25, span 8, overlap 0 (paper: 25%; span ours, S ~ L x budget)
# StreamingLLM and LaCache (and the full cache) each give results.csv, heatmap.png and summary.md.
#   bash scripts/niah.sh [--gpus N]    one GPU per (model, method); ~10 GPU-hours for the 128K model
#   bash scripts/niah.sh --smoke       embedded SmolLM2-135M, --interval 512 (~340 and ~890 tokens), 11 depths, 1 test
source "$(dirname "$0")/lib.sh"
parse_common "$@"
dir=$OUT/niah
if [ $SMOKE = 1 ]; then
    for method in full streamingllm lacache; do
        queue "$PY" niah/pred.py --model_name smollm2-135m --method $method --max_tokens 1024 --interval 512 \
            --num_tests 1 --protocol lacache --budget 0.5 --span 14 --overlap 0 --output_dir "$dir"
    done
else
    for method in streamingllm lacache full; do
        queue "$PY" niah/pred.py --model_name meta-llama/Llama-3.2-3B-Instruct --method $method --max_tokens 131072 \
            --interval 16384 --num_tests 50 --protocol lacache --budget 0.5 --span 14 --overlap 0 --output_dir "$dir"
        queue "$PY" niah/pred.py --model_name lmsys/longchat-7b-v1.5-32k --method $method --max_tokens 32768 \
            --interval 4096 --num_tests 50 --protocol lacache --budget 0.25 --span 8 --overlap 0 --output_dir "$dir"
    done
fi
drain
finish "$dir (heatmap.png and summary.md in each run folder)"
