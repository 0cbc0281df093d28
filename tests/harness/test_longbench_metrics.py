"""LongBench metrics against hand-computed scores (arithmetic in the comments)."""
import math

import pytest

from longbench import config, metrics
from longbench.metrics import (classification, code_sim, count, fuzz_ratio, qa_f1, qa_f1_zh, retrieval,
                               retrieval_zh, rouge, rouge_zh, score, score_e)


# ------------------------------------------------------------------------------------------ config
def test_config_tables_cover_the_21_datasets():
    assert len(config.DATASETS) == 21 and len(set(config.DATASETS)) == 21
    assert set(config.PROMPTS) == set(config.MAX_NEW_TOKENS) == set(config.METRICS) == set(config.DATASETS)
    assert set(config.DATASETS_E) <= set(config.DATASETS) and len(config.DATASETS_E) == 13
    assert set(config.METRICS.values()) == set(metrics.METRIC_FUNCTIONS)
    assert config.FIRST_LINE_ONLY <= config.NO_CHAT
    for name, prompt in config.PROMPTS.items():  # every prompt formats with LongBench's two fields
        assert "{context}" in prompt
        prompt.format(context="C", input="I")
    assert config.MODEL_MAX_LENGTH["llama2-7b-chat-4k"] == 3500
    assert config.MAX_NEW_TOKENS["gov_report"] == 512 and config.MAX_NEW_TOKENS["samsum"] == 128


# ------------------------------------------------------------------------------------------ qa_f1
def test_qa_f1_english():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: P = 2/2, R = 2/3,
    # F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert qa_f1("The cat sat", "a cat sat down") == pytest.approx(0.8)
    # "The answer is: Paris!" -> [answer, is, paris] vs [paris]: P = 1/3, R = 1, F1 = (2/3) / (4/3) = 0.5
    assert qa_f1("The answer is: Paris!", "Paris") == pytest.approx(0.5)
    # punctuation goes before articles: "The, Beatles." -> "the beatles" -> [beatles]: exact match
    assert qa_f1("The, Beatles.", "Beatles") == pytest.approx(1.0)
    # multiset overlap: [paris, paris] vs [paris] share 1: P = 1/2, R = 1, F1 = 1 / 1.5 = 2/3
    assert qa_f1("paris paris", "Paris") == pytest.approx(2 / 3)


def test_qa_f1_empty_and_disjoint_are_zero():
    assert qa_f1("", "Paris") == 0
    assert qa_f1("the", "Paris") == 0  # only an article: nothing left
    assert qa_f1("London", "Paris") == 0


def test_qa_f1_zh():
    pytest.importorskip("jieba")
    # jieba: 我喜欢北京。 -> [我, 喜欢, 北京, 。]; 。 normalises to "" and is dropped -> [我, 喜欢, 北京]
    #        我爱北京天安门 -> [我, 爱, 北京, 天安门]
    # overlap {我, 北京} = 2: P = 2/3, R = 2/4, F1 = 2 * (1/3) / (7/6) = 4/7
    assert qa_f1_zh("我喜欢北京。", "我爱北京天安门") == pytest.approx(4 / 7)
    # punctuation and spaces only -> no tokens -> 0
    assert qa_f1_zh("，。！ ", "北京") == 0
    assert qa_f1_zh("", "北京") == 0


# ------------------------------------------------------------------------------------------ rouge
def test_rouge_l():
    pytest.importorskip("rouge")
    # LCS("the cat sat", "the cat sat on a mat") = 3 words; P = 3/3, R = 3/6,
    # F = 2PR / (P + R + 1e-8) (the package's smoothing) = 1 / 1.5 = 2/3
    assert rouge("the cat sat", "the cat sat on a mat") == pytest.approx(2 / 3, abs=1e-6)
    assert rouge("the cat sat", "the cat sat") == pytest.approx(1.0, abs=1e-6)


def test_rouge_exception_scores_zero():
    pytest.importorskip("rouge")
    # the package raises "Hypothesis is empty." / "Reference is empty." (full stops split
    # sentences, so "..." is empty too); LongBench scores the exception as 0
    assert rouge("", "the cat sat") == 0.0
    assert rouge("...", "the cat sat") == 0.0
    assert rouge("the cat sat", "") == 0.0


def test_rouge_zh():
    pytest.importorskip("jieba")
    pytest.importorskip("rouge")
    # "我 喜欢 北京" vs "我 爱 北京 天安门": LCS [我, 北京] = 2: P = 2/3, R = 2/4, F = 4/7
    assert rouge_zh("我喜欢北京", "我爱北京天安门") == pytest.approx(4 / 7, abs=1e-6)
    assert rouge_zh("", "我爱北京天安门") == 0.0


# ------------------------------------------------------------------------------------------ classification
def test_classification_basic():
    classes = ["Animal", "City", "Date"]
    assert classification("Animal", "Animal", all_classes=classes) == 1.0
    # two classes named: [Animal, City], truth among them -> 1/2
    assert classification("Animal or City", "City", all_classes=classes) == 0.5
    assert classification("Date", "City", all_classes=classes) == 0.0
    assert classification("no idea", "City", all_classes=classes) == 0.0  # no match -> 0 (no fuzzy fallback)
    assert classification("", "City", all_classes=classes) == 0.0


def test_classification_substring_rule():
    # "Other" is inside the truth "Other number" but is another class: dropped -> [Other number] -> 1
    classes = ["Date", "Other", "Other number"]
    assert classification("Other number", "Other number", all_classes=classes) == 1.0
    # with the truth "Other", "Other" stays and "Other number" is not inside "Other": 1/2
    assert classification("Other number", "Other", all_classes=classes) == 0.5


def test_classification_removal_while_iterating_quirk():
    # matches [New, York, New York]; LongBench removes "New" while iterating, so "York" slides into
    # the examined slot and is skipped: [York, New York] -> 1/2 (a clean filter would give 1)
    classes = ["New", "York", "New York"]
    assert classification("New York", "New York", all_classes=classes) == 0.5


# ------------------------------------------------------------------------------------------ numbers
def test_retrieval_en_and_zh():
    assert retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval("Paragraph 3 or Paragraph 13", "Paragraph 3") == 0.5  # numbers [3, 13]: 1 of 2
    assert retrieval("Paragraph 30", "Paragraph 3") == 0.0  # whole numbers, no substring credit
    assert retrieval("I do not know", "Paragraph 3") == 0.0  # no numbers
    assert retrieval("", "Paragraph 3") == 0.0
    assert retrieval_zh("段落5", "段落5") == 1.0
    assert retrieval_zh("答案是段落5和段落6", "段落5") == 0.5
    with pytest.raises(ValueError):
        retrieval("Paragraph 3", "no id here")


def test_count():
    assert count("There are 12 unique paragraphs", "12") == 1.0
    assert count("12 or 13", "12") == 0.5
    assert count("5 5 6", "5") == pytest.approx(2 / 3)
    assert count("", "12") == 0.0


# ------------------------------------------------------------------------------------------ code
def test_code_sim_first_code_line():
    # fences and comment lines are skipped; "return x+1" vs "return x + 1": difflib matches
    # "return x" + "+" + "1" = 10 chars, ratio = 2 * 10 / (10 + 12) = 0.909 -> 91 -> 0.91
    assert code_sim("```python\n# add one\nreturn x+1\n```", "return x + 1") == 0.91
    assert code_sim("\n\n// comment\nreturn x + 1;", "return x + 1;") == 1.0
    assert code_sim("# only a comment", "return x") == 0.0  # no code line -> "" -> 0
    assert code_sim("", "return x") == 0.0


def test_fuzz_ratio_is_fuzzywuzzys_difflib_path():
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("", "a") == 0 and fuzz_ratio("abc", "abc") == 100
    # difflib, not exact LCS: "if (i < n) {" vs "while (n > i) {" is 52 here (rapidfuzz says 59.26)
    assert fuzz_ratio("if (i < n) {", "while (n > i) {") == 52
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    if fuzz.SequenceMatcher.__module__ != "difflib":
        pytest.skip("fuzzywuzzy uses python-Levenshtein here, not the difflib path LongBench ran")
    pairs = [("self.assertEqual(a, b)", "self.assertEquals(a,b)"), ("x = foo(a, b)", "y = foo(b, a)"),
             ("for k, v in d.items():", "for v, k in d.items():"), ("public void run() {", "int run(int a) {"),
             ("return x+1", "return x + 1"), ("if (i < n) {", "while (n > i) {")]
    for a, b in pairs:
        assert fuzz_ratio(a, b) == fuzz.ratio(a, b)


# ------------------------------------------------------------------------------------------ dataset scores
def test_score_takes_max_over_answers_and_averages():
    # "Paris" vs "London": 0; vs "Paris, France" -> [paris] vs [paris, france]: P = 1, R = 1/2, F1 = 2/3
    assert score("hotpotqa", ["Paris"], [["London", "Paris, France"]]) == 66.67
    # samples 0.8 and 0 -> mean 0.4 -> 40.0
    assert score("hotpotqa", ["The cat sat", "nothing"], [["a cat sat down"], ["x"]]) == 40.0
    assert score("hotpotqa", [""], [["Paris"]]) == 0.0
    with pytest.raises(ValueError):
        score("hotpotqa", [], [])


def test_first_line_rule_trec():
    classes = ["Animal", "City"]
    # trec keeps "Animal" (first line after leading newlines) -> 1; the whole text names both -> 1/2
    assert score("trec", ["\nAnimal\nCity"], [["Animal"]], classes) == 100.0
    assert classification("\nAnimal\nCity", "Animal", all_classes=classes) == 0.5


def test_first_line_rule_samsum():
    pytest.importorskip("rouge")
    pred = "John will come.\nDialogue: Amy: hi"
    # samsum scores "John will come." only -> identical to the reference -> F = 2 / (2 + 1e-8) -> 100.0
    assert score("samsum", [pred], [["John will come."]]) == 100.0
    # gov_report keeps every line: LCS 3 of the hypothesis's 6 words (P = 1/2, R = 1) -> F = 2/3
    assert score("gov_report", [pred], [["John will come."]]) == 66.67


def test_score_e_buckets():
    # passage_count, truth "5": scores 1, 1, 0, 2/3 ("5 5 6": 2 of 3 numbers)
    # lengths 3999 -> 0-4k; 4000, 7999 -> 4-8k; 8000 -> 8k+
    out = score_e("passage_count", ["5", "5", "6", "5 5 6"], [["5"]] * 4, [3999, 4000, 7999, 8000])
    assert out == {"0-4k": 100.0, "4-8k": 50.0, "8k+": 66.67}
    empty = score_e("passage_count", ["5"], [["5"]], [100])
    assert empty["0-4k"] == 100.0 and math.isnan(empty["4-8k"]) and math.isnan(empty["8k+"])
