"""The stages of one layer's step through a :class:`lacache_core.CompressedCache`, one module each.

A decode or prefill step of layer ``i`` runs::

    record -> place -> observe -> [the attention kernel] -> choose -> store

* :mod:`.state`: :class:`LayerStep`, the step's state, one object: the tensors the kernel reads, the mask it
  needs, and what compaction needs after the kernel. Nothing of a step outlives it.
* :mod:`.placement`: positions and rotation. Every decision about where a key sits, how it is rotated and
  when it is rotated again.
* :mod:`.rows`: a batch whose rows have policies of their own (fillers, left padding), which looks like one
  policy from outside.
* :mod:`.reads`: sparse reads (page bounds, the pages each query head reads, the bytes read).
* :mod:`.compaction`: the policy's choice applied to the layer's storage, dense or in a store, after the kernel.
* :mod:`lacache_core.masks`: the masks a step's own layout needs (heads of different lengths, rows with fillers).
"""
from .state import LayerStep

__all__ = ["LayerStep"]
