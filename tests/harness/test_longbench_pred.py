"""longbench/pred.py end to end on a tiny local model: outputs, budgets, resume, chat wrappers, errors."""
import json

import pytest

from lacache_core.versions import HAS_CACHE_CLASSES
from runs import DATASETS, read
from runs import run_longbench as run
from tiny import killed_after, result_dir, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not HAS_CACHE_CLASSES, reason="prompt harnesses need transformers >= 4.36")

# one dataset per metric family: qa_f1, rouge, classification, count, retrieval, code_sim
def test_predictions_for_each_method_and_budget(tiny_dir, data_dir, tmp_path):
    assert run(tiny_dir, data_dir, tmp_path, "--method", "full,streamingllm,lacache", "--budget", "0.25") == 0
    folders = [result_dir(tmp_path / "pred", name)
               for name in ("tiny__full", "tiny__lacache_b0.25_S2_O0", "tiny__streamingllm_b0.25")]
    assert len(list((tmp_path / "pred").iterdir())) == 3
    for folder in folders:
        meta = json.loads((folder / "run.json").read_text())
        assert meta["max_length"] == 200 and "transformers" in meta["versions"]
        for name in DATASETS:
            rows = read(folder / f"{name}.jsonl")
            assert [r["_id"] for r in rows] == [f"{name}-{i}" for i in range(3)]
            assert all({"pred", "answers", "all_classes", "length"} <= set(r) for r in rows)
            assert all(r["prompt_tokens"] <= 200 + 60 for r in rows)  # truncated prompt + prompt format
    lacache = json.loads((result_dir(tmp_path / "pred", "tiny__lacache_b0.25_S2_O0") / "run.json").read_text())
    assert lacache["cache_size"] == 50 and lacache["budget"] == 0.25
    full = read(result_dir(tmp_path / "pred", "tiny__full") / "hotpotqa.jsonl")
    small = read(result_dir(tmp_path / "pred", "tiny__lacache_b0.25_S2_O0") / "hotpotqa.jsonl")
    assert all(f["peak_kv_bytes"] > s["peak_kv_bytes"] > 0 for f, s in zip(full, small) if f["prompt_tokens"] > 60)
    # and the folders score with longbench/eval.py: every dataset, one metric family each
    pytest.importorskip("rouge")
    from longbench.eval import main as evaluate
    assert evaluate(["--path", *map(str, folders), "--output_dir", str(tmp_path)]) == 0
    for folder in folders:
        result = json.loads((folder / "result.json").read_text())
        assert set(result) == set(DATASETS) | {"average"}
        assert all(0 <= v <= 100 for v in result.values())
    assert (tmp_path / "comparison.md").exists()


def test_interrupted_run_resumes_without_loss_or_duplicates(tiny_dir, data_dir, tmp_path, monkeypatch):
    import longbench.pred as pred

    assert run(tiny_dir, data_dir, tmp_path / "clean", "--method", "lacache", "--budget", "0.25") == 0
    real = pred.answer_all
    monkeypatch.setattr(pred, "answer_all", killed_after(real, 7))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, data_dir, tmp_path / "cut", "--method", "lacache", "--budget", "0.25")
    monkeypatch.setattr(pred, "answer_all", real)
    folder = result_dir(tmp_path / "cut" / "pred", "tiny__lacache_b0.25_S2_O0")
    assert sum(len(read(p)) for p in folder.glob("*.jsonl")) == 7
    with open(folder / "trec.jsonl", "a") as f:
        f.write('{"_id": "trec-1", "pred')  # and a line cut short by the kill
    assert run(tiny_dir, data_dir, tmp_path / "cut", "--method", "lacache", "--budget", "0.25") == 0
    clean = result_dir(tmp_path / "clean" / "pred", "tiny__lacache_b0.25_S2_O0")
    for name in DATASETS:
        a, b = read(clean / f"{name}.jsonl"), read(folder / f"{name}.jsonl")
        assert [(r["_id"], r["pred"]) for r in a] == [(r["_id"], r["pred"]) for r in b]


def test_data_parallel_shards_merge_to_the_single_process_result(tiny_dir, data_dir, tmp_path, monkeypatch):
    import harness.records as records
    import harness.runner as runner

    assert run(tiny_dir, data_dir, tmp_path / "one", "--method", "streamingllm", "--budget", "0.25",
               "--datasets", "hotpotqa") == 0
    # two ranks run one after the other (rank 0 last, so that its barrier means "all done"): each writes
    # its shard, rank 0 merges them
    monkeypatch.setattr(records, "barrier", lambda: True)
    for rank in (1, 0):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setattr(runner, "init_distributed", lambda: (rank, 2))
        assert run(tiny_dir, data_dir, tmp_path / "two", "--method", "streamingllm", "--budget", "0.25",
                   "--datasets", "hotpotqa") == 0
        folder = result_dir(tmp_path / "two" / "pred", "tiny__streamingllm_b0.25")
        if rank == 1:
            assert [r["_id"] for r in read(folder / "hotpotqa.rank1-of-2.jsonl")] == ["hotpotqa-1"]
    assert not list(folder.glob("*.rank*"))
    one = read(result_dir(tmp_path / "one" / "pred", "tiny__streamingllm_b0.25") / "hotpotqa.jsonl")
    two = read(result_dir(tmp_path / "two" / "pred", "tiny__streamingllm_b0.25") / "hotpotqa.jsonl")
    assert [(r["_id"], r["pred"]) for r in one] == [(r["_id"], r["pred"]) for r in two]


def test_chat_wrappers():
    from longbench.pred import encode, longbench_wrapper

    assert longbench_wrapper("llama2-7b-chat-4k") == ("[INST]", "[/INST]")
    # the LaCache repository passes the weights' path, which has no "llama2": no wrapper
    assert longbench_wrapper("meta-llama/Llama-2-7b-chat-hf") is None
    assert longbench_wrapper("lmsys/longchat-7b-v1.5-32k")[1] == " ASSISTANT:"
    template = "{% for m in messages %}w7 {{ m['content'] }} w8{% endfor %}{% if add_generation_prompt %} w9{% endif %}"
    tok = tiny_tokenizer(chat_template=template)

    class Args:
        max_length, chat_template, model, weights = 100, "auto", "tiny", "tiny"

    ids = encode(tok, "w1 w2", "hotpotqa", Args)[0].tolist()
    assert ids == tok("w7 w1 w2 w8 w9").input_ids
    assert encode(tok, "w1 w2", "trec", Args)[0].tolist() == tok("w1 w2").input_ids  # few-shot: never wrapped
    Args.chat_template = "none"
    assert encode(tok, "w1 w2", "hotpotqa", Args)[0].tolist() == tok("w1 w2").input_ids


@pytest.mark.parametrize("flags, message", [
    (["--budget", "1.5"], "--budget must be in (0, 1]"),
    (["--datasets", "hotpotqa,nope"], "--datasets must be a comma list"),
    (["--method", "lacache", "--span", "9"], "--span"),
    (["--method", "lacache", "--budget", "0.01"], "cache_size"),
    (["--prefill_chunk_size", "0"], "--prefill_chunk_size must be >= 1"),
])
def test_bad_flags_give_one_line_errors(tiny_dir, data_dir, tmp_path, capsys, flags, message):
    assert run(tiny_dir, data_dir, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading bar
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_offline_without_data_says_how_to_provide_it(tiny_dir, tmp_path, capsys, monkeypatch):
    from longbench.pred import main

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'THUDM/LongBench' on the Hub (LocalEntryNotFoundError)")

    try:
        import datasets
        monkeypatch.setattr(datasets, "load_dataset", unreachable)  # what an offline machine sees, without the wait
    except ImportError:
        pass  # without the datasets package the hub route fails with the same message
    rc = main(["--model", "tiny", "--model_name_or_path", str(tiny_dir), "--max_length", "200", "--device", "cpu",
               "--datasets", "hotpotqa", "--method", "full", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and "--data_dir" in last


def test_prefill_chunk_size_bounds_peak_kv(tiny_dir, data_dir, tmp_path):
    assert run(tiny_dir, data_dir, tmp_path, "--method", "lacache", "--budget", "0.25", "--datasets", "gov_report",
               "--prefill_chunk_size", "16") == 0
    rows = read(result_dir(tmp_path / "pred", "tiny__lacache_b0.25_S2_O0_chunk16") / "gov_report.jsonl")
    model = tiny_model("llama", "sdpa", layers=4)
    per_token = 2 * 4 * model.config.num_key_value_heads * 16 * 4  # k+v, layers, kv heads, head_dim, fp32
    assert all(r["peak_kv_bytes"] <= (50 + 16) * per_token for r in rows)
    assert any(r["prompt_tokens"] > 66 for r in rows)  # prompts longer than what the cache ever held


def test_longbench_e_reads_the_e_files_and_scores_by_length_bucket(tiny_dir, data_dir, tmp_path):
    assert run(tiny_dir, data_dir, tmp_path, "--e", "--datasets", "hotpotqa", "--method", "full") == 0
    folder = result_dir(tmp_path / "pred_e", "tiny__full")
    assert [r["_id"] for r in read(folder / "hotpotqa.jsonl")] == ["hotpotqa-0", "hotpotqa-1"]
    from longbench.eval import main as evaluate
    assert evaluate(["--path", str(folder), "--e"]) == 0
    assert set(json.loads((folder / "result.json").read_text())["hotpotqa"]) == {"0-4k", "4-8k", "8k+"}
