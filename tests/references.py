"""Re-derivations of reference rules (KIVI, GEAR-L, SnapKV, the official NIAH sweep) and a from-scratch decoder step,
which several test modules check the library against. Moved here unchanged from test_quant, test_gear,
test_reference_selections and test_niah_official (whose docstrings say which reference code each follows), so that
no test module imports another."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from lacache_core import CompressedCache, build_policy, enable_position_shift
from lacache_core.quant import quantize
from lacache_core.versions import with_cache
from tiny import manual_next_logits, tiny_model

TOKENS = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))
# the prompt and the setting test_quest and test_quest_kvcache_factory both run (each imports them as TOKENS and
# SETTINGS); moved here unchanged from those two modules, where they were identical
QUEST_TOKENS = torch.randint(0, 128, (1, 140), generator=torch.Generator().manual_seed(5))
QUEST_SETTINGS = dict(cache_size=48, start_size=4, span=2, recent_window=4, window_size=4)


def per_head_gather(store):
    """Gather a hand-chosen per-head keep from a quantized store of 70 tokens, 2 KV heads of width 16 (56 quantized,
    14 whole): returns the store's keys and values from before, gathered by the same keep (what it should now hold)."""
    before_k, before_v = store.view()
    keep = torch.stack([torch.tensor(list(range(0, 40, 2)) + list(range(56, 70))),  # head 0: 20 quantized
                        torch.tensor(list(range(0, 24)) + list(range(60, 70)))])  # head 1: 24 quantized
    store.gather(keep)
    index = keep[None, :, :, None].expand(1, 2, 34, 16)
    return before_k.gather(2, index), before_v.gather(2, index)


def quantized_count(n, config):
    """Tokens of ``n`` KIVI holds quantized on a run without eviction: blocks of ``group`` oldest tokens until at
    most ``residual`` are left whole."""
    m = 0
    while n - m > config.residual and n - m >= config.group:
        m += config.group
    return m


def kivi_reference(key, value, config):
    """KIVI's rule on a run without eviction: the oldest tokens in blocks of ``group`` (keys per channel over a
    block, values per token over ``group`` channels) until at most ``residual`` are left whole."""
    g, m = config.group, quantized_count(key.shape[2], config)

    def fake(x, dim):
        codes, low, scale = quantize(x, config.bits, dim)
        return low + codes * scale

    b, h, _, d = value.shape  # keys may hold fewer channels (ThinK)
    k = torch.cat([fake(key[:, :, i:i + g], 2) for i in range(0, m, g)] + [key[:, :, m:]], 2)
    v = fake(value[:, :, :m].reshape(b, h, m, d // g, g), -1).reshape(b, h, m, d)
    return k, torch.cat([v, value[:, :, m:]], 2)


def evicted_next_step(method: str, quant):
    """A 40-slot ``method`` cache held under ``quant``, after a 70-token prompt and 10 decode steps: ``(cache, the
    next logits, a from-scratch step's over what the stores hold, at the method's slots or original positions)``."""
    model = enable_position_shift(tiny_model("llama", "eager"))
    cache = CompressedCache(build_policy(method, cache_size=40, start_size=4, span=2, window_size=4), 6, quant=quant)
    with torch.no_grad():
        model(TOKENS[:, :70], use_cache=True, **with_cache(cache))
        for t in range(70, 80):
            model(TOKENS[:, t:t + 1], use_cache=True, **with_cache(cache))
        kv = [cache._stores[i].view() for i in range(6)]
        slot = cache.policy.position_mode == "slot"
        positions = None if slot else cache.kept_positions()
        expected = manual_next_logits(model, int(TOKENS[0, 80]), kv, query_pos=None if slot else 80,
                                      key_positions=positions)
        got = model(TOKENS[:, 80:81], use_cache=True, **with_cache(cache)).logits[0, -1]
    return cache, got, expected


def fake_quant(x, bits, dim):
    """Asymmetric min/scale quantization along ``dim``, dequantized (written out again, not imported)."""
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (high - low) / (2 ** bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return low + ((x - low) / scale).round().clamp(0, 2 ** bits - 1) * scale


def best_rank(error, rank):
    """The best rank-``rank`` approximation of each ``[..., n, d]`` matrix: numpy's SVD in float64."""
    e = error.detach().double().numpy()
    u, s, vh = np.linalg.svd(e, full_matrices=False)
    return torch.from_numpy((u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]).to(error.dtype)


def gear_block(key, value, config):
    """One block (``[b, h, n, d]``) under GEAR-L: keys per channel over the block, values per token over groups of
    ``group`` channels, each plus the best rank-``rank`` approximation of its error."""
    k = fake_quant(key, config.bits, 2)
    b, h, n, d = value.shape  # keys may hold fewer channels (ThinK)
    v = fake_quant(value.reshape(b, h, n, d // config.group, config.group), config.bits, -1).reshape(b, h, n, d)
    return k + best_rank(key - k, config.rank), v + best_rank(value - v, config.rank)


def gear_reference(key, value, config):
    """GEAR-L on a run without eviction: blocks of ``group`` oldest tokens until at most ``residual`` are whole."""
    g, m = config.group, quantized_count(key.shape[2], config)
    blocks = [gear_block(key[:, :, i:i + g], value[:, :, i:i + g], config) for i in range(0, m, g)]
    return (torch.cat([k for k, _ in blocks] + [key[:, :, m:]], 2),
            torch.cat([v for _, v in blocks] + [value[:, :, m:]], 2))


def window_attention(query, key, window):
    """``[1, kv_heads, window, n]``: the last ``window`` queries over every key, causal, per KV head (mean)."""
    heads, kv_heads, n = query.shape[1], key.shape[1], key.shape[2]
    groups = heads // kv_heads
    rep = key.repeat_interleave(groups, dim=1)
    logits = query[:, :, -window:] @ rep.transpose(2, 3) / math.sqrt(query.shape[-1])
    block = torch.full((window, window), float("-inf")).triu(1)
    logits[:, :, :, -window:] += block
    probs = logits.softmax(-1, dtype=torch.float32)
    return probs.view(1, kv_heads, groups, window, n).mean(2)


def reference_snapkv(query, key, cache_size, window, kernel, pooling):
    probs = window_attention(query, key, window)
    scores = probs[..., :-window].sum(-2)  # [1, kvh, n - w]: the prefix columns only
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(scores, kernel, stride=1, padding=kernel // 2)
    top = pooled.topk(cache_size - window, dim=-1).indices[0]
    n = key.shape[2]
    return [sorted(row.tolist()) + list(range(n - window, n)) for row in top]


def reference_sweep(max_tokens: int, interval: int, num_tests: int):
    """(point, n_garbage, prefix, depth label, seed) in the official loop order."""
    out = []
    for point in range(max_tokens // interval):
        n_garbage = int(3.75 * (point + 1) * interval // 1024 * 1024)
        for prefix in range(0, n_garbage + 1, max(n_garbage // 10, 1)):
            for seed in range(num_tests):
                out.append((point, n_garbage, prefix, round(prefix / n_garbage * 100, -1), seed))
    return out
