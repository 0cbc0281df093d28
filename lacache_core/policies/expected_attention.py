"""Expected Attention (Devoto et al., 2025, arXiv 2510.00636): keep the keys that future queries are expected to read.

Followed: kvpress's ``ExpectedAttentionPress`` (``kvpress/presses/expected_attention_press.py``, NVIDIA/kvpress @
8bb29b9). The prompt's queries before RoPE (the sinks' left out) are summarised by their mean ``mu`` and covariance
``S`` per query head. Both are turned by the average rotation ``R`` of the next ``n_future_positions`` positions.
A key ``k`` then scores ``E[exp(q.k * scale)] ~ exp(R mu . k * scale + k' R S R' k * scale^2 / 2)`` (a Gaussian's
moment generating function), softmaxed over the prompt's non-sink keys, averaged over the query heads of each KV
head, and multiplied by ``|v| + ...`` (``(score + epsilon) * |v|``). The sinks score above every other token.

Where kvpress recomputes the pre-RoPE queries from the hidden states with the layer's ``q_proj`` (and ``q_norm``),
this turns the rotated queries the attention read back by their positions, with the model's own rotation: the same
vectors for every family, partial rotary and scaled RoPE included, with no access to the module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional, Tuple

import torch

from .base import param
from .scorer import ScorerPolicy


def average_rotation(rotation, first: int, count: int, like: torch.Tensor) -> torch.Tensor:
    """``R = mean_t R(t)`` over positions ``first .. first + count - 1``, as a ``[d, d]`` matrix (``R x`` rotates
    column vector ``x``): every basis vector rotated by the model's own rotation, then averaged."""
    d = like.shape[-1]
    basis = torch.eye(d, dtype=like.dtype, device=like.device)[None, :, None, :].expand(1, d, count, d)
    positions = torch.arange(first, first + count, device=like.device)
    columns = rotation.at(basis.contiguous(), positions, limit=first + count).float().mean(2)[0]  # [d (basis i), d]
    return columns.T


@dataclass
class ExpectedAttention(ScorerPolicy):
    """After the prompt, keep per KV head the keys of highest expected attention from future queries.

    Parameters
    ----------
    start_size : int
        Leading tokens always kept, and left out of the query statistics (kvpress's ``n_sink``, 4).
    n_future_positions : int
        Future positions whose rotations are averaged (512 in kvpress).
    use_covariance : bool
        Add the queries' covariance term to the expected logit (kvpress: on).
    use_vnorm : bool
        Multiply each score by its value's L2 norm (kvpress: on).
    epsilon : float
        Added to a score before the value-norm product (kvpress: 0).
    """

    name: ClassVar[str] = "expected_attention"

    start_size: int = param(4, low=0)
    n_future_positions: int = param(512, low=1)
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = param(0.0, low=0.0)

    _rotations: Dict[Tuple, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def _reset_state(self) -> None:
        super()._reset_state()
        self._rotations = {}

    def future_rotation(self, rotation, n: int, like: torch.Tensor) -> torch.Tensor:
        """The ``[d, d]`` average rotation after a prompt of ``n`` tokens (the same for every layer of a pass)."""
        key = (n, like.shape[-1], like.dtype, like.device)
        if key not in self._rotations:
            self._rotations = {key: average_rotation(rotation, n, self.n_future_positions, like)}
        return self._rotations[key]

    def query_statistics(self, query: torch.Tensor, rotation, n: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Mean ``[b, heads, d]`` and covariance ``[b, heads, d, d]`` (or ``None``) of the prompt's queries before
        RoPE, sinks left out, turned by the average future rotation."""
        q = query.shape[2]
        plain = rotation.at(query, torch.arange(n - q, n, device=query.device), limit=n, inverse=True)
        plain = plain[:, :, self.start_size:].float()
        mu = plain.mean(2)
        turn = self.future_rotation(rotation, n, query)
        cov = None
        if self.use_covariance:
            centered = plain - mu[:, :, None]
            cov = turn @ (centered.transpose(2, 3) @ centered / plain.shape[2]) @ turn.T
        return mu @ turn.T, cov

    def score(self, query, key, value, rotation, scaling):
        b, heads, n, d = key.shape[0], query.shape[1], key.shape[2], key.shape[3]
        kv_heads, s = key.shape[1], self.start_size
        mu, cov = self.query_statistics(query, rotation, n)
        keys = key[:, :, s:].float().repeat_interleave(heads // kv_heads, 1)  # [b, heads, n - s, d]
        logits = (keys @ mu[..., None])[..., 0] * scaling
        if cov is not None:
            logits = logits + torch.einsum("bhnd,bhde,bhne->bhn", keys, cov, keys) * scaling ** 2 / 2
        scores = logits.softmax(-1).view(b, kv_heads, heads // kv_heads, n - s).mean(2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * value[:, :, s:].float().norm(dim=-1)
        return torch.cat([scores.new_full((b, kv_heads, s), scores.max().item() + 1), scores], -1)
