"""Several perplexity streams in one batch (``ppl/run.py --batch_size N``): each stream scores what it
scores alone, for every method whose choice of slots does not depend on the tokens."""
import json

import pytest
import torch
import transformers
from packaging.version import Version

from harness.streaming import split_streams, stream_perplexity, stream_perplexity_batched, stream_tokens
from lacache_core import ConfigError, build_policy
from test_ppl_harness import text_file, tiny_dir  # noqa: F401 (fixtures)
from tiny import tiny_model

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                reason="cache objects need transformers >= 4.36")
BATCHABLE = ["full", "streamingllm", "lacache"]
SETTINGS = dict(cache_size=24, start_size=4, span=3, overlap=1)


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
@pytest.mark.parametrize("method", BATCHABLE)
def test_each_stream_of_a_batch_scores_what_it_scores_alone(method, query_position):
    model = tiny_model("llama", "eager")
    tokens = torch.randint(0, 128, (3, 70), generator=torch.Generator().manual_seed(4))
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


@pytest.mark.parametrize("method", ["h2o", "snapkv"])
def test_methods_that_score_tokens_are_refused_at_batch_above_one(method):
    streams = torch.zeros(2, 2, 10, dtype=torch.long)
    with pytest.raises(ConfigError, match=f"--batch_size 2 .* --method {method} scores tokens"):
        stream_perplexity_batched(tiny_model("llama", "eager"), streams, build_policy(method, cache_size=64))


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


def test_ppl_batch_size_refuses_a_scoring_method_before_loading(capsys):
    from ppl.run import main

    assert main(["--model_name_or_path", "/nonexistent", "--method", "h2o", "--batch_size", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch_size 2" in err[0] and "--method h2o" in err[0]
