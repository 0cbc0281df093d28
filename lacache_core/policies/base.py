"""Common machinery of every cache policy.

A policy decides which cache slots each layer keeps. It never touches key or value tensors: it
answers :meth:`CachePolicy.keep` with an index tensor per layer (``[n_keep]``, or ``[kv_heads,
n_keep]`` for a per-head choice), and the caller (:class:`lacache_core.cache.CompressedCache`, or the
official-style ``policy(past_key_values)`` call) gathers keys and values with it. That one
contract serves decode-time and prefill-time methods alike, and keeps policies testable on
positions alone.

The policy also records the original token position held in each slot, and declares where its
kept keys sit when they are rotated (:attr:`CachePolicy.key_positions`):

* ``"slot"``: at their slot in the cache, ``0 .. n-1`` (position shift, as the LaCache and
  StreamingLLM code do);
* ``"original"``: at the position the token had in the input (the reference implementations of
  H2O, TOVA, SnapKV, PyramidKV and PyramidInfer, and how kvpress and KVCache-Factory run them).
"""
from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch

from ..errors import ConfigError

KVList = Sequence[Tuple[torch.Tensor, torch.Tensor]]
POSITION_MODES = ("slot", "original")

BOUNDS = ("low", "high", "above", "below")
Bound = Union[int, float, Callable[["CachePolicy"], Union[int, float]], None]


def param(default, *, low: Bound = None, high: Bound = None, above: Bound = None, below: Bound = None,
          flag: bool = True, short: Optional[str] = None, file: bool = False, added_later: bool = False):
    """A hyper-parameter field with its valid range: the one place that range is declared.

    ``low``/``high`` are inclusive bounds, ``above``/``below`` exclusive ones; a bound may be a
    function of the policy (``high=lambda p: p.span - 1``). :meth:`CachePolicy.check_hyperparameters`
    enforces them, and the harness's flags are generated from the same fields (their help is the
    class docstring's ``Parameters`` entry). ``flag=False`` keeps a field off the command line;
    ``short`` is its label in result-folder names (``S16``), which then always show it. ``file=True``: the
    value is a file's path, and a run's identity records the file's contents' digest with it.
    ``added_later=True``: a field added after results were recorded; a run's identity leaves it out while
    it holds its default (which reproduces the earlier behaviour), so those results keep their hash.
    """
    return field(default=default, metadata={"low": low, "high": high, "above": above, "below": below, "flag": flag,
                                            "short": short, "file": file, "added_later": added_later})


def left_out_of_identity(f, value) -> bool:
    """Whether a run's identity omits field ``f`` holding ``value`` (see ``param(added_later=True)``)."""
    return f.metadata.get("added_later", False) and value == f.default


@functools.lru_cache(maxsize=None)
def type_hints(cls) -> Dict[str, object]:
    return typing.get_type_hints(cls)


def choices_of(annotation) -> Optional[Tuple]:
    """The allowed values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) annotation, else ``None``."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is Union:
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def base_type(annotation):
    """``int``, ``float``, ``bool`` or ``str`` behind ``Optional[...]`` / ``Literal[...]``."""
    choices = choices_of(annotation)
    if choices is not None:
        return type(choices[0])
    if typing.get_origin(annotation) is Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _check_value(name: str, annotation, value, meta: dict, policy) -> None:
    if value is None and typing.get_origin(annotation) is Union and type(None) in typing.get_args(annotation):
        return
    choices = choices_of(annotation)
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"--{name} must be one of {list(choices)}, got {value!r}")
        return
    kind = base_type(annotation)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"--{name} must be {'an integer' if kind is int else 'a ' + kind.__name__}, got {value!r}")
    bound = {k: (b(policy) if callable(b) else b) for k, b in meta.items()}
    low, high, above, below = bound.get("low"), bound.get("high"), bound.get("above"), bound.get("below")
    if ((low is not None and value < low) or (high is not None and value > high)
            or (above is not None and value <= above) or (below is not None and value >= below)):
        raise ConfigError(f"--{name} must be {describe_range(low, high, above, below)}, got {value!r}")


def describe_range(low=None, high=None, above=None, below=None) -> str:
    """``">= 1"``, ``"in [0, 15]"``, ``"in (0, 1]"``... (for errors and ``--help``)."""
    lower = f"[{low}" if low is not None else (f"({above}" if above is not None else None)
    upper = f"{high}]" if high is not None else (f"{below})" if below is not None else None)
    if lower and upper:
        return f"in {lower}, {upper}"
    if lower:
        return f">= {low}" if low is not None else f"> {above}"
    return f"<= {high}" if high is not None else (f"< {below}" if below is not None else "any value")


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
    #: ``True`` for policies that compress once, after the first forward pass (the prompt), and never again.
    prefill_only: ClassVar[bool] = False
    #: ``True`` for policies whose KV heads keep different numbers of slots (:meth:`keep` answers a list of
    #: per-head ``[n_h]`` tensors); their kept keys have no common slots, so they sit at original positions.
    ragged: ClassVar[bool] = False
    #: ``True`` for policies that also drop key channels (ThinK): the cache then asks :meth:`channel_keep`
    #: after each choice of slots, and keeps the layer's older keys with the kept channels only.
    prunes_channels: ClassVar[bool] = False
    #: Hyper-parameters that have no effect under KV quantization (``--quant``), each with the reason.
    quant_ignores: ClassVar[Dict[str, str]] = {}
    #: ``True`` for policies that also rewrite kept values when they evict (CaM): the cache then passes the layer's
    #: values through ``merge_values(layer, keep, value)`` (a new ``[b, kv_heads, n, d]``) before gathering ``keep``.
    merges_values: ClassVar[bool] = False
    #: ``True`` for policies that merge adjacent layers into one store (MiniCache): after layer ``l``'s step the cache
    #: asks ``closes_pair(l)`` and, if so, holds layers ``l - 1`` and ``l`` in the stores ``merge_pair`` returns.
    merges_layers: ClassVar[bool] = False

    key_positions: Optional[Literal["slot", "original"]] = field(default=None, kw_only=True)

    _layer_positions: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    _held: List[int] = field(default_factory=list, init=False, repr=False)
    _pending: List[int] = field(default_factory=list, init=False, repr=False)
    _num_layers: Optional[int] = field(default=None, init=False, repr=False)
    _seen: int = field(default=0, init=False, repr=False)
    _plan: Optional[torch.Tensor] = field(default=None, init=False, repr=False)
    #: Per layer, for layers whose KV heads hold different numbers of slots (AdaKV, HeadKV): each head's
    #: count of padding slots at the front of the ``[kv_heads, n]`` positions (``LongTensor [kv_heads]``).
    _pads: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    #: Where the cache's tensors live: positions and position-only plans are kept there, so that a
    #: compaction needs no host round trip per layer.
    _device: torch.device = field(default=torch.device("cpu"), init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_hyperparameters()
        if self.ragged and self.key_positions == "slot":
            raise ConfigError(f"--key_positions slot is not available for {self.name}: its heads keep different "
                              "numbers of slots, so kept keys sit at their original positions")
        if self.prunes_channels and self.key_positions == "slot":
            raise ConfigError(f"--key_positions slot is not available for {self.name}: it prunes channels of keys "
                              "rotated at their original positions")

    def check_hyperparameters(self) -> None:
        """Raise a one-line :class:`ConfigError` for a hyper-parameter of the wrong type or out of its
        :func:`param` range (fixed bounds first, then bounds that depend on other fields)."""
        hints = type_hints(type(self))
        hyper = [f for f in fields(self) if f.init]
        for f in hyper:
            fixed = {k: v for k, v in f.metadata.items() if not callable(v) and k in BOUNDS}
            _check_value(f.name, hints[f.name], getattr(self, f.name), fixed, self)
        for f in hyper:
            if any(callable(v) for v in f.metadata.values()):
                bounds = {k: v for k, v in f.metadata.items() if k in BOUNDS}
                _check_value(f.name, hints[f.name], getattr(self, f.name), bounds, self)

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
        return None if self._plan is None else self._plan[layer]

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """See one layer's attention inputs of the current forward pass (before it is compacted).

        Parameters
        ----------
        query : ``[batch, heads, q, head_dim]``, rotated as the attention sees it.
        key : ``[batch, kv_heads, n, head_dim]``, all cached keys including the new ones, rotated.
        scaling : the attention's softmax scale (``head_dim ** -0.5``).
        """

    def max_cache_len(self, num_layers: int) -> Optional[int]:
        """Largest number of slots a layer holds after a forward pass (``None``: unbounded)."""
        return None

    def channel_keep(self, layer: int, key: torch.Tensor) -> Optional[torch.Tensor]:
        """Key channels ``layer`` keeps of its older slots (policies with :attr:`prunes_channels`).

        Parameters
        ----------
        key : ``[b, kv_heads, n, d]``, the layer's keys after this step's choice of slots, rotated.

        Returns
        -------
        ``LongTensor [kv_heads, d_keep]`` (increasing), or ``None`` to keep every channel.
        """
        return None

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
            raise ConfigError(f"--method {self.name} stores layers in a form of its own (heads of different lengths or "
                              "pruned key channels): run it with a lacache_core.CompressedCache, not on (key, value) lists")
        pkv = [tuple(layer) for layer in past_key_values]
        keep = self.compact(pkv[0][0].shape[-2], len(pkv), pkv[0][0].device)
        if keep is None:
            return pkv
        return [(k, v) if row is None else gather_layer(k, v, row) for (k, v), row in zip(pkv, keep)]


def gather_layer(key: torch.Tensor, value: torch.Tensor, keep_row: torch.Tensor):
    """Keep slots ``keep_row`` of one layer's ``[b, h, seq, d]`` key and value.

    ``keep_row`` is ``LongTensor [n_keep]`` (the same slots for every head), ``[h, n_keep]``
    (per KV head, as SnapKV and PyramidKV select) or ``[b, h, n_keep]`` (per row of a batch and head).
    """
    idx = keep_row if keep_row.device == key.device else keep_row.to(key.device)
    if idx.dim() == 1:
        return key.index_select(-2, idx), value.index_select(-2, idx)
    b, h, _, d = key.shape
    full = (idx[None] if idx.dim() == 2 else idx)[..., None].expand(b, h, idx.shape[-1], d)
    return key.gather(2, full), value.gather(2, full)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
