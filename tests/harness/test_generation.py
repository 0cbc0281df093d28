"""harness.generation: budgets, greedy answers under every kind of cache, chunked prefill."""
import dataclasses

import pytest
import torch

from lacache_core import METHODS, ConfigError, enable_position_shift, make_cache
from lacache_core.versions import with_cache
from lacache_core.cache import kv_bytes
from harness.generation import (BudgetSpec, answer, budget_cache_size, greedy_answer, official_start_size,
                                     stop_token_ids, truncate_middle)
from lacache_core.versions import HAS_CACHE_CLASSES
from tiny import method_files, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not HAS_CACHE_CLASSES, reason="prompt harnesses need transformers >= 4.36")

PROMPT = torch.randint(1, 120, (1, 150), generator=torch.Generator().manual_seed(5))


def test_official_start_size_rule():
    # min(128, max(1, T - (L + 1)), C - (L + 1)), from the spec
    assert official_start_size(3500, 1750, 32) == 128
    assert official_start_size(50, 1750, 32) == 17       # short prompt: T - 33
    assert official_start_size(10, 1750, 32) == 1        # max(1, ...)
    assert official_start_size(3500, 40, 32) == 7        # small cache: C - 33
    assert budget_cache_size(0.5, 3500) == 1750 and budget_cache_size(0.25, 3500) == 875
    with pytest.raises(ConfigError, match="--budget"):
        budget_cache_size(1.5, 100)


def test_full_answer_equals_transformers_generate():
    model = tiny_model("llama", "eager")
    ref = model.generate(PROMPT, max_new_tokens=25, do_sample=False, min_new_tokens=25)[0, PROMPT.shape[1]:]
    enable_position_shift(model)
    ids = greedy_answer(model, PROMPT, BudgetSpec("full").make(model, PROMPT.shape[1]), 25)
    assert ids == ref.tolist()


@pytest.mark.parametrize("method", ["lacache", "streamingllm", "h2o", "tova"])
def test_compressed_answer_equals_generate_with_the_same_cache(method):
    """Two independent drivers (our loop, transformers' generate) agree once the cache compacts."""
    model = tiny_model("llama", "sdpa")
    enable_position_shift(model)
    settings = dict(cache_size=48, start_size=4, span=2, overlap=0)
    cache = make_cache(method, model, **settings)
    ref = model.generate(PROMPT, **with_cache(cache), max_new_tokens=30, do_sample=False, min_new_tokens=30)
    spec = BudgetSpec(method, 48, 4, settings={"span": 2, "overlap": 0})
    ours = greedy_answer(model, PROMPT, spec.make(model, PROMPT.shape[1]), 30)
    assert ours == ref[0, PROMPT.shape[1]:].tolist()


def test_prefill_is_full_attention_then_compaction():
    """The first answer token comes from full-attention prefill logits, whatever the budget."""
    model = tiny_model("llama", "eager")
    enable_position_shift(model)
    full = greedy_answer(model, PROMPT, BudgetSpec("full").make(model, 150), 1)
    cache = BudgetSpec("lacache", 40, None, settings={"span": 2}).make(model, 150)
    small = greedy_answer(model, PROMPT, cache, 1)
    assert small == full
    assert cache.get_seq_length() <= cache.policy.max_cache_len(model.config.num_hidden_layers)
    assert cache.policy.start_size == official_start_size(150, 40, 6) == 33


def test_chunked_prefill_is_exact_for_full_cache_and_bounds_memory_for_lacache():
    model = tiny_model("llama", "eager")
    enable_position_shift(model)
    whole = greedy_answer(model, PROMPT, BudgetSpec("full").make(model, 150), 20)
    chunked = greedy_answer(model, PROMPT, BudgetSpec("full").make(model, 150), 20, prefill_chunk_size=16)
    assert chunked == whole

    spec = BudgetSpec("lacache", 40, 4, settings={"span": 2})
    one_shot, chunked = spec.make(model, 150), spec.make(model, 150)
    greedy_answer(model, PROMPT, one_shot, 1)
    greedy_answer(model, PROMPT, chunked, 1, prefill_chunk_size=16)
    per_slot = kv_bytes(chunked) // chunked.get_seq_length()
    assert one_shot.peak_bytes == 150 * per_slot            # the whole prompt was held once
    assert chunked.peak_bytes <= (40 + 16) * per_slot        # never more than budget + one chunk
    # same kept layout once compacted: every layer holds the same number of slots, at most the budget
    assert chunked.get_seq_length() <= 40 and chunked.kept_positions()[:, -1].eq(149).all()


def test_chunked_prefill_rejected_for_prefill_time_methods():
    model = tiny_model("llama", "eager")
    enable_position_shift(model)
    spec = BudgetSpec("snapkv", 64, 4, settings={"window_size": 8})
    with pytest.raises(ConfigError, match="prefill.chunk_size"):
        greedy_answer(model, PROMPT, spec.make(model, 150), 5, prefill_chunk_size=32)


def test_stop_tokens_and_min_new_tokens():
    model = tiny_model("llama", "eager")
    enable_position_shift(model)
    tok = tiny_tokenizer()
    free = greedy_answer(model, PROMPT, BudgetSpec("full").make(model, 150), 10)
    stop = stop_token_ids(tok, model, extra=["\n"])
    assert {122, 123} <= set(stop)
    # a stop token that is chosen ends the answer at once; one that never comes changes nothing
    assert greedy_answer(model, PROMPT, BudgetSpec("full").make(model, 150), 10, stop_ids=[free[0]]) == []
    unused = next(t for t in range(128) if t not in free)
    assert greedy_answer(model, PROMPT, BudgetSpec("full").make(model, 150), 10, stop_ids=[unused]) == free
    # a stop token is never the first answer token when min_new_tokens=1
    first = greedy_answer(model, PROMPT, BudgetSpec("full").make(model, 150), 3, stop_ids=[free[0]],
                          min_new_tokens=1)
    assert first and first[0] != free[0]


def test_answer_decodes_and_reports():
    model = tiny_model("llama", "eager")
    enable_position_shift(model)
    tok = tiny_tokenizer()
    res = answer(model, tok, PROMPT, BudgetSpec("lacache", 40, 4, settings={"span": 2}), 5)
    assert res.prompt_tokens == 150 and len(res.token_ids) <= 5
    assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)
    assert res.peak_kv_bytes > 0


def test_truncate_middle_keeps_both_ends():
    tok = tiny_tokenizer()
    text = " ".join(f"w{i}" for i in range(100))
    assert truncate_middle(tok, text, 200) == text
    # LongBench joins the two decoded halves without a separator
    assert truncate_middle(tok, text, 10) == "w0 w1 w2 w3 w4" + "w95 w96 w97 w98 w99"


def test_bad_budget_settings_are_one_line_errors():
    model = tiny_model("llama", "eager")
    with pytest.raises(ConfigError, match="--method"):
        BudgetSpec("nope", 10)
    with pytest.raises(ConfigError, match="budget"):
        BudgetSpec("lacache", None)
    with pytest.raises(ConfigError, match="cache_size 8"):
        BudgetSpec("lacache", 8, 4, settings={"span": 2}).make(model, 100)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m not in ("full", "minicache", "duo_attention")))  # no budget
def test_every_method_gets_the_same_budget_and_its_reference_sinks(method):
    """The budget reaches every policy (StreamingLLM has no cache_size field: its window is derived); the
    LongBench sink rule reaches the methods of the LaCache harness, the others keep their own default,
    and a given --start_size reaches every one."""
    model = tiny_model("llama", "eager")
    settings = {"span": 2, "window_size": 8, **method_files(model.config)}
    cache = BudgetSpec(method, 200, None, settings=settings).make(model, 300)
    assert cache.policy.cache_size == 200
    default = {f.name: f.default for f in dataclasses.fields(METHODS[method])}["start_size"]
    rule = official_start_size(300, 200, 6) == 128
    assert cache.policy.start_size == (128 if method in ("lacache", "streamingllm") else default) and rule
    assert BudgetSpec(method, 200, 6, settings=settings).make(model, 300).policy.start_size == 6
    with pytest.raises(ConfigError, match="build_policy.cache_size 4 must exceed StreamingLLM.start_size 4"):
        make_cache("streamingllm", model, cache_size=4, start_size=4)


def test_llama3_style_models_stop_on_both_end_tokens():
    model = tiny_model("llama", "eager")
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    model.generation_config.eos_token_id = [122, 100]  # Llama-3-Instruct lists <|end_of_text|> and <|eot_id|>
    stop = stop_token_ids(tok, model)
    assert {122, 100, eot} <= set(stop)


@pytest.mark.parametrize("method", ["snapkv", "adakv"])
def test_answers_record_the_kv_bytes_they_end_with(method):
    """Per-head storage is counted as stored: AdaKV ends with SnapKV's total (the same per-layer budget, up to
    rounding), both far below the prompt's full cache they peaked at."""
    model = enable_position_shift(tiny_model("llama", "eager"))
    res = answer(model, tiny_tokenizer(), PROMPT, BudgetSpec(method, 40, None, settings={"window_size": 8}), 3)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    slot_bytes = 2 * 4 * d * cfg.num_key_value_heads * cfg.num_hidden_layers  # k and v, float32, all heads
    assert res.peak_kv_bytes == 150 * slot_bytes
    assert abs(res.final_kv_bytes - (40 + 2) * slot_bytes) <= 2 * 4 * d * cfg.num_hidden_layers * cfg.num_key_value_heads
