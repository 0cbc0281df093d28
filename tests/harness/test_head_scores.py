"""scripts/head_scores.py: where the needle is, what a head copies, and a file HeadKV reads."""
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.48"),
                                reason="the extension-point integration needs transformers >= 4.48")


def test_needle_positions_cover_every_occurrence_of_the_key():
    from head_scores import needle_positions

    # the key 7 8 appears at 2-3 and 6-7; a lone 7 at 9 is no occurrence
    assert needle_positions([1, 2, 7, 8, 3, 4, 7, 8, 5, 7], [7, 8]) == [2, 3, 6, 7]


def test_top_attended_ranks_prompt_positions_like_the_attention():
    from head_scores import TopAttended

    # 2 query heads on 1 KV head; keys along e0 with logits 1, 5, 3 for query e0 and -1, -5, -3 for -e0
    key = torch.tensor([[1.0, 0.0], [5.0, 0.0], [3.0, 0.0], [9.0, 0.0]])[None, None]
    query = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])[None, :, None]
    policy = TopAttended(top_k=2, prompt_len=3)  # slot 3 is not in the prompt: never counted
    policy.observe(0, query, key, scaling=1.0)
    assert policy.top[0].tolist() == [[1, 2], [0, 2]]


def test_scores_file_is_read_by_headkv(tmp_path):
    from head_scores import main

    from lacache_core import HeadKV
    from tiny import char_tokenizer, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", char_tokenizer())  # one token per digit: the key is findable
    out = tmp_path / "scores.json"
    assert main(["--model_name_or_path", str(model_dir), "--lengths", "120", "--depths", "0.5", "--device", "cpu",
                 "--output", str(out)]) == 0
    table = json.loads(out.read_text())
    record = json.loads(out.with_suffix(".run.json").read_text())
    assert record["complete"] and record["setting"]["lengths"] == [120]
    assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in table.values())
    policy = HeadKV(cache_size=40, window_size=8, head_scores=str(out))
    layers = 1 + max(int(k.split("-")[0]) for k in table)
    heads = 1 + max(int(k.split("-")[1]) for k in table)
    assert len(table) == layers * heads
    policy.bind(layers)
    assert policy.caps(heads, heads).shape == (layers, heads)
