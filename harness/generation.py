"""Prompt-and-answer runs under a KV budget: the shared core of ``longbench/``, ``niah/`` and ``ruler/``.

The official LongBench and needle harnesses prefill the whole prompt with full attention, compact
the cache to its budget, then decode greedily with the query at the end of the compacted cache.
:func:`answer` does exactly that for every registered method, and with ``prefill_chunk_size`` it
feeds the prompt in chunks and compacts between them, so that memory is bounded by the budget and
the chunk instead of the prompt length.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import torch

from lacache_core.cache import CompressedCache, kv_bytes, make_cache, prefill
from lacache_core.errors import ConfigError
from lacache_core.policies import METHODS
from lacache_core.versions import HAS_CACHE_CLASSES, with_cache

#: Leading tokens every method keeps in the official LongBench harness, at most.
LONGBENCH_START_CAP = 128
#: The methods whose reference code is the LaCache harness, which sizes their sinks by the LongBench rule;
#: the others keep the sinks of their own reference code (their ``start_size`` default) unless told otherwise.
OFFICIAL_SINK_RULE = ("streamingllm", "lacache")


def official_start_size(prompt_len: int, cache_size: int, num_layers: int, cap: int = LONGBENCH_START_CAP) -> int:
    """Sink tokens kept after a prompt of ``prompt_len`` tokens, by the official LongBench rule.

    ``min(cap, max(1, T - (L + 1)), C - (L + 1))``: at most ``cap``, and leaving room for one
    ladder of ``L + 1`` slots in both the prompt and the cache.
    """
    return max(1, min(cap, max(1, prompt_len - (num_layers + 1)), cache_size - (num_layers + 1)))


def budget_cache_size(budget: float, length: int) -> int:
    """Cache slots per layer for a budget given as a fraction of ``length`` tokens (official: ``int(b * n)``)."""
    if not 0 < budget <= 1:
        raise ConfigError(f"--budget must be in (0, 1], got {budget}")
    return max(1, int(budget * length))


@dataclass
class BudgetSpec:
    """How a harness turns its flags into a cache, per prompt.

    ``method == "full"`` means the unmodified model with its ordinary cache. Every other method gets
    the same ``cache_size``, and ``start_size`` if one is given; ``None``: the official LongBench
    rule, per prompt, for the methods of :data:`OFFICIAL_SINK_RULE`, and each other method's own
    default (SnapKV's reference keeps no sinks, H2O's here 4).
    """

    method: str = "full"
    cache_size: Optional[int] = None
    start_size: Optional[int] = None
    start_cap: int = LONGBENCH_START_CAP
    settings: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.method != "full" and self.cache_size is None:
            raise ConfigError(f"--method {self.method} needs a budget (--budget or --cache_size)")

    def make(self, model, prompt_len: int):
        """A fresh cache for one prompt of ``prompt_len`` tokens."""
        if not HAS_CACHE_CLASSES:
            raise ConfigError("the prompt harnesses need transformers >= 4.36 (cache objects); "
                              "use ppl_legacy/ for transformers < 4.36")
        if self.method == "full":
            from transformers import DynamicCache
            return DynamicCache()
        layers = model.config.num_hidden_layers
        start = self.start_size
        if start is None and self.method in OFFICIAL_SINK_RULE:
            start = official_start_size(prompt_len, self.cache_size, layers, self.start_cap)
        settings = dict(self.settings or {})
        settings.update(cache_size=self.cache_size, start_size=start)  # None: the method's default
        try:
            return make_cache(self.method, model, **settings)
        except ConfigError as err:
            raise ConfigError(f"{err} (cache_size {self.cache_size}, start_size {start}, {layers} layers)") from None


def budget_spec(args, method: str, prompt_len: int, start_size: Optional[int] = None) -> BudgetSpec:
    """The cache of one prompt under the harness flags: ``--cache_size`` tokens, or ``--budget`` x
    ``prompt_len`` (the official harnesses' rule); ``--start_size``, else ``start_size`` (``None``: the
    LongBench rule, per prompt)."""
    from .flags import method_settings

    if method == "full":
        return BudgetSpec("full")
    cache_size = args.cache_size if args.cache_size is not None else budget_cache_size(args.budget, prompt_len)
    start = args.start_size if args.start_size is not None else start_size
    if start is not None and cache_size <= start:
        given = "--cache_size" if args.cache_size is not None else f"--budget {args.budget:g}"
        raise ConfigError(f"{given} gives a {cache_size}-slot cache for a {prompt_len}-token prompt, not more than "
                          f"--start_size {start}; raise the budget or lower --start_size")
    return BudgetSpec(method, cache_size, start, settings=method_settings(args, method))


def stop_token_ids(tokenizer, model=None, extra: Iterable[str] = ()) -> List[int]:
    """Token ids that end an answer: the tokenizer's and the generation config's EOS (Llama-3 lists
    two: ``<|end_of_text|>`` and ``<|eot_id|>``), ``<|eot_id|>``/``<|im_end|>`` when the vocabulary
    has them, and the last token of each string in ``extra`` (e.g. ``"\\n"`` for samsum)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|eot_id|>", "<|im_end|>") if t in vocab)
    for text in extra:
        enc = tokenizer.encode(text, add_special_tokens=False)
        if enc:
            ids.add(int(enc[-1]))
    return sorted(ids)


@dataclass
class Answer:
    token_ids: List[int]
    text: str
    prompt_tokens: int
    seconds: float
    peak_kv_bytes: int
    #: KV bytes held when the answer ends (as stored: heads of different lengths counted at their own).
    final_kv_bytes: int = 0


@torch.no_grad()
def greedy_answer(model, input_ids: torch.Tensor, cache, max_new_tokens: int, stop_ids: Sequence[int] = (),
                  min_new_tokens: int = 0, prefill_chunk_size: Optional[int] = None) -> List[int]:
    """Greedy decoding after a (possibly chunked) prefill; returns the new token ids (stop token excluded).

    Parameters
    ----------
    input_ids : ``LongTensor [1, T]`` on the model's device.
    cache : a :class:`CompressedCache` (compacted after every forward) or an ordinary ``DynamicCache``.
    min_new_tokens : stop tokens are not chosen before this many tokens (LongBench's samsum rule).
    """
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=input_ids.device)
    logits = prefill(model, input_ids, cache, prefill_chunk_size)
    out: List[int] = []
    while len(out) < max_new_tokens:
        if len(out) < min_new_tokens and stop.numel():
            logits = logits.index_fill(-1, stop, float("-inf"))
        token = int(logits[0].argmax())
        if stop.numel() and token in stop_ids:
            break
        out.append(token)
        if len(out) == max_new_tokens:
            break
        step = torch.tensor([[token]], device=input_ids.device)
        logits = model(step, use_cache=True, **with_cache(cache)).logits[:, -1]
    return out


def answer(model, tokenizer, input_ids: torch.Tensor, spec: BudgetSpec, max_new_tokens: int,
           stop_ids: Sequence[int] = (), min_new_tokens: int = 0, prefill_chunk_size: Optional[int] = None) -> Answer:
    """Answer one prompt under ``spec``'s budget: fresh cache, prefill, greedy decoding, decoded text."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    cache = spec.make(model, input_ids.shape[1])
    t0 = time.perf_counter()
    ids = greedy_answer(model, input_ids, cache, max_new_tokens, stop_ids, min_new_tokens, prefill_chunk_size)
    seconds = time.perf_counter() - t0
    # an ordinary cache only grows, so its final size is its peak
    peak = cache.peak_bytes if isinstance(cache, CompressedCache) else kv_bytes(cache)
    return Answer(ids, tokenizer.decode(ids, skip_special_tokens=True), input_ids.shape[1], seconds, peak,
                  kv_bytes(cache))


def truncate_middle(tokenizer, prompt: str, max_length: int) -> str:
    """LongBench's truncation: a prompt longer than ``max_length`` tokens keeps its first and last
    ``max_length / 2`` tokens (the question usually sits at one end)."""
    ids = tokenizer(prompt, truncation=False).input_ids  # BOS included, as LongBench counts it
    if len(ids) <= max_length:
        return prompt
    half = max_length // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True))


def encode_prompt(tokenizer, text: str, chat: bool, answer_prefix: str = "") -> torch.Tensor:
    """``[1, T]`` ids of ``text``, wrapped in the tokenizer's chat template when ``chat`` (and one exists),
    followed by ``answer_prefix`` (the start of the answer, e.g. RULER's "The special magic number is")."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text + answer_prefix, add_special_tokens=False, return_tensors="pt").input_ids
    return tokenizer(text + answer_prefix, return_tensors="pt").input_ids
