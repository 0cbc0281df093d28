"""GEAR KV compression (Kang et al. 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
Generative Inference of LLM", arXiv 2403.05527), on the KIVI backbone of :mod:`lacache_core.quant`.

GEAR quantizes the cache and keeps a low-rank approximation of what quantization lost: for each block of
tokens the error ``E = X - dequant(quant(X))`` of one head (``[n, d]``) is held as ``A @ B`` with ``A``
``[n, r]`` (one row per token) and ``B`` ``[r, d]`` (one per block and head), for keys and values alike;
attention reads ``dequant(quant(X)) + A @ B``. Here the backbone is :class:`lacache_core.quant.KIVIStore`'s
(keys per channel over a block of ``group`` tokens, values per token over ``group`` channels, the newest
``residual`` tokens whole), and the low-rank part is taken of each block as it is quantized.

Reference code, github.com/opengear-project/GEAR at commit efe0bfe (read for the behaviour, not copied):

* ``cuda_supported_gear/modeling_llamagear.py`` (``key_compression``, ``value_compression``, and the decode
  path that compresses the full-precision residual once it is full): GEAR on KIVI's backbone. Each flushed
  chunk is quantized and the per-head low-rank factors of its error are appended, one pair per chunk; only
  the low-rank variant (GEAR-L, ``gearlKIVI``) adds a correction there, the outlier-free one.
* ``cuda_supported_gear/quant/new_pack.py`` (``headwise_lrap``): the factors, per head, by power iteration
  from a random start (token-side factor orthonormalized by QR, channel-side factor ``E^T Q``); defaults in
  ``cuda_supported_gear/test.py`` and the ``GenerationBench/GenerationTest/run_template_*.sh`` scripts:
  rank 2 while decoding (4 at prefill), 3 iterations.
* ``GenerationBench/GenerationTest/GEARLM/Simulated/compress_function.py`` (``fake_poweriteration_group``,
  ``gearlkivi_channelQ``, ``gearlkivi_tokenQ``, ``gearslkivi_*``) and ``compress_config.py``: the simulated
  (fake-quantized) variants, GEAR with sparse outliers (``left``, a share of entries kept exact) and GEAR-L.

What is built here, and where it differs:

* GEAR-L (quantization + low rank), the variant the reference runs on KIVI's backbone; the sparse outliers of
  GEAR proper (simulated code only) are not built.
* The factors are the rank-``r`` truncated SVD (``torch.linalg.svd``) of the error, not power iteration:
  it is the best rank-``r`` approximation (Eckart-Young), to which the reference's iterations converge, so
  the corrected block is never further from ``X`` than the quantized one; it is deterministic, so a resumed
  run and a test re-derive the same factors without touching the global random state; and a block is small
  (``group`` x ``head_dim``). As in the reference, the token-side factor is orthonormal (``U_r``) and the
  block's factor carries the singular values (``S_r V_r^T``).
* One rank for every block (the reference's decode rank; its larger prefill rank is not separate here), and
  blocks are KIVI's ``group`` tokens (the reference compresses its ``residual``-token chunk at once; with
  ``--quant_residual`` equal to ``--quant_group`` the two agree).
* Eviction keeps rows: a kept token keeps its codes and its row of ``A``, its block keeps ``B``; nothing is
  recomputed. Tokens quantized at eviction to fill a gap form a block of their own, with its own factors.

This module holds the store; the hyper-parameters are :class:`lacache_core.quantizers.GEAR`.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .quant import KIVIStore, unpack

# ``GEAR`` in annotations is lacache_core.quantizers.GEAR, not imported: it imports this module


def low_rank(error: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` truncated SVD of ``error`` (``[..., n, d]``) as ``(A, B)``: ``A = U_r`` ``[..., n, rank]``
    (orthonormal columns), ``B = S_r V_r^T`` ``[..., rank, d]``; zero-padded where ``min(n, d) < rank``."""
    u, s, vh = torch.linalg.svd(error.float(), full_matrices=False)
    k = min(rank, s.shape[-1])
    a, b = u[..., :k], s[..., :k, None] * vh[..., :k, :]
    if k < rank:
        a = torch.cat([a, a.new_zeros(*a.shape[:-1], rank - k)], -1)
        b = torch.cat([b, b.new_zeros(*b.shape[:-2], rank - k, b.shape[-1])], -2)
    return a, b


class GEARStore(KIVIStore):
    """One layer under :class:`GEAR`: a :class:`lacache_core.quant.KIVIStore` whose blocks also hold the low-rank
    factors of their quantization errors.

    Held besides KIVI's tensors: per quantized token, its rows of the token-side factors, ``key_lr_a`` and
    ``value_lr_a`` (``[b, h, m, r]``); per key block, the block-side factors ``key_lr_b`` and ``value_lr_b``
    (``[b, h, blocks, r, d]``). A token's values share its key block, so one block id indexes both.
    """

    TOKEN_FIELDS = KIVIStore.TOKEN_FIELDS + ("key_lr_a", "value_lr_a")
    BLOCK_FIELDS = KIVIStore.BLOCK_FIELDS + ("key_lr_b", "value_lr_b")
    FIELDS = KIVIStore.FIELDS + ("key_lr_a", "value_lr_a", "key_lr_b", "value_lr_b")
    KEY_CHANNEL_FIELDS = KIVIStore.KEY_CHANNEL_FIELDS + ("key_lr_b",)

    def __init__(self, config: GEAR, key: torch.Tensor, value: torch.Tensor):
        b, h, _, d = key.shape
        self.key_lr_a = key.new_zeros(b, h, 0, config.rank)
        self.value_lr_a = self.key_lr_a.clone()
        self.key_lr_b = key.new_zeros(b, h, 0, config.rank, d)
        self.value_lr_b = self.key_lr_b.clone()
        super().__init__(config, key, value)

    def _quantize_block(self, key, value, block):
        (key_codes, value_codes, v_low, v_scale), (k_low, k_scale) = super()._quantize_block(key, value, block)
        c, (b, h, n, d) = self.config, value.shape
        # the errors of what dequantized() will give, over the block's tokens only (keys: their channels held)
        k_hat = unpack(key_codes, c.bits, key.shape[-1]).to(self.dtype) * k_scale + k_low
        v_hat = (unpack(value_codes, c.bits, d).to(self.dtype).view(b, h, n, d // c.group, c.group) * v_scale[..., None]
                 + v_low[..., None]).view(b, h, n, d)
        mask = block[..., None]
        k_a, k_b = low_rank(torch.where(mask, key.float() - k_hat.float(), 0.0), self.key_lr_a.shape[-1])
        v_a, v_b = low_rank(torch.where(mask, value.float() - v_hat.float(), 0.0), c.rank)
        return ((key_codes, value_codes, v_low, v_scale, k_a.to(self.dtype), v_a.to(self.dtype)),
                (k_low, k_scale, k_b[:, :, None].to(self.dtype), v_b[:, :, None].to(self.dtype)))

    def prune_channels(self, channels: torch.Tensor, whole=None) -> "GEARStore":
        """KIVI's, and the key factors' rank capped at the channels kept (a rank above it would hold zeros)."""
        super().prune_channels(channels)
        b, h = self.key.shape[:2]
        rank, width = min(self.config.rank, channels.shape[-1]), channels.shape[-1]
        self.key_lr_a = self.key_lr_a.new_zeros(b, h, 0, rank)
        self.key_lr_b = self.key_lr_b.new_zeros(b, h, 0, rank, width)
        return self

    def _decoded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """KIVI's dequantized keys and values plus each token's low-rank correction ``A[t] @ B[block(t)]``."""
        keys, values = super()._decoded()
        block = self.key_block.long()[..., None]
        key_block, value_block = block.expand(keys.shape), block.expand(values.shape)
        for j in range(self.key_lr_a.shape[-1]):  # rank-1 terms, each gathered per token as KIVI gathers its scales
            keys = keys + self.key_lr_a[..., j:j + 1] * self.key_lr_b[:, :, :, j].gather(2, key_block)
        for j in range(self.value_lr_a.shape[-1]):
            values = values + self.value_lr_a[..., j:j + 1] * self.value_lr_b[:, :, :, j].gather(2, value_block)
        return keys, values
