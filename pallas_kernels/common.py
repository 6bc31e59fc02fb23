"""What the flash-attention kernels of every backend share: the static config and block skipping.

Masks are defined by positions and segment ids (see `reference.py`), not by indices, so the
decision "may this (query block, key block) pair hold a visible entry?" is made from per-block
ranges: the min/max position and min/max segment id of each block. The rules are conservative
(a block marked visible may still be fully masked, never the reverse) and exact for the common
cases: causal or windowed rows with positions that grow with the index, and packed rows whose
segment ids grow along the row.

Two flags come out per block pair:
  visible  some entry may be unmasked; invisible blocks are skipped (no matmul, and the kernels
           clamp their index maps / loop bounds so skipped blocks are not even fetched);
  full     every entry is unmasked; the kernel skips building the mask (iota, compares, select).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from pallas_kernels.reference import MASK_VALUE

# Per-block info fields, in this order, in the [B, num_blocks, 4] int32 arrays.
POS_LO, POS_HI, SEG_LO, SEG_HI = range(4)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static description of one attention call, after padding. Hashable (a custom_vjp static arg)."""

    backend: str  # "tpu" | "gpu"
    interpret: bool  # run the kernels in the backend's interpret mode (on CPU)
    causal: bool
    has_window: bool  # a (possibly traced) window scalar is passed; <= 0 at run time means global
    has_segments: bool
    softcap: float | None
    scale: float
    q_len: int  # real lengths (before padding)
    kv_len: int
    q_pad: int  # padded lengths
    kv_pad: int
    block_q: int
    block_kv: int
    block_q_dkv: int
    block_kv_dkv: int
    block_q_dq: int
    block_kv_dq: int
    alibi: bool = False  # ALiBi slopes [N] are passed: every score tile gets -slope * |q_pos - k_pos|

    @property
    def kv_padded(self) -> bool:
        return self.kv_pad != self.kv_len

    @property
    def needs_mask(self) -> bool:
        """False when every entry is visible (no causal, window, segments or padded keys)."""
        return self.causal or self.has_window or self.has_segments or self.kv_padded


def _all(conds):
    return functools.reduce(jnp.logical_and, conds) if conds else jnp.bool_(True)


def block_flags(q_info, k_info, window, *, causal: bool, has_window: bool, has_segments: bool):
    """(visible, full) for a query block against a key block.

    q_info, k_info: sequences (pos_lo, pos_hi, seg_lo, seg_hi) of scalars or broadcastable arrays;
    window: int32 scalar (<= 0 means global). Works on traced scalars inside a kernel and on
    arrays in the wrapper.
    """
    qp0, qp1, qs0, qs1 = q_info
    kp0, kp1, ks0, ks1 = k_info
    vis, full = [], []
    if has_segments:
        vis.append((qs0 <= ks1) & (ks0 <= qs1))
        full.append((qs0 == qs1) & (ks0 == ks1) & (qs0 == ks0))
    if causal:
        vis.append(kp0 <= qp1)
        full.append(kp1 <= qp0)
    if has_window:
        off = window <= 0
        if causal:  # 0 <= dpos < W
            vis.append(off | (qp0 - kp1 < window))
            full.append(off | (qp1 - kp0 < window))
        else:  # |dpos| < W
            vis.append(off | ((qp0 - kp1 < window) & (kp0 - qp1 < window)))
            full.append(off | ((qp1 - kp0 < window) & (kp1 - qp0 < window)))
    return _all(vis), _all(full)


def block_info(pos_BL, seg_BL, block: int):
    """[B, L/block, 4] int32: per-block (pos_lo, pos_hi, seg_lo, seg_hi). L must divide by block."""
    b, length = pos_BL.shape
    p = pos_BL.reshape(b, length // block, block)
    s = jnp.zeros_like(p) if seg_BL is None else seg_BL.reshape(b, length // block, block)
    return jnp.stack([p.min(-1), p.max(-1), s.min(-1), s.max(-1)], axis=-1).astype(jnp.int32)


def block_ranges(q_info, k_info, window, cfg: KernelConfig):
    """Visible key-block range per query block and query-block range per key block.

    Returns kv_range [B, nq, 2] and q_range [B, nk, 2] int32 (first, last visible block); a block
    with nothing visible gets (0, 0), and its kernel body never runs (the visible test fails).
    """
    vis, _ = block_flags(tuple(q_info[:, :, None, f] for f in range(4)),
                         tuple(k_info[:, None, :, f] for f in range(4)), window,
                         causal=cfg.causal, has_window=cfg.has_window, has_segments=cfg.has_segments)
    vis = jnp.broadcast_to(vis, (q_info.shape[0], q_info.shape[1], k_info.shape[1]))

    def first_last(v, axis):
        n = v.shape[axis]
        any_ = v.any(axis)
        first = jnp.argmax(v, axis)
        last = n - 1 - jnp.argmax(jnp.flip(v, axis), axis)
        return jnp.stack([jnp.where(any_, first, 0), jnp.where(any_, last, 0)], -1).astype(jnp.int32)

    return first_last(vis, 2), first_last(vis, 1)


def empty_rows_fixup(m, l):
    """Finalize online softmax: (1/l or 0, lse or MASK_VALUE) for rows with no visible key.

    A row whose keys were all masked still saw MASK_VALUE scores (never -inf), so its running max
    is MASK_VALUE (or -inf if no block was visited); it gets output 0 and lse = MASK_VALUE.
    """
    empty = m < MASK_VALUE * 0.5
    l_safe = jnp.where(empty, 1.0, l)
    inv = jnp.where(empty, 0.0, 1.0 / l_safe)
    lse = jnp.where(empty, MASK_VALUE, m + jnp.log(l_safe))
    return inv, lse


def window_array(window):
    """The window as an int32 [1] array (0 = global); None stays None."""
    if window is None:
        return None
    return jnp.asarray(window, jnp.int32).reshape(1)


def tile_mask(q_pos, k_pos, q_seg, k_seg, window, kv_index, c: KernelConfig):
    """Boolean mask of a score tile from q (rows) and k (columns) vectors broadcast to its shape;
    the semantics of reference.attention_mask, plus padded keys (kv_index >= kv_len)."""
    conds = []
    if c.has_segments:
        conds.append(q_seg == k_seg)
    if c.causal or c.has_window:
        d = q_pos - k_pos
        if c.causal:
            conds.append(d >= 0)
        if c.has_window:
            in_window = (d < window) if c.causal else ((d < window) & (-d < window))
            conds.append((window <= 0) | in_window)
    if kv_index is not None:
        conds.append(kv_index < c.kv_len)
    return functools.reduce(jnp.logical_and, conds)
