"""ruler/pred.py end to end on a tiny model: per-sample budget, outputs, resume, scoring, errors."""
import json

import pytest

from lacache_core.versions import HAS_CACHE_CLASSES
from runs import run_ruler as run
from tiny import result_dir

pytestmark = pytest.mark.skipif(not HAS_CACHE_CLASSES, reason="prompt harnesses need transformers >= 4.36")


@pytest.fixture(scope="module")
def data_dir(ruler_data):
    """The RULER-format data (conftest's ``ruler_data``; ``data_dir`` there is LongBench's)."""
    return ruler_data


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
