"""PyramidKV's three prompt-length regimes against KVCache-Factory's rule.

Reference: Zefan-Cai/KVCache-Factory @ c97f9d7, ``pyramidkv/pyramidkv_utils.py``,
``PyramidKVCluster.update_kv``. :func:`reference_kept` re-derives from that code how many tokens a layer
holds after the prompt; the kept positions are re-derived with ``reference_snapkv`` (the same file's
top-k of the pooled window scores plus the window), at the capacity the reference gives the layer.
"""
import pytest
import torch

from lacache_core import PyramidKV, SnapKV
from references import reference_snapkv

# The issue's example: 32 layers, budget 512, window 32, so P = C - w = 480 and 2 P = 960.
LAYERS, C, W, BETA = 32, 512, 32, 20
KERNEL = 5  # average pooling: max pooling makes plateaus of equal scores, where either order is right


def reference_kept(layer, num_layers, cache_size, window, beta, q_len):
    """Tokens ``layer`` holds after ``update_kv`` on a ``q_len``-token prompt, in the reference's own steps.

    ``q_len < max_capacity_prompt``: returned whole; ``q_len < 2 (max_capacity_prompt - window)``: the
    top ``max_capacity_prompt - window`` prefix tokens plus the window; otherwise the layer's pyramid
    capacity plus the window.
    """
    min_num = (cache_size - window) // beta
    max_num = (cache_size - window) * 2 - min_num
    if max_num >= q_len - window:
        max_num = q_len - window
        min_num = (cache_size - window) * 2 - max_num
    steps = (max_num - min_num) // (num_layers - 1)
    capacity = max_num - layer * steps
    if q_len < cache_size:
        return q_len
    if q_len < (cache_size - window) * 2:
        return cache_size - window + window
    return capacity + window


def layer_inputs(n, layers, seed=0):
    """Per layer a ``(query [1, 4, n, 8], key [1, 2, n, 8])`` pair (GQA: 2 query heads per KV head)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 4, n, 8, generator=gen), torch.randn(1, 2, n, 8, generator=gen)) for _ in range(layers)]


def kept_positions(policy, inputs):
    """Per layer, per KV head, the prompt positions ``policy`` keeps (``range(n)`` for a layer kept whole)."""
    n = inputs[0][1].shape[2]
    for layer, (query, key) in enumerate(inputs):
        policy.observe(layer, query, key, scaling=query.shape[-1] ** -0.5)
    keep = policy.compact(n, len(inputs)) or [None] * len(inputs)
    return [[list(range(n))] * 2 if k is None else k.tolist() for k in keep]


def reference_positions(inputs, layer, q_len):
    """What the reference keeps in ``layer``: the whole prompt, or its SnapKV choice at the layer's capacity."""
    query, key = inputs[layer]
    kept = reference_kept(layer, len(inputs), C, W, BETA, q_len)
    return [list(range(q_len))] * 2 if kept == q_len else reference_snapkv(query, key, kept, W, KERNEL, "avg")


def test_issue_example_keeps_the_budget_in_every_layer():
    # 600 tokens: 512 <= 600 < 960, the middle regime. Every layer keeps 512 (480 best prefix tokens and the
    # window) -- not the pyramid's 440 on average and 69 in the deepest layer that the issue reports.
    assert [reference_kept(i, LAYERS, C, W, BETA, 600) for i in range(LAYERS)] == [512] * LAYERS
    assert PyramidKV(cache_size=C, window_size=W, beta=BETA).layer_budgets(LAYERS, 600) == [512] * LAYERS
    inputs = layer_inputs(600, LAYERS)
    ours = kept_positions(PyramidKV(cache_size=C, window_size=W, beta=BETA, kernel_size=KERNEL, pooling="avg"), inputs)
    snap = kept_positions(SnapKV(cache_size=C, window_size=W, kernel_size=KERNEL, pooling="avg"), inputs)
    assert ours == snap  # the middle regime is SnapKV's choice at the same budget, layer by layer
    assert ours == [reference_positions(inputs, i, 600) for i in range(LAYERS)]
    assert {len(head) for layer in ours for head in layer} == {512}


@pytest.mark.parametrize("q_len", [C - 1, C, C + 1, 2 * (C - W) - 1, 2 * (C - W), 2 * (C - W) + 1])
def test_regime_boundaries_follow_the_reference(q_len):
    # The reference's comparisons are strict: n = C is already the middle regime (its top-k of all P prefix
    # tokens keeps them all, so it holds the prompt whole like the first regime), and n = 2 P is already the
    # pyramid (clamped: its first layer holds n - w prefix tokens, i.e. the whole prompt, its deepest 92).
    policy = PyramidKV(cache_size=C, window_size=W, beta=BETA, kernel_size=KERNEL, pooling="avg")
    expected = [reference_kept(i, LAYERS, C, W, BETA, q_len) for i in range(LAYERS)]
    assert [min(b, q_len) for b in policy.layer_budgets(LAYERS, q_len)] == expected
    inputs = layer_inputs(q_len, LAYERS, seed=q_len)
    ours = kept_positions(policy, inputs)
    assert ours == [reference_positions(inputs, i, q_len) for i in range(LAYERS)]
    if C < q_len < 2 * (C - W):
        snap = kept_positions(SnapKV(cache_size=C, window_size=W, kernel_size=KERNEL, pooling="avg"), inputs)
        assert ours == snap and set(expected) == {C}
    if q_len >= 2 * (C - W):
        assert expected[0] == q_len and expected[-1] < C  # a true pyramid, not SnapKV's budget


def test_issue_example_through_a_model():
    # The whole path: a 32-layer tiny Llama, a 600-token prompt, the cache holding 512 slots in every layer.
    from lacache_core import CompressedCache, enable_position_shift
    from lacache_core.versions import HAS_CACHE_CLASSES, with_cache
    from tiny import tiny_model

    if not HAS_CACHE_CLASSES:
        pytest.skip("cache objects need transformers >= 4.36")
    model = enable_position_shift(tiny_model("llama", "sdpa", layers=LAYERS))
    cache = CompressedCache(PyramidKV(cache_size=C, window_size=W, beta=BETA), LAYERS)
    tokens = torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(tokens, **with_cache(cache), use_cache=True)
    assert [cache.get_seq_length(i) for i in range(LAYERS)] == [512] * LAYERS
