"""Positions and rotation: where each key sits, how it is rotated, and when it is rotated again.

Keys are stored rotated (``incremental``) or un-rotated and rotated at every step (``every_step``, the official
code's way); :func:`check_key_rotation` decides which a cache may use, :meth:`KeyPlacement.stores_rotated` which
it does. Keys stored rotated by a slot-position policy sit in a frame of their own per layer: a key at slot ``s``
is rotated to ``s + offset``, the query with it, so attention sees the same relative positions. A compaction
that only drops slots in front of a run of newest keys then moves the frame instead of those keys
(:meth:`KeyPlacement.compact_in_place`): StreamingLLM rotates its few sinks at each step, not its whole window.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError
from ..policies import FullCache

KEY_ROTATIONS = ("auto", "every_step", "incremental")
#: A layer's frame offset is folded back into its keys once it passes this many positions, so that rotation
#: angles stay small (float32 angles lose precision at large positions).
REBASE_AFTER = 1024


def check_key_rotation(policy, key_rotation: str, query_at_slot: bool, quant) -> str:
    """``key_rotation`` as the cache must use it with ``policy`` and ``quant``; a :class:`ConfigError` where the
    combination cannot work."""
    if key_rotation not in KEY_ROTATIONS:
        raise ConfigError(f"make_cache.key_rotation must be one of {KEY_ROTATIONS}, got {key_rotation!r}")
    if key_rotation == "incremental" and not query_at_slot and policy.position_mode == "slot":
        raise ConfigError("make_cache.key_rotation incremental needs queries at their keys' slots "
                          "(make_cache.query_at_slot True)")
    if key_rotation == "every_step" and policy.prunes_channels:
        raise ConfigError(f"make_cache.key_rotation every_step cannot be used with make_cache.method {policy.name}: it "
                          "prunes channels of rotated keys, so keys must be stored rotated (incremental or auto)")
    merge = getattr(policy, "merge", None)
    if merge is not None and key_rotation == "every_step":
        raise ConfigError(f"make_cache.key_rotation every_step cannot be used with {type(policy).__name__}.merge {merge}: "
                          "evicted keys are merged as stored, rotated (incremental or auto)")
    if quant is None:
        return key_rotation
    if merge is not None:
        raise ConfigError(f"make_cache.quant {quant.method} cannot be used with {type(policy).__name__}.merge {merge}: "
                          "merged keys are rewritten in place, which quantized codes do not allow")
    setting = type(quant).__name__
    if quant.schedule == "reference" and not isinstance(policy, FullCache):
        raise ConfigError(f"{setting}.schedule reference splits keys and values at different tokens, as KIVI's code "
                          f"does, so nothing can be evicted from it: use it with make_cache.method full, not "
                          f"{policy.name}")
    if policy.prunes_channels and quant.key_order != "post_rope":
        raise ConfigError(f"make_cache.method {policy.name} prunes channels of rotated keys: with make_cache.quant "
                          f"{quant.method} use {setting}.key_order post_rope")
    if getattr(policy, "row_order", "position") != "position":  # ThinK's rows whole by order of score
        raise ConfigError(f"{type(policy).__name__}.row_order {policy.row_order} cannot be used with make_cache.quant: "
                          "there the keys in the full-precision residual keep every channel, whatever their order")
    if quant.key_order != "post_rope":
        if key_rotation == "incremental":
            raise ConfigError(f"make_cache.quant {quant.method} stores keys before RoPE and rotates them at every "
                              "step: make_cache.key_rotation incremental cannot be used with it")
        return "every_step"
    if policy.position_mode != "original":  # quantized as rotated, at original positions that never move
        raise ConfigError(f"{setting}.key_order post_rope cannot be used with make_cache.method {policy.name} at "
                          "cache slots: kept keys move to other slots, and quantized keys cannot be rotated again; "
                          f"use pre_rope or {type(policy).__name__}.key_positions original")
    if key_rotation == "every_step":
        raise ConfigError(f"{setting}.key_order post_rope stores keys rotated: make_cache.key_rotation every_step "
                          "cannot be used with it")
    return "incremental"


class KeyPlacement:
    """Every decision about the rotation of a cache's keys and queries (one per cache).

    Parameters
    ----------
    policy : the cache's policy (its ``position_mode``: cache slot or original position).
    key_rotation : as :func:`check_key_rotation` returned it.
    query_at_slot : rotate a slot policy's queries at their keys' slot (else at the caller's ``position_ids``).
    num_layers : decoder layers.
    """

    def __init__(self, policy, key_rotation: str, query_at_slot: bool, num_layers: int):
        self.policy, self.key_rotation, self.query_at_slot = policy, key_rotation, query_at_slot
        self.rotated: Optional[bool] = None  # resolved from "auto" at the first step
        self.offsets = [0] * num_layers  # per layer: keys at slot s are rotated to s + offset
        self.rotation = None  # the model's Rotation, from the first step

    @property
    def slot(self) -> bool:
        return self.policy.position_mode == "slot"

    def stores_rotated(self, rotation, like: torch.Tensor) -> bool:
        """Whether stored keys carry their rotation (``key_rotation`` resolved on the first call)."""
        if self.rotated is None:
            mode = self.key_rotation
            if mode == "auto":
                exact = not self.slot
                accurate = like.dtype in (torch.float32, torch.float64) and rotation.composes(like)
                mode = "incremental" if (self.query_at_slot or exact) and (exact or accurate) else "every_step"
            self.rotated = mode == "incremental"
            self.rotation = rotation
            if not self.rotated and getattr(self.policy, "merge", None) is not None:
                raise ConfigError(f"{type(self.policy).__name__}.merge needs keys stored rotated, which key_rotation auto "
                                  f"does not give in {like.dtype}: use float32, or make_cache.key_rotation incremental")
        return self.rotated

    def new_embeddings(self, layer: int, embeddings, rotation, held: int, next_position: int, pads):
        """The ``(cos, sin)`` the model's attention should rotate its new query and keys with, and whether they
        rotate them: the new tokens' slots (after ``held`` slots, in the layer's frame) or original positions
        (from ``next_position``; per row after ``pads``), or an identity where keys are stored un-rotated."""
        if not self.stores_rotated(rotation, embeddings[0]):
            return rotation.identity(embeddings), False
        if self.slot:
            return rotation.embeddings(held + self.offsets[layer], embeddings), True
        if pads is not None:  # a left-padded batch: each row's tokens at their positions in that row
            return rotation.embeddings_rows(next_position, pads, embeddings), True
        return rotation.embeddings(next_position, embeddings), True

    def place(self, step, rotation, position_ids, rows, pads, tokens_in: int):
        """Rotate a step whose new keys arrived un-rotated: returns ``(query, keys, new)``. With keys stored
        rotated, ``keys`` is ``None`` and ``new`` the new keys rotated (for the storage to take in); otherwise
        ``keys`` are all keys rotated for this step and ``new`` is ``None``."""
        query, key, layer, q_len, n = step.query, step.stored_key, step.layer, step.q_len, step.n
        rotated = self.stores_rotated(rotation, key)
        seen = self.policy.seen if rows is None else tokens_in
        first = n - q_len + self.offsets[layer] if self.slot else seen - q_len  # position of the first new token
        per_row = rows is not None and not self.slot and not rotated
        if per_row:  # each row at its own original positions: its tokens count from its first after its padding
            pads = pads if pads is not None else torch.zeros(len(rows), dtype=torch.long)
            at = (tokens_in - q_len - pads)[:, None] + torch.arange(q_len)
            query = rotation.at(query, at.clamp_min(0), limit=tokens_in)
        elif self.slot and not (self.query_at_slot or position_ids is None):
            query = rotation.at(query, position_ids)
        else:
            query = rotation.from_slot(query, first)
        if rotated:
            return query, None, rotation.from_slot(key[..., n - q_len:, :], first)
        if self.slot:
            return query, rotation.from_slot(key, 0), None
        if per_row:
            held = row_positions(rows, layer, n, key.shape[1])
            return query, rotation.at(key, held, per_head=True, limit=tokens_in), None
        held = self.policy.layer_positions(layer)
        return query, rotation.at(key, held, per_head=held.dim() == 2, limit=self.policy.seen), None

    def moved_keys(self, kept_key: torch.Tensor, keep: torch.Tensor, n: int, fillers) -> torch.Tensor:
        """Keys stored rotated at their slots, gathered by ``keep``, rotated to the slots they now hold. Alone a key
        only moves down; in a batch a row that now keeps fewer slots than the longest gains filler slots in front
        (``fillers``, ``[b]``, after this step's choice), so its keys can move up (fillers are not rotated)."""
        rotation = self.rotation
        place = torch.arange(keep.shape[-1], device=kept_key.device)
        shift = keep.to(kept_key.device) - place
        if fillers is not None:
            fillers = fillers.to(kept_key.device)
            shift = torch.where(place < fillers.view(-1, *(1,) * (shift.dim() - 1)), 0, shift)
        per_head = shift.dim() >= 2
        kept_key = rotation.at(kept_key, shift.clamp_min(0), per_head=per_head, limit=n, inverse=True)
        up = (-shift).clamp_min(0)
        return rotation.at(kept_key, up, per_head=per_head, limit=n) if bool(up.any()) else kept_key

    def compact_in_place(self, layer: int, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, newest: int,
                         oldest: int = 0):
        """Apply ``keep`` (``[n_keep]``: its last ``newest`` entries the newest slots, and where known its first
        ``oldest`` the oldest) to a dense layer of rotated keys by moving the frame: the newest run stays where it
        is, in memory and in rotation; the older kept keys are rotated by what the frame moved less their own shift
        and written just in front of it. Returns the kept ``(key, value)`` (views of the same memory). Only after
        the kernel has read this step's tensors."""
        n, m = key.shape[-2], keep.shape[-1]
        evicted, front = n - m, m - newest
        if front and oldest >= front:  # the sinks: slots 0 .. front - 1, all moved by the frame's move
            key[..., evicted:evicted + front, :] = self.rotation.shift(key[..., :front, :], evicted)
            value[..., evicted:evicted + front, :] = value[..., :front, :].clone()  # the two may overlap
        elif front:
            older = keep[:front].to(key.device)
            rise = evicted - (older - torch.arange(front, device=key.device))  # >= 0: an older key moved less
            key[..., evicted:evicted + front, :] = self.rotation.at(key.index_select(-2, older), rise, limit=n)
            value[..., evicted:evicted + front, :] = value.index_select(-2, older)
        key, value = key[..., evicted:, :], value[..., evicted:, :]
        self.offsets[layer] += evicted
        if self.offsets[layer] > REBASE_AFTER:
            key, self.offsets[layer] = self.in_frame(layer, key, 0), 0
        return key, value

    def compact_rows_in_place(self, layer: int, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                              fillers: torch.Tensor):
        """:meth:`compact_in_place` for a batch whose rows chose for themselves: ``keep`` (``[b, kv_heads, width]``,
        every head alike) holds each row's kept slots right-aligned after its ``fillers`` (``[b]``, after this
        choice; :meth:`BatchRows.aligned`). The frame moves by the slots every row gives up, ``n - width``; a kept
        key that sits further back than its new slot is rotated forward by the difference and written there, the
        rest (each row's newest run) stay where they are. Returns the kept ``(key, value)`` (views of the same
        memory)."""
        n, width = key.shape[-2], keep.shape[-1]
        evicted = n - width
        slots = keep[:, 0].to(key.device)  # [b, width]
        target = evicted + torch.arange(width, device=key.device)  # each column's memory slot
        rise = target - slots  # >= 0: kept slots increase along a row and end at n - 1
        moving = (rise > 0) & (target >= evicted + fillers.to(key.device)[:, None])  # fillers' columns never move
        rows = moving.any(1).nonzero().flatten()  # rows compact at steps of their own: only those that do now
        if rows.numel():
            columns = moving[rows].any(0).nonzero().flatten()
            source = torch.where(moving, slots, target)[rows][:, columns]  # [r, c]; unmoved entries copy in place
            into = target[columns].expand_as(source)
            at = rows[:, None]
            # advanced indices around a slice put their dimensions first: [r, c, kv_heads, d]
            moved_key = self.rotation.at(key[at, :, source].transpose(1, 2), (into - source)[:, None, :].expand(
                -1, key.shape[1], -1), per_head=True, limit=n)
            key[at, :, into] = moved_key.transpose(1, 2)
            value[at, :, into] = value[at, :, source]
        key, value = key[..., evicted:, :], value[..., evicted:, :]
        self.offsets[layer] += evicted
        if self.offsets[layer] > REBASE_AFTER:
            key, self.offsets[layer] = self.in_frame(layer, key, 0), 0
        return key, value

    def in_frame(self, layer: int, key: torch.Tensor, offset: int) -> torch.Tensor:
        """Layer ``layer``'s stored keys rotated from its frame to frame ``offset`` (0: each key at its slot)."""
        shift = offset - self.offsets[layer]
        return self.rotation.shift(key, shift) if shift else key

    def state(self) -> dict:
        """What a cache restored from saved keys needs to hold them the same way: whether they carry their rotation,
        and each layer's frame (saved keys are as stored, in their frame, so a resumed run is bit-exact)."""
        return {"stored_rotated": self.rotated, "frame_offsets": list(self.offsets)}

    @staticmethod
    def key_rotation_to_resume(state: dict) -> str:
        """The ``key_rotation`` a cache restored from :meth:`state` must be built with."""
        return {True: "incremental", False: "every_step"}.get(state.get("stored_rotated"), "auto")

    def load_state(self, state: dict) -> None:
        self.offsets = list(state.get("frame_offsets") or self.offsets)

    def can_move_frame(self) -> bool:
        return bool(self.rotated) and self.slot and self.query_at_slot


def row_positions(rows: list, layer: int, n: int, kv_heads: int) -> torch.Tensor:
    """``LongTensor [b, kv_heads, n]``: each row's original positions of its slots (its own after its fillers,
    which read position 0 and are masked)."""
    out = []
    for row in rows:
        held = row.layer_positions(layer)
        held = held.expand(kv_heads, -1) if held.dim() == 1 else held
        out.append(torch.nn.functional.pad(held, (n - held.shape[-1], 0)))
    return torch.stack(out)
