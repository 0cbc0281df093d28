"""KVzip (Kim et al., 2025, arXiv 2505.23416): score each prompt token by how much the model reads it to repeat the
prompt, independently of any question.

Followed: kvpress's ``KVzipPress`` (``kvpress/presses/kvzip_press.py``, NVIDIA/kvpress @ 8bb29b9). After the prompt,
the model runs extra forward passes over the cache ("context reconstruction"). The prompt after the chat template's
prefix is cut into chunks of ``context_chunk`` tokens; chunk ``i`` is fed as::

    "\\n\\nRepeat the previous context exactly."  + template suffix + chunk 0                  (i = 0)
    "\\n\\nRepeat the part of the previous context exactly, starting with" + the last
        ``chunk_postfix`` tokens of chunk i - 1  + template suffix + chunk i                  (i > 0)

In each layer, the pass's queries attend (a softmax of their own) over the first ``min(start_size, chunk start)``
prompt keys, the chunk's keys, and the pass's own keys (causally). A prompt token's score in a (layer, KV head) is
the largest probability any query of that KV head's group gives it; the first ``start_size`` tokens start at 1 (a
chunk that covers them overwrites that, as the reference does), tokens of the template prefix past them at 0. The
pass's own keys are dropped after it, and the next token follows the prompt.

Then, with ``layerwise`` off (the reference default), the ``layers * kv_heads * (n - cache_size)`` lowest scores of
the whole model are pruned: each layer loses its share of them, taken per layer from its heads and tokens together,
so layers and heads keep different numbers of tokens (real memory here: heads are stored at their own lengths;
kvpress masks the pruned keys). With ``layerwise`` on, each layer prunes ``kv_heads * (n - cache_size)``.

Differences from the reference: the budget is ``cache_size`` slots per (layer, KV head) on average (kvpress:
``compression_ratio`` of the tokens); scores are computed in float32 with the attention's own softmax scale (kvpress:
the model's dtype, ``1 / sqrt(head_dim)``); ties break towards pruning the older token (kvpress: ``topk``'s order); a
prompt within the budget is kept whole without the passes; ``kvzip_plus_normalization`` is not built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Tuple

import torch

from ..errors import ConfigError
from .base import CachePolicy, param

REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with"
#: Queries scored at once: bounds the ``[heads, queries, keys]`` probabilities a chunk's pass holds.
QUERY_BLOCK = 512


def template_parts(tokenizer) -> Tuple[str, str]:
    """``(prefix, suffix)``: the text a chat template puts before a user's message and after it (the generation
    prompt included), as kvpress finds them; ``("", "\\n")`` for a tokenizer without a template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "", "\n"
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}], add_generation_prompt=True,
                                         tokenize=False, enable_thinking=False)
    before, suffix = text.split(separator)
    return before.split(dummy)[0], suffix


def encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)], dtype=torch.long)


def reconstruction_scores(query: torch.Tensor, key: torch.Tensor, span: Tuple[int, int], sinks: int,
                          scaling: float) -> torch.Tensor:
    """One layer's scores of the prompt slots ``span`` from one reconstruction pass.

    Parameters
    ----------
    query : ``[1, heads, q, d]``, the pass's queries, rotated.
    key : ``[1, kv_heads, n + q, d]``, the prompt's ``n`` keys and the pass's ``q``, rotated.
    span : ``(start, end)``, the prompt slots the pass repeats.
    sinks : leading prompt keys in the softmax besides the span (``min(start_size, start)``).

    Returns
    -------
    ``[kv_heads, end - start]``: per KV head, the largest probability of any of its queries on each slot.
    """
    start, end = span
    _, heads, q, d = query.shape
    kv_heads = key.shape[1]
    keys = torch.cat([key[0, :, :sinks], key[0, :, start:end], key[0, :, -q:]], 1).float()  # [kvh, m, d]
    grouped = query[0].float().view(kv_heads, heads // kv_heads, q, d)
    best = torch.zeros(kv_heads, end - start, device=query.device)
    own = torch.arange(q, device=query.device)
    for first in range(0, q, QUERY_BLOCK):
        rows = own[first:first + QUERY_BLOCK]
        logits = torch.einsum("hgqd,hkd->hgqk", grouped[:, :, first:first + QUERY_BLOCK], keys) * scaling
        logits[..., -q:].masked_fill_(own[None, :] > rows[:, None], float("-inf"))  # the pass's keys causally
        probs = logits.softmax(-1)[..., sinks:sinks + end - start]
        best = torch.maximum(best, probs.amax(dim=(1, 2)))
    return best


def pruned_per_layer(scores: torch.Tensor, cache_size: int, layerwise: bool) -> List[int]:
    """How many (head, token) pairs each layer prunes from ``scores [layers, kv_heads, n]`` so that the model keeps
    ``kv_heads * cache_size`` per layer on average (``layerwise``: in every layer)."""
    layers, heads, n = scores.shape
    if layerwise:
        return [heads * (n - cache_size)] * layers
    lowest = lowest_first(scores.reshape(-1))[:scores.numel() - layers * heads * cache_size]
    return torch.bincount(lowest // (heads * n), minlength=layers).tolist()


def lowest_first(scores: torch.Tensor) -> torch.Tensor:
    """Indices of ``scores`` from the lowest up, ties by index (the older token first)."""
    return torch.argsort(scores, stable=True)


@dataclass
class KVzip(CachePolicy):
    """After the prompt, score every prompt token by reconstruction passes; keep the best across layers and heads.

    Parameters
    ----------
    cache_size : int
        Prompt slots kept per (layer, KV head) on average (every layer, with ``layerwise``).
    start_size : int
        Leading prompt tokens that start with the highest score and join every pass's softmax (kvpress's ``n_sink``).
    layerwise : bool
        Prune the same number of tokens in every layer, instead of the model's lowest scores wherever they are.
    context_chunk : int
        Prompt tokens one reconstruction pass repeats.
    chunk_postfix : int
        Tokens of the previous chunk that a later pass's request quotes.
    """

    name: ClassVar[str] = "kvzip"
    default_positions: ClassVar[str] = "original"
    observes: ClassVar[bool] = True
    prefill_only: ClassVar[bool] = True
    ragged: ClassVar[bool] = True
    scores_by_passes: ClassVar[bool] = True

    cache_size: int = param(256, low=1)
    start_size: int = param(4, low=0)
    layerwise: bool = False
    context_chunk: int = param(2048, low=1)
    chunk_postfix: int = param(8, low=0)

    #: ``"prompt"`` (the first pass), ``"scoring"`` (reconstruction passes), ``"choosing"``, ``"done"``.
    _phase: str = field(default="prompt", init=False, repr=False)
    _prompt_len: int = field(default=0, init=False, repr=False)
    _span: Optional[Tuple[int, int]] = field(default=None, init=False, repr=False)
    _scores: Optional[torch.Tensor] = field(default=None, init=False, repr=False)  # [layers, kv_heads, n]
    _pruned: Optional[List[int]] = field(default=None, init=False, repr=False)

    def _reset_state(self) -> None:
        self._phase, self._prompt_len, self._span, self._scores, self._pruned = "prompt", 0, None, None, None

    def max_cache_len(self, num_layers: int) -> Optional[int]:
        return None  # a layer may keep up to the whole prompt

    def layer_budgets(self, num_layers: int, prompt_len: Optional[int] = None) -> List[int]:
        """Prompt slots per KV head after a prompt of ``prompt_len`` tokens: in every layer with ``layerwise``, else on
        average over the model's layers (each layer's own share follows the scores)."""
        return [self.cache_size if prompt_len is None else min(prompt_len, self.cache_size)] * num_layers

    # -- the passes
    def scoring_passes(self, input_ids, tokenizer):
        if self._phase != "scoring":
            return []  # a prompt within the budget is kept whole
        if tokenizer is None:
            raise ConfigError("make_cache.method kvzip needs the model's tokenizer to write its reconstruction "
                              "requests: pass prefill(..., tokenizer=...)")
        prefix, suffix = template_parts(tokenizer)
        prefix_ids = encode(tokenizer, prefix)
        start = prefix_ids.shape[1]
        if start and not torch.equal(input_ids[:, :start].cpu(), prefix_ids):
            start = 0  # the prompt does not begin with the template: reconstruct all of it
        suffix_ids, first, later = (encode(tokenizer, text) for text in (suffix, REPEAT_FIRST, REPEAT_NEXT))
        context = input_ids[:, start:].cpu()
        chunks = [context[:, i:i + self.context_chunk] for i in range(0, context.shape[1], self.context_chunk)]
        passes = []
        for i, chunk in enumerate(chunks):
            request = first if i == 0 else torch.cat(
                [later, chunks[i - 1][:, chunks[i - 1].shape[1] - self.chunk_postfix:]], 1)
            span = (start + i * self.context_chunk, start + i * self.context_chunk + chunk.shape[1])
            passes.append((span, torch.cat([request, suffix_ids, chunk], 1).to(input_ids.device)))
        return passes

    def begin_pass(self, span):
        self._span = span

    def end_passes(self):
        if self._phase == "scoring":
            self._phase, self._span = "choosing", None

    # -- scoring and choosing
    def observe(self, layer, query, key, scaling):
        if self._phase == "prompt" or self._phase == "done":
            return
        if self._span is None:
            raise ConfigError("make_cache.method kvzip scores the prompt by reconstruction passes before decoding: fill "
                              "the cache with lacache_core.prefill(model, input_ids, cache, tokenizer=...), or run "
                              "model.generate() inside lacache_core.prompt_passes(model, tokenizer)")
        if self._scores is None:
            self._scores = torch.zeros(self._num_layers, key.shape[1], self._prompt_len, device=key.device)
            self._scores[..., :self.start_size] = 1.0
        sinks = min(self.start_size, self._span[0])
        self._scores[layer, :, self._span[0]:self._span[1]] = reconstruction_scores(query, key, self._span, sinks,
                                                                                   scaling)

    def keep(self, layer: int, n: int):
        if self._phase == "prompt":
            if layer == self._num_layers - 1:
                self._prompt_len = n
                self._phase = "scoring" if n > self.cache_size else "done"
            return None
        if self._phase == "scoring":
            return torch.arange(self._prompt_len)  # the pass's own tokens are dropped
        if self._phase == "choosing":
            return self._choose(layer)
        return None

    def _choose(self, layer: int) -> List[torch.Tensor]:
        if layer == 0:
            self._pruned = pruned_per_layer(self._scores, self.cache_size, self.layerwise)
        scores = self._scores[layer]  # [kv_heads, n]
        kept = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        kept[lowest_first(scores.reshape(-1))[:self._pruned[layer]]] = False
        if layer == self._num_layers - 1:
            self._phase, self._scores = "done", None
        return [row.nonzero().squeeze(-1) for row in kept.view(scores.shape)]

    def holds_whole(self, layer: int) -> bool:
        return self._phase in ("prompt", "scoring")  # under a quantizer, heads are cut to their lengths first

    def settle(self, layer: int, n: int):
        keep = super().settle(layer, n)
        if self._phase == "scoring" and layer == self._num_layers - 1:
            self._seen = self._prompt_len  # the pass's tokens are gone: the next token follows the prompt
        return keep
