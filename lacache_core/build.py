"""Building a :class:`CompressedCache` for a model, and feeding it a prompt."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Optional

import torch
from tqdm.auto import tqdm

from .cache import CompressedCache
from .errors import ConfigError
from .policies import build_policy
from .quantizers import Quantizer
from .readers import Reader
from .versions import CACHE_KWARG, with_cache

__all__ = ["make_cache", "make_row_cache", "prefill", "prompt_passes"]


def make_cache(method: str, model_or_config, query_at_slot: bool = True, key_rotation: str = "auto",
               quant: Optional[Quantizer] = None, read: Optional[Reader] = None, **settings) -> CompressedCache:
    """Build a :class:`CompressedCache` for ``method`` sized to a model (or its config).

    Example
    -------
    >>> enable_position_shift(model)
    >>> cache = make_cache("lacache", model, cache_size=256, span=8, overlap=4)
    >>> model.generate(input_ids, past_key_values=cache, max_new_tokens=4096)
    """
    config = getattr(model_or_config, "config", model_or_config)
    policy = build_policy(method, **settings)
    return CompressedCache(policy, config.num_hidden_layers, query_at_slot=query_at_slot, key_rotation=key_rotation,
                           quant=quant, read=read)


def make_row_cache(method: str, model_or_config, row_settings: list, query_at_slot: bool = True,
                   key_rotation: str = "auto", quant: Optional[Quantizer] = None,
                   read: Optional[Reader] = None) -> CompressedCache:
    """A :class:`CompressedCache` for a batch whose rows differ in their settings (``row_settings[j]`` for row
    ``j``, as :func:`make_cache`'s keywords), e.g. a budget that is a fraction of each row's prompt.

    Example
    -------
    >>> cache = make_row_cache("lacache", model, [dict(cache_size=512), dict(cache_size=300)])
    >>> model.generate(left_padded_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64)
    """
    layers = getattr(model_or_config, "config", model_or_config).num_hidden_layers
    same = all(s == row_settings[0] for s in row_settings)  # one policy serves rows that score nothing
    policies = []
    for settings in row_settings[:1] if same else row_settings:
        try:  # an impossible budget names its numbers
            policy = build_policy(method, **settings)
            policy.bind(layers)
        except ConfigError as err:
            raise ConfigError(f"{err} (cache_size {settings.get('cache_size')}, start_size "
                              f"{settings.get('start_size')}, {layers} layers)") from None
        policies.append(policy)
    return CompressedCache.for_rows(policies, layers, query_at_slot=query_at_slot, key_rotation=key_rotation,
                                    quant=quant, read=read)


def prefill(model, input_ids: torch.Tensor, cache, chunk_size: Optional[int] = None, tokenizer=None,
            **inputs) -> torch.Tensor:
    """Feed a prompt into ``cache``, whole or ``chunk_size`` tokens at a time; returns the last logits ``[b, vocab]``.

    With a :class:`CompressedCache` of a decode-time method the policy compacts between chunks, so
    peak memory depends on the budget and the chunk, not on the prompt length. Prefill-time
    methods (SnapKV, ...) compress after the first forward pass, so they need the whole prompt at
    once (``chunk_size=None``). A method that scores the prompt by passes of its own (KVzip) gets them
    here, after the prompt, written with ``tokenizer``. ``inputs`` (a left-padded batch's ``attention_mask``
    and ``position_ids``) go to the model with the whole prompt.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"prefill.chunk_size must be >= 1, got {chunk_size}")
    if chunk_size is not None and isinstance(cache, CompressedCache) and cache.policy.prefill_only:
        raise ConfigError(f"prefill.chunk_size cannot be used with make_cache.method {cache.policy.name}: it compresses the "
                          "whole prompt once")
    if chunk_size is not None and inputs:
        raise ConfigError("prefill.chunk_size cannot feed a padded batch: its rows would be cut at different places "
                          "of their own prompts; use batch size 1 or the whole prompt")
    extra = last_logits_only(model)
    passes = isinstance(cache, CompressedCache) and cache.policy.scores_by_passes
    step = chunk_size or input_ids.shape[1]
    logits = None
    for start in range(0, input_ids.shape[1], step):
        out = model(input_ids[:, start:start + step], use_cache=True, **with_cache(cache), **extra, **inputs)
        logits = out.logits[:, -1]
    if passes:
        run_scoring_passes(model, input_ids, cache, tokenizer, extra)
    return logits


def last_logits_only(model) -> dict:
    """The keyword that makes ``model`` compute the last position's logits only (a ``[prompt, vocab]`` logits tensor
    would dominate a prompt's memory), where this release has one."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else (
        {"num_logits_to_keep": 1} if "num_logits_to_keep" in params else {})


@contextmanager
def prompt_passes(model, tokenizer):
    """Within the block, every forward pass of ``model`` into a :class:`CompressedCache` whose method scores its prompt
    by passes of its own (KVzip) is followed by those passes, written with ``tokenizer``: ``model.generate()`` then
    runs such a method as :func:`prefill` does. A forward hook; the model's forward is left as it is.

    Example
    -------
    >>> cache = make_cache("kvzip", model, cache_size=512)
    >>> with prompt_passes(model, tokenizer):
    ...     out = model.generate(ids, past_key_values=cache, max_new_tokens=64)
    """
    running = []  # the passes are forward passes of the same model: the hook must not run again inside them
    extra = last_logits_only(model)  # once, not at every decoding step the hook sees

    def after_forward(module, args, kwargs, output):
        cache = kwargs.get(CACHE_KWARG, kwargs.get("past_key_values"))
        if running or not isinstance(cache, CompressedCache) or not cache.policy.scores_by_passes:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ConfigError(f"prompt_passes runs make_cache.method {cache.policy.name}'s passes from the prompt's "
                              "input_ids; this forward pass got none (inputs_embeds?)")
        running.append(True)
        try:
            with torch.no_grad():
                run_scoring_passes(model, input_ids, cache, tokenizer, extra)
        finally:
            running.clear()
        return None

    handle = model.register_forward_hook(after_forward, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def run_scoring_passes(model, input_ids: torch.Tensor, cache: CompressedCache, tokenizer, extra: dict) -> None:
    """The passes that score the prompt for ``cache``'s policy (:meth:`CachePolicy.scoring_passes`), then its choice
    applied to every layer. In a batch each row is scored alone, on a copy of its own tokens
    (:meth:`CompressedCache.row_alone`, counted in the cache's peak while it lives): its passes are its own prompt's."""
    rows = cache.rows.policies
    if rows is None:
        passes = cache.policy.scoring_passes(input_ids, tokenizer)
        run_passes(model, cache, passes, extra)
    else:
        pads, passes = cache.rows.pads, []
        for row, policy in enumerate(rows):
            own = input_ids[row:row + 1, 0 if pads is None else int(pads[row]):]
            own_passes = policy.scoring_passes(own, tokenizer)  # none for a prompt within its budget
            if own_passes:
                alone = cache.row_alone(row)
                run_passes(model, alone, own_passes, extra)
                cache.peak_bytes = max(cache.peak_bytes, cache.kv_bytes() + alone.peak_bytes)
            passes += own_passes
    if passes:
        cache.compact()


def run_passes(model, cache: CompressedCache, passes: list, extra: dict) -> None:
    """Run one prompt's scoring ``passes`` (``((start, end), ids)`` each) in the cache of that prompt alone."""
    policy = cache.policy
    for span, ids in tqdm(passes, desc=f"{policy.name} scoring passes", leave=False, disable=len(passes) < 2):
        policy.begin_pass(span)
        model(ids, use_cache=True, **with_cache(cache), **extra)
    policy.end_passes()
