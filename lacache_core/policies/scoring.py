"""Attention scores for the policies that rank tokens (H2O, TOVA, ...), computed from q and k.

Policies compute the few attention rows they need themselves, so they work whatever kernel the
model runs (eager, sdpa, flash_attention_2): no attention weights are requested from the model.
"""
from __future__ import annotations

import torch


def attention_probs(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of each query over all keys, averaged over the query heads of a KV head.

    Parameters
    ----------
    query : ``[b, heads, q, d]``, the last ``q`` positions of the sequence.
    key : ``[b, kv_heads, n, d]``, with ``n >= q``; query ``j`` sits at slot ``n - q + j`` and
        only sees keys up to it (causal).

    Returns
    -------
    ``[b, kv_heads, q, n]`` float32 probabilities.
    """
    b, heads, q, d = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    grouped = query.float().view(b, kv_heads, heads // kv_heads, q, d)
    logits = torch.einsum("bkgqd,bknd->bkgqn", grouped, key.float()) * scaling
    if q > 1:
        rows = torch.arange(n - q, n, device=key.device)[:, None]
        logits = logits.masked_fill(torch.arange(n, device=key.device)[None, :] > rows, float("-inf"))
    return logits.softmax(-1).mean(2)


def attention_mass(query: torch.Tensor, key: torch.Tensor, scaling: float, chunk: int = 256) -> torch.Tensor:
    """Attention each key receives, summed over all queries, averaged over batch and heads: ``[n]``.

    Queries are processed ``chunk`` at a time so a long prefill needs ``O(chunk * n)`` memory.
    """
    q, n = query.shape[2], key.shape[2]
    total = torch.zeros(n, device=key.device, dtype=torch.float32)
    for start in range(0, q, chunk):
        stop = min(start + chunk, q)
        # queries start..stop-1 sit at slots n - q + start ...; keys beyond the last of them are masked
        visible = n - q + stop
        probs = attention_probs(query[:, :, start:stop], key[:, :, :visible], scaling)
        total[:visible] += probs.sum(2).mean((0, 1))
    return total


def keep_top(scores: torch.Tensor, n: int, start_size: int, recent_size: int, budget: int) -> torch.Tensor:
    """Slots kept: the first ``start_size``, the last ``recent_size``, and the highest ``scores`` in between.

    ``scores`` is ``[n]``; returns a sorted LongTensor of ``budget`` slots (on ``scores``' device).
    """
    device = scores.device
    middle = scores[start_size:n - recent_size]
    top = torch.topk(middle, budget - start_size - recent_size).indices + start_size
    return torch.cat([torch.arange(start_size, device=device), top.sort().values,
                      torch.arange(n - recent_size, n, device=device)])


def with_protected(chosen: torch.Tensor, start_size: int, recent_size: int, n: int) -> torch.Tensor:
    """Per head, the first ``start_size`` slots, the ``chosen`` slots (``[kv_heads, k]``, any order) sorted,
    and the last ``recent_size`` of ``n``: ``LongTensor [kv_heads, start_size + k + recent_size]``."""
    heads, device = chosen.shape[0], chosen.device
    return torch.cat([torch.arange(start_size, device=device).expand(heads, start_size), chosen.sort(-1).values,
                      torch.arange(n - recent_size, n, device=device).expand(heads, recent_size)], -1)


def ensure_layer(store: list, layer: int) -> None:
    """Grow a per-layer list of scores with ``None`` until ``store[layer]`` exists."""
    store.extend([None] * (layer + 1 - len(store)))


def pad_to(scores, n: int, device) -> torch.Tensor:
    """``scores`` (``[m]`` or None) extended with zeros for the ``n - m`` newest slots."""
    if scores is None:
        return torch.zeros(n, device=device)
    if scores.shape[0] == n:
        return scores
    return torch.cat([scores, torch.zeros(n - scores.shape[0], device=scores.device)])


def seeded_generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the ``salt`` (layer, tokens seen, ...): the same draws for the
    same run, whatever happened before, so a sampling policy has no random state to save or restore."""
    mixed = seed
    for value in salt:
        mixed = (mixed * 1_000_003 + value) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(mixed)


def sample_by_score(scores: torch.Tensor, count: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct indices of ``scores`` (``[m]``), drawn one after another with probability
    ``softmax(scores / temperature)`` among those left (uniform for ``temperature <= 0``).

    The draws are the top ``count`` of ``scores / temperature`` plus Gumbel noise (the Gumbel-top-k
    trick): the distribution of ``torch.multinomial(softmax, count, replacement=False)``, which the
    references call, without its underflow, so a cold temperature tends to plain top-k. Noise is drawn
    on the CPU from ``generator``; the indices come back on ``scores``' device.
    """
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    values = scores.detach().double().cpu()
    uniform = torch.rand(values.shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    noisy = -torch.log(-torch.log(uniform))
    if temperature > 0:
        noisy = noisy + values / temperature
    return torch.topk(noisy, min(count, values.numel())).indices.to(scores.device)
