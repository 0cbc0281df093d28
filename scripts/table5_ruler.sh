#!/usr/bin/env bash
# Table 5: RULER's 13 tasks on LongChat-7b-v1.5-32k at 16K context, 100 samples per task, StreamingLLM and
# LaCache at 50% of the context (span 16, overlap 8: the paper's O = S/2 for synthetic tasks; the paper
# does not give RULER's ladder), plus the full cache. SQuAD and HotpotQA come from the hub (or
# --squad/--hotpotqa files given to ruler/prepare.py); without them qa_1/qa_2 are skipped.
#   bash scripts/table5_ruler.sh [--gpus N]   samples sharded over N GPUs with torchrun; ~6 GPU-hours per method
#   bash scripts/table5_ruler.sh --smoke      embedded SmolLM2-135M, 2K context, 2 samples per task (~20 min CPU)
source "$(dirname "$0")/lib.sh"
parse_common "$@"
if [ $SMOKE = 1 ]; then
    MODEL=smollm2-135m; LEN=2048; N=2
else
    MODEL=lmsys/longchat-7b-v1.5-32k; LEN=16384; N=100
fi
dir=$OUT/table5
"$PY" ruler/prepare.py --tokenizer "$MODEL" --max_length $LEN --num_samples $N --output_dir "$dir/data"
RUN=$(launcher)
$RUN ruler/pred.py --model_name_or_path "$MODEL" --data_dir "$dir/data/$LEN" --method full --output_dir "$dir/pred"
$RUN ruler/pred.py --model_name_or_path "$MODEL" --data_dir "$dir/data/$LEN" --method streamingllm,lacache \
    --budget 0.5 --span 16 --overlap 8 --output_dir "$dir/pred"
"$PY" ruler/eval.py --pred_dir "$dir"/pred/* --output_dir "$dir"
finish "$dir (tables: $dir/comparison.md and summary.md in each run folder)"
