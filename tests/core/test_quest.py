"""Quest (lacache_core/quest.py): page choice on keys built so that the right pages are known, the reference's
rule re-derived here in its own form (sign trick, page max, top pages of a padded score row), and the next
step of a cache read through Quest against a from-scratch decoder step that applies that rule."""
import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import METHODS, CompressedCache, ConfigError, Quest, build_policy, enable_position_shift
from lacache_core.quest import page_bounds, page_scores, selected_tokens
from lacache_core.readers import build_reader
from lacache_core.versions import with_cache
from references import QUEST_SETTINGS as SETTINGS, QUEST_TOKENS as TOKENS
from tiny import fill_and_generate, method_files, manual_next_logits, ppl_killed_then_resumed, tiny_model

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                reason="cache objects need transformers >= 4.36")


def test_pages_and_their_bounds_by_hand():
    # one KV head, d = 2, pages of 2 slots; query (1, -1): bound = max(high_0, low_0) . q_0 + max(-high_1, -low_1)
    keys = torch.tensor([[0., 0.], [1., 0.],      # page 0: high (1, 0), low (0, 0)   -> 1 + 0  = 1
                         [3., 1.], [0., 2.],      # page 1: high (3, 2), low (0, 1)   -> 3 - 1  = 2
                         [-1., -5.], [2., -1.],   # page 2: high (2, -1), low (-1, -5) -> 2 + 5 = 7
                         [0., 0.], [0., 0.],      # page 3: 0
                         [4., 5.]])[None, None]   # page 4, partial: high = low = (4, 5) -> 4 - 5 = -1
    low, high = page_bounds(keys, 2)
    assert torch.equal(high[0, 0, 2], torch.tensor([2., -1.])) and torch.equal(low[0, 0, 4], torch.tensor([4., 5.]))
    query = torch.tensor([1., -1.])[None, None, None]
    assert page_scores(query, low, high)[0, 0, 0].tolist() == [1., 2., 7., 0., -1.]
    config = Quest(token_budget=4, page_size=2)  # max(3, 4 // 2) = 3 pages: 2, 1 and 0
    every = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    chosen = selected_tokens(config, query, low, high, every)[0, 0, 0]
    assert chosen.tolist() == [True] * 6 + [False] * 3
    # a page the mask hides entirely is never worth reading: pages 1, 0 and 3 instead
    hide_page_2 = every.clone()
    hide_page_2[..., 4:6] = False
    chosen = selected_tokens(config, query, low, high, hide_page_2)[0, 0, 0]
    assert chosen.tolist() == [True] * 4 + [False, False] + [True, True, False]


def test_pages_read_follow_the_reference_budget_rule():
    config = Quest(token_budget=1024, page_size=16)
    assert config.pages_read(100) == 6      # min(100, 1024) // 16 = 6 of 7 pages: a short cache is still read sparsely
    assert config.pages_read(20) == 2       # at least 3, but only 2 pages exist
    assert config.pages_read(5000) == 64    # 1024 // 16
    assert Quest(token_budget=8, page_size=16).pages_read(200) == 3


def test_the_bound_is_an_upper_bound_and_tight_for_one_token_pages():
    g = torch.Generator().manual_seed(0)
    keys, query = torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 6, 1, 8, generator=g)
    low, high = page_bounds(keys, 7)
    bounds = page_scores(query, low, high)  # [2, 6, 1, 8 pages]
    exact = query @ keys.repeat_interleave(2, 1).transpose(2, 3)  # [2, 6, 1, 50]
    page_max = torch.nn.functional.pad(exact, (0, 6), value=-1e9).view(2, 6, 1, 8, 7).amax(-1)
    assert bool((bounds >= page_max - 1e-5).all())
    one = page_bounds(keys, 1)
    torch.testing.assert_close(page_scores(query, *one), exact)


def reference_choice(query, keys, config, n):
    """The reference's selection (evaluation/quest_attention.py), re-derived in its own form: keys repeated to the
    query heads, ``k * sign(q)`` maximised over each page (padding at the dtype's min), ``|q|`` against it, and the
    top ``min(max(3, min(n, budget) // page), pages)`` pages of that score row."""
    groups = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, 1)
    sign = torch.where(query > 0, 1.0, -1.0)
    page = config.page_size
    pad = page - ((n - 1) % page + 1)
    signed = torch.cat([keys * sign, torch.full((*keys.shape[:2], pad, keys.shape[-1]), torch.finfo(keys.dtype).min)], 2)
    page_max = signed.view(*keys.shape[:2], -1, page, keys.shape[-1]).amax(3)  # [1, heads, pages, d]
    score = (query * sign) @ page_max.transpose(2, 3)  # [1, heads, 1, pages]
    budget = min(n, config.token_budget)
    top = score.topk(min(max(3, budget // page), score.shape[-1]), -1).indices
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
    return chosen.repeat_interleave(page, -1)[..., :n]


def quest_next_logits(model, token, kv_unrotated, config, key_positions=None, query_pos=None):
    """A from-scratch decoder step (``tiny.manual_next_logits``) under Quest: layers from ``config.dense_layers`` on
    let each query head attend only to :func:`reference_choice`'s tokens."""
    def reads(layer, query, keys):
        if layer < config.dense_layers:
            return torch.ones(*query.shape[:3], keys.shape[2], dtype=torch.bool)
        return reference_choice(query, keys, config, keys.shape[2])

    return manual_next_logits(model, token, kv_unrotated, query_pos=query_pos, key_positions=key_positions, reads=reads)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["full", "lacache", "streamingllm", "h2o"])
def test_next_step_matches_a_from_scratch_step_reading_the_reference_pages(method, attn):
    model = enable_position_shift(tiny_model("llama", attn))
    config = Quest(token_budget=12, page_size=4, dense_layers=2)
    policy = build_policy(method, **{k: v for k, v in SETTINGS.items() if k in METHODS[method].hyperparameters()})
    cache = CompressedCache(policy, 6, key_rotation="every_step", read=config)  # un-rotated keys, to re-derive from
    with torch.no_grad():
        model(TOKENS[:, :60], use_cache=True, **with_cache(cache))
        for t in range(60, 100):
            model(TOKENS[:, t:t + 1], use_cache=True, **with_cache(cache))
        kv = [cache._layer(i) for i in range(6)]
        original = policy.position_mode == "original"
        expected = quest_next_logits(model, int(TOKENS[0, 100]), kv, config,
                                     key_positions=cache.kept_positions() if original else None,
                                     query_pos=100 if original else None)
        dense = quest_next_logits(model, int(TOKENS[0, 100]), kv, Quest(10 ** 6, 1))  # every slot read
        got = model(TOKENS[:, 100:101], use_cache=True, **with_cache(cache)).logits[0, -1]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    if original:
        return
    assert (expected - dense).abs().max() > 1e-3  # the pages chosen change the answer: the test can tell


def test_read_bytes_count_the_pages_read_and_the_metadata_held():
    model = enable_position_shift(tiny_model("llama", "eager"))
    config = Quest(token_budget=16, page_size=8, dense_layers=2)
    plain = CompressedCache(build_policy("full"), 6)
    cache = CompressedCache(build_policy("full"), 6, read=config)
    with torch.no_grad():
        for c in (plain, cache):
            model(TOKENS[:, :63], use_cache=True, **with_cache(c))
        cache.read_bytes, cache.dense_read_bytes = 0.0, 0
        for c in (plain, cache):
            model(TOKENS[:, 63:64], use_cache=True, **with_cache(c))
    # 64 slots, kv_heads 2, head_dim 16, float32: 64 * 2 * 16 * 4 bytes each of keys and values per layer
    layer = 2 * 64 * 2 * 16 * 4
    pages = 2 * 8 * 2 * 16 * 4  # min and max of 8 pages, per KV head
    assert cache.dense_read_bytes == 6 * layer
    assert cache.kv_bytes() == plain.kv_bytes() + 4 * pages  # metadata of the 4 sparse layers, held
    # each query head reads 3 of 8 pages; a KV head reads the union of its 2 query heads' pages: 3 to 6 of 8
    sparse = cache.read_bytes - 2 * layer - 4 * pages
    assert 4 * layer * 3 / 8 - 1e-6 <= sparse <= 4 * layer * 6 / 8 + 1e-6


@pytest.mark.parametrize("method", sorted(METHODS))
def test_quest_composes_with_every_method_in_generate(method):
    # page_size 1 and an unbounded budget read every slot: the same tokens as without Quest; a small budget reads less
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    settings = dict(SETTINGS, **method_files(model.config))

    def cache(read):
        policy = build_policy(method, **{k: v for k, v in settings.items() if k in METHODS[method].hyperparameters()})
        return CompressedCache(policy, 6, read=read)

    outputs = []
    for read in (None, Quest(token_budget=10 ** 6, page_size=1, dense_layers=0)):
        outputs.append(fill_and_generate(model, TOKENS[:, :60], cache(read), 20))
    assert torch.equal(outputs[0], outputs[1])
    sparse = cache(Quest(token_budget=8, page_size=4))
    fill_and_generate(model, TOKENS[:, :60], sparse, 20)
    assert 0 < sparse.read_bytes < 0.9 * sparse.dense_read_bytes  # short heads (HeadKV) are read whole


def test_bad_read_settings_are_one_line_errors():
    for kwargs, setting in [(dict(token_budget=0), "Quest.token_budget"), (dict(page_size=0), "Quest.page_size"),
                            (dict(dense_layers=-1), "Quest.dense_layers")]:
        with pytest.raises(ConfigError, match=setting):
            Quest(**kwargs)
    with pytest.raises(ConfigError, match="make_cache.read must be one of"):
        build_reader("pages")
    assert build_reader("none") is None


@pytest.mark.parametrize("method", ["full", "lacache"])
def test_ppl_reads_sparsely_records_the_reads_and_resumes_to_the_same_numbers(tiny_dir, text_file, tmp_path, monkeypatch,  # noqa: F811
                                                                              method):
    import json

    from ppl.run import main

    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
              "--method", method, "--cache_size", "48", "--span", "2", "--num_eval_tokens", "120",
              "--read", "quest", "--quest_budget", "8", "--quest_page_size", "4", "--checkpoint_every", "40"]
    assert main(common + ["--output_dir", str(tmp_path / "clean")]) == 0
    clean = next((tmp_path / "clean").iterdir())
    assert "_quest8p4d2" in clean.name
    record = json.loads((clean / "run.json").read_text())
    assert record["setting"]["cache"]["read"] == {"method": "quest", "token_budget": 8, "page_size": 4, "dense_layers": 2}
    results = record["results"]
    assert 0 < results["read_fraction"] < 0.9  # 2 of the 4 layers read densely; the others 3 pages of 4 per query head
    assert results["read_bytes_per_step"] == pytest.approx(results["read_fraction"] * results["dense_read_bytes_per_step"])
    cut = ppl_killed_then_resumed(common, tmp_path / "cut", monkeypatch)
    resumed = json.loads((cut / "run.json").read_text())["results"]
    assert (cut / "nlls.txt").read_text() == (clean / "nlls.txt").read_text()
    assert resumed["read_fraction"] == pytest.approx(results["read_fraction"])
    assert main(common[:-8] + ["--output_dir", str(tmp_path / "dense")]) == 0  # the same run read densely
    dense = next((tmp_path / "dense").iterdir())
    assert (dense / "nlls.txt").read_text() != (clean / "nlls.txt").read_text()


def test_bad_read_flags_are_one_line_errors(tiny_dir, text_file, tmp_path, capsys):  # noqa: F811
    from ppl.run import main

    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
              "--output_dir", str(tmp_path), "--read", "quest"]
    assert main(common + ["--quest_budget", "0"]) == 2
    assert main(common + ["--quest_page_size", "-3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ["error: --quest_budget must be >= 1, got 0", "error: --quest_page_size must be >= 1, got -3"]


@pytest.mark.parametrize("method", ["lacache", "streamingllm", "cam", "h2o"])
def test_each_row_of_a_padded_batch_reads_what_it_reads_alone(method):
    # per-row budgets (half of each prompt): fillers change from step to step. Page bounds are per channel, which a
    # rotation of keys and query together changes, so a slot method's pages are scored at the row's own slots
    if Version(transformers.__version__) < Version("4.48"):
        pytest.skip("padded batches need the attention-interface path (transformers >= 4.48)")
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    read = Quest(token_budget=8, page_size=4, dense_layers=1)
    rows = [TOKENS[0, :n] for n in (60, 45, 52)]
    ids, mask = torch.zeros(3, 60, dtype=torch.long), torch.zeros(3, 60, dtype=torch.long)
    for j, row in enumerate(rows):
        ids[j, 60 - len(row):], mask[j, 60 - len(row):] = row, 1

    def policy(n):
        return build_policy(method, cache_size=n // 2, start_size=2, span=2)

    def run(cache, prompt, attention_mask=None):
        return model.generate(prompt, attention_mask=attention_mask, **with_cache(cache), max_new_tokens=16,
                              min_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_logits=True)

    batch = run(CompressedCache.for_rows([policy(len(row)) for row in rows], 6, read=read), ids, mask)
    for j, row in enumerate(rows):
        alone = run(CompressedCache(policy(len(row)), 6, read=read), row[None])
        torch.testing.assert_close(torch.stack([s[j] for s in batch.logits]), torch.stack([s[0] for s in alone.logits]),
                                   atol=1e-4, rtol=1e-4)


def test_prompt_harnesses_read_full_and_budgeted_caches_sparsely(tiny_dir, tmp_path, capsys):  # noqa: F811
    import json

    from runs import rows_of
    from runs import run_niah

    read = ("--read", "quest", "--quest_budget", "8", "--quest_page_size", "4", "--quest_dense_layers", "1")
    assert run_niah(tiny_dir, tmp_path / "q", "--method", "full,lacache", *read) == 0
    folders = [p for p in sorted((tmp_path / "q").iterdir()) if p.is_dir()]
    assert [p.name.split("__")[-1].rsplit("-", 1)[0] for p in folders] == ["full_quest8p4d1", "lacache_b0.5_S2_O0_s4_quest8p4d1"]
    for folder in folders:
        assert len(rows_of(folder / "results.csv")) == 12
        record = json.loads((folder / "run.json").read_text())
        assert record["setting"]["method"]["read"]["token_budget"] == 8
        assert 0 < record["read_fraction"] < 1
    assert run_niah(tiny_dir, tmp_path / "bad", *read[:2], "--quest_dense_layers", "-1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ["error: --quest_dense_layers must be >= 0, got -1"]


def test_longbench_records_the_share_each_answer_read(tiny_dir, data_dir, tmp_path):  # noqa: F811
    import json

    from runs import DATASETS, read
    from runs import run_longbench

    assert run_longbench(tiny_dir, data_dir, tmp_path, "--method", "full", "--read", "quest", "--quest_budget", "8",
                         "--quest_page_size", "4") == 0
    folder = next((tmp_path / "pred").iterdir())
    assert folder.name.startswith("tiny__full_quest8p4d2")
    shares = [r.get("read_fraction") for name in DATASETS for r in read(folder / f"{name}.jsonl")]
    answered = [share for share in shares if share is not None]  # an answer of one token has no decode step
    assert answered and all(0 < share < 1 for share in answered)
    assert json.loads((folder / "run.json").read_text())["setting"]["method"]["read"]["page_size"] == 4


@pytest.mark.parametrize("method", ["adakv", "lacache"])
def test_reading_every_slot_counts_as_a_dense_read(method):
    # one-slot pages and an unbounded budget read every own slot: apart from the page metadata, the bytes read equal
    # a dense read's, for heads of different lengths (AdaKV) and for the rows of a left-padded batch (their filler
    # slots are neither read nor part of a dense read of that row)
    if Version(transformers.__version__) < Version("4.48"):
        pytest.skip("padded batches need the attention-interface path (transformers >= 4.48)")
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    read = Quest(token_budget=10 ** 6, page_size=1, dense_layers=0)
    settings = dict(cache_size=100, start_size=4, span=2, window_size=8, **method_files(model.config))
    policy = build_policy(method, **{k: v for k, v in settings.items() if k in METHODS[method].hyperparameters()})
    cache = CompressedCache(policy, 6, read=read)
    if method == "adakv":
        ids, mask = TOKENS[:, :60], None
    else:
        ids, mask = TOKENS[:, :60].repeat(2, 1), torch.ones(2, 60, dtype=torch.long)
        mask[1, :30] = 0
    model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert cache.dense_read_bytes > 0
    assert cache.read_bytes - cache.metadata_read_bytes == pytest.approx(cache.dense_read_bytes, rel=1e-9)
