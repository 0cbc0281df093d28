"""LaCache slot selection: the spec's worked examples, a literal re-derivation, and the defects."""
import random

import pytest
import torch

from lacache_core import ConfigError, LaCache, StreamingLLM
from lacache_core.reference import ReferenceLaCache


def rng(a, b, step=1):
    return list(range(a, b + 1, step))


def decode(policy, num_layers, tokens):
    """Feed ``tokens`` tokens one per call; yield (token index, policy) after each call."""
    for t in range(tokens):
        policy.compact(t + 1 if policy.positions is None else policy.positions.shape[1] + 1, num_layers)
        yield t, policy


def run_to(policy, num_layers, last_token):
    for t, _ in decode(policy, num_layers, last_token + 1):
        pass
    return policy.positions_per_layer()


# ----------------------------------------------------------------------------- worked examples
def test_spec_example_span16_first_eviction():
    layers = run_to(LaCache(256, 16, 0, 4), 32, 256)
    assert layers[0] == rng(0, 4) + rng(6, 256)
    assert layers[1] == rng(0, 3) + rng(5, 256)
    assert all(layers[i] == layers[i % 2] for i in range(32))


def test_spec_example_span16_before_and_at_first_startover():
    policy = LaCache(256, 16, 0, 4)
    layers = run_to(policy, 32, 475)
    assert layers[0] == rng(0, 4) + rng(6, 444, 2) + rng(445, 475)
    assert layers[1] == rng(0, 3) + rng(5, 443, 2) + rng(444, 475)
    cursor = policy._cursor
    policy.compact(257, 32)  # token 476
    assert policy._cursor < cursor, "token 476 must start over"
    assert policy.positions_per_layer()[0] == rng(0, 4) + rng(8, 444, 2) + rng(445, 476)


def test_spec_example_span16_token_1000_and_startover_period():
    policy = LaCache(256, 16, 0, 4)
    startovers, last_cursor = [], policy._cursor
    for t, p in decode(policy, 32, 1001):
        if p._cursor < last_cursor:
            startovers.append(t)
        last_cursor = p._cursor
    assert startovers == [476, 696, 916]
    even = policy.positions_per_layer()[0]
    assert even == rng(0, 4) + rng(20, 436, 16) + rng(448, 664, 8) + rng(668, 784, 4) + rng(786, 884, 2) + rng(885, 1000)


def test_spec_example_span8_overlap4():
    policy = LaCache(256, 8, 4, 4)
    assert policy.geometry(32) == (7, 2, 5)
    first, compactions, startovers, lengths = None, [], [], []
    last_cursor = policy._cursor
    for t, p in decode(policy, 32, 1924):
        if first is None and p.positions.shape[1] < t + 1:
            first = t
            layers = p.positions_per_layer()
            for i in range(32):
                o = i % 6
                kept = [x for x in range(4, 11) if x in layers[i]]
                assert kept == [4 + o, 5 + o]
        if p._cursor < last_cursor:
            startovers.append(t)
        elif p._cursor > last_cursor:
            compactions.append(t)
        last_cursor = p._cursor
        if first is not None:
            lengths.append(p.positions.shape[1])
    assert first == 258
    assert startovers == [813, 1368, 1923]
    gaps = {b - a for a, b in zip(compactions, compactions[1:]) if a > 258 and b < 813}
    assert gaps == {5}
    assert min(lengths) == 254 and max(lengths) == 258


# ----------------------------------------------------------------------------- re-derivation
def compare_with_reference(num_layers, cache_size, span, overlap, start_size, chunks):
    ours = LaCache(cache_size, span, overlap, start_size)
    ref = ReferenceLaCache(num_layers, cache_size, span, overlap, start_size)
    n = 0
    for count in chunks:
        ref.append(count)
        ref.call()
        n = (0 if ours.positions is None else ours.positions.shape[1]) + count
        ours.compact(n, num_layers)
        if any(len(set(lst)) != len(lst) for lst in ref.layers):
            return "reference-duplicates"
        assert ours.positions_per_layer() == ref.layers
    return "ok"


@pytest.mark.parametrize("num_layers,cache_size,span,overlap,start_size", [
    (32, 256, 16, 0, 4), (32, 256, 8, 4, 4), (32, 128, 8, 2, 4), (30, 256, 8, 4, 4),
    (30, 200, 7, 3, 4), (4, 40, 2, 0, 4), (6, 32, 3, 1, 1), (2, 16, 1, 0, 0),
    (12, 64, 5, 4, 8), (40, 512, 10, 5, 4), (3, 12, 1, 0, 2), (8, 30, 3, 2, 2),
])
def test_decode_matches_reference(num_layers, cache_size, span, overlap, start_size):
    assert compare_with_reference(num_layers, cache_size, span, overlap, start_size, [1] * 1500) == "ok"


def test_random_configurations_match_reference():
    gen = random.Random(0)
    checked = 0
    while checked < 60:
        L = gen.randint(2, 40)
        span = gen.randint(1, L - 1)
        overlap = gen.randint(0, span - 1)
        start = gen.choice([0, 1, 4, 16])
        policy = LaCache(10_000, span, overlap, start)
        _, kept, freed = policy.geometry(L)
        if freed < 1:
            continue
        cache = policy.min_cache_size(L) + gen.randint(0, 200)
        # a prefill of random length, then decode, and now and then several tokens at once
        chunks = [gen.randint(1, 3 * cache)] + [gen.choice([1, 1, 1, 2, 7]) for _ in range(gen.randint(50, 600))]
        result = compare_with_reference(L, cache, span, overlap, start, chunks)
        checked += result == "ok"


# ----------------------------------------------------------------------------- defects
def test_long_prefill_defect_fixed_without_duplicates():
    """Spec: 32 layers, prompt 3500, C = 875, s = 128, S = 9, O = 3: official keeps token 3200 twice."""
    ref = ReferenceLaCache(32, 875, 9, 3, 128)
    ref.append(3500)
    ref.call()
    doubled = [i for i, lst in enumerate(ref.layers) if lst.count(3200) == 2]
    assert doubled == [7, 15, 23, 31]

    ours = LaCache(875, 9, 3, 128)
    ours.compact(3500, 32)
    layers = ours.positions_per_layer()
    assert all(len(set(lst)) == len(lst) for lst in layers)
    assert {len(lst) for lst in layers} == {len(ref.layers[0])}
    for i in range(32):
        if i not in doubled:
            assert layers[i] == ref.layers[i]
    # and it keeps going without duplicates or growth past the budget
    for _ in range(500):
        ours.compact(ours.positions.shape[1] + 1, 32)
        assert ours.positions.shape[1] <= ours.max_cache_len(32)
    assert all(len(set(lst)) == len(lst) for lst in ours.positions_per_layer())


@pytest.mark.parametrize("kwargs,layers,setting", [
    (dict(cache_size=256, span=16, overlap=16), 32, "LaCache.overlap"),
    (dict(cache_size=256, span=0, overlap=0), 32, "LaCache.span"),
    (dict(cache_size=256, span=32, overlap=0), 32, "LaCache.span"),
    (dict(cache_size=256, span=40, overlap=0), 32, "LaCache.span"),
    (dict(cache_size=36, span=16, overlap=0, start_size=4), 32, "LaCache.cache_size"),
    (dict(cache_size=256, span=8, overlap=-1), 32, "LaCache.overlap"),
    (dict(cache_size=256, span=8, overlap=0, start_size=-2), 32, "LaCache.start_size"),
])
def test_invalid_settings_rejected_with_one_line(kwargs, layers, setting):
    with pytest.raises(ConfigError) as err:
        LaCache(num_layers=layers, **kwargs)
    msg = str(err.value)
    assert setting in msg and "\n" not in msg


def test_minimum_cache_size_works():
    policy = LaCache(cache_size=4 + 32 + 1, span=16, overlap=0, start_size=4, num_layers=32)
    for _ in range(300):
        policy.compact((0 if policy.positions is None else policy.positions.shape[1]) + 1, 32)
        assert all(len(set(l)) == len(l) for l in policy.positions_per_layer())
        assert policy.positions.shape[1] <= policy.max_cache_len(32)


def test_no_compensation_caps_at_cache_size():
    policy = LaCache(cache_size=256, span=8, overlap=4, compensate=False)
    for _ in range(1500):
        policy.compact((0 if policy.positions is None else policy.positions.shape[1]) + 1, 32)
        assert policy.positions.shape[1] <= 256


# ----------------------------------------------------------------------------- official tensor API
def test_official_call_on_key_value_list():
    L, policy = 6, LaCache(cache_size=40, span=2, overlap=0, start_size=4)
    past = None
    for t in range(200):
        k_new = torch.full((1, 2, 1, 8), float(t))
        v_new = -k_new
        past = [(k_new, v_new)] * L if past is None else [
            (torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)) for k, v in past]
        past = policy(past)
        for i, (k, v) in enumerate(past):
            assert k.shape[2] <= policy.max_cache_len(L)
            assert k[0, 0, :, 0].long().tolist() == policy.positions_per_layer()[i]
            assert torch.equal(v, -k)


def test_streamingllm_keeps_sinks_and_recent():
    policy = StreamingLLM(start_size=4, recent_size=12)
    for t in range(100):
        policy.compact((0 if policy.positions is None else policy.positions.shape[1]) + 1, 3)
    assert policy.positions_per_layer() == [rng(0, 3) + rng(88, 99)] * 3


def test_very_long_prefill_matches_reference_when_the_last_group_overruns():
    """8 layers, C 512, S2 O1, a 32768-token prompt: the startover's last group runs past the list end."""
    ref = ReferenceLaCache(8, 512, 2, 1, 4)
    ref.append(32768)
    ref.call()
    ours = LaCache(512, 2, 1, 4)
    ours.compact(32768, 8)
    assert ours.positions_per_layer() == ref.layers
    assert all(len(set(row)) == len(row) for row in ref.layers)
