"""DuoAttention: head patterns read from DuoAttention's published format or our JSON, streaming heads chosen over
all layers as kvpress's ``DuoAttentionPress.post_init_from_model`` (NVIDIA/kvpress @ 8bb29b9), and what each head
keeps after the prompt."""
import json

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import CompressedCache, ConfigError, DuoAttention, build_policy, enable_position_shift
from lacache_core.versions import with_cache
from tiny import tiny_model

# 3 layers x 2 KV heads; clipped to [0, 1] as DuoAttention's load_attn_pattern does (-0.2 -> 0, 1.3 -> 1)
TABLE = [[0.9, -0.2], [0.4, 1.3], [0.1, 0.6]]


def published(tmp_path, sink=2, recent=3):
    folder = tmp_path / "Llama-like" / "lr=0.02-reg=0.05"
    folder.mkdir(parents=True)
    (folder / "full_attention_heads.tsv").write_text("\n".join("\t".join(map(str, row)) for row in TABLE) + "\n")
    (folder / "config.json").write_text(json.dumps({"sink_size": sink, "recent_size": recent}))
    return folder


def keeps(policy, n, layers=3, kv_heads=2):
    policy.bind(layers)
    out = []
    for layer in range(layers):
        policy.record(layer, n)
        policy.observe(layer, torch.zeros(1, 4, n, 8), torch.zeros(1, kv_heads, n, 8), 1.0)
        keep = policy.settle(layer, n)
        out.append(None if keep is None else [k.tolist() for k in keep])
    return out


@pytest.mark.parametrize("ratio,streaming", [
    (0.5, {(0, 1), (2, 0), (1, 0)}),  # round(6 * 0.5) = 3 lowest of 0, 0.1, 0.4, 0.6, 0.9, 1
    (0.34, {(0, 1), (2, 0)}),         # round(2.04) = 2
    (0.0, set()),
])
def test_the_lowest_scored_heads_of_all_layers_stream(tmp_path, ratio, streaming):
    policy = DuoAttention(duo_patterns=str(published(tmp_path)), head_compression_ratio=ratio)
    n = 12
    window = [0, 1, 9, 10, 11]  # sink_size 2, recent_size 3 from config.json
    expected = []
    for layer in range(3):
        heads = [window if (layer, h) in streaming else list(range(n)) for h in range(2)]
        expected.append(None if all(len(h) == n for h in heads) else heads)
    assert keeps(policy, n) == expected


def test_tsv_file_and_json_give_the_same_heads_and_flags_override_the_sizes(tmp_path):
    folder = published(tmp_path)
    ours = tmp_path / "mine.json"
    ours.write_text(json.dumps({"sink_size": 2, "recent_size": 3, "scores": TABLE}))
    by_folder = keeps(DuoAttention(duo_patterns=str(folder)), 12)
    assert keeps(DuoAttention(duo_patterns=str(folder / "full_attention_heads.tsv")), 12) == by_folder
    assert keeps(DuoAttention(duo_patterns=str(ours)), 12) == by_folder
    wider = keeps(DuoAttention(duo_patterns=str(ours), start_size=1, recent_window=4), 12)
    assert wider[0] == [list(range(12)), [0, 8, 9, 10, 11]]


@pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"), reason="cache objects need transformers >= 4.36")
def test_a_prompt_within_sinks_and_window_is_kept_whole_and_decoding_grows_every_head(tmp_path):
    policy = DuoAttention(duo_patterns=str(published(tmp_path)))
    assert keeps(policy, 5) == [None, None, None]
    model = enable_position_shift(tiny_model("llama", "eager", layers=3))
    cache = CompressedCache(DuoAttention(duo_patterns=str(published(tmp_path / "b"))), 3)
    tokens = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(tokens[:, :20], **with_cache(cache), use_cache=True)
        model(tokens[:, 20:21], **with_cache(cache), use_cache=True)
    assert cache.head_lengths(0).tolist() == [21, 6]  # layer 0: head 1 streams (2 + 3, then the new token)
    assert cache.kept_positions()[0][1].tolist() == [0, 1, 17, 18, 19, 20]


def test_bad_patterns_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs DuoAttention.duo_patterns FILE"):
        build_policy("duo_attention")
    with pytest.raises(ConfigError, match="cannot read"):
        DuoAttention(duo_patterns=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.tsv"
    bad.write_text("0.1\tx\n")
    with pytest.raises(ConfigError, match="not a table of numbers"):
        DuoAttention(duo_patterns=str(bad))
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps({"scores": [[0.1, 0.2], [0.3]]}))
    with pytest.raises(ConfigError, match="one row of numbers per layer"):
        DuoAttention(duo_patterns=str(ragged))
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({"scores": [[0.1]], "sink_size": -1}))
    with pytest.raises(ConfigError, match="sink_size must be an integer >= 0"):
        DuoAttention(duo_patterns=str(sizes))
    policy = DuoAttention(duo_patterns=str(published(tmp_path)))
    with pytest.raises(ConfigError, match="scores 3 layers, the model has 4"):
        policy.bind(4)
    with pytest.raises(ConfigError, match="scores 2 KV heads a layer, the model has 3"):
        keeps(DuoAttention(duo_patterns=str(published(tmp_path / "c"))), 12, kv_heads=3)
