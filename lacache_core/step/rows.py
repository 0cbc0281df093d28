"""A batch whose rows have policies of their own (a budget per row, scoring policies that choose per row), and a
left-padded batch: filler slots at the front of each row, which attention never sees."""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..errors import ConfigError
from ..masks import own_key_visible
from ..policies import policy_from_state


class BatchRows:
    """The rows of a cache's batch, which look like one policy from outside.

    Attributes
    ----------
    policies : one policy per row (row 0 is the cache's own), or ``None`` while one policy serves every row.
    fillers : per layer, ``LongTensor [b]``: the slots at the front of each row that hold no token of it (left
        padding, then what aligns rows that keep fewer slots); ``None`` without rows or padding.
    tokens_in : tokens fed per row, padding included (the batch's positions).
    pads : a left-padded batch's pad count per row (``[b]``), or ``None``.
    """

    def __init__(self, policy, num_layers: int):
        self.policy, self.num_layers = policy, num_layers
        self.policies: Optional[list] = None
        self.fillers: Optional[list] = None
        self.tokens_in = 0
        self.pads: Optional[torch.Tensor] = None

    def set_policies(self, policies: list) -> None:
        for p in policies[1:]:
            p.bind(self.num_layers)
        self.policies = list(policies)
        self.fillers = [torch.zeros(len(policies), dtype=torch.long) for _ in range(self.num_layers)]

    def state(self) -> dict:
        """What the rows need to continue (``{}`` without rows of their own)."""
        if self.policies is None:
            return {}
        return {"rows": [p.state_dict() for p in self.policies[1:]], "fillers": [f.clone() for f in self.fillers],
                "tokens_in": self.tokens_in}

    def restore(self, state: dict) -> None:
        if not state:
            return
        rows = [policy_from_state(saved) for saved in state["rows"]]
        for p in rows:
            p.bind(self.num_layers)
        self.policies = [self.policy] + rows
        self.fillers = [f.clone() for f in state["fillers"]]
        self.tokens_in = state["tokens_in"]

    def for_batch(self, batch: int) -> Optional[list]:
        """The per-row policies of a batch, for a policy that scores tokens (``None``: one policy serves every row,
        since a position-only choice depends on the slot count alone, the same in every row)."""
        if self.policies is None and (batch == 1 or not self.policy.observes) and self.fillers is None:
            return None
        if self.policies is None:
            if self.policy.seen:
                raise RuntimeError("a cache used at batch size 1 cannot continue at a larger batch; use a fresh cache")
            self.policies = [self.policy] + [copy.deepcopy(self.policy) for _ in range(batch - 1)]
            if self.fillers is None:
                self.fillers = [torch.zeros(batch, dtype=torch.long) for _ in range(self.num_layers)]
        elif len(self.policies) != batch:
            raise RuntimeError(f"the batch changed from {len(self.policies)} to {batch} rows; use a fresh cache")
        return self.policies

    def settle(self, layer: int, n: int) -> list:
        """Each row's choice for ``layer`` among its own tokens (the slots after its fillers), as its policy answers
        :meth:`CachePolicy.settle`."""
        return [row.settle(layer, n - int(f)) for row, f in zip(self.policies, self.fillers[layer])]

    def aligned(self, layer: int, keeps: list, n: int, kv_heads: int) -> Optional[torch.Tensor]:
        """The rows' ``keeps`` (each ``[n_keep]``, ``[kv_heads, n_keep]`` or ``None``) as one ``[b, kv_heads, width]``
        index into the batch's ``n`` slots (``None``: every row keeps all). Rows that keep fewer slots than the
        longest are aligned with filler slots at the front, which attention never sees."""
        if all(k is None for k in keeps):
            return None
        fillers = self.fillers[layer]
        device = next(k for k in keeps if k is not None).device
        if all(k is None or k.dim() == 1 for k in keeps):  # every row's heads alike: one scatter for the batch
            return self._aligned_alike(layer, keeps, n, kv_heads, device)
        slots = [torch.arange(int(f), n, device=device).expand(kv_heads, -1) if k is None
                 else k.to(device).expand(kv_heads, k.shape[-1]) + int(f) for k, f in zip(keeps, fillers)]
        width = max(row.shape[-1] for row in slots)
        self.fillers[layer] = torch.tensor([width - row.shape[-1] for row in slots])
        return torch.stack([torch.nn.functional.pad(row, (width - row.shape[-1], 0)) for row in slots])

    def _aligned_alike(self, layer: int, keeps: list, n: int, kv_heads: int, device) -> torch.Tensor:
        """:meth:`aligned` where each row keeps ``[n_keep]`` slots (or all): the same index, filler columns 0."""
        fillers = self.fillers[layer]
        lengths = torch.tensor([n - int(f) if k is None else k.shape[-1] for k, f in zip(keeps, fillers)])
        width = int(lengths.max())
        own = torch.cat([torch.arange(n - int(f), device=device) if k is None else k.to(device)
                         for k, f in zip(keeps, fillers)])
        row = torch.repeat_interleave(torch.arange(len(keeps)), lengths)
        column = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - width, lengths)
        index = torch.zeros(len(keeps), width, dtype=torch.long, device=device)
        index[row.to(device), column.to(device)] = own + fillers.to(device)[row.to(device)]
        self.fillers[layer] = width - lengths
        return index[:, None, :].expand(-1, kv_heads, -1)

    def note_padding(self, mask: torch.Tensor) -> None:
        """Read the left padding of a batch's first forward pass from its 4D attention mask (layer 0's).

        A row's pad slots are those whose own query cannot see them (causal and sliding-window masks always
        let a token see itself); they must be a prefix of the row.
        """
        if self.tokens_in or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            return
        q, n = mask.shape[-2], mask.shape[-1]
        own = own_key_visible(mask)  # [b, q]
        if bool(own.all()):
            return
        pads = (~own).sum(-1).cpu()
        prefix = torch.arange(q)[None, :] < pads[:, None]
        if n != q or not torch.equal(~own.cpu(), prefix):
            raise ConfigError("only left padding of the first forward pass is supported with a compressed cache "
                              "(pad tokens before each row's first token)")
        self.fillers = [pads.clone() for _ in range(self.num_layers)]
        self.pads = pads

    def positions(self, row: int):
        """Original positions held for batch row ``row`` (as :meth:`CompressedCache.kept_positions`)."""
        return self.policy.positions if self.policies is None else self.policies[row].positions
