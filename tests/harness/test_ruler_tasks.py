"""RULER data generator: answers really in the context, depths, token budgets, determinism, CLI.

A character-level tokenizer (one token per character) makes every length checkable by hand.
"""
import json
import re
import runpy
import string
import sys
from collections import Counter
from pathlib import Path

import pytest
import transformers

from lacache_core.errors import ConfigError
from ruler import prepare
from ruler import tasks as rt

ML = 2048  # characters; vt and cwe need about 1.9K for their one-shot example plus the question
N = 3
ROOT = Path(__file__).resolve().parents[2]
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for ([\w-]+) is: ([\w-]+)\.")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
NIAH = [t for t, c in rt.TASKS.items() if c.kind == "niah"]
KEYS = ["index", "task", "input", "answer_prefix", "outputs", "length", "max_new_tokens", "depth"]


def char_tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(dict.fromkeys(string.printable))}}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))  # no merges: one token per character
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def write_squad(path: Path) -> Path:
    """SQuAD v2.0 layout: 2 articles x 12 paragraphs, one answerable and one impossible question each."""
    data = []
    for a, title in enumerate(["Amber", "Basalt"]):
        paragraphs = []
        for p in range(12):
            code = f"CODE{a}{p:02d}"
            ctx = (f"{title} paragraph {p}. The secret code of {title} {p} is {code}. "
                   f"Filler sentence number {p} about {title} keeps this paragraph long enough to matter.")
            paragraphs.append({"context": ctx, "qas": [
                {"id": f"{a}-{p}", "question": f"What is the secret code of {title} {p}?", "is_impossible": False,
                 "answers": [{"text": code, "answer_start": ctx.index(code)}]},
                {"id": f"{a}-{p}-x", "question": f"What is the colour of {title} {p}?", "is_impossible": True,
                 "answers": [], "plausible_answers": [{"text": "red", "answer_start": 0}]},
            ]})
        data.append({"title": title, "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


def write_hotpotqa(path: Path) -> Path:
    """HotpotQA distractor layout: 6 questions x 4 paragraphs (the first two support the answer)."""
    rows = []
    for q in range(6):
        context = [[f"Title {q}-{k}", [f"Paragraph {k} of question {q} says fact {q}{k}. ",
                                        f"It adds a second sentence so that it is not tiny {k}."]]
                   for k in range(4)]
        rows.append({"_id": str(q), "question": f"Which facts belong to question {q}?", "answer": f"ANSWER{q}",
                     "supporting_facts": [[f"Title {q}-0", 0], [f"Title {q}-1", 0]], "context": context,
                     "type": "bridge", "level": "easy"})
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    return write_squad(folder / "dev-v2.0.json"), write_hotpotqa(folder / "hotpot_dev_distractor_v1.json")


@pytest.fixture(scope="module")
def qa_data(qa_files):
    return {"squad": rt.load_squad(qa_files[0]), "hotpotqa": rt.load_hotpotqa(qa_files[1])}


@pytest.fixture(scope="module")
def samples(tok, qa_data):
    gen = rt.RulerGenerator(tok, ML, seed=7, qa_data=qa_data)
    return {task: gen.generate(task, N) for task in rt.TASK_NAMES}


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("char_tok")
    tok.save_pretrained(folder)
    return folder


def test_lines_have_the_format_and_fit_the_budget(samples):
    new_tokens = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}  # RULER's tokens_to_generate
    for task, rows in samples.items():
        assert [r["index"] for r in rows] == list(range(N))
        for r in rows:
            assert list(r) == KEYS and r["task"] == task
            assert r["max_new_tokens"] == new_tokens[rt.TASKS[task].kind]
            assert r["length"] == len(r["input"] + r["answer_prefix"])  # one token per character
            assert r["length"] + r["max_new_tokens"] <= ML, task
            assert r["length"] + r["max_new_tokens"] >= 0.7 * ML, task
            assert r["outputs"] and all(isinstance(o, str) and o for o in r["outputs"])
            json.dumps(r)


def test_prompts_use_ruler_templates(samples):
    single = samples["niah_single_2"][0]
    assert single["input"].startswith("A special magic number is hidden within the following text.")
    assert single["answer_prefix"].startswith(" The special magic number for ")
    assert single["answer_prefix"].endswith(" mentioned in the provided text is")
    multi = samples["niah_multivalue"][0]
    assert multi["input"].startswith("Some special magic numbers are hidden within the following text.")
    assert multi["answer_prefix"].endswith(" mentioned in the provided text are")
    assert samples["niah_single_3"][0]["input"].startswith("A special magic uuid is hidden")
    assert samples["vt"][0]["answer_prefix"].startswith(" Answer: According to the chain(s) of variable assignment")
    assert samples["cwe"][0]["answer_prefix"] == " Answer: The top 10 words that appear most often in the list are:"
    assert samples["fwe"][0]["answer_prefix"].endswith("the three most frequently appeared words are:")
    assert samples["qa_1"][0]["answer_prefix"] == " Answer:"


def _queried_keys(prefix: str):
    query = re.search(r" for (.+) mentioned in the provided text", prefix).group(1)
    return re.split(r", and |, ", query)


@pytest.mark.parametrize("task", NIAH)
def test_niah_answers_are_the_values_of_the_asked_keys(samples, task):
    cfg = rt.TASKS[task]
    num_keys = max(cfg.num_keys, cfg.num_queries)
    for r in samples[task]:
        needles = NEEDLE_RE.findall(r["input"])
        assert {kind for kind, _, _ in needles} == {cfg.value_type}
        by_key = {}
        for _, key, value in needles:
            by_key.setdefault(key, []).append(value)
        asked = _queried_keys(r["answer_prefix"])
        assert len(asked) == cfg.num_queries
        assert sorted(r["outputs"]) == sorted(v for k in asked for v in by_key[k])
        assert len(r["outputs"]) == cfg.num_queries * cfg.num_values
        if cfg.haystack == "needle":  # distractor needles all carry other keys
            assert all(len(by_key[k]) == 1 for k in by_key) and len(needles) > 5
            assert len(r["depth"]) == 1
        else:
            assert len(by_key) == num_keys and len(needles) == num_keys * cfg.num_values == len(r["depth"])
        for value in r["outputs"]:
            assert UUID_RE.match(value) if cfg.value_type == "uuids" else re.fullmatch(r"\d{7}", value)
        for key in asked:
            assert UUID_RE.match(key) if cfg.key_type == "uuids" else re.fullmatch(r"[a-z]+-[a-z]+", key)
        assert all(d in rt.DEPTHS for d in r["depth"]) and r["depth"] == sorted(r["depth"])


@pytest.mark.parametrize("task", NIAH)
def test_niah_needles_sit_at_their_depth(tok, task):
    cfg = rt.TASKS[task]
    gen = rt.RulerGenerator(tok, 6000, seed=11)
    for r in gen.generate(task, 4):
        context = r["input"].split("\n", 1)[1].rsplit("\nWhat ", 1)[0]
        sep = " " if cfg.haystack == "essay" else "\n"
        asked = set(_queried_keys(r["answer_prefix"]))
        real = [m for m in NEEDLE_RE.finditer(context) if cfg.haystack != "needle" or m.group(2) in asked]
        assert len(real) == len(r["depth"])
        removed = sum(len(m.group(0)) + len(sep) for m in real)
        haystack_len = len(context) - removed
        units = context.split(sep) if sep == "\n" else rt.split_sentences(context)
        tolerance = 100 * (max(len(u) for u in units) + 1) / haystack_len + 0.5
        before = 0
        for m, depth in zip(real, r["depth"]):  # needles appear in the order of their (sorted) depths
            offset = m.start() - before
            assert abs(100 * offset / haystack_len - depth) <= tolerance, (task, depth, offset, haystack_len)
            before += len(m.group(0)) + len(sep)


def _resolve(text: str):
    """Variable -> value of every ``VAR A = 123`` / ``VAR B = VAR A`` line of ``text``."""
    bound = dict(re.findall(r"^VAR (\w+) = (?:VAR )?(\w+)$", text, flags=re.M))

    def value(v):
        while v in bound:
            v = bound[v]
        return v
    return {v: value(v) for v in bound}


def test_vt_chain_resolves_to_the_listed_variables(samples):
    for r in samples["vt"]:
        example, task = r["input"].rsplit("Memorize and track", 1)
        query = re.search(r"assigned the value (\d+) in the text above\.$", task).group(1)
        assert f"the value {query}, they are: " in r["answer_prefix"]
        values = _resolve(task)
        assert sorted(v for v, val in values.items() if val == query) == sorted(r["outputs"])
        assert len(r["outputs"]) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in r["outputs"])
        # the one-shot example states its own answer, which its chain supports
        ex_value = re.search(r"assigned the value (\d+) in the text above\.", example).group(1)
        ex_answer = example.rsplit("they are: ", 1)[1].split()
        ex_values = _resolve(example)
        assert sorted(ex_answer) == sorted(v for v, val in ex_values.items() if val == ex_value)
        # depth: share of noise lines before each assignment
        lines = task.split("\n\n", 1)[1].rsplit("\nQuestion:", 1)[0].split("\n")
        noise = [i for i, line in enumerate(lines) if line == rt.NOISE]
        stmts = [i for i, line in enumerate(lines) if line.startswith("VAR ")]
        assert r["depth"] == [round(100 * sum(n < s for n in noise) / len(noise), 1) for s in stmts]


def _top_words(segment: str):
    entries = re.findall(r"(\d+)\. ([a-z]+)", segment)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    return Counter(w for _, w in entries)


def test_cwe_answers_are_the_most_common_words(samples):
    for r in samples["cwe"]:
        _, example, task = r["input"].split("Below is a numbered list of words.")
        counts = _top_words(task.split("\n", 1)[1].split("\nQuestion:")[0])
        assert len(r["outputs"]) == 10 and set(r["outputs"]) <= set(counts)
        rest = [c for w, c in counts.items() if w not in r["outputs"]]
        assert rest and min(counts[w] for w in r["outputs"]) > max(rest)
        assert {counts[w] for w in r["outputs"]} == {6} and set(rest) == {1}  # RULER below 4096 tokens: 6x / 1x
        ex_counts = _top_words(example.split("\n", 1)[1].split("\nQuestion:")[0])
        ex_answer = re.findall(r"\d+\. ([a-z]+)", example.split("appear most often in the list are:")[1])
        assert set(ex_answer) == {w for w, c in ex_counts.items() if c == 3} and len(ex_answer) == 10


def test_fwe_answers_are_the_most_frequent_coded_words(samples):
    for r in samples["fwe"]:
        text = r["input"].split("coded words. ", 1)[1].split("\nQuestion:", 1)[0]
        counts = Counter(text.split())
        assert counts.most_common(1)[0][0] == "..."  # the noise word ranks first and is to be ignored
        del counts["..."]
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[:3] == r["outputs"] and all(re.fullmatch(r"[a-z]{6}", w) for w in r["outputs"])
        assert counts[ranked[2]] > counts[ranked[3]]  # no tie with the fourth word


def _documents(r):
    context = r["input"].split("The following are given documents.\n\n", 1)[1]
    context = context.split("\n\nAnswer the question based on the given documents.", 1)[0]
    docs = re.split(r"(?:^|\n\n)Document \d+:\n", context)[1:]
    numbers = [int(n) for n in re.findall(r"(?:^|\n\n)Document (\d+):\n", context)]
    assert numbers == list(range(1, len(docs) + 1))
    return context, docs


def test_qa_1_gold_paragraph_among_distractors(samples, qa_data):
    squad = qa_data["squad"]
    assert len(squad.items) == 24  # the impossible questions are left out
    for i, r in enumerate(samples["qa_1"]):
        item = squad.items[i]
        assert r["input"].endswith(f"Question: {item.query}") and r["outputs"] == item.outputs
        context, docs = _documents(r)
        gold = squad.docs[item.gold[0]]
        assert gold in docs and r["outputs"][0] in gold and len(docs) > 3
        assert sum(r["outputs"][0] in d for d in docs) == 1  # distractors do not hold the answer
        start = context.index(f"Document {docs.index(gold) + 1}:\n{gold}")
        assert r["depth"] == [round(100 * start / len(context), 1)]


def test_qa_2_supporting_paragraphs_present(samples, qa_data):
    hotpot = qa_data["hotpotqa"]
    for i, r in enumerate(samples["qa_2"]):
        item = hotpot.items[i]
        assert r["outputs"] == [f"ANSWER{i}"] and r["input"].endswith(f"Question: {item.query}")
        context, docs = _documents(r)
        for k in range(4):  # all ten (here four) paragraphs of the question are gold, as in RULER
            assert any(d.startswith(f"Title {i}-{k}\n") for d in docs)
        assert len(docs) > 4 and len(r["depth"]) == 2


def test_qa_loaders_read_datasets_rows_like_the_official_json(qa_files, qa_data):
    """The hub layouts (rajpurkar/squad_v2, hotpotqa/hotpot_qa distractor rows) give the same data."""
    squad_rows = [{"id": q["id"], "title": art["title"], "context": par["context"], "question": q["question"],
                   "answers": {"text": [a["text"] for a in q["answers"]],
                               "answer_start": [a["answer_start"] for a in q["answers"]]}}
                  for art in json.loads(qa_files[0].read_text())["data"] for par in art["paragraphs"]
                  for q in par["qas"]]
    hotpot_rows = [{"id": r["_id"], "question": r["question"], "answer": r["answer"],
                    "supporting_facts": {"title": [t for t, _ in r["supporting_facts"]],
                                         "sent_id": [i for _, i in r["supporting_facts"]]},
                    "context": {"title": [t for t, _ in r["context"]], "sentences": [s for _, s in r["context"]]}}
                   for r in json.loads(qa_files[1].read_text())]
    assert rt.load_squad(squad_rows) == qa_data["squad"]
    assert rt.load_hotpotqa(hotpot_rows) == qa_data["hotpotqa"]


def test_same_seed_same_samples_other_seed_other_samples(tok, qa_data, samples):
    again = rt.RulerGenerator(tok, ML, seed=7, qa_data=qa_data)
    other = rt.RulerGenerator(tok, ML, seed=8, qa_data=qa_data)
    for task in rt.TASK_NAMES:
        assert again.generate(task, N) == samples[task]
        assert [r["input"] for r in other.generate(task, N)] != [r["input"] for r in samples[task]], task


def test_a_length_too_small_is_a_config_error(tok):
    with pytest.raises(ConfigError, match=r"--max_length 600 is too small for vt.*use --max_length >= \d+"):
        rt.RulerGenerator(tok, 600).sample("vt", 0)


def test_prepare_writes_files_and_is_reproducible(tok_dir, qa_files, tmp_path, capsys):
    argv = ["--tokenizer", str(tok_dir), "--max_length", "2048", "--num_samples", "1", "--seed", "3",
            "--squad", str(qa_files[0]), "--hotpotqa", str(qa_files[1])]
    assert prepare.main(argv + ["--max_length", "2304", "--output_dir", str(tmp_path / "a")]) == 0
    assert prepare.main(argv + ["--output_dir", str(tmp_path / "b")]) == 0
    for length in (2048, 2304):
        folder = tmp_path / "a" / str(length)
        for task in rt.TASK_NAMES:
            text = (folder / f"{task}.jsonl").read_text()
            if length == 2048:  # same seed, same files
                assert text == (tmp_path / "b" / "2048" / f"{task}.jsonl").read_text()
            rows = [json.loads(line) for line in text.splitlines()]
            assert len(rows) == 1 and all(list(r) == KEYS for r in rows)
            assert all(r["length"] + r["max_new_tokens"] <= length for r in rows)
        record = json.loads((folder / "prepare.json").read_text())
        assert record["counts"] == {task: 1 for task in rt.TASK_NAMES} and record["skipped"] == {}
        assert record["args"]["max_length"] == length and "transformers" in record["versions"]


def test_prepare_skips_qa_without_sources(tok_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "hub_reachable", lambda timeout=3.0: False)
    assert prepare.main(["--tokenizer", str(tok_dir), "--max_length", "2048", "--num_samples", "1",
                         "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if line.startswith("qa_1 skipped") and "--squad" in line]) == 1
    assert len([line for line in out if line.startswith("qa_2 skipped") and "--hotpotqa" in line]) == 1
    written = sorted(p.stem for p in (tmp_path / "2048").glob("*.jsonl"))
    assert written == sorted(rt.TASK_NAMES[:11])
    assert set(json.loads((tmp_path / "2048" / "prepare.json").read_text())["skipped"]) == {"qa_1", "qa_2"}


@pytest.mark.parametrize("argv, flag", [
    (["--max_length", "0"], "--max_length"),
    (["--max_length", "abc"], "--max_length"),
    (["--num_samples", "0"], "--num_samples"),
    (["--tasks", "niah_single_1,bogus"], "--tasks"),
    (["--tasks", "qa_1", "--squad", "missing/dev-v2.0.json"], "--squad"),
    (["--tasks", "vt", "--max_length", "600"], "--max_length"),
])
def test_bad_flags_are_one_line_config_errors(tok_dir, tmp_path, argv, flag):
    with pytest.raises(ConfigError) as err:
        prepare.main(["--tokenizer", str(tok_dir), "--output_dir", str(tmp_path)] + argv)
    assert str(err.value).count("\n") == 0 and flag in str(err.value)
    assert not list(tmp_path.rglob("*.jsonl"))


def test_script_prints_error_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ruler/prepare.py", "--num_samples", "0"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "ruler" / "prepare.py"), run_name="__main__")
    assert done.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --num_samples must be >= 1, got 0"
