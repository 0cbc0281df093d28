"""Several perplexity streams in one batch (``ppl/run.py --batch_size N``), and ``generate()`` on a batch:
each row gives what it gives alone, for every method (scoring methods choose per row)."""
import json

import pytest
import torch
import transformers
from packaging.version import Version

from harness.generation import greedy_answer
from harness.streaming import split_streams, stream_perplexity, stream_perplexity_batched, stream_tokens
from lacache_core import METHODS, CompressedCache, ConfigError, build_policy, enable_position_shift
from lacache_core.versions import with_cache
from tiny import generate_with_passes, method_files, ppl_killed_then_resumed, same_positions, tiny_model

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                reason="cache objects need transformers >= 4.36")
DECODE = [name for name, cls in METHODS.items() if not cls.prefill_only]
PREFILL = [name for name, cls in METHODS.items() if cls.prefill_only]
SETTINGS = dict(cache_size=24, start_size=4, span=3, overlap=1, recent_window=4, window_size=4, beta=2)


@pytest.fixture(scope="module")
def tiny_dir(ppl_tiny_dir):
    """This module's runs use the perplexity harness's tiny model (conftest's ``ppl_tiny_dir``)."""
    return ppl_tiny_dir


class ListTokenizer:
    """Texts given as lists of token ids."""

    def __call__(self, text, return_tensors="pt"):
        return type("Encoded", (), {"input_ids": torch.tensor([text])})()


def test_stream_tokens_scores_within_texts_and_splits_in_order():
    pairs = stream_tokens(ListTokenizer(), [[1, 2, 3], [7, 8, 9, 10]], limit=None)
    assert pairs.tolist() == [[1, 2, 7, 8, 9], [2, 3, 8, 9, 10]]  # 3 -> 7 (across texts) is never scored
    assert stream_tokens(ListTokenizer(), [[1, 2, 3], [7, 8, 9, 10]], limit=4).shape == (2, 4)
    assert split_streams(pairs, 2).tolist() == [[[1, 2], [7, 8]], [[2, 3], [8, 9]]]
    with pytest.raises(ConfigError, match="--batch_size 6 is more streams than the 5 tokens"):
        split_streams(pairs, 6)


@pytest.mark.parametrize("query_position", ["slot", "official"])
@pytest.mark.parametrize("method", DECODE)
def test_each_stream_of_a_batch_scores_what_it_scores_alone(method, query_position):
    model = tiny_model("llama", "eager")
    # no token twice in a row's stream: a repeated token has the same layer-0 key, an exact tie in KNorm's
    # norms that rounding (batched or not) would break either way
    g = torch.Generator().manual_seed(4)
    tokens = torch.stack([torch.randperm(128, generator=g)[:70] for _ in range(3)])
    streams = torch.stack([tokens[:, :-1], tokens[:, 1:]])  # [2, 3, 69]
    batched = stream_perplexity_batched(model, streams, build_policy(method, **SETTINGS), query_position)
    assert [len(row) for row in batched.nlls] == [69] * 3
    for j in range(3):
        # the one-stream protocol over stream j alone (one text, fresh cache) is the reference
        alone = stream_perplexity(model, ListTokenizer(), [tokens[j].tolist()], build_policy(method, **SETTINGS),
                                  query_position=query_position)
        torch.testing.assert_close(torch.tensor(batched.nlls[j]), torch.tensor(alone.nlls), rtol=1e-5, atol=1e-6)
    if method != "full":  # bounded: three rows of at most the budget while a step runs
        d = model.config.hidden_size // model.config.num_attention_heads
        per_row = model.config.num_hidden_layers * 2 * model.config.num_key_value_heads * d * 4
        assert batched.peak_kv_bytes <= 3 * per_row * (build_policy(method, **SETTINGS).max_cache_len(6) + 1)  # + the new token


def test_prefill_methods_are_refused_in_streams():
    streams = torch.zeros(2, 2, 10, dtype=torch.long)
    with pytest.raises(ConfigError, match="--batch_size 2 cannot run --method snapkv: it compresses a prompt once"):
        stream_perplexity_batched(tiny_model("llama", "eager"), streams, build_policy("snapkv", cache_size=64))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_generate_on_a_batch_gives_each_row_what_it_gives_alone(method):
    # rows of the same length (no padding); a scoring method keeps each row's own tokens
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    g = torch.Generator().manual_seed(8)
    prompts = torch.stack([torch.randperm(128, generator=g)[:60] for _ in range(3)])  # no ties (see above)
    settings = dict(SETTINGS, cache_size=40, **method_files(model.config))
    cache = CompressedCache(build_policy(method, **settings), 6)
    batch = generate_with_passes(model, prompts, **with_cache(cache), max_new_tokens=30, min_new_tokens=30,
                                 do_sample=False)
    alone_bytes = 0
    for j in range(3):
        alone = CompressedCache(build_policy(method, **settings), 6)
        row = generate_with_passes(model, prompts[j:j + 1], **with_cache(alone), max_new_tokens=30,
                                   min_new_tokens=30, do_sample=False)
        assert torch.equal(batch[j], row[0])
        alone_bytes += alone.kv_bytes()
        # each row kept what it keeps alone (past layer 0, where a generated token repeated has the same key
        # and KNorm's tie between the copies may go either way)
        mine, theirs = cache.row_positions(j), alone.kept_positions()
        assert all(same_positions(a, b) for a, b in list(zip(mine, theirs))[1:])
    if cache.policy.ragged or cache.policy.prunes_channels:  # every layer in a store: each row's, as alone
        assert cache.kv_bytes() == alone_bytes


def test_ppl_batch_size_writes_one_log_per_stream_and_resumes(tiny_dir, text_file, tmp_path, monkeypatch):  # noqa: F811
    import ppl.run as run_module
    from ppl.run import main

    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
              "--method", "lacache", "--cache_size", "32", "--span", "2", "--num_eval_tokens", "299",
              "--batch_size", "3", "--checkpoint_every", "40"]
    assert main(common + ["--output_dir", str(tmp_path / "clean")]) == 0
    folder = next((tmp_path / "clean").iterdir())
    assert folder.name.endswith("_bs3-" + folder.name.split("-")[-1])
    summary = json.loads((folder / "run.json").read_text())
    logs = [[float(x) for x in (folder / f"nlls_stream{j}.txt").read_text().split()] for j in range(3)]
    assert [len(row) for row in logs] == [100] * 3 and summary["results"]["tokens_scored"] == 300
    assert summary["results"]["batch_size"] == 3 and summary["setting"]["data"]["batch_size"] == 3
    # stream 1 is the second 100 scored tokens of the one-stream protocol, from an empty cache
    alone = main(["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
                  "--method", "lacache", "--cache_size", "32", "--span", "2", "--num_eval_tokens", "99",
                  "--output_dir", str(tmp_path / "one")])
    assert alone == 0
    first = [float(x) for x in next((tmp_path / "one").iterdir()).joinpath("nlls.txt").read_text().split()]
    torch.testing.assert_close(torch.tensor(logs[0]), torch.tensor(first), rtol=1e-5, atol=1e-6)

    real = run_module.stream_perplexity_batched

    def interrupted(*a, on_step=None, **kw):
        def boom(step, nlls):
            on_step(step, nlls)
            if step == 57:
                raise KeyboardInterrupt
        return real(*a, on_step=boom, **kw)

    monkeypatch.setattr(run_module, "stream_perplexity_batched", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(common + ["--output_dir", str(tmp_path / "cut")])
    cut = next((tmp_path / "cut").iterdir())
    assert all(len((cut / f"nlls_stream{j}.txt").read_text().split()) == 58 for j in range(3))
    monkeypatch.setattr(run_module, "stream_perplexity_batched", real)
    assert main(common + ["--output_dir", str(tmp_path / "cut")]) == 0
    assert json.loads((cut / "run.json").read_text())["results"]["resumed"] is True
    for j in range(3):  # resumed from the step-40 checkpoint: the same numbers as the clean run
        assert (cut / f"nlls_stream{j}.txt").read_text() == (folder / f"nlls_stream{j}.txt").read_text()


def test_ppl_bad_batch_size_is_one_line_before_loading(capsys):
    from ppl.run import main

    assert main(["--model_name_or_path", "/nonexistent", "--batch_size", "0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch_size must be >= 1, got 0" in err[0]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_a_left_padded_batch_gives_each_row_what_it_gives_alone(method):
    # rows of 60, 45 and 52 tokens, left-padded: pad slots are never attended, never sinks, and go first
    if Version(transformers.__version__) < Version("4.48"):
        pytest.skip("padded batches need the attention-interface path (transformers >= 4.48)")
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    g = torch.Generator().manual_seed(9)
    lengths = [60, 45, 52]
    rows = [torch.randperm(127, generator=g)[:n] + 1 for n in lengths]
    prompts = torch.zeros(3, 60, dtype=torch.long)
    mask = torch.zeros(3, 60, dtype=torch.long)
    for j, row in enumerate(rows):
        prompts[j, 60 - len(row):], mask[j, 60 - len(row):] = row, 1
    settings = dict(SETTINGS, cache_size=40, **method_files(model.config))
    cache = CompressedCache(build_policy(method, **settings), 6)
    batch = generate_with_passes(model, prompts, attention_mask=mask, **with_cache(cache), max_new_tokens=25,
                                 min_new_tokens=25, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                                 output_logits=True)
    for j, row in enumerate(rows):
        alone = CompressedCache(build_policy(method, **settings), 6)
        single = generate_with_passes(model, row[None], **with_cache(alone), max_new_tokens=25, min_new_tokens=25,
                                      do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(batch.sequences[j, 60:], single.sequences[0, len(row):]), f"row {j}"
        # and the same logits at every step, not only the same argmax (keys rotated to the slots they move to)
        torch.testing.assert_close(torch.stack([s[j] for s in batch.logits]), torch.stack([s[0] for s in single.logits]),
                                   atol=1e-3, rtol=1e-3)
        mine, theirs = cache.row_positions(j), alone.kept_positions()
        assert all(same_positions(a, b) for a, b in list(zip(mine, theirs))[1:])  # layer 0: see above


@pytest.mark.parametrize("method", ["lacache", "streamingllm", "cam", "h2o"])
def test_rows_with_budgets_of_their_own_give_the_logits_they_give_alone(method):
    # each row's budget half of its own prompt (as the prompt harnesses size them): rows keep different counts, so
    # a row's filler slots change from step to step and its kept keys move up as well as down
    if Version(transformers.__version__) < Version("4.48"):
        pytest.skip("padded batches need the attention-interface path (transformers >= 4.48)")
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    g = torch.Generator().manual_seed(11)
    rows = [torch.randperm(127, generator=g)[:n] + 1 for n in (60, 45, 52)]
    prompts, mask = torch.zeros(3, 60, dtype=torch.long), torch.zeros(3, 60, dtype=torch.long)
    for j, row in enumerate(rows):
        prompts[j, 60 - len(row):], mask[j, 60 - len(row):] = row, 1

    def policy(n):
        return build_policy(method, cache_size=n // 2, start_size=2, span=2, recent_window=4)

    def run(cache, ids, attention_mask=None):
        return model.generate(ids, attention_mask=attention_mask, **with_cache(cache), max_new_tokens=20,
                              min_new_tokens=20, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                              output_logits=True)

    batch = run(CompressedCache.for_rows([policy(len(row)) for row in rows], 6), prompts, mask)
    for j, row in enumerate(rows):
        single = run(CompressedCache(policy(len(row)), 6), row[None])
        torch.testing.assert_close(torch.stack([s[j] for s in batch.logits]), torch.stack([s[0] for s in single.logits]),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["streamingllm", "lacache", "h2o", "snapkv", "adakv"])
def test_a_padded_batch_keeps_the_models_sliding_window(method):
    # the cache builds the mask of a padded batch and of a sliding-window layer itself: the window (here 10 of
    # 40 slots) counted in slots, in generate() and in a forward loop alike
    if Version(transformers.__version__) < Version("4.48"):
        pytest.skip("padded batches need the attention-interface path (transformers >= 4.48)")
    model = tiny_model("mistral", "sdpa")
    model.config.sliding_window = 10
    model = enable_position_shift(model)
    g = torch.Generator().manual_seed(10)
    rows = [torch.randperm(127, generator=g)[:n] + 1 for n in (60, 45)]
    prompts, mask = torch.zeros(2, 60, dtype=torch.long), torch.zeros(2, 60, dtype=torch.long)
    for j, row in enumerate(rows):
        prompts[j, 60 - len(row):], mask[j, 60 - len(row):] = row, 1
    settings = dict(SETTINGS, cache_size=40)
    batch = model.generate(prompts, attention_mask=mask, **with_cache(CompressedCache(build_policy(method, **settings), 6)),
                           max_new_tokens=15, min_new_tokens=15, do_sample=False, pad_token_id=0)
    unwindowed = tiny_model("mistral", "sdpa")
    for j, row in enumerate(rows):
        alone = model.generate(row[None], **with_cache(CompressedCache(build_policy(method, **settings), 6)),
                               max_new_tokens=15, min_new_tokens=15, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[j, 60:], alone[0, len(row):]), f"row {j}"
    # generate() counts positions by the tokens fed; a forward loop by the slots held: one window for both
    loop = greedy_answer(model, rows[1][None], CompressedCache(build_policy(method, **settings), 6), 15)
    assert loop == batch[1, 60:].tolist()
    # and the window matters here: without it the first row answers otherwise
    free = enable_position_shift(unwindowed).generate(
        rows[0][None], **with_cache(CompressedCache(build_policy(method, **settings), 6)), max_new_tokens=15,
        min_new_tokens=15, do_sample=False, pad_token_id=0)
    assert not torch.equal(free[0, 60:], batch[0, 60:])


KIVI_FLAGS = ["--quant", "kivi", "--quant_bits", "4", "--quant_group", "8", "--quant_residual", "16"]


@pytest.mark.parametrize("quant", [[], KIVI_FLAGS], ids=["dense", "kivi4"])
@pytest.mark.parametrize("method", ["lacache", "h2o"])
def test_ppl_streams_score_as_alone_and_resume(tiny_dir, text_file, tmp_path, monkeypatch, method, quant):  # noqa: F811
    # stream 0 scores what the one-stream run of its tokens scores, and a killed run resumes from the checkpoint to
    # the same numbers: H2O's rows each keep a policy of their own (and under --quant a store of their own), saved
    from ppl.run import main

    base = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
            "--method", method, "--cache_size", "32", "--span", "2", *quant]
    common = base + ["--num_eval_tokens", "299", "--batch_size", "3", "--checkpoint_every", "40"]
    assert main(common + ["--output_dir", str(tmp_path / "clean")]) == 0
    folder = next((tmp_path / "clean").iterdir())
    logs = [(folder / f"nlls_stream{j}.txt").read_text() for j in range(3)]
    assert main(base + ["--num_eval_tokens", "99", "--output_dir", str(tmp_path / "one")]) == 0
    first = [float(x) for x in next((tmp_path / "one").iterdir()).joinpath("nlls.txt").read_text().split()]
    torch.testing.assert_close(torch.tensor([float(x) for x in logs[0].split()]), torch.tensor(first),
                               rtol=1e-5, atol=1e-6)
    cut = ppl_killed_then_resumed(common, tmp_path / "cut", monkeypatch, after=57, batched=True)
    assert [(cut / f"nlls_stream{j}.txt").read_text() for j in range(3)] == logs
