"""ruler/pred.py end to end on a tiny model: per-sample budget, outputs, resume, scoring, errors."""
import json

import pytest

from lacache_core.versions import HAS_CACHE_CLASSES
from tiny import result_dir

pytestmark = pytest.mark.skipif(not HAS_CACHE_CLASSES, reason="prompt harnesses need transformers >= 4.36")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two tasks in ruler/prepare.py's format (word-level prompts the tiny tokenizer knows)."""
    folder = tmp_path_factory.mktemp("ruler_data") / "256"
    folder.mkdir()
    for task in ("niah_single_1", "vt"):
        rows = [{"index": i, "task": task, "input": " ".join(f"w{(7 * i + j) % 120}" for j in range(180)),
                 "answer_prefix": " w5 w6", "outputs": ["w3"], "length": 182, "max_new_tokens": 4, "depth": [50.0]}
                for i in range(3)]
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "prepare.json").write_text(json.dumps({"args": {"max_length": 256}}))
    return folder


def run(tiny_dir, data_dir, out, *extra):
    from ruler.pred import main
    return main(["--model_name_or_path", str(tiny_dir), "--data_dir", str(data_dir), "--device", "cpu",
                 "--output_dir", str(out), "--span", "2", *extra])


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predictions_budget_resume_and_scoring(tiny_dir, data_dir, tmp_path):
    assert run(tiny_dir, data_dir, tmp_path, "--method", "full,lacache", "--budget", "0.5") == 0
    lacache = result_dir(tmp_path, f"{tiny_dir.name}__256__lacache_b0.5_S2_O0")
    rows = read(lacache / "vt.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2]
    # budget x prompt tokens: the prompt is input + answer prefix (182 words)
    assert all(r["prompt_tokens"] == 182 and r["cache_size"] == 91 for r in rows)
    assert json.loads((lacache / "run.json").read_text())["max_length"] == 256
    before = (lacache / "vt.jsonl").read_text()
    assert run(tiny_dir, data_dir, tmp_path, "--method", "lacache", "--budget", "0.5") == 0  # nothing left to do
    assert (lacache / "vt.jsonl").read_text() == before

    from ruler.eval import main as evaluate
    full = result_dir(tmp_path, f"{tiny_dir.name}__256__full")
    assert evaluate(["--pred_dir", str(full), str(lacache)]) == 0
    summary = (lacache / "summary.csv").read_text()
    assert "niah_single_1" in summary and "vt" in summary


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "nope"], "--tasks must be a comma list"),
    (["--tasks", "cwe"], "no samples for cwe"),
    (["--budget", "0"], "--budget must be in (0, 1]"),
])
def test_bad_flags(tiny_dir, data_dir, tmp_path, capsys, flags, message):
    assert run(tiny_dir, data_dir, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
