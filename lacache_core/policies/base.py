"""Common machinery of every cache policy.

A policy decides which cache slots each layer keeps: it answers :meth:`CachePolicy.keep` with an index
tensor per layer (``[n_keep]``, or ``[kv_heads, n_keep]`` for a per-head choice), and the caller
(:class:`lacache_core.cache.CompressedCache`, or the official-style ``policy(past_key_values)`` call) applies it.
That one contract serves decode-time and prefill-time methods alike, and keeps policies testable on positions
alone. A method whose compaction also changes tensors (CaM merges evicted values into kept ones, ThinK prunes key
channels, MiniCache merges two layers) does that work in its own hooks (:meth:`CachePolicy.before_keep`,
:meth:`CachePolicy.after_keep`, :meth:`CachePolicy.merged_stores`), through the operations every layer store
offers (:class:`lacache_core.storage.LayerStore`), so the cache holds no branch for any method.

The policy also records the original token position held in each slot, and declares where its
kept keys sit when they are rotated (:attr:`CachePolicy.key_positions`):

* ``"slot"``: at their slot in the cache, ``0 .. n-1`` (position shift, as the LaCache and
  StreamingLLM code do);
* ``"original"``: at the position the token had in the input (the reference implementations of
  H2O, TOVA, SnapKV, PyramidKV and PyramidInfer, and how kvpress and KVCache-Factory run them).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Dict, List, Literal, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError
from ..storage import LayerStore, gather_slots
from ..params import (BOUNDS, Bound, base_type, check_fields, choices_of, describe_range,  # noqa: F401
                      left_out_of_identity, param, type_hints)

KVList = Sequence[Tuple[torch.Tensor, torch.Tensor]]
POSITION_MODES = ("slot", "original")

@dataclass
class CachePolicy:
    """Base class: per-layer bookkeeping of original positions, and the one :meth:`keep` contract.

    Subclasses implement either :meth:`select` (one ``[num_layers, n_keep]`` choice from the slot
    count alone, computed once per forward pass) or :meth:`keep` (per layer, after :meth:`observe`).

    Parameters
    ----------
    key_positions : {"slot", "original"}, optional
        Where kept keys are rotated: at their cache slot (position shift) or at their original
        position. ``None``: as the method's reference code does (:attr:`default_positions`).
    """

    name: ClassVar[str] = "base"
    #: Where the method's reference implementation puts kept keys ("slot" or "original").
    default_positions: ClassVar[str] = "original"
    #: ``True`` for policies that score tokens: :meth:`observe` then sees every layer's queries and keys.
    observes: ClassVar[bool] = False
    #: ``True`` for observing policies whose scores also read values or un-rotate queries (LagKV, Expected
    #: Attention): :meth:`observe_values` then sees every layer's values and the model's rotation, before :meth:`observe`.
    observes_values: ClassVar[bool] = False
    #: ``True`` for policies that read the attention module's weights (:meth:`read_weights`; CriticalKV).
    reads_weights: ClassVar[bool] = False
    #: ``True`` for policies that compress once, after the first forward pass (the prompt), and never again.
    prefill_only: ClassVar[bool] = False
    #: ``True`` for policies whose KV heads keep different numbers of slots (:meth:`keep` answers a list of
    #: per-head ``[n_h]`` tensors); their kept keys have no common slots, so they sit at original positions.
    ragged: ClassVar[bool] = False
    #: ``True`` for policies that also drop key channels (ThinK, in :meth:`after_keep`): channels are scored on keys
    #: rotated at their original positions, so ``key_positions="slot"`` is refused.
    prunes_channels: ClassVar[bool] = False
    #: ``True`` for policies that score the prompt by forward passes of their own after it (KVzip's context
    #: reconstruction): :func:`lacache_core.prefill` runs them (:meth:`scoring_passes`), then compacts every layer.
    scores_by_passes: ClassVar[bool] = False
    #: Hyper-parameters that have no effect under KV quantization (``--quant``), each with the reason.
    quant_ignores: ClassVar[Dict[str, str]] = {}

    key_positions: Optional[Literal["slot", "original"]] = field(default=None, kw_only=True)

    _layer_positions: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    _held: List[int] = field(default_factory=list, init=False, repr=False)
    _pending: List[int] = field(default_factory=list, init=False, repr=False)
    _num_layers: Optional[int] = field(default=None, init=False, repr=False)
    _seen: int = field(default=0, init=False, repr=False)
    _plan: Optional[torch.Tensor] = field(default=None, init=False, repr=False)
    _plan_runs: Optional[torch.Tensor] = field(default=None, init=False, repr=False)  # kept_runs, per layer
    #: Per layer, for layers whose KV heads hold different numbers of slots (AdaKV, HeadKV): each head's
    #: count of padding slots at the front of the ``[kv_heads, n]`` positions (``LongTensor [kv_heads]``).
    _pads: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    #: Where the cache's tensors live: positions and position-only plans are kept there, so that a
    #: compaction needs no host round trip per layer.
    _device: torch.device = field(default=torch.device("cpu"), init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_hyperparameters()
        if self.ragged and self.key_positions == "slot":
            raise ConfigError(f"{type(self).__name__}.key_positions slot is not available for {self.name}: its heads "
                              "keep different numbers of slots, so kept keys sit at their original positions")
        if self.prunes_channels and self.key_positions == "slot":
            raise ConfigError(f"{type(self).__name__}.key_positions slot is not available for {self.name}: it prunes "
                              "channels of keys rotated at their original positions")

    def check_hyperparameters(self) -> None:
        """Raise a one-line :class:`ConfigError` for a hyper-parameter of the wrong type or out of its
        :func:`param` range, naming the setting (``LaCache.overlap``; :func:`lacache_core.params.check_fields`)."""
        check_fields(self)

    # ----------------------------------------------------------------- hooks for subclasses
    def validate(self, num_layers: int) -> None:
        """Raise :class:`ConfigError` if the settings cannot work with ``num_layers`` layers."""

    def select(self, n: int, num_layers: int) -> Optional[torch.Tensor]:
        """Slots to keep in every layer, given ``n`` cached slots in each (position-only methods).

        Returns
        -------
        torch.LongTensor of shape ``[num_layers, n_keep]`` (increasing per row), or ``None`` when
        nothing is evicted.
        """
        raise NotImplementedError

    def keep(self, layer: int, n: int) -> Optional[torch.Tensor]:
        """Slots layer ``layer`` keeps out of its ``n`` (new tokens included): the one contract.

        Returns
        -------
        ``LongTensor [n_keep]`` (every head alike) or ``[kv_heads, n_keep]`` (per KV head), increasing
        along the last dimension, on any device; ``None`` when the layer keeps everything.
        """
        if layer == 0:
            plan = self.select(n, self._num_layers)
            self._plan = None if plan is None else plan.to(self._device)  # one copy per compaction
            self._plan_runs = None if plan is None or plan.dim() != 2 else kept_runs(plan, n)
        return None if self._plan is None else self._plan[layer]

    def kept_runs(self, layer: int) -> Optional[Tuple[int, int]]:
        """``(oldest, newest)``: how many of the oldest slots ``0, 1, ..`` and of the newest slots ``.., n - 1`` the
        last :meth:`keep` answer of ``layer`` keeps, each as one run, where the plan of a position-only method says
        so without reading the index back from its device (``None``: not known here; a method with a :meth:`keep`
        of its own never knows)."""
        if type(self).keep is not CachePolicy.keep or self._plan is None or self._plan_runs is None:
            return None
        oldest, newest = self._plan_runs[layer].tolist()
        return oldest, newest

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """See one layer's attention inputs of the current forward pass (before it is compacted).

        Parameters
        ----------
        query : ``[batch, heads, q, head_dim]``, rotated as the attention sees it.
        key : ``[batch, kv_heads, n, head_dim]``, all cached keys including the new ones, rotated.
        scaling : the attention's softmax scale (``head_dim ** -0.5``).
        """

    def observe_values(self, layer: int, value: torch.Tensor, rotation) -> None:
        """See one layer's values of the current forward pass, right before :meth:`observe` (policies that
        set :attr:`observes_values`).

        Parameters
        ----------
        value : ``[batch, kv_heads, n, head_dim]``, all cached values including the new ones.
        rotation : the model's :class:`lacache_core.rope.Rotation`, which turns a query or key to any position.
        """

    def read_weights(self, layer: int, attention) -> None:
        """See one layer's attention module before :meth:`observe_values`, for a method that reads its weights
        (CriticalKV: the output projection; policies that set :attr:`reads_weights`)."""

    def scoring_passes(self, input_ids: torch.Tensor, tokenizer) -> List[Tuple[Tuple[int, int], torch.Tensor]]:
        """The forward passes that score the prompt ``input_ids`` (``[1, n]``), for policies that set
        :attr:`scores_by_passes`: ``((start, end), ids)`` each, the prompt slots ``start .. end - 1`` that pass scores
        and the token ids it feeds (``[1, m]``). The caller announces each with :meth:`begin_pass` before running it,
        then calls :meth:`end_passes`."""
        raise NotImplementedError

    def begin_pass(self, span: Tuple[int, int]) -> None:
        """The next forward pass is the scoring pass of prompt slots ``span`` (:meth:`scoring_passes`)."""

    def end_passes(self) -> None:
        """Every scoring pass has run: the next :meth:`keep` of each layer applies the choice."""

    def max_cache_len(self, num_layers: int) -> Optional[int]:
        """Largest number of slots a layer holds after a forward pass (``None``: unbounded)."""
        return None

    # ----------------------------------------------------------------- a method's own tensor work
    def before_keep(self, layer: int, keep, store: LayerStore, value: torch.Tensor) -> None:
        """Change ``store`` through its operations before this step's choice ``keep`` (:meth:`settle`'s answer)
        applies to it. Nothing by default; CaM merges the values of the slots it evicts into kept ones.

        Parameters
        ----------
        store : the layer (or one batch row of it) with every slot of this step, this policy's own tokens only.
        value : ``[b, kv_heads, n, d]``, the values this step's attention read (not to be written into).
        """

    def works_in(self, hook: str) -> bool:
        """Whether this policy's override of ``hook`` (``"before_keep"``, ``"after_keep"``) does any work with its
        settings (a batch's rows then need views of their own; ``True`` by default)."""
        return True

    def after_keep(self, layer: int, store: LayerStore) -> LayerStore:
        """The store that holds ``layer`` (or one batch row of it) from now on, given ``store``, which holds the
        slots this step kept: ``store`` by default; ThinK prunes its key channels."""
        return store

    def merged_stores(self, layer: int, previous, current, fillers: Optional[torch.Tensor] = None,
                      quant=None) -> Optional[Tuple[LayerStore, LayerStore]]:
        """The stores that hold layers ``layer - 1`` and ``layer`` from now on where this step merges the two
        (MiniCache), else ``None`` (the default).

        Parameters
        ----------
        previous : returns the earlier layer's ``(key, value)`` (each ``[b, kv_heads, n, d]``, keys as stored); a
            call, since reading a quantized layer dequantizes it.
        current : this layer's ``(key, value)``, as ``previous``'s.
        fillers : ``LongTensor [b]``, each row's slots at the front that hold none of its tokens (a padded batch).
        quant : the cache's quantizer (:class:`lacache_core.quantizers.Quantizer`), or ``None``.
        """
        return None

    def holds_whole(self, layer: int) -> bool:
        """Whether a quantized ``layer`` keeps its tokens unquantized past this step, for a later layer's
        :meth:`merged_stores` (MiniCache: the earlier layer of a pair waits for the merge). ``False`` by default."""
        return False

    # ----------------------------------------------------------------- shared machinery
    @property
    def position_mode(self) -> str:
        """``"slot"`` or ``"original"``: the ``key_positions`` setting, or the method's reference default."""
        return self.default_positions if self.key_positions is None else self.key_positions

    @classmethod
    def hyperparameters(cls) -> List[str]:
        """Names of the settings a user chooses (``flag=False`` fields, such as ``num_layers``, excluded)."""
        return [f.name for f in fields(cls) if f.init and f.metadata.get("flag", True)]

    def settings(self) -> dict:
        """The hyper-parameters, as a JSON-friendly dict (for run records); ``key_positions`` resolved."""
        out, chosen = {"method": self.name}, set(self.hyperparameters())
        for f in fields(self):
            if f.name in chosen and not left_out_of_identity(f, getattr(self, f.name)):
                out[f.name] = getattr(self, f.name)
        out["key_positions"] = self.position_mode
        return out

    def state_dict(self) -> dict:
        """Settings and running state (the non-init fields) as numbers, strings, tensors and lists of them:
        what ``torch.load(..., weights_only=True)`` reads back, so a saved policy can carry no code."""
        state = {}
        for f in fields(self):
            if not f.init:
                value = getattr(self, f.name)
                state[f.name] = str(value) if isinstance(value, torch.device) else value
        return {"method": self.name, "settings": {f.name: getattr(self, f.name) for f in fields(self) if f.init},
                "state": state}

    def load_state_dict(self, saved: dict) -> None:
        """Restore the running state :meth:`state_dict` saved (from a policy built with its settings)."""
        names = {f.name for f in fields(self) if not f.init}
        unknown = set(saved["state"]) - names
        if unknown:
            raise ConfigError(f"saved state of {saved.get('method')!r} has fields {sorted(unknown)} that "
                              f"{type(self).__name__} does not")
        for name, value in saved["state"].items():
            setattr(self, name, torch.device(value) if name == "_device" else value)

    def reset(self) -> None:
        """Forget all state (start a new sequence)."""
        self._layer_positions, self._held, self._pending, self._pads = [], [], [], []
        self._num_layers, self._seen, self._plan = None, 0, None
        self._reset_state()

    def _reset_state(self) -> None:
        """Subclasses reset their own running state here."""

    def bind(self, num_layers: int) -> None:
        if self._num_layers is None:
            self.validate(num_layers)
            self._num_layers = num_layers
            self._layer_positions = [None] * num_layers
            self._held, self._pending = [0] * num_layers, [0] * num_layers
            self._pads = [None] * num_layers
        elif self._num_layers != num_layers:
            raise ConfigError(
                f"cache policy was used with {self._num_layers} layers, now {num_layers}; call reset() between models"
            )

    @property
    def seen(self) -> int:
        """Tokens seen so far (the original position of the next token)."""
        return self._seen

    def record(self, layer: int, n: int, device: Optional[torch.device] = None) -> None:
        """Note that ``layer`` now holds ``n`` slots, the newest ones just appended, on ``device``.

        Layer 0 is recorded first in every forward pass and counts the new tokens. The new
        positions are only counted here and written out when needed (:meth:`layer_positions`),
        since a position-only method needs them just at its compactions.
        """
        if device is not None:
            self._device = device
        held = self._held[layer]
        new = n - held
        if new < 0:
            raise RuntimeError(
                f"the cache shrank from {held} to {n} slots outside the policy; use a fresh cache per sequence"
            )
        if layer == 0:
            self._seen += new
        self._held[layer] = n
        self._pending[layer] += new

    def layer_positions(self, layer: int) -> torch.Tensor:
        """Original positions held by ``layer``: ``LongTensor [n]``, or ``[kv_heads, n]`` after a per-head choice."""
        new = self._pending[layer]
        pos = self._layer_positions[layer]
        if pos is not None and pos.device != self._device:  # e.g. a policy restored from a checkpoint
            pos = self._layer_positions[layer] = pos.to(self._device)
        if new or pos is None:
            fresh = torch.arange(self._seen - new, self._seen, device=self._device)
            pos = fresh if pos is None else torch.cat([pos, fresh.expand(*pos.shape[:-1], new)], -1)
            self._layer_positions[layer], self._pending[layer] = pos, 0
        return pos

    def apply(self, layer: int, keep) -> None:
        """Carry the original positions of ``layer`` along a :meth:`keep` answer (a list of per-head
        ``[n_h]`` answers: heads of different lengths, stored left-padded to the longest)."""
        if keep is None:
            return
        if isinstance(keep, list):
            pos = self.layer_positions(layer)
            pos = pos.expand(len(keep), pos.shape[-1]) if pos.dim() == 1 else pos
            rows = [pos[h, idx.to(self._device)] for h, idx in enumerate(keep)]
            n = max(r.shape[0] for r in rows)
            self._layer_positions[layer] = torch.stack([torch.nn.functional.pad(r, (n - r.shape[0], 0)) for r in rows])
            self._pads[layer] = torch.tensor([n - r.shape[0] for r in rows])
            self._held[layer] = n
            return
        pos, idx = self.layer_positions(layer), keep.to(self._device)
        if idx.dim() == 2 and pos.dim() == 1:
            pos = pos.expand(idx.shape[0], pos.shape[0])
        self._layer_positions[layer] = pos.gather(-1, idx) if pos.dim() == idx.dim() else pos[..., idx]
        self._held[layer] = idx.shape[-1]

    def settle(self, layer: int, n: int) -> Optional[torch.Tensor]:
        """After :meth:`record` (and :meth:`observe`): choose what ``layer`` keeps and carry its positions along."""
        keep = self.keep(layer, n)
        self.apply(layer, keep)
        return keep

    @property
    def positions(self):
        """Original positions per layer: ``LongTensor [num_layers, n]`` when every layer holds the same
        slots for all heads, else a list of ``[n_l]`` or ``[kv_heads, n_l]`` tensors, or, for a layer whose
        heads differ in length, a list of ``[n_h]`` tensors per head (``None`` before use)."""
        if not self._held or self._seen == 0:
            return None
        rows = [self.layer_positions(layer) for layer in range(self._num_layers)]
        if all(r.dim() == 1 and r.shape == rows[0].shape for r in rows):
            return torch.stack(rows)
        pads = self._pads or [None] * self._num_layers
        return [r if p is None else [r[h, int(p[h]):] for h in range(r.shape[0])] for r, p in zip(rows, pads)]

    def positions_per_layer(self) -> List[list]:
        """Per layer, the original token positions held (for tests and plots)."""
        rows = self.positions
        return [] if rows is None else [r.tolist() if isinstance(r, torch.Tensor) else [h.tolist() for h in r]
                                        for r in rows]

    def compact(self, n: int, num_layers: int,
                device: Optional[torch.device] = None) -> Optional[List[Optional[torch.Tensor]]]:
        """Every layer now holds ``n`` slots (on ``device``): one :meth:`keep` answer per layer, or ``None``."""
        self.bind(num_layers)
        keep = []
        for layer in range(num_layers):
            self.record(layer, n, device)
            keep.append(self.settle(layer, n))
        return None if all(k is None for k in keep) else keep

    def __call__(self, past_key_values: KVList) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Official-repository API: compact a list of ``(key, value)`` pairs.

        Parameters
        ----------
        past_key_values : sequence of ``(key, value)``, each ``[batch, kv_heads, seq, head_dim]``
            One pair per layer, all with the same ``seq``.

        Returns
        -------
        list of ``(key, value)`` pairs, compacted (the input is returned unchanged if nothing is evicted).
        """
        if past_key_values is None:
            return past_key_values
        if self.ragged or self.prunes_channels:
            raise ConfigError(f"make_cache.method {self.name} stores layers in a form of its own (heads of different lengths or "
                              "pruned key channels): run it with a lacache_core.CompressedCache, not on (key, value) lists")
        pkv = [tuple(layer) for layer in past_key_values]
        keep = self.compact(pkv[0][0].shape[-2], len(pkv), pkv[0][0].device)
        if keep is None:
            return pkv
        return [(k, v) if row is None else gather_layer(k, v, row) for (k, v), row in zip(pkv, keep)]


def gather_layer(key: torch.Tensor, value: torch.Tensor, keep_row: torch.Tensor):
    """Keep slots ``keep_row`` of one layer's ``[b, h, seq, d]`` key and value (:func:`lacache_core.storage.gather_slots`)."""
    return gather_slots(key, value, keep_row)


def kept_runs(plan: torch.Tensor, n: int) -> torch.Tensor:
    """Per row of ``plan`` (``[num_layers, n_keep]``, increasing slots out of ``n``): how many of its first entries
    are the oldest slots ``0, 1, ..`` and how many of its last are the newest ``.., n - 1``, each in a row.
    ``LongTensor [num_layers, 2]``."""
    plan, m = plan.cpu(), plan.shape[-1]
    if m == 0:
        return torch.zeros(plan.shape[0], 2, dtype=torch.long)

    def run(moved: torch.Tensor) -> torch.Tensor:  # entries before the first moved one
        first = moved.int().argmax(-1)
        return torch.where(moved.any(-1), first, torch.full_like(first, m))

    oldest = run(plan != torch.arange(m))
    newest = run((plan != torch.arange(n - m, n)).flip(-1))
    return torch.stack([oldest, newest], -1)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
