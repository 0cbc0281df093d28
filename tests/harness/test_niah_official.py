"""``niah/pred.py --protocol lacache`` against a re-derivation of the LaCache repository's
``niah/pred.py`` @ 0f27c33 (``generate_prompt_landmark`` and its sweep loop)."""
import csv
import random

import pytest

from lacache_core.versions import HAS_CACHE_CLASSES
from references import reference_sweep
from runs import run_niah_official as run
from tiny import char_tokenizer

pytestmark = pytest.mark.skipif(not HAS_CACHE_CLASSES, reason="prompt harnesses need transformers >= 4.36")

# the official filler snippet and text, as that script has them
SNIPPET = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
           "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def reference_prompt(n_garbage: int, n_prefix: int, seed: int):
    garbage = SNIPPET * 5000
    key = random.Random(seed).randint(1, 99999)
    lines = ["There is important information hidden in a lot of irrelevant text. Find it and memorize it. "
             "You will be quizzed on this hidden information.",
             garbage[:n_prefix], f"The pass key is {key}. Remember it. {key} is the pass key.",
             garbage[:n_garbage - n_prefix], "What is the pass key? The pass key is"]
    return "\n".join(lines), str(key)


def test_prompts_keys_budgets_and_csv_follow_the_official_script(char_model_dir, tmp_path, monkeypatch):
    tok = char_tokenizer(bos=True)
    rc, calls = run(char_model_dir, tmp_path, monkeypatch, "--method", "full")
    assert rc == 0
    sweep = reference_sweep(1024, 300, 2)
    assert len(calls) == len(sweep) == 3 * 11 * 2
    for (ids, limit, _), (_, n_garbage, prefix, _, seed) in zip(calls, sweep):
        text, key = reference_prompt(n_garbage, prefix, seed)
        assert ids == tok(text).input_ids  # BOS, no chat template
        assert limit == len(tok(key).input_ids)  # the official answer budget (BOS included)
    # the same test index has the same key in every cell
    assert len({reference_prompt(1024, p, 0)[1] for p in (0, 512, 1024)}) == 1
    folder = next(tmp_path.glob("*__passkey-lacache__full-*"))
    with open(folder / "official.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Context Length", "Document Depth", "Score"] and len(rows) == 1 + 3 * 11
    expected = []
    for i in range(0, len(sweep), 2):
        _, n_garbage, prefix, depth, _ = sweep[i]
        tokens = sum(len(tok(reference_prompt(n_garbage, prefix, s)[0]).input_ids) for s in (0, 1))
        expected.append([str(tokens // 2), f"{depth}", "1"])  # test 0 answers its key, test 1 does not
    assert rows[1:] == expected


def test_cache_budget_is_budget_times_prompt_tokens_with_64_sinks(char_model_dir, tmp_path, monkeypatch):
    rc, calls = run(char_model_dir, tmp_path, monkeypatch, "--method", "lacache", "--span", "2", "--budget", "0.5")
    assert rc == 0
    for ids, _, spec in calls:
        assert spec.cache_size == int(0.5 * len(ids)) and spec.start_size == 64


@pytest.mark.parametrize("flags, message", [
    (["--interval", "256"], "--interval must be >= 274 with --protocol lacache"),
    (["--depths", "0,50"], "--depths cannot be used with --protocol lacache"),
    (["--max_new_tokens", "8"], "--max_new_tokens cannot be used with --protocol lacache"),
    (["--mode", "essays"], "--protocol lacache is the official passkey test"),
])
def test_official_protocol_flags_give_one_line_errors(char_model_dir, tmp_path, monkeypatch, capsys, flags, message):
    rc, _ = run(char_model_dir, tmp_path, monkeypatch, *flags)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("error: ") and message in err


def test_official_column_labels():
    from niah.official import column_label

    assert column_label(1499, "full") == "1k" and column_label(2600, "full") == "3k"
    assert column_label(11000, "lacache") == "11k" and column_label(16400, "lacache") == "16k"
