"""LaCache and StreamingLLM inside vLLM (lacache_vllm), on vLLM's CPU build, against our Hugging Face cache.

The reference is ``model.generate`` with :func:`lacache_core.make_cache` of the same method and settings, on the
same weights: the path every other test checks against the official code and a from-scratch decoder step.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engines import BLOCK, close, engine_core, greedy, make_llm
from lacache_core import enable_position_shift, make_cache
from lacache_core.errors import ConfigError
from lacache_vllm.settings import CompressionSettings

NEW_TOKENS = 200
# Prompts of different lengths, shorter and longer than the budget, in one batch.
PROMPTS = [list(range(1, 40)), list(range(5, 100)), [7, 9, 11] * 40]
METHODS = {
    # 6 layers, span 2: ladder groups of 3 slots, each layer keeps 1 (offsets 0, 1, 2, 0, ...), 2 freed per group.
    "lacache": dict(method="lacache", cache_size=70, span=2, overlap=0, start_size=4),
    "streamingllm": dict(method="streamingllm", cache_size=64, start_size=4),
}


def hf_generate(model, prompt, settings, new_tokens=NEW_TOKENS):
    """Greedy tokens of ``model.generate`` with our cache (``settings=None``: the full cache)."""
    ids = torch.tensor([prompt])
    extra = {}
    if settings is not None:
        enable_position_shift(model)
        settings = dict(settings)
        extra["past_key_values"] = make_cache(settings.pop("method"), model, **settings)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **extra)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=sorted(METHODS))
def compressed_run(request, tiny):
    """One engine per method: its tokens for the batch, what its scheduler counted, and the worker's layout."""
    path, model = tiny
    llm = make_llm(path, METHODS[request.param])
    tokens = greedy(llm, PROMPTS, NEW_TOKENS)
    core = engine_core(llm)
    found = dict(method=request.param, tokens=tokens, stats=core.scheduler.kv_compression.stats,
                 free=core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
                 blocks=core.scheduler.kv_cache_manager.block_pool.num_gpu_blocks,
                 layout=llm.collective_rpc(lambda worker: worker.model_runner._kv_compression.layout)[0])
    close(llm)
    return found


def test_greedy_tokens_equal_our_hf_cache(compressed_run, tiny):
    _, model = tiny
    settings = METHODS[compressed_run["method"]]
    for prompt, got in zip(PROMPTS, compressed_run["tokens"]):
        assert len(got) == NEW_TOKENS
        assert got == hf_generate(model, prompt, settings), f"prompt of {len(prompt)} tokens"
    # the budget matters on this model: the full cache generates other tokens for every prompt
    full = [hf_generate(model, prompt, None) for prompt in PROMPTS]
    assert all(f != got for f, got in zip(full, compressed_run["tokens"]))


def test_blocks_held_stay_at_the_budget(compressed_run, tiny):
    settings = dict(METHODS[compressed_run["method"]])
    budget = CompressionSettings(settings.pop("method"), tuple(sorted(settings.items()))).policy(6).max_cache_len(6)
    stats = compressed_run["stats"]
    # while decoding, a request holds the blocks of its budget plus the new token's slot, no more
    assert set(stats.decode_peak_blocks.values()) == {-(-(budget + 1) // BLOCK)}
    assert len(stats.decode_peak_blocks) == len(PROMPTS)
    # a prompt longer than the budget is written whole first: its peak is the prompt's blocks
    assert stats.peak_blocks and max(stats.peak_blocks.values()) == -(-max(map(len, PROMPTS)) // BLOCK)
    assert compressed_run["free"] == compressed_run["blocks"] - 1  # every block back in the pool (one is vLLM's null)


def test_the_cpu_kernel_layout_is_found(compressed_run):
    assert compressed_run["layout"] == "cpu: K transposed per (block, head), then V"


def test_without_kv_compression_the_engine_is_unchanged(tiny):
    path, model = tiny
    llm = make_llm(path)
    assert engine_core(llm).scheduler.kv_compression is None
    tokens = greedy(llm, PROMPTS[:2], 60)
    close(llm)
    assert tokens == [hf_generate(model, prompt, None, 60) for prompt in PROMPTS[:2]]


@pytest.mark.parametrize("engine, setting, message", [
    ({}, {"method": "h2o", "cache_size": 64}, "kv_compression.method h2o is not available inside vLLM: it scores"),
    ({}, {"method": "adakv", "cache_size": 64}, "KV heads keep different numbers of slots"),
    ({}, {"method": "minicache"}, "changes cached tensors"),
    ({}, {"method": "nope"}, "kv_compression.method must be one of ['streamingllm', 'lacache'], got 'nope'"),
    ({}, {"cache_size": 64}, "must be a dict with a 'method' key"),
    ({}, {"method": "lacache", "cache_size": 64, "spam": 2}, "kv_compression.spam is not a setting of lacache"),
    ({}, {"method": "lacache", "cache_size": 64, "span": 2, "overlap": 2}, "kv_compression.overlap must be in [0, 1]"),
    ({}, {"method": "lacache", "cache_size": 8, "span": 2}, "kv_compression.cache_size must be >= start_size"),
    ({}, {"method": "lacache", "span": 2, "key_positions": "original"}, "kv_compression.key_positions must be 'slot'"),
    ({"enable_prefix_caching": True}, {"method": "lacache", "span": 2}, "cannot run with enable_prefix_caching"),
    ({"kv_cache_dtype": "fp8"}, {"method": "streamingllm"}, "cannot run with cache_dtype"),
])
def test_refusals_are_one_line_before_the_engine_starts(tiny, engine, setting, message):
    with pytest.raises(ConfigError) as err:
        make_llm(tiny[0], setting, **engine)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_multiprocess_engine_loads_the_entry_point(tiny, tmp_path):
    """vLLM's default mode: the engine core in its own process, which loads the plugin from its entry point."""
    path, model = tiny
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        from engines import greedy, make_llm
        if __name__ == "__main__":
            llm = make_llm({path!r}, {METHODS['lacache']!r})
            print("TOKENS", json.dumps(greedy(llm, [{PROMPTS[1]!r}], 160)))
    """))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    line = next((l for l in done.stdout.splitlines() if l.startswith("TOKENS")), None)
    assert line is not None, done.stderr[-3000:]
    assert json.loads(line[len("TOKENS "):]) == [hf_generate(model, PROMPTS[1], METHODS["lacache"], 160)]
