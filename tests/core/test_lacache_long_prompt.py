"""LaCache after a long prompt into a small cache: the startover in rounds.

The official code (GATECH-EIC/LaCache @ 0f27c33, ``LongBench/lacache/kv_cache.py``, the line
``ladder_index = torch.tensor(ladder_index)[ladder_index_startover]``) raises ``IndexError`` when
one startover must free many times what a pass can: its last merged group, ``B2`` slots wide, lies
partly past the end of the step-4 list. :class:`ReferenceLaCache` (the literal re-derivation)
raises there too. Our policy runs the startover in rounds there (``LaCache.startover_rounds``) and
is unchanged wherever the official code runs.

Kept positions only (``LaCache.select``), no model: a setting is a number of layers, a ladder
(span, overlap, layout), a cache size, sinks and a prompt length, then single-token decode steps.
"""
import itertools

import pytest
import torch

from lacache_core import ConfigError, LaCache
from lacache_core.reference import ReferenceLaCache

# (layers, spans): the first and last span, the paper's choices (L/4, L/2, span 9 on 32 layers) and small ones.
LADDERS = {2: (1,), 4: (1, 2, 3), 8: (1, 2, 3, 4, 6), 30: (1, 4, 7, 15), 32: (1, 4, 8, 9, 16)}
DECODE_STEPS = 200


def valid_settings():
    """Every ``(L, S, O)`` of :data:`LADDERS` with ``0 <= O < S`` that frees at least one slot per group."""
    for num_layers, spans in LADDERS.items():
        for span in spans:
            for overlap in range(span):
                if LaCache(10_000, span, overlap).geometry(num_layers)[2] >= 1:
                    yield num_layers, span, overlap


def cache_sizes(num_layers, span, overlap, start_size):
    """The smallest valid cache, one a little larger, and a LongBench-like 64 or 128 slots."""
    low = LaCache(10_000, span, overlap, start_size).min_cache_size(num_layers)
    return sorted({low, low + 7, max(low, 64 if num_layers <= 8 else 128)})


def prompt_lengths(cache_size):
    """Just past the cache, a few times it (one merged startover), and far past it (the raising regime)."""
    return (cache_size + 3, 4 * cache_size, 20 * cache_size + 11)


def official_length(num_layers, cache_size, span, overlap, start_size):
    """The most slots the official code holds per layer: its ``C`` after the compensation step grows it."""
    ref = ReferenceLaCache(num_layers, cache_size, span, overlap, start_size)
    return ref.C + ref.R // 2


def reference_prompt(num_layers, cache_size, span, overlap, start_size, prompt):
    """The official kept slots after the prompt, or ``None`` where the official code raises."""
    ref = ReferenceLaCache(num_layers, cache_size, span, overlap, start_size)
    ref.append(prompt)
    try:
        ref.call()
    except IndexError:
        return None
    return ref


def ladder_violations(pos, start_size, limit, layout):
    """What breaks the ladder's shape in ``pos`` (``LongTensor [L, n]``, original positions per layer).

    Checked: the length is within ``limit``; every layer keeps the ``start_size`` sinks; every layer
    holds strictly increasing positions (no token twice, order kept); the layout's ladder: ``paper``,
    deeper layers never hold an older token than shallower ones slot by slot (``pos[i] <= pos[i+1]``);
    ``official``, the first two layers (offsets 0 and 1 of every group) keep different tokens once
    any token was evicted.
    """
    bad = []
    if pos.shape[1] > limit:
        bad.append(f"length {pos.shape[1]} > {limit}")
    sinks = min(start_size, pos.shape[1])
    if not torch.equal(pos[:, :sinks], torch.arange(sinks).expand(pos.shape[0], sinks)):
        bad.append("sinks lost")
    if not bool((pos[:, 1:] > pos[:, :-1]).all()):
        bad.append("duplicate or reordered token")
    evicted = int(pos[0, -1]) + 1 > pos.shape[1]
    if layout == "paper" and not bool((pos[1:] >= pos[:-1]).all()):
        bad.append("a deeper layer holds an older token")
    if layout == "official" and evicted and pos.shape[0] > 1 and torch.equal(pos[0], pos[1]):
        bad.append("layers 0 and 1 identical")
    return bad


def run(policy, num_layers, prompt, steps):
    """Compact a ``prompt``-token prompt, then decode ``steps`` tokens one per call; yield
    ``(newest token, kept positions LongTensor [L, n])`` after every call."""
    pos = torch.arange(prompt).expand(num_layers, prompt)
    for newest in range(prompt - 1, prompt + steps):
        if newest >= prompt:
            pos = torch.cat([pos, torch.full((num_layers, 1), newest)], 1)
        keep = policy.select(pos.shape[1], num_layers)
        if keep is not None:
            pos = pos.gather(1, keep)
        yield newest, pos


# ----------------------------------------------------------------------------- the issue's examples
@pytest.mark.parametrize("num_layers,cache_size,span,overlap,start_size,prompt", [
    (32, 50, 9, 3, 4, 500),    # the paper's LongBench ladder, 10% of a 500-token prompt
    (8, 32, 4, 1, 4, 300),
    (8, 32, 4, 2, 4, 300),
    (30, 64, 4, 1, 4, 1000),
])
def test_issue_examples_raise_officially_and_run_here(num_layers, cache_size, span, overlap, start_size, prompt):
    assert reference_prompt(num_layers, cache_size, span, overlap, start_size, prompt) is None
    policy = LaCache(cache_size, span, overlap, start_size, num_layers=num_layers)
    limit = official_length(num_layers, cache_size, span, overlap, start_size)
    for newest, pos in run(policy, num_layers, prompt, 300):
        assert ladder_violations(pos, start_size, limit, "official") == []
        assert bool((pos[:, -1] == newest).all())


def test_issue_example_with_longbench_sinks_is_refused_in_one_line():
    """The LongBench sink rule gives 17 sinks for C = 50 on 32 layers: no room for a ladder of A = 2."""
    with pytest.raises(ConfigError) as err:
        LaCache(50, 9, 3, 17, num_layers=32)
    assert "LaCache.cache_size" in str(err.value) and ">= start_size + num_layers + 2 = 51" in str(err.value)
    assert "\n" not in str(err.value)


def test_rounds_worked_out_by_hand():
    """8 layers, S4 O1 (B 3, A 2, R 1), C 32, 4 sinks, a 300-token prompt.

    Step 4: cursor 4, room 20, 10 groups: layer 0 keeps slots 4+3j+{0,1}, layer 1 4+3j+{1,2} (j < 10),
    then tokens 34..299: 290 slots. Official startover: need 258, one pass frees 10, so times 26,
    groups of 53 slots, 6 groups: 4 + 53 * 6 > 290, the official code raises. Round 1: times 26
    frees 255 in 5 groups (4 + 53 * 5 < 290), entries 4 + 53j + {0, 26} (+1 on layer 1), then tokens
    279..299: 35 slots. Round 2: need 3, times 1, 3 groups of 3, entries 4 + 3j + {0, 1} (+1 on
    layer 1), then 13 on: 32 slots. Cursor 4 + 3 * 2.
    """
    policy = LaCache(32, 4, 1, 4)
    keep = policy.select(300, 8)
    newest = list(range(279, 300))
    assert keep[0].tolist() == [0, 1, 2, 3, 4, 40, 93, 120, 173, 199, 252] + newest
    assert keep[1].tolist() == [0, 1, 2, 3, 41, 68, 121, 147, 200, 227, 253] + newest
    assert bool((keep[:, -21:] == torch.tensor(newest)).all()) and keep.shape == (8, 32)
    assert policy._cursor == 10


# ----------------------------------------------------------------------------- the grid
def grid():
    """Every ladder of :data:`LADDERS` x sinks {0, 4} x :func:`cache_sizes` x :func:`prompt_lengths`."""
    for (num_layers, span, overlap), start_size in itertools.product(valid_settings(), (0, 4)):
        for cache_size in cache_sizes(num_layers, span, overlap, start_size):
            for prompt in prompt_lengths(cache_size):
                yield num_layers, cache_size, span, overlap, start_size, prompt


def decode_grid():
    """Every ladder once, its sinks, cache size and prompt length (4 or 20 caches) taken in turn."""
    for k, (num_layers, span, overlap) in enumerate(valid_settings()):
        start_size = (0, 4)[k % 2]
        cache_size = cache_sizes(num_layers, span, overlap, start_size)[k % 3]
        yield num_layers, cache_size, span, overlap, start_size, prompt_lengths(cache_size)[1 + k % 2]


def same_as_reference(pos, ref):
    """``pos`` equals the official kept slots, layer by layer, except on layers where the official code
    keeps a token twice or out of order (its ``times >= 2`` defect, fixed here, see docs/reference_differences.md)."""
    return all(row.tolist() == kept for row, kept in zip(pos, ref.layers) if kept == sorted(set(kept)))


def test_grid_covers_every_regime():
    """On the grid the official code runs cleanly, keeps a token twice, and raises, each many times."""
    outcomes = {"raises": 0, "duplicates": 0, "clean": 0}
    for setting in grid():
        ref = reference_prompt(*setting)
        kind = "raises" if ref is None else "clean" if all(k == sorted(set(k)) for k in ref.layers) else "duplicates"
        outcomes[kind] += 1
    assert min(outcomes.values()) >= 100, outcomes


@pytest.mark.parametrize("layout", ["official", "paper"])
def test_prompt_grid_never_raises_keeps_the_ladder_and_matches_the_official_code(layout):
    """After the prompt, on every setting: the ladder's shape (:func:`ladder_violations`); where the
    official code raises, the newest token kept by every layer; elsewhere, the official kept slots."""
    failures = []
    for setting in grid():
        num_layers, cache_size, span, overlap, start_size, prompt = setting
        policy = LaCache(cache_size, span, overlap, start_size, ladder_layout=layout, num_layers=num_layers)
        (_, pos), = run(policy, num_layers, prompt, 0)
        limit = official_length(num_layers, cache_size, span, overlap, start_size)
        bad = ladder_violations(pos, start_size, limit, layout)
        ref = reference_prompt(*setting) if layout == "official" else None
        if ref is None and layout == "official" and not bool((pos[:, -1] == prompt - 1).all()):
            bad.append("prompt end lost")
        if ref is not None and not same_as_reference(pos, ref):
            bad.append("differs from the official code")
        if bad:
            failures.append((setting, bad))
    assert failures == []


@pytest.mark.parametrize("layout", ["official", "paper"])
def test_decodes_after_long_prompts_never_raise_and_keep_the_ladder(layout):
    """200 decode steps after each prompt of :func:`decode_grid`: the ladder's shape and the newest
    token in every layer after every step; on up to 8 layers, where the official code runs, the
    official kept slots after every step (until it keeps a token twice)."""
    failures = []
    for setting in decode_grid():
        num_layers, cache_size, span, overlap, start_size, prompt = setting
        policy = LaCache(cache_size, span, overlap, start_size, ladder_layout=layout, num_layers=num_layers)
        limit = official_length(num_layers, cache_size, span, overlap, start_size)
        ref = reference_prompt(*setting) if layout == "official" and num_layers <= 8 else None
        held = 0
        for newest, pos in run(policy, num_layers, prompt, DECODE_STEPS):
            if ref is not None and newest >= prompt:
                ref.append(1)
                ref.call()
            # Between compactions one token is appended: only the length can go wrong there.
            compacted, held = pos.shape[1] <= held, pos.shape[1]
            bad = ladder_violations(pos, start_size, limit, layout) if compacted else []
            if pos.shape[1] > limit:
                bad.append(f"length {pos.shape[1]} > {limit}")
            if newest >= prompt and not bool((pos[:, -1] == newest).all()):  # the prompt: see the prompt grid
                bad.append("newest token lost")
            if ref is not None and not all(k == sorted(set(k)) for k in ref.layers):
                ref = None
            if ref is not None and pos.tolist() != ref.layers:
                bad.append("differs from the official code")
            if bad:
                failures.append((setting, newest, bad))
                break
    assert failures == []
