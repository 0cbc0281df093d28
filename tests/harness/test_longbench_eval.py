"""longbench/eval.py on tiny prediction folders with hand-computed scores."""
import json
import runpy
import sys
from pathlib import Path

import pytest

from lacache_core.errors import ConfigError
from harness.paper import longbench as paper_longbench
from longbench.eval import _run as main  # raises ConfigError (the CLI prints it in one line)

EVAL_SCRIPT = Path(__file__).resolve().parents[2] / "longbench" / "eval.py"
TREC_CLASSES = ["Animal", "City", "Date"]


def write_run(folder: Path, run: dict, datasets: dict) -> Path:
    """A prediction folder: run.json and one jsonl per dataset from (pred, answers, length) triples."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(run))
    for dataset, samples in datasets.items():
        classes = TREC_CLASSES if dataset == "trec" else None
        lines = [json.dumps({"_id": f"{dataset}-{i}", "pred": pred, "answers": answers, "all_classes": classes,
                             "length": length}, ensure_ascii=False)
                 for i, (pred, answers, length) in enumerate(samples)]
        (folder / f"{dataset}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


RUN_A = {"model": "smollm2-1.7b-instruct", "method": "lacache", "budget": 0.5, "span": 16, "overlap": 0}
DATA_A = {
    # 0.8 ([cat, sat] vs [cat, sat, down]) and 2/3 (max over London: 0, "Paris, France": P 1, R 1/2)
    # -> mean 0.7333 -> 73.33
    "hotpotqa": [("The cat sat", ["a cat sat down"], 100), ("Paris", ["London", "Paris, France"], 200)],
    # first line "Animal" -> 1; "City or Date" names 2 classes incl. the truth -> 1/2 -> mean 75.0
    "trec": [("\nAnimal\nCity", ["Animal"], 100), ("City or Date", ["Date"], 100)],
    # "5" -> 1; "5 5 6" -> 2 of 3 numbers -> mean 5/6 -> 83.33
    "passage_count": [("5", ["5"], 100), ("5 5 6", ["5"], 100)],
}
RUN_B = {"model": "llama2-7b-chat-4k", "method": "full", "budget": None, "span": 16, "overlap": 0}
DATA_B = {"hotpotqa": [("Paris", ["Paris"], 100)]}  # exact -> 100.0


@pytest.fixture
def runs(tmp_path):
    pred = tmp_path / "out" / "pred"
    return write_run(pred / "run_a", RUN_A, DATA_A), write_run(pred / "run_b", RUN_B, DATA_B)


def test_scores_and_paper_column(runs, capsys):
    run_a, _ = runs
    assert main(["--path", str(run_a)]) == 0
    result = json.loads((run_a / "result.json").read_text())
    # average (73.33 + 75.0 + 83.33) / 3 = 77.22
    assert result == {"trec": 75.0, "hotpotqa": 73.33, "passage_count": 83.33, "average": 77.22}
    assert list(result) == ["hotpotqa", "trec", "passage_count", "average"]  # LongBench's order
    md = (run_a / "result.md").read_text()
    # paper: SmolLM2-1.7B, LaCache 50%: hotpotqa 24.32 -> diff 73.33 - 24.32 = +49.01
    assert "| hotpotqa | 73.33 | 24.32 | +49.01 |" in md
    assert "| trec | 75.00 | 54.50 | +20.50 |" in md
    # paper average over the same 3 datasets: (24.32 + 54.5 + 1.5) / 3 = 26.77; 77.22 - 26.77 = +50.45
    assert "| average | 77.22 | 26.77 | +50.45 |" in md
    assert "hotpotqa | 73.33" in capsys.readouterr().out


def test_official_model_flag_and_full_column(runs):
    _, run_b = runs
    out = run_b.parents[1]
    assert main(["--model", "run_b", "--output_dir", str(out)]) == 0
    assert json.loads((run_b / "result.json").read_text()) == {"hotpotqa": 100.0, "average": 100.0}
    paper = paper_longbench("llama2-7b-chat")["full"]["hotpotqa"]
    assert f"| hotpotqa | 100.00 | {paper:.2f} | {100 - paper:+.2f} |" in (run_b / "result.md").read_text()


def test_no_paper_number_leaves_cells_empty(tmp_path):
    folder = write_run(tmp_path / "run", {"model": "smollm2-135m-instruct", "method": "lacache", "budget": 0.5},
                       {"hotpotqa": DATA_A["hotpotqa"]})
    main(["--path", str(folder)])
    assert "| hotpotqa | 73.33 |  |  |" in (folder / "result.md").read_text()


def test_several_runs_write_a_comparison(runs, tmp_path):
    run_a, run_b = runs
    out = tmp_path / "cmp"
    assert main(["--path", str(run_a), str(run_b), "--output_dir", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    assert "| dataset | run_a | run_b | paper smollm2-1.7b-instruct lacache_0.5 | paper llama2-7b-chat full |" in table
    assert "| hotpotqa | 73.33 | 100.00 | 24.32 |" in table
    assert "| trec | 75.00 |  | 54.50 |" in table  # run_b has no trec
    assert (run_a / "result.json").exists() and (run_b / "result.json").exists()


def test_longbench_e_buckets(tmp_path):
    folder = write_run(tmp_path / "out" / "pred_e" / "run_e", RUN_A, {
        # exact -> 1 (length 100: 0-4k); 0.8 (5000: 4-8k); 0 (9000: 8k+)
        "hotpotqa": [("Paris", ["Paris"], 100), ("The cat sat", ["a cat sat down"], 5000), ("x", ["y"], 9000)],
        "passage_count": [("5", ["5"], 3999)],  # only the 0-4k bucket has samples
    })
    assert main(["--model", "run_e", "--e", "--output_dir", str(tmp_path / "out")]) == 0
    result = json.loads((folder / "result.json").read_text())
    assert result["hotpotqa"] == {"0-4k": 100.0, "4-8k": 80.0, "8k+": 0.0}
    assert result["passage_count"] == {"0-4k": 100.0, "4-8k": None, "8k+": None}  # empty bucket -> null
    assert result["average"] == {"0-4k": 100.0, "4-8k": 80.0, "8k+": 0.0}
    assert "| hotpotqa | 100.00 | 80.00 | 0.00 |" in (folder / "result.md").read_text()


def test_other_jsonl_files_are_skipped(runs):
    run_a, _ = runs
    (run_a / "hotpotqa.rank0-of-2.jsonl").write_text("{}\n")  # a pred.py shard: not scored twice
    main(["--path", str(run_a)])
    assert json.loads((run_a / "result.json").read_text())["hotpotqa"] == 73.33
    assert "hotpotqa.rank0-of-2.jsonl (not a LongBench dataset name)" in (run_a / "result.md").read_text()


def test_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--path"):
        main(["--path", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="--model nope"):
        main(["--model", "nope", "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="--model NAME"):
        main([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no LongBench prediction files"):
        main(["--path", str(tmp_path / "empty")])


def test_script_prints_one_error_line_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["eval.py", "--path", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EVAL_SCRIPT), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: --path {tmp_path / 'missing'}: no such folder\n"


def test_classification_needs_the_class_list(tmp_path):
    folder = write_run(tmp_path / "run", RUN_A, {"trec": DATA_A["trec"]})
    line = json.dumps({"_id": "t", "pred": "Animal", "answers": ["Animal"], "all_classes": None, "length": 1})
    (folder / "trec.jsonl").write_text(line + "\n")
    with pytest.raises(ConfigError, match="all_classes"):
        main(["--path", str(folder)])
