"""Which method a vLLM engine runs, read from one place: ``additional_config["kv_compression"]``.

    LLM(model, additional_config={"kv_compression": {"method": "lacache", "cache_size": 256, "span": 8}})
    vllm serve MODEL --additional-config '{"kv_compression": {"method": "streamingllm", "cache_size": 256}}'

The keys are the method's own hyper-parameters (its dataclass fields, the names our command lines use), checked
with the same ranges; every error is one :class:`lacache_core.errors.ConfigError` line that names the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lacache_core.errors import ConfigError
from lacache_core.policies import METHODS, build_policy
from lacache_core.policies.base import CachePolicy

CONFIG_KEY = "kv_compression"

#: Methods that run inside the engine: every layer keeps the same number of slots, chosen from slot counts alone
#: (position-only) or from the cached keys themselves (key norms), never from attention weights.
SUPPORTED = ("lacache", "streamingllm", "knorm_decode")
#: Decode-time methods scored by the keys they hold; the scheduler counts their slots by their budget.
SCORED_BY_KEYS = ("knorm_decode",)

_ATTENTION = "it scores tokens by attention weights, which vLLM's attention kernel does not return"
_PROMPT = "it scores the prompt by the attention of its last queries, which vLLM's attention kernel does not return"
REFUSED = {
    "full": "it keeps every token: run vLLM without kv_compression",
    "h2o": _ATTENTION, "tova": _ATTENTION, "scissorhands": _ATTENTION,
    "cam": _ATTENTION + ", and merges evicted values into kept ones",
    "lshe": "it scores tokens by hashes of the queries, which vLLM's attention kernel does not expose",
    "snapkv": _PROMPT, "pyramidkv": _PROMPT, "pyramidinfer": _PROMPT, "nacl": _PROMPT,
    "knorm": "its first skip_layers layers keep the whole prompt, so layers hold different numbers of slots, and "
             "vLLM keeps one block list per request for every layer (knorm_decode runs)",
    "think": "it prunes key channels, which a paged cache block has no room to drop",
    "adakv": "its KV heads keep different numbers of slots, and vLLM keeps one block list per request",
    "headkv": "its KV heads keep different numbers of slots, and vLLM keeps one block list per request",
    "minicache": "it merges pairs of layers into one",
    "rkv": "it scores tokens by the attention of the newest queries, which vLLM's attention kernel does not return",
    "expected_attention": "it scores the prompt from its queries, which vLLM's attention kernel does not expose",
    "chunkkv": "it ranks chunks by a prompt scorer (SnapKV by default) that vLLM's attention kernel cannot feed",
    "criticalkv": "it re-ranks a prompt scorer's choice (SnapKV by default) that vLLM's attention kernel cannot feed",
    "keydiff": "it compresses the prompt once, after prefill, and the plugin compacts only as tokens are decoded",
    "lagkv": "it compresses the prompt once, after prefill, and the plugin compacts only as tokens are decoded",
    "kvzip": "it scores the prompt by forward passes of its own over a request to repeat it, which the engine's "
             "scheduler does not run, and its heads keep different numbers of slots",
}


#: Settings of a supported method that the plugin does not carry out, each with the reason.
NOT_IN_ENGINE = {"merge": "merging evicted tokens into kept ones is not written for the plugin's block moves"}


def refusal(method: str) -> str:
    """Why ``method`` does not run inside vLLM (empty for a supported one)."""
    if method in SUPPORTED:
        return ""
    return REFUSED.get(method, "it is not one of the methods written for the plugin")


@dataclass(frozen=True)
class CompressionSettings:
    """One engine's method and hyper-parameters (as ``additional_config["kv_compression"]`` gave them)."""

    method: str
    settings: tuple  # ((name, value), ...): hashable, so that every process derives the same policies

    @classmethod
    def from_config(cls, additional_config: Optional[dict]) -> Optional["CompressionSettings"]:
        """``None`` where the engine was started without ``kv_compression`` (the plugin then changes nothing)."""
        raw = (additional_config or {}).get(CONFIG_KEY)
        if raw is None:
            return None
        if not isinstance(raw, dict) or "method" not in raw:
            raise ConfigError(f"additional_config.{CONFIG_KEY} must be a dict with a 'method' key "
                              f"(one of {list(SUPPORTED)}), got {raw!r}")
        raw = dict(raw)
        method = raw.pop("method")
        if method not in METHODS:
            raise ConfigError(f"{CONFIG_KEY}.method must be one of {list(SUPPORTED)}, got {method!r}")
        why = refusal(method)
        if why:
            raise ConfigError(f"{CONFIG_KEY}.method {method} is not available inside vLLM: {why} "
                              f"(available: {list(SUPPORTED)})")
        names = (set(METHODS[method].hyperparameters()) | {"cache_size"}) - set(NOT_IN_ENGINE)
        unknown = sorted(set(raw) - names)
        if unknown and unknown[0] in NOT_IN_ENGINE:
            raise ConfigError(f"{CONFIG_KEY}.{unknown[0]} is not available inside vLLM: {NOT_IN_ENGINE[unknown[0]]}")
        if unknown:
            raise ConfigError(f"{CONFIG_KEY}.{unknown[0]} is not a setting of {method} (valid: {sorted(names)})")
        out = cls(method, tuple(sorted(raw.items())))
        out.policy()  # every range checked once, here, with the method's own one-line errors
        return out

    def policy(self, num_layers: Optional[int] = None) -> CachePolicy:
        """A fresh policy (one per request: its state is that request's compaction history)."""
        try:
            return self._policy(num_layers)
        except ConfigError as err:  # the library names LaCache.span; a vLLM user wrote kv_compression.span
            raise ConfigError(str(err).replace(f"{METHODS[self.method].__name__}.", f"{CONFIG_KEY}.")) from None

    def _policy(self, num_layers: Optional[int]) -> CachePolicy:
        policy = build_policy(self.method, **dict(self.settings))
        if num_layers is not None:
            policy.bind(num_layers)
        return policy
