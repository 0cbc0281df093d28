"""scripts/duo_patterns.py: kvpress's on-the-fly DuoAttention scores, re-derived from the model's projections, and a
file DuoAttention reads."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.48"),
                                reason="the extension-point integration needs transformers >= 4.48")


def kvpress_scores(model, ids, q_len):
    """``duo_attention_on_the_fly`` for one text, as kvpress computes it: each layer's input through
    ``input_layernorm``, ``q_proj`` and ``k_proj``, the means over tokens repeated ``q_len`` times and rotated
    (rotate-half, theta from the config), the last query's softmax attention, the area under its cumsum."""
    from tiny import rotate

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    hidden = model(ids, output_hidden_states=True).hidden_states[:-1]
    out = []
    for layer, h in zip(model.model.layers, hidden):
        h = layer.input_layernorm(h)
        q = layer.self_attn.q_proj(h).view(-1, heads, d).mean(0)  # [heads, d]
        k = layer.self_attn.k_proj(h).view(-1, kv_heads, d).mean(0)
        pos = torch.arange(q_len)
        theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
        last_q = rotate(q[:, None].expand(heads, q_len, d), pos, theta, d)[:, -1]
        keys = rotate(k[:, None].expand(kv_heads, q_len, d), pos, theta, d).repeat_interleave(heads // kv_heads, 0)
        attention = (torch.einsum("hd,hnd->hn", last_q, keys) / math.sqrt(d)).softmax(-1)
        out.append(attention.cumsum(-1).mean(-1).view(kv_heads, -1).mean(-1))
    return torch.stack(out)


def test_scores_equal_kvpress_on_the_fly_rule():
    from duo_patterns import MeanQueryKey, area_under_cumulative_attention

    from lacache_core import CompressedCache, enable_position_shift
    from lacache_core.versions import with_cache
    from tiny import tiny_model

    model = tiny_model("llama", "eager", layers=3)
    with torch.no_grad():  # sharper attention than random init gives, so that the heads' scores differ
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    ids = torch.tensor([[5, 9] * 20])  # two tokens: means that do not average out
    with torch.no_grad():
        expected = kvpress_scores(model, ids, 64)
        enable_position_shift(model)
        policy = MeanQueryKey()
        model(ids, **with_cache(CompressedCache(policy, 3)), use_cache=True)
        ours = torch.stack([area_under_cumulative_attention(q, k, policy.rotation, 64, s) for q, k, s in policy.means])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert ours.std() > 1e-2  # heads differ, so the comparison can fail


def test_patterns_file_is_read_by_duo_attention(tmp_path):
    from duo_patterns import main

    from lacache_core import DuoAttention
    from tiny import char_tokenizer, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", char_tokenizer())
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"text number {i} " * 20}) for i in range(3)) + "\n")
    out = tmp_path / "tiny.duo.json"
    assert main(["--model_name_or_path", str(model_dir), "--dataset_name", str(texts), "--num_samples", "2",
                 "--q_len", "50", "--device", "cpu", "--output", str(out)]) == 0
    table = json.loads(out.read_text())
    record = json.loads(out.with_suffix(".run.json").read_text())
    assert record["complete"] and record["setting"]["num_samples"] == 2
    assert (table["sink_size"], table["recent_size"]) == (128, 256) and len(table["scores"]) == 4
    assert all(len(row) == 2 and all(0 < v <= 1 for v in row) for row in table["scores"])
    policy = DuoAttention(duo_patterns=str(out))
    policy.bind(4)
    assert policy._streaming.sum() == 4  # half of the 8 (layer, KV head) pairs
