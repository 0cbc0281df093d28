"""The lm-evaluation-harness model ``kvcache`` (also ``lacache``): Hugging Face's ``hf`` model whose every request runs
on a compressed KV cache of any of our methods, quantizers and readers.

* ``generate_until``: each batch gets a fresh cache, prefilled with the (left-padded) prompts and compressed, then
  decoded, as our LongBench harness does (the first new token is read from the whole prompt).
* ``loglikelihood``: a context is prefilled up to its last ``compress_before`` tokens and compressed; then the rest
  of the context and the continuation are read over the compressed cache, so every continuation token is scored
  after compression. One prefill serves all of a context's continuations (a copy of the cache for each).
* ``loglikelihood_rolling``: a document streams through one cache, ``rolling_chunk`` tokens per forward pass, the
  cache compressed after each: the streaming perplexity of ``ppl/``.

``method=full`` with no quantizer or reader is ``hf`` itself: every request goes through HFLM's own code.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import List, Tuple

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from lacache_core.errors import ConfigError
from lacache_core.build import prefill, prompt_passes
from lacache_core.patches import enable_position_shift
from lacache_core.versions import with_cache

from ..generation import batch_cache, budget_spec
from .settings import in_model_args, parse_cache_args, split_model_args


@register_model("kvcache", "lacache")
class KVCacheLM(HFLM):
    """``HFLM`` with a compressed cache; ``--model_args`` takes HFLM's arguments and every setting of our command
    lines (``method``, ``cache_size`` or ``budget``, a method's hyper-parameters, ``quant``/``quant_*``,
    ``read``/``read_*``, ``key_rotation``) plus ``compress_before`` and ``rolling_chunk``."""

    def __init__(self, pretrained, **kwargs):
        ours, theirs = split_model_args(kwargs, HFLM.__init__)
        self.cache_args = parse_cache_args(ours)
        super().__init__(pretrained=pretrained, **theirs)
        if self.cache_args.compresses:
            enable_position_shift(self.model)

    def _new_cache(self, prompt_lens: List[int]):
        """A fresh cache for a batch whose rows hold prompts of ``prompt_lens`` tokens (``budget`` is per prompt)."""
        args = self.cache_args.args
        try:  # a budget too small for the method (or for this prompt's share of it) names its setting
            specs = [budget_spec(args, self.cache_args.method, n) for n in prompt_lens]
            return batch_cache(self.model, specs, prompt_lens)
        except ConfigError as error:
            raise ConfigError(in_model_args(str(error))) from None

    # -- generate_until
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if not self.cache_args.compresses:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        mask = generation_kwargs.get("attention_mask")
        lens = [context.shape[1]] * context.shape[0] if mask is None else mask.sum(-1).tolist()
        generation_kwargs.update(with_cache(self._new_cache(lens)))
        with prompt_passes(self.model, self.tokenizer):  # a method's scoring passes after the prompt (KVzip)
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # -- loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if not self.cache_args.compresses:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        by_context = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            whole = (context + continuation)[-(self.max_length + 1):]  # HFLM's left truncation
            by_context[tuple(whole[:len(whole) - len(continuation)])].append(i)
        results: List[Tuple[float, bool]] = [None] * len(requests)
        for context, members in tqdm(by_context.items(), desc="contexts", disable=disable_tqdm or self.rank != 0):
            prefilled = self._prefill(list(context))
            for i in members:
                results[i] = self._score(prefilled, list(context), requests[i][2])
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def _prefill(self, context: List[int]):
        """The cache after all but the last ``compress_before`` context tokens, and the last logits it gave
        (``None`` before any token)."""
        cache = self._new_cache([len(context)])
        head = context[:max(len(context) - self.cache_args.compress_before, 0)]
        if not head:
            return cache, None
        with torch.no_grad():  # lacache_core's prefill: a forward, and a method's scoring passes (KVzip)
            last = prefill(self.model, torch.tensor([head], device=self.device), cache, tokenizer=self.tokenizer)
        return cache, last

    def _score(self, prefilled, context: List[int], continuation: List[int]) -> Tuple[float, bool]:
        """``(sum of log-probabilities, greedy)`` of ``continuation`` after ``context``, on a copy of the prefilled
        cache (the copy is dropped, so the prefill serves the next continuation unchanged)."""
        cache, last = prefilled
        cache = copy.deepcopy(cache)
        head = max(len(context) - self.cache_args.compress_before, 0)
        rest = context[head:] + continuation[:-1]
        logits = [] if last is None else [last]
        if rest:
            with torch.no_grad():
                out = self.model(torch.tensor([rest], device=self.device), use_cache=True, **with_cache(cache))
            logits.append(out.logits[0])
        logits = torch.cat(logits)[-len(continuation):]
        logprobs = F.log_softmax(logits.float(), -1)
        target = torch.tensor(continuation, device=logprobs.device)
        greedy = bool((logprobs.argmax(-1) == target).all())
        return float(logprobs.gather(-1, target[:, None]).sum()), greedy

    # -- loglikelihood_rolling
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        if not self.cache_args.compresses:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        totals = []
        for request in tqdm(requests, desc="documents", disable=disable_tqdm or self.rank != 0):
            (text,) = request.args
            tokens = [self.prefix_token_id] + self.tok_encode(text)
            totals.append(self._stream(tokens))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
        return totals

    def _stream(self, tokens: List[int]) -> float:
        """Sum of log-probabilities of ``tokens[1:]``, each given the ones before it through one compressed cache."""
        cache, chunk, total = self._new_cache([len(tokens)]), self.cache_args.rolling_chunk, 0.0
        with torch.no_grad():
            for start in range(0, len(tokens) - 1, chunk):
                piece = torch.tensor([tokens[start:min(start + chunk, len(tokens) - 1)]], device=self.device)
                logprobs = F.log_softmax(self.model(piece, use_cache=True, **with_cache(cache)).logits[0].float(), -1)
                target = torch.tensor(tokens[start + 1:start + 1 + piece.shape[1]], device=self.device)
                total += float(logprobs.gather(-1, target[:, None]).sum())
        return total
