"""Token-by-token streaming perplexity, the protocol of the official (StreamingLLM-derived) script.

Every text is fed one token per forward pass through one cache that persists across texts; the
model's next-token NLL is recorded for every position but the last of each text; the cache policy
runs after every pass. The official script stops after scoring ``num_eval_tokens + 1`` tokens, and
so do we, so that the same flags give the same perplexity.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lacache_core.cache import CompressedCache, cache_layers, kv_bytes
from lacache_core.step.placement import KeyPlacement
from lacache_core.errors import ConfigError
from lacache_core.patches import enable_position_shift
from lacache_core.policies import CachePolicy, FullCache, policy_from_state
from lacache_core import KIVI, Quest
from lacache_core.quant import store_from_state
from lacache_core.versions import HAS_CACHE_CLASSES, output_cache, with_cache

QUERY_POSITIONS = ("slot", "official")


@dataclass
class StreamResult:
    nlls: List[float] = field(default_factory=list)
    seconds: float = 0.0
    peak_kv_bytes: int = 0
    #: Bytes that decode steps read from the cache, and would read densely (``read_bytes`` set by ``--read``).
    read_bytes: float = 0.0
    dense_read_bytes: int = 0

    @property
    def ppl(self) -> float:
        return running_ppl(self.nlls, len(self.nlls))

    @property
    def tokens_per_s(self) -> float:
        return len(self.nlls) / self.seconds if self.seconds > 0 else float("nan")


def running_ppl(nlls: List[float], upto: int) -> float:
    part = nlls[:upto]
    if not part:
        return float("nan")
    try:
        return math.exp(sum(part) / len(part))
    except OverflowError:  # a mean NLL above ~709: a perplexity past float range, not a crash
        return float("inf")


def perplexity_problem(nlls: List[float]) -> Optional[str]:
    """Why the perplexity of ``nlls`` is not a number to report (``None`` when it is finite)."""
    if not nlls:
        return "no token was scored"
    bad = [i for i, nll in enumerate(nlls) if not math.isfinite(nll)]
    if bad:
        return (f"{len(bad)} of {len(nlls)} scored tokens have a non-finite loss, the first at token {bad[0]} "
                "(the model's logits overflow or are NaN: a broken model, or a --dtype too narrow for it)")
    mean = sum(nlls) / len(nlls)
    if not math.isfinite(running_ppl(nlls, len(nlls))):
        return f"the mean loss {mean:.1f} over {len(nlls)} tokens is past float range (exp overflows)"
    return None


def scoreable_tokens(tokenizer, texts: Iterable[str], enough: Optional[int] = None) -> int:
    """Tokens the protocol scores in ``texts`` (each text's tokens but its first), counting stops once
    ``enough`` are found (the texts are then not all tokenized)."""
    total = 0
    for text in texts:
        total += max(0, len(tokenizer(text).input_ids) - 1)
        if enough is not None and total >= enough:
            break
    return total


def checkpoints(nlls: List[float], start: int = 1024) -> dict:
    """Perplexity over the first 1K, 2K, 4K, ... scored tokens (keys like ``"1K"``)."""
    out, k = {}, start
    while k <= len(nlls):
        out[f"{k // 1024}K"] = running_ppl(nlls, k)
        k *= 2
    return out


def next_query_position(previous: int, held: int, mode: str = "slot") -> int:
    """Position of the next query, given the previous one and the cache length before this step.

    ``"slot"``: the new key's slot, ``held``. ``"official"``: ``previous + 1`` while that does not
    exceed ``held``, else ``previous`` (the official harness; start with ``previous = -1``).
    """
    if mode == "slot":
        return held
    return previous + 1 if previous + 1 <= held else previous


def _new_cache(policy: CachePolicy, num_layers: int, legacy: bool, query_position: str, key_rotation: str = "auto",
               quant: Optional[KIVI] = None, read: Optional[Quest] = None):
    if legacy:
        if quant is not None or read is not None:
            raise ConfigError("--quant and --read need transformers >= 4.36 (cache objects); ppl_legacy/ has none")
        return None
    if not isinstance(policy, FullCache) or quant is not None or read is not None:  # a full cache quantized or read sparsely
        return CompressedCache(policy, num_layers, query_at_slot=query_position == "slot", key_rotation=key_rotation,
                               quant=quant, read=read)
    from transformers import DynamicCache
    return DynamicCache()


def _restore_cache(state: dict, policy: CachePolicy, num_layers: int, legacy: bool, query_position: str, device,
                   quant: Optional[KIVI] = None, read: Optional[Quest] = None):
    layers = [(k.to(device), v.to(device)) for k, v in state["layers"]]
    if legacy:
        return layers or None
    key_rotation = KeyPlacement.key_rotation_to_resume(state)  # the saved keys carry their rotation or not
    cache = _new_cache(policy, num_layers, legacy, query_position, key_rotation, quant, read)
    from transformers import DynamicCache
    for i, (k, v) in enumerate(layers):
        DynamicCache.update(cache, k, v, i)  # the base update: no compaction, the policy state is restored as is
    for i, saved in enumerate(state.get("quant_layers") or []):  # the quantized stores as they were, codes and all
        cache._keep_in_store(i, store_from_state(quant, {k: t.to(device) for k, t in saved.items()}), layers[i][0])
    if isinstance(cache, CompressedCache):
        cache.placement.load_state(state)
        cache.restore_batch(state.get("batch") or {})
        cache.peak_bytes = state["peak_kv_bytes"]
        cache.read_bytes, cache.dense_read_bytes, cache.metadata_read_bytes = state.get("read_bytes", (0.0, 0.0, 0.0))
    return cache


def stored_layers(cache) -> list:
    """Per-layer ``(key, value)`` as the cache stores them (a :class:`CompressedCache`'s keys in their frame)."""
    if isinstance(cache, CompressedCache):
        return [cache._stored(i) for i in range(cache.num_layers)]
    return cache_layers(cache)


def save_checkpoint(path: Path, policy: CachePolicy, cache, result: "StreamResult", where: tuple,
                    position: int, meta: dict) -> None:
    """Everything needed to continue the stream: scored NLLs, where we are, policy state and cache."""
    state = {"nlls": result.nlls, "where": where, "position": position, "seconds": result.seconds,
             "peak_kv_bytes": result.peak_kv_bytes if not isinstance(cache, CompressedCache) else cache.peak_bytes,
             "policy": policy.state_dict(), "layers": [(k.cpu(), v.cpu()) for k, v in stored_layers(cache)], "meta": meta,
             **(cache.placement.state() if isinstance(cache, CompressedCache) else {"stored_rotated": None}),
             "batch": cache.batch_state() if isinstance(cache, CompressedCache) else {},
             "read_bytes": tuple(float(getattr(cache, name, 0.0))
                                 for name in ("read_bytes", "dense_read_bytes", "metadata_read_bytes"))}
    if getattr(cache, "quant", None) is not None:  # dequantized views would be quantized again on restore
        state["layers"] = [(k[..., :0, :].cpu(), v[..., :0, :].cpu()) for k, v in state["layers"]]
        state["quant_layers"] = [{k: t.cpu() for k, t in store.state().items()} for store in cache._stores]
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    """A :func:`save_checkpoint` state. Read with ``weights_only=True``: tensors, numbers, strings and
    containers only, so a planted file cannot run code; anything else is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for a file with code in it, EOFError/RuntimeError if cut
        raise ConfigError(f"{path}: not a checkpoint this harness wrote ({type(err).__name__}); delete it to start "
                          "the run over") from None


def stream_perplexity(model, tokenizer, texts: Iterable[str], policy: CachePolicy,
                      num_eval_tokens: Optional[int] = None, query_position: str = "slot",
                      on_token: Optional[Callable[[int, float], None]] = None, desc: str = "ppl",
                      checkpoint: Optional[Path] = None, checkpoint_every: int = 0,
                      resume: Optional[dict] = None, meta: Optional[dict] = None,
                      key_rotation: str = "auto", quant: Optional[KIVI] = None,
                      read: Optional[Quest] = None) -> StreamResult:
    """Stream ``texts`` through ``model`` one token at a time under ``policy``.

    Parameters
    ----------
    policy : CachePolicy
        ``FullCache`` runs the unmodified model; other policies patch attention for position shift.
    num_eval_tokens : int, optional
        Stop after ``num_eval_tokens + 1`` scored tokens (the official script's count).
    query_position : {"slot", "official"}
        ``"slot"``: the query sits at its key's cache slot (the previous cache length).
        ``"official"``: reproduce the official harness, whose position rises by one per step while
        it does not exceed the previous cache length (it drifts ahead of the keys when the policy
        frees several slots at once, i.e. LaCache with ``R >= 2``).
    on_token : callable ``(index, nll)``, optional
        Called after each scored token (used to append results to disk as they come).
    checkpoint, checkpoint_every : Path, int
        Save the full stream state to ``checkpoint`` every ``checkpoint_every`` scored tokens (0: never).
    resume : dict, optional
        A state from :func:`load_checkpoint`; ``policy`` is then replaced by the saved one and the
        stream continues exactly where it stopped (same NLLs as an uninterrupted run).
    key_rotation : {"auto", "every_step", "incremental"}
        How the cache rotates stored keys (:class:`lacache_core.CompressedCache`).
    quant : KIVI, optional
        Quantized KV storage (:mod:`lacache_core.quant`).
    read : Quest, optional
        Sparse reads (:mod:`lacache_core.quest`); the result counts the bytes decode steps read.
    """
    _check_stream(model, policy, query_position)
    legacy = not HAS_CACHE_CLASSES
    if legacy and policy.observes:
        raise ConfigError(f"--method {policy.name} scores tokens from attention and needs transformers >= 4.36 "
                          "(ppl/run.py); the tuple-cache harness supports full, streamingllm and lacache")
    if policy.prefill_only:
        raise ConfigError(f"--method {policy.name} compresses a prompt once (prefill-time) and the token-by-token "
                          "perplexity protocol has no prompt; use it where there is one (generate, LongBench, NIAH)")
    policy, cache, device = _open_stream(model, policy, query_position, legacy, resume, key_rotation, quant, read)
    result, position, skip = StreamResult(), -1, (0, -1)
    if resume is not None:
        result.nlls, result.seconds = list(resume["nlls"]), resume["seconds"]
        result.peak_kv_bytes, position, skip = resume["peak_kv_bytes"], resume["position"], tuple(resume["where"])

    limit = None if num_eval_tokens is None else num_eval_tokens + 1
    bar = tqdm(total=limit, initial=len(result.nlls), desc=desc, unit="tok", dynamic_ncols=True)
    start = time.perf_counter() - result.seconds
    with torch.inference_mode():
        for text_index, text in enumerate(texts):
            if text_index < skip[0] or (limit is not None and len(result.nlls) >= limit):
                continue
            ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
            first = skip[1] + 1 if text_index == skip[0] else 0
            for idx in range(first, ids.shape[1] - 1):
                if legacy:
                    held = 0 if cache is None else cache[0][0].shape[-2]
                else:
                    held = cache.get_seq_length()
                position = next_query_position(position, held, query_position)
                out = model(ids[:, idx:idx + 1], use_cache=True, **with_cache(cache),
                            position_ids=torch.tensor([[position]], device=device))
                cache = output_cache(out)
                if legacy:
                    result.peak_kv_bytes = max(result.peak_kv_bytes, kv_bytes(cache))
                    cache = policy(cache)
                nll = F.cross_entropy(out.logits[0, -1].float(), ids[0, idx + 1]).item()
                result.nlls.append(nll)
                if on_token is not None:
                    on_token(len(result.nlls) - 1, nll)
                bar.update(1)
                if len(result.nlls) % 64 == 0:
                    bar.set_postfix(ppl=f"{result.ppl:.3f}", refresh=False)
                if checkpoint is not None and checkpoint_every and len(result.nlls) % checkpoint_every == 0:
                    result.seconds = time.perf_counter() - start
                    save_checkpoint(checkpoint, policy, cache, result, (text_index, idx), position, meta or {})
                if limit is not None and len(result.nlls) >= limit:
                    break
    result.seconds = time.perf_counter() - start
    bar.close()
    if not legacy:
        result.peak_kv_bytes = _peak_bytes(cache, result.peak_kv_bytes)
        _note_reads(cache, result)
    return result


def _note_reads(cache, result) -> None:
    if getattr(cache, "read", None) is not None:
        result.read_bytes, result.dense_read_bytes = cache.read_bytes, cache.dense_read_bytes


def _check_stream(model, policy: CachePolicy, query_position: str) -> None:
    """The settings every stream checks before any work: the query position, and the policy against the model."""
    if query_position not in QUERY_POSITIONS:
        raise ConfigError(f"--query_position must be one of {QUERY_POSITIONS}, got {query_position!r}")
    policy.bind(model.config.num_hidden_layers)


def _open_stream(model, policy: CachePolicy, query_position: str, legacy: bool, resume: Optional[dict],
                 key_rotation: str, quant: Optional[KIVI] = None, read: Optional[Quest] = None):
    """What every stream starts with, once checked (:func:`_check_stream`): position shift, and the cache
    (fresh, or from ``resume``, whose saved policy then replaces ``policy``). Returns ``(policy, cache, device)``."""
    num_layers = model.config.num_hidden_layers
    device = next(model.parameters()).device
    if not isinstance(policy, FullCache) or quant is not None or read is not None:
        enable_position_shift(model)
    if resume is None:
        return policy, _new_cache(policy, num_layers, legacy, query_position, key_rotation, quant, read), device
    policy = policy_from_state(resume["policy"])
    return policy, _restore_cache(resume, policy, num_layers, legacy, query_position, device, quant, read), device


def _peak_bytes(cache, measured: int) -> int:
    """Peak KV bytes of a stream: a CompressedCache's own peak, or a growing cache's final size."""
    return cache.peak_bytes if isinstance(cache, CompressedCache) else max(measured, kv_bytes(cache))


# ----------------------------------------------------------------------------------------- N streams at once
@dataclass
class BatchStreamResult:
    """Per-stream NLLs (``nlls[j]``: stream ``j``'s, in order), wall time and peak KV bytes of the batch."""

    nlls: List[List[float]] = field(default_factory=list)
    seconds: float = 0.0
    peak_kv_bytes: int = 0
    read_bytes: float = 0.0
    dense_read_bytes: int = 0

    @property
    def scored(self) -> int:
        return sum(map(len, self.nlls))

    @property
    def ppl(self) -> float:
        """Perplexity over every stream's tokens together."""
        flat = [x for row in self.nlls for x in row]
        return running_ppl(flat, len(flat))

    @property
    def tokens_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else float("nan")

    def step_major(self) -> List[float]:
        """All NLLs, step by step (stream 0..N-1 of step 0, then of step 1, ...), for running-perplexity curves."""
        return [x for step in zip(*self.nlls) for x in step]


def stream_tokens(tokenizer, texts: Iterable[str], limit: Optional[int]) -> torch.Tensor:
    """The inputs and targets the one-stream protocol scores, in order: ``LongTensor [2, T]``.

    Each text contributes its tokens but the last as inputs and its tokens but the first as targets
    (no token is scored against the next text's), ``T`` at most ``limit``.
    """
    inputs, targets, total = [], [], 0
    for text in texts:
        if limit is not None and total >= limit:
            break
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        inputs.append(ids[:-1])
        targets.append(ids[1:])
        total += ids.shape[0] - 1
    pairs = torch.stack([torch.cat(inputs), torch.cat(targets)]) if inputs else torch.zeros(2, 0, dtype=torch.long)
    return pairs if limit is None else pairs[:, :limit]


def split_streams(pairs: torch.Tensor, streams: int) -> torch.Tensor:
    """``[2, T]`` inputs and targets cut into ``streams`` consecutive chunks of ``T // streams`` tokens:
    ``[2, streams, T // streams]`` (the last ``T mod streams`` tokens are left out)."""
    length = pairs.shape[1] // streams
    if length < 1:
        raise ConfigError(f"--batch_size {streams} is more streams than the {pairs.shape[1]} tokens to score; "
                          f"lower --batch_size")
    return pairs[:, :streams * length].reshape(2, streams, length)


def check_batchable(policy: CachePolicy, streams: int, flag: str = "--batch_size") -> None:
    """One-line refusal of what cannot run ``streams`` rows at once yet (``flag``: the flag that asked for them)."""
    if streams > 1 and policy.prefill_only:
        raise ConfigError(f"{flag} {streams} cannot run --method {policy.name}: it compresses a prompt once, "
                          "and streams have none")
    if streams > 1 and not HAS_CACHE_CLASSES:
        raise ConfigError(f"{flag} {streams} needs transformers >= 4.36 (cache objects); use batch 1")


def stream_perplexity_batched(model, streams: torch.Tensor, policy: CachePolicy, query_position: str = "slot",
                              on_step: Optional[Callable[[int, List[float]], None]] = None, desc: str = "ppl",
                              checkpoint: Optional[Path] = None, checkpoint_every: int = 0,
                              resume: Optional[dict] = None, meta: Optional[dict] = None,
                              key_rotation: str = "auto", quant: Optional[KIVI] = None,
                              read: Optional[Quest] = None) -> BatchStreamResult:
    """Several streams through ``model`` in one batch, one token of each per forward pass.

    Parameters
    ----------
    streams : ``LongTensor [2, N, m]``, inputs and targets of ``N`` streams of ``m`` tokens (:func:`split_streams`).
        Each stream starts with an empty cache and keeps its own row of it; all advance together. A
        position-only policy holds the same slots in every row; a scoring policy chooses per row
        (:class:`lacache_core.CompressedCache` keeps a copy of it per row), and one gather per layer serves the batch.
    on_step : callable ``(step, [nll of each stream])``, optional
        Called after each step (used to append each stream's NLL to its own log as it comes).
    checkpoint, checkpoint_every, resume, meta, key_rotation, quant, read : as :func:`stream_perplexity` (every
        ``checkpoint_every`` steps).

    Stream ``j`` scores the same NLLs as the one-stream protocol on ``streams[:, j]`` alone with a fresh cache.
    """
    inputs, targets = streams
    count, length = inputs.shape
    _check_stream(model, policy, query_position)
    check_batchable(policy, count)
    policy, cache, device = _open_stream(model, policy, query_position, False, resume, key_rotation, quant, read)
    result, position, first = BatchStreamResult(nlls=[[] for _ in range(count)]), -1, 0
    if resume is not None:
        result.nlls, result.seconds = [list(row) for row in resume["nlls"]], resume["seconds"]
        result.peak_kv_bytes, position, first = resume["peak_kv_bytes"], resume["position"], resume["where"][1] + 1
    inputs, targets = inputs.to(device), targets.to(device)
    bar = tqdm(total=length * count, initial=first * count, desc=desc, unit="tok", dynamic_ncols=True)
    start = time.perf_counter() - result.seconds
    with torch.inference_mode():
        for t in range(first, length):
            position = next_query_position(position, cache.get_seq_length(), query_position)
            out = model(inputs[:, t:t + 1], use_cache=True, **with_cache(cache),
                        position_ids=torch.full((count, 1), position, device=device))
            cache = output_cache(out)
            nlls = F.cross_entropy(out.logits[:, -1].float(), targets[:, t], reduction="none").tolist()
            for row, nll in zip(result.nlls, nlls):
                row.append(nll)
            if on_step is not None:
                on_step(t, nlls)
            bar.update(count)
            if (t + 1) % 64 == 0:
                bar.set_postfix(ppl=f"{result.ppl:.3f}", refresh=False)
            if checkpoint is not None and checkpoint_every and (t + 1) % checkpoint_every == 0:
                result.seconds = time.perf_counter() - start
                save_checkpoint(checkpoint, policy, cache, result, (-1, t), position, meta or {})
    result.seconds = time.perf_counter() - start
    bar.close()
    result.peak_kv_bytes = _peak_bytes(cache, result.peak_kv_bytes)
    _note_reads(cache, result)
    return result
