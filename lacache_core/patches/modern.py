"""Position-shift attention forward for transformers >= 4.48 (Llama, Mistral, Qwen2)."""
from __future__ import annotations

import sys

from ..cache import CompressedCache
from ..rope import apply_rope


def _attention_interface(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = module.config._attn_implementation
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]


def position_shift_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                           past_key_values=None, **kwargs):
    """Attention with keys cached un-rotated and rotated by cache slot ``0 .. n-1`` at every step.

    Shapes: ``hidden_states [b, q, hidden]``; queries ``[b, heads, q, d]``; cached keys and values
    ``[b, kv_heads, n, d]``. With any other cache than :class:`CompressedCache`, the model's own
    forward runs unchanged.
    """
    if "past_key_value" in kwargs and past_key_values is None:  # 4.48 - 4.55 spell it singular
        past_key_values = kwargs.pop("past_key_value")
    cache = past_key_values
    if not isinstance(cache, CompressedCache) or not cache.policy.position_shift:
        return self._lacache_original_forward(hidden_states, position_embeddings=position_embeddings,
                                              attention_mask=attention_mask, past_key_values=past_key_values,
                                              **kwargs)
    cache.patched_forward_seen = True
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    past = cache.get_seq_length(self.layer_idx)
    key, value = cache.update(key, value, self.layer_idx)
    cos, sin = self._lacache_rope.get(key.shape[-2], query)
    key = apply_rope(key, cos, sin)
    if cache.query_at_slot:
        q_len = query.shape[-2]
        query = apply_rope(query, cos[past:past + q_len], sin[past:past + q_len])
    else:
        query = apply_rope(query, *position_embeddings)

    if cache.policy.observes:
        cache.policy.observe(self.layer_idx, query, key, self.scaling)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] != key.shape[-2]:
        # layers of a prefill-time method hold different lengths; the model built the mask for layer 0
        q_len = query.shape[-2]
        attention_mask = None if q_len == 1 else attention_mask[..., -key.shape[-2]:]
    extra = {}
    window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    if window is not None:
        extra["sliding_window"] = window
    attn_output, attn_weights = _attention_interface(self)(
        self, query, key, value, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling, **extra, **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    cache.end_of_layer(self.layer_idx)
    return self.o_proj(attn_output), attn_weights
