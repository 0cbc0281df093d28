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
    # scored by its keys' norms, a choice per KV head, kept keys at their original positions (its reference's way)
    "knorm_decode": dict(method="knorm_decode", cache_size=64, start_size=4, recent_window=8),
    # LaCache's ladder with kept keys left at their original positions (new tokens too), as --key_positions original
    "lacache_original": dict(method="lacache", cache_size=70, span=2, overlap=0, start_size=4,
                             key_positions="original"),
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


# A key's norm in the first layer depends on its token alone, so every repeated token ties there, and the two
# engines' float rounding (1e-6) breaks those ties differently: KNorm's choice among copies of one token is arbitrary
# in any implementation. Its tokens are not compared; what it keeps is (test_knorm_decode_keeps_the_lowest_norms).
TIES = {"knorm_decode"}


def test_greedy_tokens_equal_our_hf_cache(compressed_run, tiny):
    if compressed_run["method"] in TIES:
        pytest.skip("key-norm ties in the first layer are broken by float rounding (see TIES)")
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
    assert budget < len(PROMPTS[1])
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
    ({}, {"method": "minicache"}, "it merges pairs of layers into one"),
    ({}, {"method": "nope"}, "kv_compression.method must be one of ['lacache', 'streamingllm', 'knorm_decode'], got 'nope'"),
    ({}, {"cache_size": 64}, "must be a dict with a 'method' key"),
    ({}, {"method": "lacache", "cache_size": 64, "spam": 2}, "kv_compression.spam is not a setting of lacache"),
    ({}, {"method": "lacache", "cache_size": 64, "span": 2, "overlap": 2}, "kv_compression.overlap must be in [0, 1]"),
    ({}, {"method": "lacache", "cache_size": 8, "span": 2}, "kv_compression.cache_size must be >= start_size"),
    ({}, {"method": "knorm"}, "layers hold different numbers of slots"),
    ({}, {"method": "rkv"}, "it scores tokens by the attention of the newest queries"),
    ({}, {"method": "streamingllm", "merge": "pivot"}, "kv_compression.merge is not available inside vLLM"),
    ({}, {"method": "knorm_decode", "cache_size": 8, "recent_window": 8}, "kv_compression.cache_size must be >= 9, got 8"),
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


def test_knorm_decode_keeps_the_lowest_norms_per_head(tiny, monkeypatch):
    """At every compaction, in every layer and KV head: the sinks and the recent window are kept, no evicted key has
    a lower norm than a kept one, and the kept keys (and values) sit at slots 0.. in order, unrotated."""
    from lacache_vllm.worker import WorkerCompaction

    settings = METHODS["knorm_decode"]
    checked = []
    compact = WorkerCompaction.compact

    def checking_compact(self, req_id, state, ledger, held, kept):
        blocks = torch.tensor(state.block_ids[0])
        before = [access.read(blocks, torch.arange(held)) for _, access, _ in self.layers]
        compact(self, req_id, state, ledger, held, kept)
        for (layer, access, _), (key, value) in zip(self.layers, before):
            norms = key.float().norm(dim=-1).T  # [kv_heads, held]
            now_key, now_value = access.read(blocks, torch.arange(kept))  # [kept, kv_heads, head_dim]
            for head in range(norms.shape[0]):
                kept_slots = [s for s in range(held) if any(torch.equal(key[s, head], k) for k in now_key[:, head])]
                assert len(kept_slots) == kept
                assert set(range(settings["start_size"])) <= set(kept_slots)
                assert set(range(held - settings["recent_window"], held)) <= set(kept_slots)
                evicted = sorted(set(range(held)) - set(kept_slots))
                middle = [s for s in kept_slots if settings["start_size"] <= s < held - settings["recent_window"]]
                assert norms[head, evicted].min() >= norms[head, middle].max() - 1e-6
                assert torch.equal(now_key[:, head], key[kept_slots, head])  # in order, as stored
                assert torch.equal(now_value[:, head], value[kept_slots, head])
        checked.append(held)

    monkeypatch.setattr(WorkerCompaction, "compact", checking_compact)
    llm = make_llm(tiny[0], settings)
    tokens = greedy(llm, PROMPTS, 40)
    close(llm)
    assert all(len(t) == 40 for t in tokens)
    assert len(checked) > 40 and max(checked) == len(PROMPTS[2])  # the long prompt, then a step at a time


def test_admission_reserves_every_running_request_budget(tiny):
    """A pool of 8 blocks (one is vLLM's null block) and six requests that each peak at 3: the scheduler admits two
    at a time and never has to preempt one for another's growth."""
    llm = make_llm(tiny[0], METHODS["lacache"], num_gpu_blocks_override=8, max_model_len=220)
    scheduler = engine_core(llm).scheduler
    preempted, running = [], []
    preempt, schedule = scheduler._preempt_request, scheduler.schedule
    scheduler._preempt_request = lambda *a, **k: preempted.append(1) or preempt(*a, **k)
    scheduler.schedule = lambda *a, **k: (schedule(*a, **k), running.append(len(scheduler.running)))[0]
    tokens = greedy(llm, [[(7 * i + j) % 250 + 3 for j in range(40 + 10 * i)] for i in range(6)], 120)
    close(llm)
    assert [len(t) for t in tokens] == [120] * 6
    assert not preempted and max(running) == 2


def test_layers_moved_one_by_one_equal_the_stacked_move(tiny, monkeypatch):
    """Where the engine's layer buffers cannot be viewed as one stack, each layer is moved on its own: the same
    tokens as our HF cache."""
    import lacache_vllm.worker

    monkeypatch.setattr(lacache_vllm.worker, "stacked", lambda accesses: None)
    path, model = tiny
    llm = make_llm(path, METHODS["lacache"])
    assert llm.collective_rpc(lambda worker: worker.model_runner._kv_compression.stack)[0] is None
    tokens = greedy(llm, PROMPTS[1:], 120)
    close(llm)
    assert tokens == [hf_generate(model, prompt, METHODS["lacache"], 120) for prompt in PROMPTS[1:]]


def test_a_prompt_prefilled_in_chunks_is_compacted_once_it_is_whole(tiny):
    """With chunks of 48 tokens, a 120-token prompt (over the 70-slot budget) is written in three steps before its
    first compaction: the same tokens as our HF cache, which takes the prompt in one forward pass."""
    path, model = tiny
    llm = make_llm(path, METHODS["lacache"], max_num_batched_tokens=48, max_num_seqs=2, max_model_len=512)
    scheduler, steps = engine_core(llm).scheduler, []
    schedule = scheduler.schedule
    scheduler.schedule = lambda *a, **k: (lambda out: steps.append(out.total_num_scheduled_tokens) or out)(
        schedule(*a, **k))
    tokens = greedy(llm, PROMPTS[2:], 120)
    close(llm)
    assert steps[:4] == [48, 48, 24, 1]
    assert tokens == [hf_generate(model, PROMPTS[2], METHODS["lacache"], 120)]


def test_a_preempted_request_is_recomputed_into_a_fresh_cache(tiny):
    """vLLM recomputes a preempted request from all its tokens. Both the scheduler and the worker start its
    compaction history again: its tokens after the preemption equal our HF cache fed the prompt and the tokens
    generated so far in one pass, then decoding on."""
    import time

    path, model = tiny
    llm = make_llm(path, METHODS["lacache"])
    core = engine_core(llm)
    scheduler, calls, preempted = core.scheduler, [0], {}
    schedule = scheduler.schedule

    def schedule_and_preempt_once(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 60:  # 60 steps in, every request is past its budget
            request = scheduler.running.pop()
            preempted.update(id=request.request_id, done=len(request.output_token_ids))
            scheduler._preempt_request(request, time.monotonic())
        return schedule(*args, **kwargs)

    scheduler.schedule = schedule_and_preempt_once
    tokens = greedy(llm, PROMPTS[1:], NEW_TOKENS)
    free, blocks = scheduler.kv_cache_manager.block_pool.get_num_free_blocks(), scheduler.kv_cache_manager.block_pool.num_gpu_blocks
    close(llm)
    assert free == blocks - 1
    which = int(preempted["id"].split("-")[0])  # LLM numbers its requests in submission order
    prompt, got, done = PROMPTS[1 + which], tokens[which], preempted["done"]
    assert 40 < done < NEW_TOKENS
    assert got[:done] == hf_generate(model, prompt, METHODS["lacache"], done)
    assert got[done:] == hf_generate(model, prompt + got[:done], METHODS["lacache"], NEW_TOKENS - done)
