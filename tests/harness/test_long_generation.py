"""scripts/long_generation.py: agreement with the full cache's greedy tokens, and peak KV, as recorded."""
import json
import sys
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.48"),
                                reason="the extension-point integration needs transformers >= 4.48")


def test_agreement_and_peak_kv_are_those_of_the_recorded_tokens(tmp_path, capsys):
    from long_generation import main

    from tiny import save_tiny_model, tiny_tokenizer

    model_dir = save_tiny_model(tmp_path / "model", tiny_tokenizer())
    out = tmp_path / "run.json"
    assert main(["--model", str(model_dir), "--methods", "streamingllm,h2o", "--cache_size", "12", "--tokens", "40",
                 "--agreement_at", "10,40", "--prompt", "w1 w2 w3 w4 w5 w6", "--device", "cpu",
                 "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {r["method"]: r for r in record["results"]}
    full = rows["full"]["tokens"]
    assert len(full) == 40 and record["args"]["cache_size"] == 12
    for method in ("streamingllm", "h2o"):
        row = rows[method]
        same = [a == b for a, b in zip(row["tokens"], full)]
        first = same.index(False) if False in same else None
        assert row["first_difference"] == first
        assert row["agreement"] == {"10": sum(same[:10]) / 10, "40": sum(same) / 40}
        assert row["peak_kv_bytes"] < rows["full"]["peak_kv_bytes"]  # 12 slots against the prompt and 40 tokens
    assert any(rows[m]["first_difference"] is not None for m in ("streamingllm", "h2o"))  # the check can fail
    assert out.with_suffix(".md").read_text().startswith("| method | peak KV MiB |")


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    from long_generation import main

    assert main(["--methods", "lacache,nope", "--output", str(tmp_path / "r.json")]) == 2
    assert "--methods must be comma-separated names of" in capsys.readouterr().err
    assert main(["--agreement_at", "10,5000", "--tokens", "100", "--output", str(tmp_path / "r.json")]) == 2
    assert "--agreement_at values must be in [1, --tokens 100]" in capsys.readouterr().err
