"""niah/: haystack construction (depth, size, seeds), scores, results file, and niah/pred.py end to end on a tiny model."""
import csv
import importlib.util
import random

import pytest

from lacache_core.versions import HAS_CACHE_CLASSES
from runs import rows_of
from runs import run_niah as run
from tiny import char_tokenizer, killed_after, result_dir, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not HAS_CACHE_CLASSES, reason="prompt harnesses need transformers >= 4.36")


HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


ESSAYS = [" ".join(f"Essay {e} sentence {i} says something{'!' if i % 3 else '.'}" for i in range(40))
          for e in range(5)]


# ----------------------------------------------------------------------------------------- haystack
@pytest.mark.parametrize("depth", [0, 50, 100])
def test_needle_sits_at_the_requested_depth(depth):
    from niah.haystack import (ESSAY_NEEDLE, FILLER, PASSKEY_NEEDLE, essay_haystack, filler, insert_at_depth,
                               needle_depth, passkey_text)

    needle = PASSKEY_NEEDLE.format(key=4242)
    context, offset = insert_at_depth(filler(200), needle, depth)
    assert context[offset:].startswith(needle)
    assert abs(needle_depth(context, needle) - depth / 100) <= (len(FILLER) / 5) / len(context)  # one sentence
    assert passkey_text(4242, 200, depth).count("4242") == 2
    hay = essay_haystack(ESSAYS, 2, 150)
    context, offset = insert_at_depth(hay, ESSAY_NEEDLE, depth)
    assert abs(needle_depth(context, ESSAY_NEEDLE) - depth / 100) < 0.01
    # at a sentence boundary: the needle is a line of its own, after a sentence end
    before = context[:offset].rstrip()
    assert before == "" or before[-1] in ".!"
    assert context.endswith(ESSAY_NEEDLE) == (depth == 100) and context.startswith(ESSAY_NEEDLE) == (depth == 0)


def test_essay_haystack_cycles_through_the_essays():
    from niah.haystack import essay_haystack, sentence_starts

    text = essay_haystack(ESSAYS, 3, 230)  # 5 x 40 sentences in one pass: wraps round
    assert text.startswith("Essay 3 sentence 0") and "Essay 0 sentence 0" in text
    assert len(sentence_starts(text)) - 1 == 230
    assert essay_haystack(ESSAYS, 0, 0) == ""


@pytest.mark.parametrize("make", [char_tokenizer, tiny_tokenizer,
                                  lambda: tiny_tokenizer(chat_template="{% for m in messages %}w7 {{ m['content'] }} "
                                                                       "w8{% endfor %} w9")])
@pytest.mark.parametrize("length", [400, 900, 3000])
def test_prompt_fills_the_length_to_within_one_filler_repeat(make, length):
    from niah.haystack import FILLER, build_prompt

    tok = make()
    per_repeat = len(tok(FILLER + " ", add_special_tokens=False).input_ids)
    for depth in (0, 50, 100):
        p = build_prompt(tok, "passkey", length, depth, seed=1, test=0)
        assert length - per_repeat < p.tokens <= length
        assert p.units > 0
        assert p.input_ids.shape[1] == len(tok(p.text).input_ids) or tok.chat_template


def test_essay_prompt_fits_the_length():
    from niah.haystack import ESSAY_NEEDLE, ESSAY_QUESTION, build_prompt, needle_depth

    tok = char_tokenizer()
    p = build_prompt(tok, "essays", 2000, 50, seed=1, test=0, essays=ESSAYS)
    longest = max(len(s) for s in ESSAYS[0].split("! ")) + 2
    assert 2000 - longest < p.tokens <= 2000
    assert p.text.endswith(ESSAY_QUESTION) and p.answer == ESSAY_NEEDLE
    hay = p.text[: -len(ESSAY_QUESTION)].rstrip()
    assert abs(needle_depth(hay, ESSAY_NEEDLE) - 0.5) < 0.05


def test_same_seed_same_keys_other_test_other_key():
    from niah.haystack import build_prompt, pass_key

    tok = char_tokenizer()
    a = build_prompt(tok, "passkey", 800, 30, seed=7, test=2)
    b = build_prompt(tok, "passkey", 800, 30, seed=7, test=2)
    assert a.text == b.text and a.answer == b.answer == str(pass_key(7, 800, 30, 2))
    assert "".join(tok.convert_ids_to_tokens(a.input_ids[0])).count(a.answer) == 2  # digits survive tokenization
    keys = {pass_key(7, 800, 30, t) for t in range(20)}
    assert len(keys) == 20 and all(1 <= k <= 99999 for k in keys)
    assert pass_key(7, 800, 30, 2) != pass_key(7, 800, 30, 3)
    assert pass_key(7, 800, 30, 2) != pass_key(8, 800, 30, 2)
    assert pass_key(7, 800, 30.0, 2) == pass_key(7, 800, 30, 2)  # depth 30 and 30.0 are one cell


def test_fit_units_matches_brute_force():
    from niah.haystack import fit_units

    rng = random.Random(0)
    for _ in range(200):
        base, steps = rng.randint(0, 50), [rng.randint(0, 9) for _ in range(300)]
        counts = [base]
        for s in steps:
            counts.append(counts[-1] + s)
        length = rng.randint(0, counts[-1] + 20)
        guess = rng.choice([None, 0, rng.randint(0, 300), 300])
        want = max([n for n, c in enumerate(counts) if c <= length], default=0)
        assert fit_units(counts.__getitem__, length, 300, guess) == want


def test_scores():
    from niah.haystack import score_essay, score_passkey

    assert score_passkey("The pass key is 12345.", 12345) == 100
    assert score_passkey(" 12345", "12345") == 100
    assert score_passkey("The pass key is 1234.", 12345) == 0
    assert score_passkey("", 7) == 0
    assert score_essay("Eat a sandwich and sit in Dolores Park on a sunny day!") == 100
    assert score_essay("eat a SANDWICH, sit in dolores-park") == pytest.approx(100 * 5 / 7)  # eat sandwich sit dolores park
    assert score_essay("The best thing to do in San Francisco") == 0
    assert score_essay("Sandwiches on Sundays") == 0  # whole words only


def test_csv_results_drop_a_cut_off_row(tmp_path):
    from niah.pred import COLUMNS, CsvResults

    path = tmp_path / "results.csv"
    with CsvResults(path) as out:
        out.append(dict(context_length=100, depth="0", test=0, score="0", pred='a, "quoted"\nanswer', prompt_tokens=99))
        out.append(dict(context_length=100, depth="50", test=0, score="100", pred="42", prompt_tokens=98))
    good = path.read_text()
    for cut in ['100,100,0,0,"half\n', "100,100,0,0,x,9"]:  # inside a quoted field; no final newline
        path.write_text(good + cut)
        with CsvResults(path) as out:
            assert out.done == {(100, "0", 0), (100, "50", 0)}
            assert out.rows[0]["pred"] == 'a, "quoted"\nanswer'
        assert path.read_text() == good
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == COLUMNS


# ----------------------------------------------------------------------------------------- pred.py
def test_end_to_end_writes_results_heatmap_and_summary(tiny_dir, tmp_path, capsys):
    import json

    assert run(tiny_dir, tmp_path, "--method", "full,lacache", "--budget", "0.5") == 0
    name = tiny_dir.name
    for tag in ("full", "lacache_b0.5_S2_O0_s4"):
        folder = result_dir(tmp_path, f"{name}__passkey__{tag}")
        rows = rows_of(folder / "results.csv")
        assert len(rows) == 2 * 3 * 2
        assert {(r["context_length"], r["depth"]) for r in rows} == {(n, d) for n in ("100", "200")
                                                                     for d in ("0", "50", "100")}
        assert all(int(r["prompt_tokens"]) <= int(r["context_length"]) for r in rows)
        assert all(r["score"] in ("0", "100") for r in rows)
        if HAS_MATPLOTLIB:  # the plot is optional (the 4.43/4.33 test environments have no matplotlib)
            assert (folder / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        summary = (folder / "summary.md").read_text()
        assert "| **all** |" in summary and "Llama3.2-3B-Instruct-128k" in summary  # the paper's table, quoted
        meta = json.loads((folder / "run.json").read_text())
        assert meta["lengths"] == [100, 200] and meta["tests"] == 12 and "transformers" in meta["versions"]
    meta = json.loads((result_dir(tmp_path, f"{name}__passkey__lacache_b0.5_S2_O0_s4") / "run.json").read_text())
    assert meta["start_size"] == 4 and meta["budget"] == 0.5 and meta["span"] == 2
    assert meta["setting"]["method"]["span"] == 2 and meta["setting"]["method"]["overlap"] == 0  # defaults resolved
    out = capsys.readouterr().out
    assert "average score per context length" in out and "| 100 |" in out


def test_interrupted_run_resumes_to_the_same_rows(tiny_dir, tmp_path, monkeypatch):
    import niah.pred as pred

    flags = ("--enable_lacache", "--budget", "0.5")
    assert run(tiny_dir, tmp_path / "clean", *flags) == 0
    real = pred.answer_all
    monkeypatch.setattr(pred, "answer_all", killed_after(real, 5))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, tmp_path / "cut", *flags)
    monkeypatch.setattr(pred, "answer_all", real)
    tag = f"{tiny_dir.name}__passkey__lacache_b0.5_S2_O0_s4"
    path = result_dir(tmp_path / "cut", tag) / "results.csv"
    assert len(rows_of(path)) == 5
    with open(path, "a") as f:
        f.write("200,0,1,0,w1 w")  # and a row cut short by the kill
    assert run(tiny_dir, tmp_path / "cut", *flags) == 0

    def key(r):
        return r["context_length"], r["depth"], r["test"], r["pred"], r["prompt_tokens"]

    clean, resumed = rows_of(result_dir(tmp_path / "clean", tag) / "results.csv"), rows_of(path)
    assert len(resumed) == 12 and [key(r) for r in resumed] == [key(r) for r in clean]


def test_every_method_gets_budget_times_prompt_tokens():
    from niah.pred import make_spec, parse_args, validate

    args = parse_args(["--method", "streamingllm,lacache,h2o", "--budget", "0.25", "--span", "2", "--device", "cpu"])
    validate(args)
    model = tiny_model("llama", "sdpa", layers=4)
    for method in args.methods:
        cache = make_spec(args, method, 1000).make(model, 1000)
        assert cache.policy.cache_size == 250 and cache.policy.start_size == 64  # official NIAH: 64 sinks
    assert make_spec(args, "full", 1000).method == "full"


@pytest.mark.parametrize("flags, message", [
    (["--interval", "0"], "--interval must be in [1, --max_tokens=200]"),
    (["--interval", "300"], "--interval must be in [1, --max_tokens=200]"),
    (["--num_tests", "0"], "--num_tests must be >= 1"),
    (["--budget", "0"], "--budget must be in (0, 1]"),
    (["--budget", "1.5"], "--budget must be in (0, 1]"),
    (["--depths", "0,120"], "--depths must be a comma list of percentages in [0, 100]"),
    (["--depths", "a,b"], "--depths must be a comma list"),
    (["--mode", "haystack"], "--mode"),
    (["--method", "nope"], "--method must be a comma list"),
    (["--enable_lacache", "--method", "full"], "--enable_lacache means --method lacache"),
    (["--method", "lacache", "--span", "9"], "--span"),
    (["--method", "streamingllm", "--start_size", "64"], "not more than --start_size 64"),  # 50-slot cache
    (["--method", "lacache", "--start_size", "64"], "not more than --start_size 64"),
])
def test_bad_flags_give_one_line_errors(tiny_dir, tmp_path, capsys, flags, message):
    assert run(tiny_dir, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
