#!/usr/bin/env bash
# Issue 17's equal-memory table: streaming perplexity against the KV bytes actually held, for the full cache,
# LaCache, StreamingLLM, CAM (also quantized), KIVI quantization (--quant, both key orders), Quest's sparse reads (--read) and
# their compositions, on the embedded SmolLM2-135M, 1,500 scored tokens of the Paul Graham essays, CPU float32.
# Writes the markdown table and the plot (docs/equal_memory_smollm2.md, .png). Every run resumes; rerunning
# skips finished ones. Run with OMP_NUM_THREADS=1 next to other work (2 cores oversubscribed slow torch ~10x).
#   bash scripts/equal_memory.sh [--out DIR]      ~45 min on a 2-core CPU
source "$(dirname "$0")/lib.sh"
parse_common "$@"
dir=$OUT/equal_memory
run() { "$PY" ppl/run.py --model_name_or_path smollm2-135m --dataset_name pg-essays --num_eval_tokens 1500 \
        --device cpu --span 8 --overlap 4 --output_dir "$dir" "$@"; }
kivi4=(--quant kivi --quant_bits 4)
quest=(--read quest --quest_budget 256)
queue run --method full
queue run --method full "${kivi4[@]}"
queue run --method full "${quest[@]}"
queue run --method lacache --cache_size 256
queue run --method lacache --cache_size 1024
queue run --method lacache --cache_size 512 "${kivi4[@]}"
queue run --method lacache --cache_size 1024 "${kivi4[@]}"
queue run --method lacache --cache_size 1024 --quant kivi --quant_bits 2
queue run --method lacache --cache_size 1024 "${quest[@]}"
queue run --method lacache --cache_size 1024 "${kivi4[@]}" "${quest[@]}"
queue run --method full --read quest --quest_budget 512
queue run --method full "${kivi4[@]}" --quant_key_order post_rope
queue run --method full --quant kivi --quant_bits 2
queue run --method full --quant kivi --quant_bits 2 --quant_key_order post_rope
queue run --method streamingllm --cache_size 256
queue run --method cam --cache_size 256
queue run --method cam --cache_size 1024 "${kivi4[@]}"
queue run --method streamingllm --cache_size 1024 "${kivi4[@]}"
queue run --method full "${kivi4[@]}" --quant_key_order post_rope --quant_schedule reference
queue run --method full --quant kivi --quant_bits 2 --quant_key_order post_rope --quant_schedule reference
drain
"$PY" scripts/memory_frontier.py "$dir" --markdown docs/equal_memory_smollm2.md --plot docs/equal_memory_smollm2.png
finish "$dir"
