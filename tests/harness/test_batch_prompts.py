"""The prompt harnesses' ``--batch_size N``: prompts of different lengths left-padded into one cache, each row
under its own budget (a fraction of its own prompt, sinks by its own length), stopping at its own stop token
or limit. Each row answers exactly what it answers alone, for every method."""
import json
from dataclasses import replace

import pytest
import torch
import transformers
from packaging.version import Version

from harness.generation import BudgetSpec, answer_all
from lacache_core import KIVI, METHODS, enable_position_shift
from runs import DATASETS, read, rows_of, run_longbench, run_niah, run_ruler
from tiny import method_files, result_dir, tiny_model

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.48"),
                                reason="padded batches need the attention-interface path (transformers >= 4.48)")
SETTINGS = dict(span=2, overlap=0, recent_window=4, window_size=4, beta=2, chunk_length=4, lag_size=8)
LENGTHS = [60, 45, 52, 38]


class IdTokenizer:
    pad_token_id, eos_token_id, chat_template = None, 0, None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def encode(self, text, add_special_tokens=False):  # KVzip's repeat requests: a token per character
        return [ord(c) % 127 + 1 for c in text]


def prompts():
    g = torch.Generator().manual_seed(11)
    # no token twice in a prompt: a repeated token's equal keys tie in KNorm, and rounding breaks ties either way
    return [(torch.randperm(127, generator=g)[:n][None] + 1, limit) for n, limit in zip(LENGTHS, [20, 12, 20, 16])]


def spec_for(method, model):
    settings = dict(SETTINGS, **method_files(model.config))
    settings = {k: v for k, v in settings.items() if k in METHODS[method].hyperparameters()}
    # a budget of half of each prompt; LaCache and StreamingLLM size their sinks by its length (LongBench rule)
    return lambda n: BudgetSpec(method, cache_size=n // 2, settings=settings) if method != "full" else BudgetSpec()


METHOD_NAMES = sorted(METHODS)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_each_prompt_of_a_batch_is_answered_as_alone(method):
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    requests, spec = prompts(), spec_for(method, model)
    alone = dict(answer_all(model, IdTokenizer(), requests, spec, batch_size=1))
    # a stop token that ends the first prompt's answer early, and no other's before its limit
    stop = [alone[0].token_ids[4]]
    alone = dict(answer_all(model, IdTokenizer(), requests, spec, batch_size=1, stop_ids=stop))
    assert len(alone[0].token_ids) <= 4 and max(len(a.token_ids) for a in alone.values()) > 4
    batched = dict(answer_all(model, IdTokenizer(), requests, spec, batch_size=3, stop_ids=stop, longest_first=True))
    assert sorted(batched) == [0, 1, 2, 3]
    for i, (ids, _) in enumerate(requests):
        assert batched[i].token_ids == alone[i].token_ids, f"prompt {i}"
        assert batched[i].prompt_tokens == ids.shape[1]
    # longest first: 60, 52, 45 together, then 38 alone
    assert [batched[i].batch_rows for i in range(4)] == [3, 3, 3, 1]


@pytest.mark.parametrize("method", ["snapkv", "h2o", "streamingllm"])
def test_each_prompt_of_a_merging_batch_is_answered_as_alone(method):
    # --merge rewrites each row's kept keys and values from its own evicted ones only
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    requests = prompts()
    spec = lambda n: BudgetSpec(method, cache_size=n // 2, settings={"window_size": 4, "merge": "pivot"})  # noqa: E731
    plain = lambda n: BudgetSpec(method, cache_size=n // 2, settings={"window_size": 4})  # noqa: E731
    alone = dict(answer_all(model, IdTokenizer(), requests, spec, batch_size=1))
    batched = dict(answer_all(model, IdTokenizer(), requests, spec, batch_size=3, longest_first=True))
    assert all(batched[i].token_ids == alone[i].token_ids for i in range(4))
    unmerged = dict(answer_all(model, IdTokenizer(), requests, plain, batch_size=1))
    assert any(unmerged[i].token_ids != alone[i].token_ids for i in range(4))  # the merge changed answers


QUANTIZED = [(m, "pre_rope") for m in METHOD_NAMES if not METHODS[m].prunes_channels] + \
    [(m, "post_rope") for m in METHOD_NAMES if METHODS[m].default_positions == "original"]


@pytest.mark.parametrize("method, order", QUANTIZED)
def test_each_prompt_of_a_quantized_batch_is_answered_as_alone(method, order):
    # each row holds its own tokens in a quantized store of its own: its blocks, residual and evictions are those it
    # has alone; keys stored before RoPE are rotated to each row's own positions (slots, or original positions)
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    quant = KIVI(bits=4, group=8, residual=16, key_order=order)
    spec = spec_for(method, model)
    quantized = lambda n: replace(spec(n), settings={**(spec(n).settings or {}), "quant": quant})  # noqa: E731
    requests = prompts()
    alone = dict(answer_all(model, IdTokenizer(), requests, quantized, batch_size=1))
    batched = dict(answer_all(model, IdTokenizer(), requests, quantized, batch_size=3, longest_first=True))
    plain = dict(answer_all(model, IdTokenizer(), requests, spec, batch_size=1))
    for i in range(4):
        assert batched[i].token_ids == alone[i].token_ids, f"prompt {i}"
        assert alone[i].final_kv_bytes < plain[i].final_kv_bytes  # held quantized
    assert [batched[i].batch_rows for i in range(4)] == [3, 3, 3, 1]


@pytest.mark.parametrize("method", ["h2o", "snapkv", "adakv"])
def test_keys_rotated_at_every_step_batch_as_alone(method):
    # un-rotated keys at original positions: each row's rotated to its own (its tokens after its padding)
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    spec = spec_for(method, model)
    every = lambda n: replace(spec(n), settings={**spec(n).settings, "key_rotation": "every_step"})  # noqa: E731
    alone = dict(answer_all(model, IdTokenizer(), prompts(), every, batch_size=1))
    batched = dict(answer_all(model, IdTokenizer(), prompts(), every, batch_size=3, longest_first=True))
    assert all(batched[i].token_ids == alone[i].token_ids for i in range(4))


def test_longbench_quantized_batch_gives_the_batch_1_records(tiny_dir, data_dir, tmp_path):  # noqa: F811
    quant = ("--quant", "kivi", "--quant_bits", "4", "--quant_group", "8", "--quant_residual", "16")
    for flags in (("--method", "lacache", *quant), ("--method", "h2o", *quant),
                  ("--method", "snapkv", *quant, "--quant_key_order", "post_rope")):
        assert run_longbench(tiny_dir, data_dir, tmp_path / "one", *flags, "--budget", "0.25") == 0
        assert run_longbench(tiny_dir, data_dir, tmp_path / "three", *flags, "--budget", "0.25", "--batch_size", "3") == 0
    for one in sorted((tmp_path / "one" / "pred").iterdir()):
        three = result_dir(tmp_path / "three" / "pred", one.name.rsplit("-", 1)[0] + "_bs3")
        for dataset in DATASETS:
            a, b = read(one / f"{dataset}.jsonl"), read(three / f"{dataset}.jsonl")
            assert [(r["_id"], r["pred"]) for r in a] == [(r["_id"], r["pred"]) for r in b]


def test_min_new_tokens_holds_back_the_stop_token_in_every_row():
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    requests, spec = prompts()[:2], spec_for("lacache", model)
    free = dict(answer_all(model, IdTokenizer(), requests, spec))
    stop = [free[0].token_ids[0], free[1].token_ids[0]]  # each row's first choice
    held = dict(answer_all(model, IdTokenizer(), requests, spec, batch_size=2, stop_ids=stop, min_new_tokens=1))
    alone = dict(answer_all(model, IdTokenizer(), requests, spec, stop_ids=stop, min_new_tokens=1))
    assert all(held[i].token_ids == alone[i].token_ids and held[i].token_ids for i in (0, 1))


def test_longbench_batch_gives_the_batch_1_records_in_sample_order(tiny_dir, data_dir, tmp_path):  # noqa: F811
    flags = ("--method", "full,lacache,snapkv", "--budget", "0.25")
    assert run_longbench(tiny_dir, data_dir, tmp_path / "one", *flags) == 0
    assert run_longbench(tiny_dir, data_dir, tmp_path / "three", *flags, "--batch_size", "3") == 0
    for name in ("tiny__full", "tiny__lacache_b0.25_S2_O0", "tiny__snapkv_b0.25"):
        one = result_dir(tmp_path / "one" / "pred", name)
        three = result_dir(tmp_path / "three" / "pred", name + "_bs3")
        assert json.loads((three / "run.json").read_text())["setting"]["cache"]["batch_size"] == 3
        for dataset in DATASETS:
            a, b = read(one / f"{dataset}.jsonl"), read(three / f"{dataset}.jsonl")
            assert [(r["_id"], r["pred"], r["prompt_tokens"]) for r in a] == \
                [(r["_id"], r["pred"], r["prompt_tokens"]) for r in b]
            assert {r["batch_rows"] for r in b} == {3} and {r["batch_rows"] for r in a} == {1}


def test_ruler_and_niah_batches_give_the_batch_1_results(tiny_dir, ruler_data, tmp_path):  # noqa: F811
    for flags in (("--method", "lacache"), ("--method", "h2o")):
        assert run_ruler(tiny_dir, ruler_data, tmp_path / "r1", *flags, "--budget", "0.5") == 0
        assert run_ruler(tiny_dir, ruler_data, tmp_path / "r2", *flags, "--budget", "0.5", "--batch_size", "2") == 0
        assert run_niah(tiny_dir, tmp_path / "n1", *flags) == 0
        assert run_niah(tiny_dir, tmp_path / "n4", *flags, "--batch_size", "4") == 0
    for one, two in zip(sorted(p for p in (tmp_path / "r1").iterdir()), sorted(p for p in (tmp_path / "r2").iterdir())):
        assert two.name.startswith(one.name.rsplit("-", 1)[0] + "_bs2")
        for task in ("niah_single_1", "vt"):
            a, b = read(one / f"{task}.jsonl"), read(two / f"{task}.jsonl")
            assert [(r["index"], r["pred"], r["cache_size"]) for r in a] == \
                [(r["index"], r["pred"], r["cache_size"]) for r in b]
    for one, four in zip(sorted((tmp_path / "n1").iterdir()), sorted((tmp_path / "n4").iterdir())):
        assert "_bs4" in four.name
        a, b = rows_of(one / "results.csv"), rows_of(four / "results.csv")
        assert len(a) == 12 and a == b


@pytest.mark.parametrize("extra,message", [
    (("--batch_size", "0"), "--batch_size must be >= 1, got 0"),
    (("--batch_size", "2", "--prefill_chunk_size", "16"), "--prefill_chunk_size cannot be used with --batch_size 2"),
])
def test_bad_batch_flags_are_one_line_errors(tiny_dir, tmp_path, capsys, extra, message):
    assert run_niah(tiny_dir, tmp_path, *extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note: --span is ignored")]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
