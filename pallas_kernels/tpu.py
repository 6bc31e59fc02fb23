"""Flash attention for TPU (Mosaic TPU `pallas_call`): forward, dK/dV and dQ kernels.

Shapes (after the wrapper's padding): q [B, T, N, H], k/v [B, S, K, H], N = K * G.

Layout. Mosaic TPU wants the last two dims of every block to be (multiple of 8, multiple of 128)
or the full array dims. A [B, T, N, H] block of one head is (1, H) in its last two dims, which
is neither, so the kernels see either
  * "flat":  [B, T, N*H] (a free reshape), block (bq, H) at column block `head`, when H % 128 == 0;
  * "bnth":  [B, N, T, H] (a transpose), block (bq, H) with H the full last dim, otherwise.
Per-row vectors (positions, segment ids, lse, delta) live as columns [B, T, 1] / [B, N, T, 1]
when the kernel needs them along sublanes (forward, dQ: scores are [bq, bk]) and as rows
[B, 1, T] / [B, N, 1, T] along lanes (dK/dV: scores are transposed, [bk, bq]); both views
of one array are free reshapes, so no transpose ever touches HBM for them.

Block skipping. Per-block position/segment ranges and, per query block, the first and last
key block that may be visible are scalar-prefetched into SMEM (`common.block_ranges`). The key
index maps clamp the grid index into that range, so the pipeline re-uses the buffer it already
holds instead of fetching skipped blocks, and the body runs under `pl.when(visible)`. Blocks
that are fully visible skip the mask (the common case far from the diagonal).

ALiBi: the slopes [N] sit whole in SMEM (one scalar per query head); every score tile, fully
visible or not, gets -slope * |q_pos - k_pos| from the position vectors the kernels read anyway.

GQA/MQA: the forward and dQ grids run over query heads and fetch K/V block `head // G`; the
dK/dV grid runs over kv heads with the G query heads of the group folded into its reduction
axis, so neither repeated K/V nor per-query-head dK/dV is ever materialised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import (POS_HI, POS_LO, SEG_HI, SEG_LO, KernelConfig, block_flags, block_info,
                                   block_ranges, empty_rows_fixup, tile_mask)
from pallas_kernels.reference import MASK_VALUE

F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Layout helpers


def _layout(h: int) -> str:
    return "flat" if h % 128 == 0 else "bnth"


def _to_kernel(x_BLNH, layout):
    b, length, n, h = x_BLNH.shape
    return x_BLNH.reshape(b, length, n * h) if layout == "flat" else x_BLNH.transpose(0, 2, 1, 3)


def _from_kernel(x, layout, n):
    if layout == "flat":
        b, length, nh = x.shape
        return x.reshape(b, length, n, nh // n)
    return x.transpose(0, 2, 1, 3)


def _head_spec(layout, block, h, index):
    """BlockSpec of one head's [block, H] tile; index(*grid, *prefetch) -> (batch, head, seq_block)."""
    if layout == "flat":
        return pl.BlockSpec((None, block, h), lambda *a: (lambda b_, n_, s_: (b_, s_, n_))(*index(*a)))
    return pl.BlockSpec((None, None, block, h), lambda *a: (lambda b_, n_, s_: (b_, n_, s_, 0))(*index(*a)))


def _col_spec(block, index):  # [B, L, 1] -> (block, 1); index -> (batch, seq_block)
    return pl.BlockSpec((None, block, 1), lambda *a: (lambda b_, s_: (b_, s_, 0))(*index(*a)))


def _row_spec(block, index):  # [B, 1, L] -> (1, block)
    return pl.BlockSpec((None, 1, block), lambda *a: (lambda b_, s_: (b_, 0, s_))(*index(*a)))


def _head_col_spec(block, index):  # [B, N, L, 1] -> (block, 1); index -> (batch, head, seq_block)
    return pl.BlockSpec((None, None, block, 1), lambda *a: (lambda b_, n_, s_: (b_, n_, s_, 0))(*index(*a)))


def _head_row_spec(block, index):  # [B, N, 1, L] -> (1, block)
    return pl.BlockSpec((None, None, 1, block), lambda *a: (lambda b_, n_, s_: (b_, n_, 0, s_))(*index(*a)))


def _div(x, d: int):
    # Non-negative operands: truncating division, which Mosaic lowers without the sign fix-ups
    # (and chip queries) of Python's floor semantics.
    return lax.div(x, jnp.int32(d))


def _rem(x, d: int):
    return lax.rem(x, jnp.int32(d))


def _clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


# --------------------------------------------------------------------------------------------
# In-kernel pieces


def _dot_nt(a, b, precision):
    """a [M, D] @ b[N, D]^T -> [M, N] f32 (contracting the minor dims: no transpose needed)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32, precision=precision)


def _dot(a, b, precision):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32, precision=precision)


def _flags(qi_ref, ki_ref, w_ref, b, i, j, nq, nk, c: KernelConfig, last_kv_partial: bool):
    """(visible, full) of query block i against key block j, from the SMEM block info."""
    qb, kb = (b * nq + i) * 4, (b * nk + j) * 4
    q_info = tuple(qi_ref[qb + f] for f in (POS_LO, POS_HI, SEG_LO, SEG_HI))
    k_info = tuple(ki_ref[kb + f] for f in (POS_LO, POS_HI, SEG_LO, SEG_HI))
    visible, full = block_flags(q_info, k_info, w_ref[0], causal=c.causal, has_window=c.has_window,
                                has_segments=c.has_segments)
    if last_kv_partial:  # the padded keys of the last block are masked, so it is never "full"
        full = jnp.logical_and(full, j < nk - 1)
    return visible, full


def _softcap(s, c: KernelConfig):
    """Scores after soft-capping, and tanh(s / cap) for the backward (None without a cap)."""
    if not c.softcap:
        return s, None
    t = jnp.tanh(s / c.softcap)
    return c.softcap * t, t


def _precision(dtype):
    # f32 inputs must not be rounded to bf16 by the MXU's default single pass.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _split_refs(refs, c: KernelConfig, n_main: int):
    """(main refs, q_pos, k_pos, q_seg | None, k_seg | None, slopes | None, rest)."""
    main, refs = refs[:n_main], refs[n_main:]
    q_pos, k_pos, refs = refs[0], refs[1], refs[2:]
    q_seg = k_seg = slopes = None
    if c.has_segments:
        q_seg, k_seg, refs = refs[0], refs[1], refs[2:]
    if c.alibi:
        slopes, refs = refs[0], refs[1:]
    return main, q_pos, k_pos, q_seg, k_seg, slopes, refs


def _alibi(s, q_pos, k_pos, slopes_ref, head):
    """Scores minus ALiBi's slope[head] * |q_pos - k_pos| (positions broadcast to the tile); s
    unchanged without slopes."""
    if slopes_ref is None:
        return s
    return s - slopes_ref[head] * jnp.abs((q_pos - k_pos).astype(F32))


def _slopes_spec():
    return pl.BlockSpec(memory_space=pltpu.SMEM)  # the whole [N] array, read as scalars


def _dispatch(step, visible, full, c: KernelConfig):
    """Run step(masked=False) on fully visible blocks and step(masked=True) on partial ones."""
    if not c.needs_mask:
        step(False)
        return
    pl.when(jnp.logical_and(visible, full))(lambda: step(False))
    pl.when(jnp.logical_and(visible, jnp.logical_not(full)))(lambda: step(True))


def _get(ref):
    return None if ref is None else ref[...]


# --------------------------------------------------------------------------------------------
# Forward: grid (B, N, nq, nk), the key axis innermost ("arbitrary": running softmax in scratch).


def _fwd_kernel(qi_ref, ki_ref, kvr_ref, w_ref, *refs, c: KernelConfig, nq, nk):
    del kvr_ref  # used by the index maps only
    (q_ref, k_ref, v_ref), qp_ref, kp_ref, qs_ref, ks_ref, sl_ref, rest = _split_refs(refs, c, 3)
    o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    b, head, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    prec = _precision(q_ref.dtype)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, F32)
        l_sc[...] = jnp.zeros(l_sc.shape, F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

    visible, full = _flags(qi_ref, ki_ref, w_ref, b, i, j, nq, nk, c, c.kv_padded)

    def step(masked: bool):
        s = _dot_nt(q_ref[...], k_ref[...], prec) * c.scale  # [bq, bk]
        s, _ = _softcap(s, c)
        s = _alibi(s, qp_ref[...], kp_ref[...], sl_ref, head)
        if masked:
            kv_index = (j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)) if c.kv_padded else None
            mask = tile_mask(qp_ref[...], kp_ref[...], _get(qs_ref), _get(ks_ref), w_ref[0], kv_index, c)
            s = jnp.where(mask, s, MASK_VALUE)  # finite, so an all-masked row never makes NaN
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v_ref.dtype), v_ref[...], prec)
        m_sc[...] = m_new

    _dispatch(step, visible, full, c)

    @pl.when(j == nk - 1)
    def _finish():
        inv, lse = empty_rows_fixup(m_sc[...], l_sc[...])
        o_ref[...] = (acc_sc[...] * inv).astype(o_ref.dtype)
        lse_ref[...] = lse


def forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, c: KernelConfig, slopes=None):
    """out [B, T, N, H] (q's dtype) and lse [B, N, T] f32 on padded inputs; `slopes` [N] f32 with c.alibi."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = c.block_q, c.block_kv
    nq, nk = t // bq, s // bk
    layout = _layout(h)
    q_info, k_info = block_info(q_pos, q_seg, bq), block_info(k_pos, k_seg, bk)
    kv_range, _ = block_ranges(q_info, k_info, window[0], c)

    def kv_block(b_, i, j, kvr):  # clamp into the visible range: skipped blocks are not fetched
        base = (b_ * nq + i) * 2
        return _clamp(j, kvr[base], kvr[base + 1])

    q_idx = lambda b_, h_, i, j, qi, ki, kvr, w: (b_, h_, i)  # noqa: E731
    kv_idx = lambda b_, h_, i, j, qi, ki, kvr, w: (b_, _div(h_, g), kv_block(b_, i, j, kvr))  # noqa: E731
    in_specs = [_head_spec(layout, bq, h, q_idx), _head_spec(layout, bk, h, kv_idx), _head_spec(layout, bk, h, kv_idx),
                _col_spec(bq, lambda b_, h_, i, *_: (b_, i)),
                _row_spec(bk, lambda b_, h_, i, j, qi, ki, kvr, w: (b_, kv_block(b_, i, j, kvr)))]
    args = [_to_kernel(q, layout), _to_kernel(k, layout), _to_kernel(v, layout), q_pos[:, :, None], k_pos[:, None, :]]
    if c.has_segments:
        in_specs += [in_specs[3], in_specs[4]]
        args += [q_seg[:, :, None], k_seg[:, None, :]]
    if c.alibi:
        in_specs.append(_slopes_spec())
        args.append(slopes)
    out_shape = [jax.ShapeDtypeStruct(args[0].shape, q.dtype), jax.ShapeDtypeStruct((b, n, t, 1), F32)]
    out_specs = [_head_spec(layout, bq, h, q_idx), _head_col_spec(bq, q_idx)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(b, n, nq, nk), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, h), F32)])
    itemsize = jnp.dtype(q.dtype).itemsize
    cost = pl.CostEstimate(flops=4 * b * n * t * s * h, transcendentals=b * n * t * s,
                           bytes_accessed=itemsize * (2 * q.size + 2 * k.size * nq))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, c=c, nq=nq, nk=nk), grid_spec=grid_spec, out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=_interpret(c), name="loom_flash_fwd",
    )(q_info.reshape(-1), k_info.reshape(-1), kv_range.reshape(-1), window, *args)
    return _from_kernel(out, layout, n), lse.reshape(b, n, t)


# --------------------------------------------------------------------------------------------
# Backward dQ: grid (B, N, nq, nk), like the forward; recomputes P from the saved lse.


def _dq_kernel(qi_ref, ki_ref, kvr_ref, w_ref, *refs, c: KernelConfig, nq, nk):
    del kvr_ref
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qp_ref, kp_ref, qs_ref, ks_ref, sl_ref, rest = \
        _split_refs(refs, c, 6)
    dq_ref, dq_sc = rest
    b, head, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    prec = _precision(q_ref.dtype)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, F32)

    visible, full = _flags(qi_ref, ki_ref, w_ref, b, i, j, nq, nk, c, c.kv_padded)

    def step(masked: bool):
        k = k_ref[...]
        s, t = _softcap(_dot_nt(q_ref[...], k, prec) * c.scale, c)
        s = _alibi(s, qp_ref[...], kp_ref[...], sl_ref, head)
        p = jnp.exp(s - lse_ref[...])  # [bq, bk]
        if masked:
            kv_index = (j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)) if c.kv_padded else None
            mask = tile_mask(qp_ref[...], kp_ref[...], _get(qs_ref), _get(ks_ref), w_ref[0], kv_index, c)
            p = jnp.where(mask, p, 0.0)
        dp = _dot_nt(do_ref[...], v_ref[...], prec)
        ds = p * (dp - delta_ref[...])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dq_sc[...] += _dot(ds.astype(k.dtype), k, prec)

    _dispatch(step, visible, full, c)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * c.scale).astype(dq_ref.dtype)


def _dq(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, window, c: KernelConfig, slopes):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = c.block_q_dq, c.block_kv_dq
    nq, nk = t // bq, s // bk
    layout = _layout(h)
    q_info, k_info = block_info(q_pos, q_seg, bq), block_info(k_pos, k_seg, bk)
    kv_range, _ = block_ranges(q_info, k_info, window[0], c)

    def kv_block(b_, i, j, kvr):
        base = (b_ * nq + i) * 2
        return _clamp(j, kvr[base], kvr[base + 1])

    q_idx = lambda b_, h_, i, j, qi, ki, kvr, w: (b_, h_, i)  # noqa: E731
    kv_idx = lambda b_, h_, i, j, qi, ki, kvr, w: (b_, _div(h_, g), kv_block(b_, i, j, kvr))  # noqa: E731
    in_specs = [_head_spec(layout, bq, h, q_idx), _head_spec(layout, bk, h, kv_idx), _head_spec(layout, bk, h, kv_idx),
                _head_spec(layout, bq, h, q_idx), _head_col_spec(bq, q_idx), _head_col_spec(bq, q_idx),
                _col_spec(bq, lambda b_, h_, i, *_: (b_, i)),
                _row_spec(bk, lambda b_, h_, i, j, qi, ki, kvr, w: (b_, kv_block(b_, i, j, kvr)))]
    args = [_to_kernel(q, layout), _to_kernel(k, layout), _to_kernel(v, layout), _to_kernel(do, layout),
            lse.reshape(b, n, t, 1), delta.reshape(b, n, t, 1), q_pos[:, :, None], k_pos[:, None, :]]
    if c.has_segments:
        in_specs += [in_specs[6], in_specs[7]]
        args += [q_seg[:, :, None], k_seg[:, None, :]]
    if c.alibi:
        in_specs.append(_slopes_spec())
        args.append(slopes)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(b, n, nq, nk), in_specs=in_specs,
        out_specs=_head_spec(layout, bq, h, q_idx), scratch_shapes=[pltpu.VMEM((bq, h), F32)])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, c=c, nq=nq, nk=nk), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(args[0].shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=6 * b * n * t * s * h, transcendentals=b * n * t * s,
                                      bytes_accessed=jnp.dtype(q.dtype).itemsize * (3 * q.size + 2 * k.size * nq)),
        interpret=_interpret(c), name="loom_flash_dq",
    )(q_info.reshape(-1), k_info.reshape(-1), kv_range.reshape(-1), window, *args)
    return _from_kernel(dq, layout, n)


# --------------------------------------------------------------------------------------------
# Backward dK/dV: grid (B, K, nk, G * nq): one key block accumulates over the G query heads of
# its group and over the query blocks. Scores are computed transposed, [bk, bq], so dV += P^T dO
# and dK += dS^T Q are plain matmuls and lse/delta are read as rows.


def _dkv_kernel(qi_ref, ki_ref, qr_ref, w_ref, *refs, c: KernelConfig, nq, nk, g):
    del qr_ref
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qp_ref, kp_ref, qs_ref, ks_ref, sl_ref, rest = \
        _split_refs(refs, c, 6)
    dk_ref, dv_ref, dk_sc, dv_sc = rest
    b, j, r = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i = _rem(r, nq)
    head = pl.program_id(1) * g + _div(r, nq)  # the query head of this step
    bk, bq = k_ref.shape[0], q_ref.shape[0]
    prec = _precision(q_ref.dtype)

    @pl.when(r == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

    visible, full = _flags(qi_ref, ki_ref, w_ref, b, i, j, nq, nk, c, c.kv_padded)

    def step(masked: bool):
        q, do = q_ref[...], do_ref[...]
        s_t, t_t = _softcap(_dot_nt(k_ref[...], q, prec) * c.scale, c)  # [bk, bq]
        s_t = _alibi(s_t, qp_ref[...], kp_ref[...], sl_ref, head)
        p_t = jnp.exp(s_t - lse_ref[...])
        if masked:
            kv_index = (j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)) if c.kv_padded else None
            mask = tile_mask(qp_ref[...], kp_ref[...], _get(qs_ref), _get(ks_ref), w_ref[0], kv_index, c)
            p_t = jnp.where(mask, p_t, 0.0)
        dv_sc[...] += _dot(p_t.astype(do.dtype), do, prec)
        dp_t = _dot_nt(v_ref[...], do, prec)
        ds_t = p_t * (dp_t - delta_ref[...])
        if t_t is not None:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk_sc[...] += _dot(ds_t.astype(q.dtype), q, prec)

    _dispatch(step, visible, full, c)

    @pl.when(r == g * nq - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * c.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dkv(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, window, c: KernelConfig, slopes):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = c.block_q_dkv, c.block_kv_dkv
    nq, nk = t // bq, s // bk
    layout = _layout(h)
    q_info, k_info = block_info(q_pos, q_seg, bq), block_info(k_pos, k_seg, bk)
    _, q_range = block_ranges(q_info, k_info, window[0], c)

    def q_block(b_, j, r, qr):
        base = (b_ * nk + j) * 2
        return _clamp(_rem(r, nq), qr[base], qr[base + 1])

    q_idx = lambda b_, kh_, j, r, qi, ki, qr, w: (b_, kh_ * g + _div(r, nq), q_block(b_, j, r, qr))  # noqa: E731
    kv_idx = lambda b_, kh_, j, r, *_: (b_, kh_, j)  # noqa: E731
    q_row = _row_spec(bq, lambda b_, kh_, j, r, qi, ki, qr, w: (b_, q_block(b_, j, r, qr)))
    k_col = _col_spec(bk, lambda b_, kh_, j, *_: (b_, j))
    in_specs = [_head_spec(layout, bq, h, q_idx), _head_spec(layout, bk, h, kv_idx), _head_spec(layout, bk, h, kv_idx),
                _head_spec(layout, bq, h, q_idx), _head_row_spec(bq, q_idx), _head_row_spec(bq, q_idx), q_row, k_col]
    args = [_to_kernel(q, layout), _to_kernel(k, layout), _to_kernel(v, layout), _to_kernel(do, layout),
            lse.reshape(b, n, 1, t), delta.reshape(b, n, 1, t), q_pos[:, None, :], k_pos[:, :, None]]
    if c.has_segments:
        in_specs += [q_row, k_col]
        args += [q_seg[:, None, :], k_seg[:, :, None]]
    if c.alibi:
        in_specs.append(_slopes_spec())
        args.append(slopes)
    kv_shape = jax.ShapeDtypeStruct(args[1].shape, k.dtype)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(b, kh, nk, g * nq), in_specs=in_specs,
        out_specs=[_head_spec(layout, bk, h, kv_idx), _head_spec(layout, bk, h, kv_idx)],
        scratch_shapes=[pltpu.VMEM((bk, h), F32), pltpu.VMEM((bk, h), F32)])
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, c=c, nq=nq, nk=nk, g=g), grid_spec=grid_spec, out_shape=[kv_shape, kv_shape],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=8 * b * n * t * s * h, transcendentals=b * n * t * s,
                                      bytes_accessed=jnp.dtype(q.dtype).itemsize * (2 * q.size * nk + 4 * k.size)),
        interpret=_interpret(c), name="loom_flash_dkv",
    )(q_info.reshape(-1), k_info.reshape(-1), q_range.reshape(-1), window, *args)
    return _from_kernel(dk, layout, kh), _from_kernel(dv, layout, kh)


def backward(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, window, c: KernelConfig, slopes=None):
    """dq, dk, dv on padded inputs. lse, delta: [B, N, T] f32 (delta = rowsum(dO * O) - dlse)."""
    dq = _dq(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, window, c, slopes)
    dk, dv = _dkv(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, window, c, slopes)
    return dq, dk, dv


def _interpret(c: KernelConfig):
    # Pallas' HLO interpreter: ~10x faster to run than the TPU simulator, which tests select with
    # `pltpu.force_tpu_interpret_mode()` (it overrides this).
    return bool(c.interpret)

