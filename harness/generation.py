"""Prompt-and-answer runs under a KV budget: the shared core of ``longbench/``, ``niah/`` and ``ruler/``.

The official LongBench and needle harnesses prefill the whole prompt with full attention, compact
the cache to its budget, then decode greedily with the query at the end of the compacted cache.
:func:`answer` does exactly that for every registered method, and with ``prefill_chunk_size`` it
feeds the prompt in chunks and compacts between them, so that memory is bounded by the budget and
the chunk instead of the prompt length.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from lacache_core.build import make_row_cache, prefill
from lacache_core.cache import CompressedCache, kv_bytes
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
        return batch_cache(model, [self], [prompt_len])

    def policy_settings(self, model, prompt_len: int) -> dict:
        """``build_policy`` keywords (and ``key_rotation``) for a prompt of ``prompt_len`` tokens."""
        start = self.start_size
        if start is None and self.method in OFFICIAL_SINK_RULE:
            start = official_start_size(prompt_len, self.cache_size, model.config.num_hidden_layers, self.start_cap)
        return {**(self.settings or {}), "cache_size": self.cache_size, "start_size": start}  # None: the default


def batch_cache(model, specs: Sequence[BudgetSpec], prompt_lens: Sequence[int]):
    """A fresh cache for a batch: row ``j`` holds a prompt of ``prompt_lens[j]`` tokens under ``specs[j]`` (one
    method; the budget and sinks may differ per row). The full cache is the model's own ``DynamicCache``."""
    if not HAS_CACHE_CLASSES:
        raise ConfigError("the prompt harnesses need transformers >= 4.36 (cache objects); "
                          "use ppl_legacy/ for transformers < 4.36")
    method = specs[0].method
    quant, read = ((specs[0].settings or {}).get(name) for name in ("quant", "read"))
    if method == "full":
        if quant is not None or read is not None:  # the full cache, quantized or read sparsely
            return make_row_cache("full", model, [{}], quant=quant, read=read)
        from transformers import DynamicCache
        return DynamicCache()
    rows = [spec.policy_settings(model, n) for spec, n in zip(specs, prompt_lens)]
    rotation = rows[0].get("key_rotation", "auto")
    rows = [{k: v for k, v in row.items() if k not in ("key_rotation", "quant", "read")} for row in rows]
    return make_row_cache(method, model, rows, key_rotation=rotation, quant=quant, read=read)


def budget_spec(args, method: str, prompt_len: int, start_size: Optional[int] = None) -> BudgetSpec:
    """The cache of one prompt under the harness flags: ``--cache_size`` tokens, or ``--budget`` x
    ``prompt_len`` (the official harnesses' rule); ``--start_size``, else ``start_size`` (``None``: the
    LongBench rule, per prompt)."""
    from .flags import method_settings

    if method == "full":
        settings = method_settings(args, method)
        return BudgetSpec("full", settings={"quant": settings["quant"], "read": settings["read"]})
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
    #: Wall time of the answer; in a batch, the batch's time over its rows.
    seconds: float
    #: Peak KV bytes; in a batch, the batch's peak over its rows (its padding included).
    peak_kv_bytes: int
    #: KV bytes held when the answer ends (as stored: heads of different lengths counted at their own).
    final_kv_bytes: int = 0
    #: Prompts answered together in this one's batch.
    batch_rows: int = 1
    #: With ``--read``: the share of the cache's bytes the decode steps read (the batch's), else ``None``.
    read_fraction: Optional[float] = None
    #: The prefill's part of ``seconds`` (a method's scoring passes included: KVzip).
    prefill_seconds: float = 0.0


def read_record(answer) -> dict:
    """``{"read_fraction": ...}`` for an answer's record when reads were sparse, else nothing (records stay as
    they were)."""
    fraction = getattr(answer, "read_fraction", None)
    return {} if fraction is None else {"read_fraction": round(fraction, 6)}


@torch.no_grad()
def greedy_answers(model, prompts: Sequence[torch.Tensor], cache, max_new_tokens: Union[int, Sequence[int]],
                   stop_ids: Sequence[int] = (), min_new_tokens: int = 0, prefill_chunk_size: Optional[int] = None,
                   pad_id: int = 0, tokenizer=None, timing: Optional[dict] = None) -> List[List[int]]:
    """Greedy decoding of a batch after a (possibly chunked) prefill; the new token ids of each prompt (stop
    token excluded).

    Prompts of different lengths are left-padded with ``pad_id`` into one ``[b, T]`` batch, with the attention
    mask and each row's own positions; every row stops at its own stop token or limit, and the batch decodes
    until all have. One prompt is the same loop with no padding.

    Parameters
    ----------
    prompts : ``b`` LongTensors ``[T_j]`` (or ``[1, T_j]``) on the model's device.
    cache : a :class:`CompressedCache` (compacted after every forward) or an ordinary ``DynamicCache``.
    max_new_tokens : one limit for every row, or one per row.
    min_new_tokens : stop tokens are not chosen before this many tokens (LongBench's samsum rule).
    tokenizer : the model's, for a method that writes passes of its own over the prompt (KVzip).
    timing : where given, ``timing["prefill_seconds"]`` is set to the prefill's wall time (scoring passes included).
    """
    device = prompts[0].device
    rows = [p.reshape(-1) for p in prompts]
    limits = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for j, row in enumerate(rows):
        ids[j, width - len(row):] = row
    inputs = {}
    if int(lengths.min()) < width:
        mask = (torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]).long()
        inputs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    stop_set = set(stop.tolist())
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache, prefill_chunk_size, tokenizer=tokenizer, **inputs)
    if timing is not None:
        timing["prefill_seconds"] = time.perf_counter() - t0
    out: List[List[int]] = [[] for _ in rows]
    live = [limit > 0 for limit in limits]
    step = 0  # tokens chosen so far by every row still going
    while any(live):
        if step < min_new_tokens and stop.numel():
            logits = logits.index_fill(-1, stop, float("-inf"))
        step += 1
        tokens = logits.argmax(-1)
        for j, token in enumerate(tokens.tolist()):
            if live[j]:
                if token in stop_set:
                    live[j] = False
                else:
                    out[j].append(token)
                    live[j] = len(out[j]) < limits[j]
        if not any(live):
            break
        if inputs:
            mask = inputs["attention_mask"]
            inputs = {"attention_mask": torch.cat([mask, torch.ones_like(mask[:, -1:])], -1),
                      "position_ids": inputs["position_ids"][:, -1:] + 1}
        logits = model(tokens[:, None], use_cache=True, **with_cache(cache), **inputs).logits[:, -1]
    return out


def greedy_answer(model, input_ids: torch.Tensor, cache, max_new_tokens: int, stop_ids: Sequence[int] = (),
                  min_new_tokens: int = 0, prefill_chunk_size: Optional[int] = None) -> List[int]:
    """:func:`greedy_answers` of one prompt (``input_ids`` ``[1, T]``)."""
    return greedy_answers(model, [input_ids], cache, max_new_tokens, stop_ids, min_new_tokens, prefill_chunk_size)[0]


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch (masked, so any id in the vocabulary serves): the tokenizer's pad, else its EOS."""
    for pad in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if pad is not None:
            return int(pad)
    return 0


def answer_batch(model, tokenizer, prompts: Sequence[torch.Tensor], specs: Sequence[BudgetSpec],
                 max_new_tokens: Union[int, Sequence[int]], stop_ids: Sequence[int] = (), min_new_tokens: int = 0,
                 prefill_chunk_size: Optional[int] = None) -> List[Answer]:
    """Answer a batch of prompts (``[1, T_j]`` each), row ``j`` under ``specs[j]``'s budget, in one cache: fresh
    cache, prefill, greedy decoding, decoded texts. Time and KV bytes are the batch's, shared over its rows."""
    device = next(model.parameters()).device
    prompts = [p.to(device) for p in prompts]
    lengths = [p.shape[-1] for p in prompts]
    cache = batch_cache(model, specs, lengths)
    t0 = time.perf_counter()
    timing = {}
    ids = greedy_answers(model, prompts, cache, max_new_tokens, stop_ids, min_new_tokens, prefill_chunk_size,
                         pad_token_id(tokenizer), tokenizer, timing)
    seconds = (time.perf_counter() - t0) / len(prompts)
    # an ordinary cache only grows, so its final size is its peak
    peak = cache.peak_bytes if isinstance(cache, CompressedCache) else kv_bytes(cache)
    final = kv_bytes(cache)
    read = cache.read_bytes / cache.dense_read_bytes if getattr(cache, "read", None) and cache.dense_read_bytes else None
    return [Answer(row, decode_text(tokenizer, row), n, seconds, peak // len(prompts), final // len(prompts),
                   len(prompts), read, timing["prefill_seconds"] / len(prompts)) for row, n in zip(ids, lengths)]


def answer(model, tokenizer, input_ids: torch.Tensor, spec: BudgetSpec, max_new_tokens: int,
           stop_ids: Sequence[int] = (), min_new_tokens: int = 0, prefill_chunk_size: Optional[int] = None) -> Answer:
    """Answer one prompt under ``spec``'s budget: fresh cache, prefill, greedy decoding, decoded text."""
    return answer_batch(model, tokenizer, [input_ids], [spec], max_new_tokens, stop_ids, min_new_tokens,
                        prefill_chunk_size)[0]


def answer_all(model, tokenizer, requests: Iterable[Tuple[torch.Tensor, int]], spec_for: Callable[[int], BudgetSpec],
               batch_size: int = 1, stop_ids: Sequence[int] = (), min_new_tokens: int = 0,
               prefill_chunk_size: Optional[int] = None, longest_first: bool = False) -> Iterator[Tuple[int, Answer]]:
    """``(i, answer)`` for every request ``i`` (``(input_ids [1, T], max_new_tokens)``), ``batch_size`` at a time.

    Requests are taken in their order (lazily: a generator builds each batch's prompts only when it is
    due), or, with ``longest_first``, all at once and sorted longest first, so that the rows of a batch
    have similar lengths and little padding and the largest batch, the one that runs out of memory if any
    does, comes first. ``spec_for(prompt_tokens)`` is the budget of each prompt.
    """
    pending = enumerate(requests)
    if longest_first and batch_size > 1:
        pending = iter(sorted(pending, key=lambda item: -item[1][0].shape[-1]))
    while True:
        batch = list(itertools.islice(pending, batch_size))
        if not batch:
            return
        prompts = [ids for _, (ids, _) in batch]
        answers = answer_batch(model, tokenizer, prompts, [spec_for(ids.shape[-1]) for ids in prompts],
                               [limit for _, (_, limit) in batch], stop_ids, min_new_tokens, prefill_chunk_size)
        yield from zip((i for i, _ in batch), answers)


#: transformers 4.x's decode clean-up, in its order (``clean_up_tokenization`` in ``tokenization_utils_base.py``,
#: identical in 4.33.0, 4.43.4 and 4.57): a space before punctuation and English contractions is dropped.
CLEANUP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def declares_cleanup(tokenizer) -> bool:
    """Whether the tokenizer's own configuration sets ``clean_up_tokenization_spaces: true``.

    Read from what the tokenizer was built with (``init_kwargs``), not from the attribute, whose
    default differs between transformers versions when the configuration says nothing.
    """
    return bool(getattr(tokenizer, "init_kwargs", {}).get("clean_up_tokenization_spaces", False))


def clean_up_spaces(text: str) -> str:
    """``text`` after transformers 4.x's ``clean_up_tokenization`` replacements (:data:`CLEANUP_REPLACEMENTS`)."""
    for old, new in CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def decode_text(tokenizer, ids) -> str:
    """Text of ``ids`` (a list or ``[T]`` tensor) without special tokens, as transformers 4.x decodes it.

    The reference harnesses decode under transformers 4.x, which applies the clean-up a tokenizer
    declares; transformers 5 skips it for BPE tokenizers (Llama-3's among them). Decode is told not to
    clean up and :func:`clean_up_spaces` is applied here instead, so every version gives the 4.x text.
    A tokenizer without the setting (not a transformers tokenizer) decodes as it does.
    """
    own = {"clean_up_tokenization_spaces": False} if hasattr(tokenizer, "clean_up_tokenization_spaces") else {}
    text = tokenizer.decode(ids, skip_special_tokens=True, **own)
    return clean_up_spaces(text) if declares_cleanup(tokenizer) else text


def truncate_middle(tokenizer, prompt: str, max_length: int) -> str:
    """LongBench's truncation: a prompt longer than ``max_length`` tokens keeps its first and last
    ``max_length / 2`` tokens (the question usually sits at one end), each half decoded on its own
    with the tokenizer's declared clean-up (:func:`decode_text`), as THUDM's ``pred.py`` does under 4.x."""
    ids = tokenizer(prompt, truncation=False).input_ids  # BOS included, as LongBench counts it
    if len(ids) <= max_length:
        return prompt
    half = max_length // 2
    return decode_text(tokenizer, ids[:half]) + decode_text(tokenizer, ids[-half:])


def encode_prompt(tokenizer, text: str, chat: bool, answer_prefix: str = "") -> torch.Tensor:
    """``[1, T]`` ids of ``text``, wrapped in the tokenizer's chat template when ``chat`` (and one exists),
    followed by ``answer_prefix`` (the start of the answer, e.g. RULER's "The special magic number is")."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text + answer_prefix, add_special_tokens=False, return_tensors="pt").input_ids
    return tokenizer(text + answer_prefix, return_tensors="pt").input_ids
