"""Position-shift attention forward for transformers 4.33 - 4.47 (Llama; Mistral and Qwen2 from 4.36).

Before 4.36 caches are tuples ``(key, value)`` per layer: a patched model then always keeps keys
un-rotated and puts the query at the current cache length, as the official legacy harness does,
and the harness compacts the tuples with ``policy(past_key_values)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..cache import CompressedCache
from ..versions import HAS_CACHE_CLASSES
from ..masks import refuse_padding


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _causal_mask(q_len: int, kv_len: int, like: torch.Tensor) -> torch.Tensor:
    """Additive bottom-right-aligned causal mask ``[1, 1, q_len, kv_len]``."""
    rows = torch.arange(kv_len - q_len, kv_len, device=like.device)[:, None]
    allowed = torch.arange(kv_len, device=like.device)[None, :] <= rows
    return torch.zeros(q_len, kv_len, dtype=like.dtype, device=like.device).masked_fill(
        ~allowed, torch.finfo(like.dtype).min)[None, None]


def _attend(module, query, key, value, attention_mask, output_attentions, step=None, cache=None):
    """Scaled dot-product attention with the model's configured kernel; returns ``(out [b, q, h, d], weights)``."""
    impl = getattr(module.config, "_attn_implementation", "eager")
    q_len, kv_len = query.shape[-2], key.shape[-2]
    ragged = step is not None and step.ragged
    if impl == "flash_attention_2" and ragged:
        from ..errors import ConfigError

        raise ConfigError(f"make_cache.method {cache.policy.name} keeps a different number of slots per head, which flash "
                          "kernels cannot mask: use from_pretrained.attn_implementation sdpa or eager")
    if impl == "flash_attention_2" and cache is not None and cache.read is not None:
        from ..errors import ConfigError

        raise ConfigError("make_cache.read quest chooses pages per query head, which a flash kernel cannot mask: use "
                          "from_pretrained.attn_implementation sdpa or eager")
    if impl == "flash_attention_2":
        from transformers.modeling_flash_attention_utils import _flash_attention_forward

        mask2d = attention_mask
        if mask2d is not None and (mask2d.dim() != 2 or bool(mask2d.all())):
            mask2d = None
        out = _flash_attention_forward(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask2d, q_len,
            dropout=0.0, sliding_window=None,
            use_top_left_mask=getattr(module, "_flash_attn_uses_top_left_mask", False), is_causal=True,
        )
        return out, None

    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    mask = None
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] >= kv_len:
        mask = attention_mask[:, :, -q_len:, :kv_len]
        if cache is not None:
            refuse_padding(mask, module.layer_idx)
    elif attention_mask is not None and attention_mask.dim() == 4 and q_len > 1:
        mask = _causal_mask(q_len, kv_len, query)  # layers of a prefill-time method differ in length
    elif q_len > 1:
        mask = _causal_mask(q_len, kv_len, query)
    if step is not None:  # heads or rows whose slots the model's mask does not know
        mask = step.masked(mask)
    if impl == "sdpa" and not output_attentions:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return out.transpose(1, 2), None
    weights = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.shape[-1])
    if mask is not None:
        weights = weights + mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2), (weights if output_attentions else None)


def position_shift_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                           output_attentions=False, use_cache=False, *args, **kwargs):
    """Attention with keys cached un-rotated and rotated by cache slot ``0 .. n-1`` at every step.

    Shapes: ``hidden_states [b, q, hidden]``; queries ``[b, heads, q, d]``; cached keys and values
    ``[b, kv_heads, n, d]``. Returns ``(output, weights, present)`` like the forwards it replaces.
    """
    tuple_mode = not HAS_CACHE_CLASSES
    ours = isinstance(past_key_value, CompressedCache)
    if not (tuple_mode or ours):
        return self._lacache_original_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                              past_key_value=past_key_value, output_attentions=output_attentions,
                                              use_cache=use_cache, *args, **kwargs)
    bsz, q_len, _ = hidden_states.shape
    query = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
    key = self.k_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    value = self.v_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)

    if tuple_mode:
        past = 0 if past_key_value is None else past_key_value[0].shape[-2]
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        present = (key, value) if use_cache else None
        key = self._lacache_rotation.from_slot(key, 0)
        query = self._lacache_rotation.from_slot(query, past)
        out, weights = _attend(self, query, key, value, attention_mask, output_attentions)
    else:  # the same call into the cache as the modern integration makes (keys arrive un-rotated here)
        key, value = past_key_value.update(key, value, self.layer_idx)
        present = past_key_value
        with past_key_value.attend(self.layer_idx, query, key, value, self._lacache_rotation, self.head_dim ** -0.5,
                                   position_ids, module=self) as step:
            out, weights = _attend(self, step.query, step.key, step.value, attention_mask, output_attentions, step,
                                   past_key_value)
    out = self.o_proj(out.reshape(bsz, q_len, -1).contiguous())
    return out, weights, present
