"""scripts/bench_kvzip.py: KVzip's prefill split into its parts, and what the cache holds after it."""
import json
import sys
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.48"),
                                reason="the extension-point integration needs transformers >= 4.48")


def test_parts_add_up_and_the_kept_bytes_are_the_budget(tmp_path):
    from bench_kvzip import main

    from tiny import save_tiny_model, tiny_tokenizer

    model_dir = save_tiny_model(tmp_path / "model", tiny_tokenizer())
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 120}" for i in range(800)))
    out = tmp_path / "run.json"
    assert main(["--model", str(model_dir), "--dataset_name", str(text), "--prompt_tokens", "160", "--budget", "0.25",
                 "--repeats", "1", "--device", "cpu", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    run = record["repeats"][0]
    assert record["prompt_tokens"] == 160 and record["cache_size"] == 40  # no chat template: the text's 160 tokens
    assert run["kvzip prefill"] == pytest.approx(run["prompt forward"] + run["passes"] + run["choice"])
    assert 0 < run["scores"] < run["passes"]
    config = transformers.AutoConfig.from_pretrained(model_dir)
    per_slot = config.num_hidden_layers * config.num_key_value_heads * config.hidden_size // config.num_attention_heads * 2 * 4
    assert run["kept KV MiB"] * 2 ** 20 == pytest.approx(40 * per_slot)  # the model's budget, shared by the scores
    request = len(tiny_tokenizer().encode("\n\nRepeat the previous context exactly.", add_special_tokens=False))
    assert run["kvzip peak KV MiB"] * 2 ** 20 == pytest.approx((160 + request + 1 + 160) * per_slot)  # prompt + pass
    assert "kvzip / snapkv prefill" in out.with_suffix(".md").read_text()


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    from bench_kvzip import main

    assert main(["--budget", "1.5", "--output", str(tmp_path / "r.json")]) == 2
    assert "--budget must be in (0, 1), got 1.5" in capsys.readouterr().err
    assert main(["--repeats", "0", "--output", str(tmp_path / "r.json")]) == 2
    assert "--repeats >= 1" in capsys.readouterr().err
