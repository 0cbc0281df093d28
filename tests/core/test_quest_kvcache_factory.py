"""``Quest(rule="kvcache_factory")``: KVCache-Factory's Quest reads (Zefan-Cai/KVCache-Factory @ c97f9d7,
``pyramidkv/quest.py`` ``select_quest_tokens``), against a re-derivation of that function written out here."""
import math

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import METHODS, CompressedCache, ConfigError, Quest, build_policy, enable_position_shift
from lacache_core.quest import selected_tokens
from lacache_core.versions import with_cache
from references import QUEST_SETTINGS as SETTINGS, QUEST_TOKENS as TOKENS
from tiny import manual_next_logits, tiny_model

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                reason="cache objects need transformers >= 4.36")


def factory_tokens(query, keys, token_budget, page_size, recent_size):
    """``select_quest_tokens`` re-derived, one query head at a time (``query`` ``[d]``, ``keys`` ``[n, d]``): the
    recent window ``min(n, recent_size, budget)``; the prefix's pages, the last padded with its last key; each page
    scored ``sum_d q_d * (max_d if q_d >= 0 else min_d)``; the top ``ceil(spare / page)`` pages (+1 where the prefix
    ends in a partial page and not all are taken), expanded to slots, slots past the prefix set to the prefix's
    length, sorted, the first ``spare`` kept; then the window. Returns the set of slots read."""
    n = keys.shape[0]
    if token_budget >= n:
        return set(range(n))
    recent = min(n, recent_size, token_budget)
    prefix, spare = n - recent, token_budget - recent
    window = set(range(prefix, n))
    if spare == 0:
        return window
    page_budget = math.ceil(spare / page_size)
    pages = math.ceil(prefix / page_size)
    if prefix % page_size and page_budget < pages:
        page_budget += 1
    padded = torch.cat([keys[:prefix], keys[prefix - 1:prefix].expand(pages * page_size - prefix, -1)])
    by_page = padded.view(pages, page_size, -1)
    low, high = by_page.amin(1), by_page.amax(1)
    score = (query * torch.where(query >= 0, high, low)).sum(-1)
    top = score.topk(min(page_budget, pages)).indices.sort().values
    slots = (top[:, None] * page_size + torch.arange(page_size)).reshape(-1)
    slots = slots.masked_fill(slots >= prefix, prefix).sort().values[:spare]
    return set(slots.tolist()) | window


def ours(config, query, keys):
    """Our reads for one decode query: ``query`` ``[1, heads, 1, d]``, ``keys`` ``[1, kv_heads, n, d]``; per query
    head the set of slots read."""
    visible = torch.ones(1, 1, 1, keys.shape[2], dtype=torch.bool)
    chosen = selected_tokens(config, query, *config.bounds(keys), visible)
    return [set(torch.nonzero(chosen[0, h, 0]).view(-1).tolist()) for h in range(query.shape[1])]


def test_a_non_multiple_budget_reads_the_budget_by_hand():
    # 15 slots, page 4, budget 6, recent 1: slot 14 always; the prefix is slots 0-13 in pages 0-3 (page 3 = 12, 13).
    # spare = 5 needs ceil(5 / 4) = 2 pages, plus 1 as the prefix ends in a partial page: 3 pages. One channel,
    # query 1: a page scores its max key, pages 0..3 score 5, 9, 1, 7, so pages 1, 3, 0 are taken; their slots
    # 0-7, 12, 13 sorted and cut to the first 5 are 0-4 (page 1's best keys fall to the cut, as in the reference)
    keys = torch.tensor([5.0] * 4 + [9.0] * 4 + [1.0] * 4 + [7.0] * 2 + [0.0]).view(1, 1, 15, 1)
    query = torch.ones(1, 1, 1, 1)
    config = Quest(token_budget=6, page_size=4, dense_layers=0, rule="kvcache_factory", recent_size=1)
    assert ours(config, query, keys) == [{0, 1, 2, 3, 4, 14}]
    assert factory_tokens(query.view(1), keys[0, 0], 6, 4, 1) == {0, 1, 2, 3, 4, 14}
    # our default: max(3, 6 // 4) = 3 whole pages of all slots (page 3 = 12-14): 11 slots, not 6
    assert ours(Quest(token_budget=6, page_size=4, dense_layers=0), query, keys) == [set(range(8)) | {12, 13, 14}]
    # the reference's own test case (tests/test_quest.py there): budget 3, page 2, recent 1 reads slots 2, 3, 4
    keys = torch.tensor([[4.0, 0.0], [3.0, 1.0], [-1.0, 5.0], [0.0, 6.0], [9.0, 9.0]]).view(1, 1, 5, 2)
    query = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    config = Quest(token_budget=3, page_size=2, rule="kvcache_factory", recent_size=1)
    assert ours(config, query, keys) == [{2, 3, 4}]


CASES = [  # (slots, budget, page, recent): multiples and not, partial last prefix pages, budget >= slots, no prefix
    (40, 18, 4, 0), (40, 18, 4, 5), (41, 13, 4, 3), (37, 16, 8, 2), (50, 10, 16, 4), (33, 8, 4, 8), (33, 8, 4, 20),
    (20, 20, 4, 2), (20, 25, 4, 2), (64, 17, 16, 1), (23, 7, 3, 0), (100, 31, 7, 6), (9, 5, 1, 2)]


@pytest.mark.parametrize("n,budget,page,recent", CASES)
def test_reads_match_the_re_derived_reference_per_query_head(n, budget, page, recent):
    gen = torch.Generator().manual_seed(n * 1000 + budget * 10 + page)
    keys, query = torch.randn(1, 2, n, 8, generator=gen), torch.randn(1, 4, 1, 8, generator=gen)  # GQA, 2 per KV head
    config = Quest(token_budget=budget, page_size=page, dense_layers=0, rule="kvcache_factory", recent_size=recent)
    got = ours(config, query, keys)
    for h in range(4):
        expected = factory_tokens(query[0, h, 0], keys[0, h // 2], budget, page, recent)
        assert got[h] == expected
        assert len(expected) == min(n, budget)  # exactly the budget, whatever the page size


def test_the_rule_differs_from_the_default_where_the_budget_is_not_a_multiple_of_the_page():
    gen = torch.Generator().manual_seed(3)
    keys, query = torch.randn(1, 1, 64, 8, generator=gen), torch.randn(1, 1, 1, 8, generator=gen)
    default = ours(Quest(token_budget=18, page_size=4, dense_layers=0), query, keys)[0]
    factory = ours(Quest(token_budget=18, page_size=4, dense_layers=0, rule="kvcache_factory"), query, keys)[0]
    assert len(default) == 16 and len(factory) == 18  # 18 // 4 = 4 whole pages; the budget exactly
    recent = ours(Quest(token_budget=18, page_size=4, dense_layers=0, rule="kvcache_factory", recent_size=6),
                  query, keys)[0]
    assert set(range(58, 64)) <= recent and recent != factory


def factory_next_logits(model, token, kv, config):
    """A from-scratch decoder step where layers from ``config.dense_layers`` on read :func:`factory_tokens`."""
    def reads(layer, query, keys):
        n = keys.shape[2]
        out = torch.ones(*query.shape[:3], n, dtype=torch.bool)
        if layer < config.dense_layers:
            return out
        groups = query.shape[1] // keys.shape[1]
        for h in range(query.shape[1]):
            chosen = factory_tokens(query[0, h, 0], keys[0, h // groups], config.token_budget, config.page_size,
                                    config.recent_size)
            out[0, h, 0] = torch.isin(torch.arange(n), torch.tensor(sorted(chosen)))
        return out

    return manual_next_logits(model, token, kv, reads=reads)


@pytest.mark.parametrize("method", ["full", "streamingllm"])
def test_next_step_matches_a_from_scratch_step_reading_the_reference_tokens(method):
    model = enable_position_shift(tiny_model("llama", "eager"))
    config = Quest(token_budget=13, page_size=4, dense_layers=2, rule="kvcache_factory", recent_size=3)
    policy = build_policy(method, **{k: v for k, v in SETTINGS.items() if k in METHODS[method].hyperparameters()})
    cache = CompressedCache(policy, 6, key_rotation="every_step", read=config)  # un-rotated keys, to re-derive from
    with torch.no_grad():
        model(TOKENS[:, :60], use_cache=True, **with_cache(cache))
        for t in range(60, 70):
            model(TOKENS[:, t:t + 1], use_cache=True, **with_cache(cache))
        kv = [cache._layer(i) for i in range(6)]
        expected = factory_next_logits(model, int(TOKENS[0, 70]), kv, config)
        default = factory_next_logits(model, int(TOKENS[0, 70]), kv, Quest(10 ** 6, 1))  # every slot read
        got = model(TOKENS[:, 70:71], use_cache=True, **with_cache(cache)).logits[0, -1]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (expected - default).abs().max() > 1e-3  # the slots read change the answer: the test can tell


def test_a_padded_batch_row_reads_what_it_reads_alone():
    if Version(transformers.__version__) < Version("4.48"):
        pytest.skip("padded batches need the attention-interface path (transformers >= 4.48)")
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    read = Quest(token_budget=9, page_size=4, dense_layers=1, rule="kvcache_factory", recent_size=2)
    rows = [TOKENS[0, :n] for n in (40, 29)]
    ids, mask = torch.zeros(2, 40, dtype=torch.long), torch.zeros(2, 40, dtype=torch.long)
    for j, row in enumerate(rows):
        ids[j, 40 - len(row):], mask[j, 40 - len(row):] = row, 1

    def run(cache, prompt, attention_mask=None):
        return model.generate(prompt, attention_mask=attention_mask, **with_cache(cache), max_new_tokens=8,
                              min_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)

    batch = run(CompressedCache.for_rows([build_policy("full") for _ in rows], 6, read=read), ids, mask)
    for j, row in enumerate(rows):
        alone = run(CompressedCache(build_policy("full"), 6, read=read), row[None])
        torch.testing.assert_close(torch.stack([s[j] for s in batch.logits]), torch.stack([s[0] for s in alone.logits]),
                                   atol=1e-4, rtol=1e-4)


def test_bad_rule_settings_are_one_line_errors():
    for kwargs, message in [(dict(rule="mine"), "Quest.rule must be one of ['quest', 'kvcache_factory'], got 'mine'"),
                            (dict(rule="kvcache_factory", recent_size=-1), "Quest.recent_size must be >= 0, got -1"),
                            (dict(recent_size=4), "Quest.recent_size 4 needs Quest.rule kvcache_factory")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            Quest(**kwargs)


def test_flags_reach_the_setting_and_old_hashes_hold(tiny_dir, text_file, tmp_path, capsys):  # noqa: F811
    import json

    from ppl.run import main

    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
              "--num_eval_tokens", "40", "--method", "full", "--read", "quest", "--quest_budget", "8"]
    assert main(common + ["--output_dir", str(tmp_path / "default")]) == 0
    assert main(common + ["--output_dir", str(tmp_path / "factory"), "--quest_rule", "kvcache_factory",
                          "--quest_recent_size", "2"]) == 0
    default = json.loads((next((tmp_path / "default").iterdir()) / "run.json").read_text())
    factory_dir = next((tmp_path / "factory").iterdir())
    factory = json.loads((factory_dir / "run.json").read_text())
    # left out at their defaults: a run recorded before the option keeps its identity (and folder hash)
    assert default["setting"]["cache"]["read"] == {"method": "quest", "token_budget": 8, "page_size": 16,
                                                   "dense_layers": 2}
    assert factory["setting"]["cache"]["read"] == {"method": "quest", "token_budget": 8, "page_size": 16,
                                                   "dense_layers": 2, "rule": "kvcache_factory", "recent_size": 2}
    assert "_quest8_kvcf2" in factory_dir.name
    assert main(common + ["--output_dir", str(tmp_path / "bad"), "--quest_recent_size", "2"]) == 2
    assert main(["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
                 "--output_dir", str(tmp_path / "bad"), "--quest_rule", "kvcache_factory"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ["error: --quest_recent_size 2 needs --quest_rule kvcache_factory; --quest_rule quest has no "
                   "recent window",
                   "error: --quest_rule kvcache_factory needs --read quest; --read none does not use it"]
