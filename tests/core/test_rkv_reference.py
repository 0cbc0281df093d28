"""R-KV's selection re-derived from its reference code, entry by entry.

Reference: Zefan-Cai/R-KV @ d15c976, ``rkv/compression/r1_kv.py`` (``R1KV.update_kv``) and ``rkv/utils.py``
(``compute_attention_scores``: GQA logits maxed over the group; ``cal_similarity``: the cosine matrix, its diagonal
and each row's newest look-alike zeroed, column means softmaxed); the buffer rule of its later ``r1_kv.py`` (31cf555).
"""
import math

import pytest
import torch

from lacache_core import RKV
from lacache_core.policies.rkv import redundancy

D, HEADS, KV_HEADS = 8, 4, 2


def test_redundancy_of_three_repeats_and_one_other_token():
    # token 0 orthogonal to tokens 1, 2, 3, which point the same way. Rows without the diagonal: 0: none alike;
    # 1: 2, 3 alike (newest 3); 2: 1, 3 (newest 3); 3: 1, 2 (newest 2). Zeroing those leaves rows 1 -> [0, 0, 1, 0],
    # 2 -> [0, 1, 0, 0], 3 -> [0, 1, 0, 0]; row 0 has no look-alike, so its entry 0 (already 0) is zeroed.
    # Column means [0, 1/2, 1/4, 0]: the oldest repeat is the most redundant, the newest the least
    key = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 3, 0, 0]])[None, None]
    expected = torch.tensor([0.0, 0.5, 0.25, 0.0]).softmax(-1)
    torch.testing.assert_close(redundancy(key, 0.5)[0, 0], expected)


def reference_selection(queries, key, budget, window, kernel, lam, threshold):
    """Per KV head, the slots R-KV keeps: written out with loops from ``r1_kv.py`` and ``utils.py``."""
    n, groups = key.shape[2], HEADS // KV_HEADS
    out = []
    for h in range(KV_HEADS):
        # importance: per window query, logits maxed over the head's query group, softmax over the n - w older keys
        older = n - window
        probs = [0.0] * older
        for q in range(window):
            logits = [max(float(queries[0, h * groups + g, q] @ key[0, h, j]) for g in range(groups)) / math.sqrt(D)
                      for j in range(older)]
            top = max(logits)
            total = sum(math.exp(v - top) for v in logits)
            for j in range(older):
                probs[j] += math.exp(logits[j] - top) / total / window
        half = kernel // 2
        importance = [max(probs[max(0, j - half):j + half + 1]) for j in range(older)]
        # redundancy over all n keys
        units = [key[0, h, j] / (key[0, h, j].norm() + 1e-8) for j in range(n)]
        sim = [[0.0 if i == j else float(units[i] @ units[j]) for j in range(n)] for i in range(n)]
        for row in sim:
            alike = [j for j in range(n) if row[j] > threshold]
            row[max(alike) if alike else 0] = 0.0
        means = [sum(sim[i][j] for i in range(n)) / n for j in range(n)]
        top = max(means)
        total = sum(math.exp(m - top) for m in means)
        red = [math.exp(m - top) / total for m in means]
        score = [lam * importance[j] - (1 - lam) * red[j] for j in range(older)]
        best = sorted(range(older), key=lambda j: -score[j])[:budget - window]
        out.append(sorted(best) + list(range(older, n)))
    return out


def feed(policy, steps, generator):
    """A prompt of ``steps[0]`` tokens, then one token per step; the policy's answer at every pass, and every
    query and key it saw (keys as held before the pass's compaction)."""
    policy.bind(1)
    queries, keys, answers = [], None, []
    for count in steps:
        q = torch.randn(1, HEADS, count, D, generator=generator)
        k = torch.randn(1, KV_HEADS, count, D, generator=generator)
        k[..., :count // 2, :] += 2.0  # a share of look-alike keys, so that the redundancy term has cosines > 0.5
        keys = k if keys is None else torch.cat([keys, k], 2)
        queries.append(q)
        n = keys.shape[2]
        policy.record(0, n)
        policy.observe(0, q, keys, D ** -0.5)
        keep = policy.settle(0, n)
        answers.append((keep, torch.cat(queries, 2), keys))
        if keep is not None:
            keys = keys.gather(2, keep[None, :, :, None].expand(1, KV_HEADS, keep.shape[-1], D))
    return answers


def test_rkv_keeps_what_its_reference_keeps_after_a_buffer_of_steps():
    policy = RKV(cache_size=24, buffer=6, window_size=5, kernel_size=3)
    answers = feed(policy, [20] + [1] * 10, torch.Generator().manual_seed(4))
    sizes = [None if keep is None else keep.shape[-1] for keep, _, _ in answers]
    assert sizes == [None] * 10 + [24]  # 20 + 10 = 30 = cache_size + buffer: compacted then, not before
    keep, queries, keys = answers[-1]
    expected = reference_selection(queries[:, :, -5:], keys, 24, 5, 3, 0.07, 0.5)  # the 5 newest queries, across steps
    assert keep.tolist() == expected


def test_rkv_compresses_a_long_prompt_at_once_then_every_buffer():
    policy = RKV(cache_size=24, buffer=6, window_size=5, kernel_size=3, mix_lambda=0.5)
    answers = feed(policy, [40] + [1] * 13, torch.Generator().manual_seed(5))
    keep, queries, keys = answers[0]
    assert keep.tolist() == reference_selection(queries[:, :, -5:], keys, 24, 5, 3, 0.5, 0.5)
    compacted = [i for i, (keep, _, _) in enumerate(answers) if keep is not None]
    assert compacted == [0, 6, 12]  # the prompt, then each time the layer holds 24 + 6


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_rkv_extremes_are_pure_redundancy_or_pure_importance(lam):
    # lambda 1: the window's attention alone decides; lambda 0: the redundancy alone (the least redundant kept)
    policy = RKV(cache_size=24, buffer=6, window_size=5, kernel_size=1, mix_lambda=lam)
    keep, queries, keys = feed(policy, [40], torch.Generator().manual_seed(6))[0]
    if lam == 0.0:
        red = redundancy(keys, 0.5)[0, :, :35]
        expected = [sorted(torch.topk(-row, 19).indices.tolist()) + list(range(35, 40)) for row in red]
    else:
        expected = reference_selection(queries[:, :, -5:], keys, 24, 5, 1, 1.0, 0.5)
    assert keep.tolist() == expected
