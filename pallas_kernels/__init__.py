"""Pallas kernels and their pure-JAX references.

`flash_attention(q_BTNH, k_BSKH, v_BSKH, *, causal, segment_ids, positions, window, softcap,
scale | sm_scale, return_lse, alibi_slopes, block_sizes, backend, interpret)`: TPU (Mosaic TPU) and GPU
(Mosaic GPU) kernels, forward and backward, tested against `reference.attention_reference`.
"""

from pallas_kernels.flash_attention import BACKENDS, BlockSizes, flash_attention
from pallas_kernels.reference import attention_reference

__all__ = ["BACKENDS", "BlockSizes", "attention_reference", "flash_attention"]
