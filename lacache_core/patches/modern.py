"""Position shift for transformers >= 4.48 through public extension points only.

Nothing of the model's own attention forward is copied or replaced. Three pieces, installed on a
model *instance*:

1. A forward pre-hook on each attention module (``torch.nn.Module.register_forward_pre_hook``).
   When the call carries a :class:`CompressedCache` (whatever the keyword is called), it hands the
   model's forward the ``position_embeddings`` the cache asks for
   (:meth:`CompressedCache.position_embeddings`): the rotation to the new tokens' positions in the
   cache, or an identity rotation (``cos = 1``, ``sin = 0``) where keys are stored un-rotated. The
   model computes and rotates its query and key exactly as usual, norms and all.
2. An attention function registered in transformers' registry (``AttentionInterface`` /
   ``ALL_ATTENTION_FUNCTIONS``) as ``lacache_<kernel>``, wrapping the kernel the user chose
   (eager, sdpa, flash_attention_2, ...). With a compressed cache it makes the one call
   :meth:`CompressedCache.attend` (which, for un-rotated storage, rotates the query and keys with
   the model's own rotary module and ``apply_rotary_pos_emb``); otherwise it calls the kernel untouched.
3. The model's mask function for that kernel, registered under the same name (4.53+), so the
   masks are those the kernel expects.

A model whose decoder has no rotary module (GPT-2, ...) is refused with a one-line error.
"""
from __future__ import annotations

import itertools
import sys
from typing import Callable

import torch

from ..cache import CompressedCache
from ..errors import ConfigError
from ..masks import visible
from ..rope import Rotation, rotary_fn_from_module, standard_apply

PREFIX = "lacache_"


def _registry():
    from transformers import modeling_utils

    return modeling_utils.ALL_ATTENTION_FUNCTIONS


def _inner_kernel(module, name: str) -> Callable:
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return _registry()[name]


def _fit_mask(mask, key_len: int):
    """The model builds one 4D mask, sized for layer 0; layers of a prefill-time method hold other lengths.

    A mask shorter than this layer's keys is widened on the left (older slots, visible to every
    query of this step), a longer one cut to its first ``key_len`` columns, as transformers' own
    kernels do.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return mask
    # some releases (4.48) size the mask one past the keys, the extra column masked for every query (a key is
    # always visible to its own query): drop such trailing columns first, so that neither a widened mask nor a layer
    # holding one slot more than layer 0 (the mask's full width) hides this layer's newest key
    if not bool(visible(mask[..., -1:]).any()):
        seen = visible(mask).flatten(0, 2).any(0)
        width = int(seen.nonzero().max()) + 1 if seen.any() else mask.shape[-1]
        mask = mask[..., :width]
    if mask.shape[-1] == key_len:
        return mask
    if mask.shape[-1] > key_len:  # what transformers' own kernels slice (not all do)
        return mask[..., :key_len]
    fill = True if mask.dtype == torch.bool else 0.0
    pad = mask.new_full((*mask.shape[:-1], key_len - mask.shape[-1]), fill)
    return torch.cat([pad, mask], -1)


def _flash_mask(mask, key_len: int):
    """Flash kernels take a 2D padding mask or None; without padding, None (their own causal flag suffices).

    They get a 2D mask sized for layer 0, or before 4.53 the eager-style 4D mask transformers builds
    for a registered name. Without padding, the 2D mask is all ones and the 4D mask's last query row
    allows every key.
    """
    if not isinstance(mask, torch.Tensor) or (mask.dim() == 2 and mask.shape[-1] == key_len):
        return mask
    if mask.dim() == 2:
        unpadded = bool(mask.all())
    else:
        last = mask[..., -1, :]
        unpadded = bool((last if last.dtype == torch.bool else last == 0).all())
    if unpadded:
        return None
    raise ConfigError("a padded batch with a compressed cache cannot run on a flash kernel yet: use "
                      "from_pretrained.attn_implementation sdpa or eager")


def _refuse_flash(cache, step) -> None:
    """Flash kernels take no per-head or per-row mask: refuse the steps that need one, in one line."""
    if step.ragged:
        raise ConfigError(f"make_cache.method {cache.policy.name} keeps a different number of slots per head, "
                          "which flash kernels cannot mask: use from_pretrained.attn_implementation sdpa or eager")
    if cache.read is not None:
        raise ConfigError("make_cache.read quest chooses pages per query head, which a flash kernel cannot mask: use "
                          "from_pretrained.attn_implementation sdpa or eager")
    if step.rows_masked:
        raise ConfigError("the rows of this batch hold different numbers of slots, which a flash kernel "
                          "cannot mask: use from_pretrained.attn_implementation sdpa or eager")


def _wrapper(inner_name: str) -> Callable:
    def lacache_attention(module, query, key, value, attention_mask, **kwargs):
        active = getattr(module, "_lacache_active", None)
        if active is None:
            return _inner_kernel(module, inner_name)(module, query, key, value, attention_mask, **kwargs)
        cache, keys_rotated = active
        flash = inner_name.startswith("flash")
        mask = _flash_mask(attention_mask, key.shape[-2]) if flash else _fit_mask(attention_mask, key.shape[-2])
        with cache.attend(module.layer_idx, query, key, value, module._lacache_rotation,
                          kwargs.get("scaling") or query.shape[-1] ** -0.5, kwargs.get("position_ids"), mask,
                          kwargs.get("sliding_window"), keys_rotated, module) as step:
            if flash:
                _refuse_flash(cache, step)
            return _inner_kernel(module, inner_name)(module, step.query, step.key, step.value,
                                                     mask if flash else step.mask, **kwargs)

    lacache_attention.__name__ = f"{PREFIX}{inner_name}"
    return lacache_attention


def register(inner_name: str) -> str:
    """Register ``lacache_<inner_name>`` (attention function and, where transformers has one, mask)."""
    name = PREFIX + inner_name
    registry = _registry()
    if name not in registry:
        fn = _wrapper(inner_name)
        try:
            from transformers import AttentionInterface

            AttentionInterface.register(name, fn)
        except ImportError:  # 4.48 - 4.49: a plain dict
            registry[name] = fn
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # before 4.53 the model builds eager-style 4D masks for a registered name
        return name
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner_name])
    return name


def _find_cache(args, kwargs):
    for value in itertools.chain(kwargs.values(), args):
        if isinstance(value, CompressedCache):
            return value
    return None


def _pre_hook(module, args, kwargs):
    cache = _find_cache(args, kwargs)
    module._lacache_active = None
    if cache is None:
        return None
    embeddings = kwargs.get("position_embeddings")
    if embeddings is None:
        raise ConfigError(f"{type(module).__name__} takes no position_embeddings from its model: it cannot be "
                          "position-shifted through transformers' extension points")
    if module.layer_idx == 0:  # a batch's left padding, read once from its first pass, before any rotation
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            cache.rows.note_padding(_fit_mask(mask, embeddings[0].shape[-2]))
    kwargs["position_embeddings"], keys_rotated = cache.position_embeddings(module.layer_idx, embeddings,
                                                                           module._lacache_rotation)
    module._lacache_active = (cache, keys_rotated)  # for the kernel of this forward: the cache, and whether
    return args, kwargs                             # the model rotates the new keys itself


def _post_hook(module, args, kwargs, output):
    module._lacache_active = None
    return None


def install(model, base, layers) -> None:
    """Install the hooks and the registered kernel on ``model`` (idempotent)."""
    rotary = getattr(base, "rotary_emb", None)
    if not isinstance(rotary, torch.nn.Module):
        raise ConfigError(f"model type {model.config.model_type!r} has no rotary embedding (model.rotary_emb): "
                          "position shift needs a RoPE decoder")
    first = layers[0].self_attn
    if "ALL_ATTENTION_FUNCTIONS" not in vars(sys.modules[type(first).__module__]):
        import transformers

        raise ConfigError(f"model type {model.config.model_type!r} does not dispatch attention through "
                          f"AttentionInterface in transformers {transformers.__version__}; use a newer release")
    apply_fn = getattr(sys.modules[type(first).__module__], "apply_rotary_pos_emb", standard_apply)
    rotation = Rotation(rotary_fn_from_module(rotary), apply_fn)
    current = model.config._attn_implementation or "eager"
    inner = current[len(PREFIX):] if current.startswith(PREFIX) else current
    model.config._attn_implementation = register(inner)
    for layer in layers:
        attn = layer.self_attn
        attn._lacache_rotation = rotation
        if getattr(attn, "_lacache_hooks", None) is None:
            attn._lacache_active = None
            attn._lacache_hooks = (
                attn.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                attn.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
            )
