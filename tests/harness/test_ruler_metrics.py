"""RULER scoring by hand (string_match_all / string_match_part) and ruler/eval.py's summaries."""
import csv
import json

import pytest

from harness import paper
from lacache_core.errors import ConfigError
from ruler import eval as ruler_eval
from ruler.metrics import metric_for, postprocess, string_match_all, string_match_part


def test_string_match_all_by_hand():
    preds = ["The numbers are 1234567 and 7654321.", "only 7654321", "NOTHING"]
    refs = [["1234567", "7654321"], ["1234567", "7654321"], ["abc"]]
    # per sample: 2/2 = 1, 1/2 = 0.5, 0/1 = 0 -> mean 1.5 / 3 = 0.5 -> 50.0
    assert string_match_all(preds, refs) == pytest.approx(50.0)


def test_string_match_part_by_hand():
    preds = ["Paris, France", "in london", "Berlin"]
    refs = [["paris", "Lyon"], ["Rome", "Madrid"], ["BERLIN"]]
    # per sample: any found -> 1, 0, 1 -> 2 / 3 -> 66.67
    assert string_match_part(preds, refs) == pytest.approx(200 / 3)


def test_all_and_part_differ_on_a_partial_answer():
    preds, refs = ["A b"], [["a", "c"]]
    # all: 1 of 2 references -> 50; part: at least one -> 100
    assert string_match_all(preds, refs) == pytest.approx(50.0)
    assert string_match_part(preds, refs) == pytest.approx(100.0)


def test_matching_is_case_insensitive_substring():
    # "zjdph" is inside "VAR ZJDPH" and "QWERT" inside "qwerty"; "ABCDE" is absent -> 2/3 -> 66.67
    assert string_match_all(["VAR ZJDPH, then qwerty"], [["zjdph", "QWERT", "ABCDE"]]) == pytest.approx(200 / 3)


def test_qa_uses_part_and_the_rest_all():
    assert metric_for("qa_1") is string_match_part and metric_for("qa_2") is string_match_part
    for task in ("niah_single_1", "niah_multivalue", "vt", "cwe", "fwe"):
        assert metric_for(task) is string_match_all


def test_postprocess_like_ruler():
    # control characters become newlines, then the ends are stripped
    assert postprocess("  \x00abc\x1fdef\t ") == "abc\ndef"
    # a reference split by a control character no longer matches: "12\n34" does not contain "1234"
    assert string_match_all(["12\x0034"], [["1234"]]) == 0.0


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        string_match_all(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        string_match_part([], [])


def _write_run(folder, info, preds):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(info))
    for task, rows in preds.items():
        with open(folder / f"{task}.jsonl", "w") as f:
            for i, (pred, outputs) in enumerate(rows):
                f.write(json.dumps({"index": i, "pred": pred, "outputs": outputs, "length": 100}) + "\n")


@pytest.fixture
def runs(tmp_path):
    common = {"model": "tiny", "budget": 8192, "span": 16, "overlap": 0, "max_length": 16384}
    a, b = tmp_path / "runs" / "lac", tmp_path / "runs" / "sllm"
    _write_run(a, common | {"method": "lacache"}, {
        # niah_single_1: 1 + 0 -> 50.0
        "niah_single_1": [("The special magic number is 1234567.", ["1234567"]), ("I do not know", ["7654321"])],
        # qa_1 (part): "Normandy" found -> 1; "10th century" missing -> 0 -> 50.0
        "qa_1": [("It was Normandy.", ["Normandy", "France"]), ("No idea", ["10th century"])],
        # cwe (all): 3 of 4 words -> 75.0
        "cwe": [("1. apple 2. Banana 3. cherry", ["apple", "banana", "cherry", "date"])],
    })
    _write_run(b, common | {"method": "streamingllm"}, {
        # niah_single_1: 1 + 1 -> 100.0; qa_1: 0 + 0 -> 0.0
        "niah_single_1": [("1234567", ["1234567"]), ("7654321", ["7654321"])],
        "qa_1": [("Paris", ["Normandy"]), ("", ["10th century"])],
    })
    return a, b


def test_eval_writes_summaries_with_paper_values(runs, tmp_path, capsys):
    a, b = runs
    assert ruler_eval.main(["--pred_dir", str(a), str(b)]) == 0
    rows = list(csv.reader((a / "summary.csv").read_text().splitlines()))
    # paper order: niah_single_1, cwe, qa_1; avg = (50 + 75 + 50) / 3 = 58.33 over 2 + 1 + 2 = 5 samples
    assert rows == [["task", "score", "n"], ["niah_single_1", "50.00", "2"], ["cwe", "75.00", "1"],
                    ["qa_1", "50.00", "2"], ["avg", "58.33", "5"]]
    rows = list(csv.reader((b / "summary.csv").read_text().splitlines()))
    assert rows[1:] == [["niah_single_1", "100.00", "2"], ["qa_1", "0.00", "2"], ["avg", "50.00", "4"]]
    ref = paper.ruler()
    md = (a / "summary.md").read_text()
    assert "| task | score | n | paper (lacache) |" in md
    assert f"| niah_single_1 | 50.00 | 2 | {ref['lacache']['niah_single_1']:.2f} |" in md
    assert f"| avg (3 tasks) | 58.33 | 5 | {ref['lacache']['avg']:.2f} |" in md
    assert f"| qa_1 | 0.00 | 2 | {ref['streamingllm']['qa_1']:.2f} |" in (b / "summary.md").read_text()
    table = (tmp_path / "runs" / "comparison.md").read_text()  # the run folders' common parent
    assert "| task | lacache b8192 s16 o0 | streamingllm b8192 | paper lacache | paper streamingllm |" in table
    assert (f"| cwe | 75.00 | - | {ref['lacache']['cwe']:.2f} | {ref['streamingllm']['cwe']:.2f} |") in table
    assert f"| avg | 58.33 | 50.00 | {ref['lacache']['avg']:.2f} | {ref['streamingllm']['avg']:.2f} |" in table


def test_eval_without_known_method_has_no_paper_column(tmp_path):
    run = tmp_path / "full"
    _write_run(run, {"method": "full"}, {"vt": [("A B C D E", ["A", "B", "C", "D", "E"])]})
    assert ruler_eval.main(["--pred_dir", str(run)]) == 0
    assert "paper" not in (run / "summary.md").read_text()
    assert not (tmp_path / "comparison.md").exists()  # one run and no --output_dir: no comparison


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_eval_bad_pred_dir_is_a_config_error(tmp_path, make):
    folder = tmp_path / "run"
    if make == "empty":
        folder.mkdir()
    with pytest.raises(ConfigError, match="--pred_dir"):
        ruler_eval.main(["--pred_dir", str(folder)])
