"""Flash attention for NVIDIA Hopper (Mosaic GPU `plgpu.kernel`): forward, dQ and dK/dV kernels.

Shapes (after the wrapper's padding): q [B, T, N, H], k/v [B, S, K, H], N = K * G, bfloat16,
H in {64, 128, 256}; f32 accumulation everywhere.

Structure (FlashAttention-3 style, warp-specialised). Each CTA runs `compute_wgs` compute
warpgroups and one memory warpgroup:
  * the memory warpgroup streams tiles with TMA into a ring of `slots` SMEM buffers, waiting on
    "consumed" barriers before overwriting a slot;
  * each compute warpgroup owns `block` rows (queries in the forward and dQ kernels, keys in the
    dK/dV kernel), issues WGMMAs from SMEM and keeps its accumulators in registers;
  * in the forward, a "schedule" barrier makes the two compute warpgroups take turns, so one's
    softmax overlaps the other's matmuls.

Block skipping: the wrapper computes, per CTA, the first and last streamed block that may be
visible (`common.block_ranges`) and the loops run only over that range, so causal and windowed
attention do proportionally less work and fetch nothing outside the band. Inside the range,
blocks that are fully visible skip the mask; the others build it from positions and segment ids
loaded for that block only.

ALiBi: the slopes come as an [N, W] array (each row one head's slope, repeated: a per-row vector
is what a warpgroup loads without SMEM); every score tile, fully visible or not, gets
-slope * |q_pos - k_pos| from position vectors loaded for that tile.

GQA/MQA: K/V tiles are addressed at kv head `head // G` (never repeated in memory); the dK/dV
grid runs over kv heads and streams the G query heads of the group, so dK/dV are accumulated
in registers and written once per kv head.

Sizes: a forward CTA is 2 x 64 query rows against 128-key tiles (64 for head_dim 256); the
backward kernels use 64 x 64 tiles and two compute warpgroups, one for head_dim 256, where the
q/dO (or k/v) tiles of a second warpgroup would not fit in shared memory. With head_dim 256 the
dK/dV accumulators ([64, 256] f32 each) exceed the register file and spill: correct, not tuned.

Interpret mode (CPU) runs the same kernels under `plgpu.force_gpu_interpret_mode()`. The
simulator takes WGMMA operands from SMEM only and does not model `pl.run_state` accumulators,
so there (only) a register operand (P, dS) is staged through SMEM into a fresh accumulator that
is then added (`_wgmma_acc`). Everything else, barriers and TMA included, is the hardware code.
Lowering for CUDA from a CPU process (an abstract GPU mesh) checks layouts and the shared-memory
budget; numerics on a real Hopper have not been measured here.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import (POS_HI, POS_LO, SEG_HI, SEG_LO, KernelConfig, block_flags, block_info,
                                   block_ranges, tile_mask)
from pallas_kernels.reference import MASK_VALUE

F32 = jnp.float32
LOG2E = math.log2(math.e)
GPU_DTYPES = ("bfloat16",)


# --------------------------------------------------------------------------------------------
# Shared pieces


def _check(q, c: KernelConfig):
    if jnp.dtype(q.dtype).name not in GPU_DTYPES:
        raise ValueError(f"flash_attention backend='gpu' supports q, k, v in {GPU_DTYPES} (f32 accumulation; "
                         f"Hopper WGMMA has no exact float32 path); got {q.dtype}. Cast to bfloat16, or use "
                         "backend='tpu' / impl='xla' for float32")


def _transforms(dtype):
    # 128-byte swizzle with (8, 128 B) tiles: the layout WGMMA reads without bank conflicts.
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


def _interpret_ctx(c: KernelConfig):
    if not c.interpret:
        return contextlib.nullcontext()
    if "NPROC" not in os.environ and (os.cpu_count() or 1) < 8:
        # Each simulated warpgroup blocks an XLA host-callback thread while it waits on a barrier;
        # XLA sizes that pool to the core count, so on small machines the warpgroups can starve.
        warnings.warn("Mosaic GPU interpret mode may hang on a machine with fewer than 8 cores: start "
                      "Python with NPROC=8 (sizes XLA's CPU thread pool) before JAX initialises", stacklevel=3)
    return plgpu.force_gpu_interpret_mode()


def _compiler_params():
    return plgpu.CompilerParams(approx_math=True)


def _wgmma(a, b, shape):
    """A fresh f32 accumulator [M, N] = a @ b (a in SMEM or registers, b in SMEM)."""
    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return pl.run_scoped(run, plgpu.ACC(shape, F32))


def _wgmma_acc(acc, a, b, stage):
    """acc + a @ b with `a` in registers, accumulating in place in the registers on hardware.

    `stage` is None on hardware. In interpret mode it is an SMEM buffer of a's shape: the
    simulator takes WGMMA operands from SMEM only and has no `pl.run_state` accumulators, so
    there `a` goes through SMEM into a fresh accumulator that is then added.
    """
    if stage is not None:
        stage[...] = a
        plgpu.commit_smem()
        return acc + _wgmma(stage, b, acc.shape)
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))


def _stage_scratch(c: KernelConfig, wgs, shape, dtype):
    """Interpret-mode staging buffers for register operands (see `_wgmma_acc`); none on hardware."""
    return [plgpu.SMEM((wgs, *shape), dtype, transforms=_transforms(dtype))] if c.interpret else []


def _split_stage(refs, c: KernelConfig, wg):
    if c.interpret:
        return refs[:-1], refs[-1].at[wg]
    return refs, None


def _load_vec(ref_view, layout):
    """A per-row / per-column vector [M] read straight from GMEM into `layout` (no TMA, no SMEM).

    Small (positions, ids, lse, delta of one tile); `optimized=False` because the vectorised path
    only exists for SMEM sources (jax 0.11 refuses GMEM there).
    """
    return plgpu.load(ref_view, layout=layout, optimized=False)


def _zeros(shape, layout):
    return plgpu.layout_cast(jnp.full(shape, 0, F32), layout)


def _row(x, shape):  # per-row vector [M] -> [M, N]
    return lax.broadcast_in_dim(x, shape, [0])


def _col(x, shape):  # per-column vector [N] -> [M, N]
    return lax.broadcast_in_dim(x, shape, [1])


def _info(ref, b, blk, nblocks):
    base = (b * nblocks + blk) * 4
    return tuple(ref[base + f] for f in (POS_LO, POS_HI, SEG_LO, SEG_HI))


def _flags(q_info, k_info, window, c: KernelConfig, kv_blk, nk):
    _, full = block_flags(q_info, k_info, window, causal=c.causal, has_window=c.has_window,
                          has_segments=c.has_segments)
    if c.kv_padded:
        full = jnp.logical_and(full, kv_blk < nk - 1)
    return full


def _scores(acc, c: KernelConfig, unit: float = 1.0):
    """Scaled (and soft-capped) scores from raw q.k, times `unit`; and tanh for the backward (or None)."""
    if not c.softcap:
        return acc * (c.scale * unit), None
    t = jnp.tanh(acc * (c.scale / c.softcap))
    return t * (c.softcap * unit), t


def _i32(x):
    return jnp.int32(x)


def _kv_tile_mask(kp_ref, ks_ref, bi, j, bq, bk, q_pos_r, q_seg_r, window, col_layout, c: KernelConfig):
    """[bq, bk] mask of a query tile (its positions / ids already in registers) against kv tile j."""
    shape = (bq, bk)
    k_pos_c = _load_vec(kp_ref.at[bi, pl.ds(j * bk, bk)], col_layout)
    k_seg_c = _load_vec(ks_ref.at[bi, pl.ds(j * bk, bk)], col_layout) if ks_ref is not None else None
    kv_index = None
    if c.kv_padded:
        kv_index = j * bk + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    return tile_mask(_row(q_pos_r, shape), _col(k_pos_c, shape),
                     None if q_seg_r is None else _row(q_seg_r, shape),
                     None if k_seg_c is None else _col(k_seg_c, shape), window, kv_index, c)


def _maybe_mask(x, full, masked, c: KernelConfig):
    """masked(x) on partial blocks only; nothing at all when no entry can ever be masked."""
    if not c.needs_mask:
        return x
    return lax.cond(full, lambda y: y, masked, x)


def _stream(copies, bars, consumed, steps, slots, src_index):
    """Memory warpgroup: TMA the tiles of steps 0..steps-1 into a ring of `slots` buffers.

    copies: [(gmem_ref_fn(step_index_args) -> GMEM ref view, smem ring)], one per stream;
    bars/consumed: per stream, barriers signalled by TMA / by the compute warpgroups.
    """
    def issue(step, slot):
        args = src_index(step)
        for (src, dst), bar in zip(copies, bars):
            plgpu.copy_gmem_to_smem(src(*args), dst.at[slot], bar.at[slot])

    for i in range(slots):
        pl.when(i < steps)(functools.partial(issue, i, i))

    @pl.loop(0, jnp.maximum(steps - slots, 0))
    def _(step):
        slot = lax.rem(step, _i32(slots))
        nxt = step + slots
        args = src_index(nxt)
        for (src, dst), bar, cons in zip(copies, bars, consumed):
            plgpu.barrier_wait(cons.at[slot])
            plgpu.copy_gmem_to_smem(src(*args), dst.at[slot], bar.at[slot])

    # Observe the last consumptions too: a thread that waits on a barrier must see every phase of
    # it (the interpreters check this; on hardware it only delays this warpgroup's exit).
    @pl.loop(jnp.maximum(steps - slots, 0), steps)
    def _(step):
        for cons in consumed:
            plgpu.barrier_wait(cons.at[lax.rem(step, _i32(slots))])


def _compute_registers(wgs: int) -> int:
    # Hopper's 64K registers per SM, redistributed to the compute warpgroups (<= 255 per thread;
    # multiples of 8); the memory warpgroup keeps 40: (2 * 232 + 40) * 128 <= 65536.
    return 232 if wgs == 2 else 240


def _kernel_call(body, out_type, scratch, grid, grid_names, num_threads, c: KernelConfig, *args):
    with _interpret_ctx(c):
        return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
                            num_threads=num_threads, thread_name="wg", compiler_params=_compiler_params())(*args)


def _seg_args(q_seg, k_seg, c):
    return (q_seg, k_seg) if c.has_segments else ()


def _slope_args(slopes, c: KernelConfig):
    """ALiBi's slopes [N] as [N, W]: one head's slope repeated along a row, W covering every
    kernel's query tile (see `_alibi_bias`)."""
    if not c.alibi:
        return ()
    width = max(c.block_q, c.block_q_dq, c.block_q_dkv)
    return (jnp.broadcast_to(slopes.astype(F32)[:, None], (slopes.shape[0], width)),)


def _split_slopes(refs, c: KernelConfig):
    if c.alibi:
        return refs[0], refs[1:]
    return None, refs


def _alibi_bias(slope_v, q_pos_v, k_pos_v, shape, transposed: bool = False):
    """slope * |q_pos - k_pos| as a [M, N] f32 tile in the WGMMA layout (to subtract from scores).

    Queries are rows and keys columns (forward, dQ), or the reverse when `transposed` (dK/dV);
    `slope_v` is a vector along the query axis (one head: all equal)."""
    rowv, colv = (k_pos_v, q_pos_v) if transposed else (q_pos_v, k_pos_v)
    d = _row(rowv.astype(F32), shape) - _col(colv.astype(F32), shape)
    slope = _col(slope_v, shape) if transposed else _row(slope_v, shape)
    return slope * jnp.maximum(d, -d)


# --------------------------------------------------------------------------------------------
# Forward: grid (N, T / (2 * block_q), B); two compute warpgroups of block_q query rows.


def forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, c: KernelConfig, slopes=None):
    """out [B, T, N, H] and lse [B, N, T] f32 on padded inputs; `slopes` [N] f32 with c.alibi."""
    _check(q, c)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    dtype = q.dtype
    wgs, bq, bk = 2, c.block_q, c.block_kv
    tile = wgs * bq
    n_tiles, nqb, nk = t // tile, t // bq, s // bk
    slots = min(2, nk)
    q_info, k_info = block_info(q_pos, q_seg, bq), block_info(k_pos, k_seg, bk)
    kv_range, _ = block_ranges(block_info(q_pos, q_seg, tile), k_info, window[0], c)
    tr = _transforms(dtype)

    def body(q_ref, k_ref, v_ref, qp_ref, kp_ref, *refs):
        if c.has_segments:
            qs_ref, ks_ref, *refs = refs
        sl_ref, refs = _split_slopes(refs, c)
        bi, head, qt, wg = (lax.axis_index(a) for a in ("batch", "heads", "q", "wg"))
        refs, stage = _split_stage(refs, c, wg)
        qi_ref, ki_ref, kvr_ref, w_ref, out_ref, lse_ref, qo_smem2, k_smem, v_smem, lse_smem2, \
            k_bars, v_bars, q_bars, k_cons, v_cons, sched = refs
        lo = kvr_ref[(bi * n_tiles + qt) * 2]
        steps = kvr_ref[(bi * n_tiles + qt) * 2 + 1] - lo + 1

        def schedule_barrier():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < wgs)
        def _compute():
            plgpu.set_max_registers(_compute_registers(wgs), action="increase")
            qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
            row0 = qt * tile + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, bq), head], qo_smem, q_bars.at[wg])
            q_info_wg = _info(qi_ref, bi, qt * wgs + wg, nqb)
            window_s = w_ref[0]
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            col_layout = plgpu.Layout.WGMMA.reduce(0)
            q_pos_r = _load_vec(qp_ref.at[bi, pl.ds(row0, bq)], row_layout)
            q_seg_r = _load_vec(qs_ref.at[bi, pl.ds(row0, bq)], row_layout) if c.has_segments else None
            # ALiBi in the base-2 units of these scores: slope * log2(e)
            slope_r = _load_vec(sl_ref.at[head, pl.ds(0, bq)], row_layout) * LOG2E if c.alibi else None
            plgpu.barrier_wait(q_bars.at[wg])
            m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, F32), row_layout)
            l_sum = _zeros((bq,), row_layout)
            acc = _zeros((bq, h), plgpu.Layout.WGMMA)
            plgpu.barrier_wait(k_bars.at[0])  # steps >= 1: the first tile is always fetched
            pl.when(wg == 1)(schedule_barrier)

            def masked(sc, j):
                mask = _kv_tile_mask(kp_ref, ks_ref if c.has_segments else None, bi, j, bq, bk, q_pos_r, q_seg_r,
                                     window_s, col_layout, c)
                return jnp.where(mask, sc, MASK_VALUE)

            def kv_step(step, carry):
                acc, m, l_sum = carry
                slot = lax.rem(step, _i32(slots))
                j = lo + step

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    schedule_barrier()
                    return acc_ref[...]
                raw = pl.run_scoped(qk, plgpu.ACC((bq, bk), F32))
                plgpu.barrier_arrive(k_cons.at[slot])
                # Base-2 softmax: exp2 is the native instruction; log2(e) is folded into the scale,
                # and masking comes after it so MASK_VALUE stays finite.
                sc, _ = _scores(raw, c, LOG2E)
                if c.alibi:
                    k_pos_c = _load_vec(kp_ref.at[bi, pl.ds(j * bk, bk)], col_layout)
                    sc = sc - _alibi_bias(slope_r, q_pos_r, k_pos_c, sc.shape)
                full = _flags(q_info_wg, _info(ki_ref, bi, j, nk), window_s, c, j, nk)
                sc = _maybe_mask(sc, full, lambda x: masked(x, j), c)
                m_new = jnp.maximum(m, sc.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(sc - _row(m_new, sc.shape))
                acc = acc * _row(alpha, acc.shape)
                l_sum = l_sum * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                plgpu.barrier_arrive(sched)  # softmax done: let the other warpgroup's matmuls go
                plgpu.barrier_wait(v_bars.at[slot])
                plgpu.barrier_wait(sched)
                acc = _wgmma_acc(acc, p16, v_smem.at[slot], stage)
                plgpu.barrier_arrive(v_cons.at[slot])

                @pl.when(step + 1 < steps)
                def _():
                    plgpu.barrier_wait(k_bars.at[lax.rem(step + 1, _i32(slots))])
                return acc, m_new, l_sum

            acc, m, l_sum = lax.fori_loop(0, steps, kv_step, (acc, m, l_sum))
            pl.when(wg == 0)(schedule_barrier)
            # Rows that saw only masked scores have m == MASK_VALUE * log2(e) (or -inf): out 0, lse MASK.
            empty = m < MASK_VALUE * 0.5
            l_safe = jnp.where(empty, 1.0, l_sum)
            inv = jnp.where(empty, 0.0, 1.0 / l_safe)
            lse = jnp.where(empty, MASK_VALUE, (m + jnp.log2(l_safe)) * (1.0 / LOG2E))
            qo_smem[...] = (acc * _row(inv, acc.shape)).astype(dtype)
            lse_smem[...] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[bi, pl.ds(row0, bq), head])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, head, pl.ds(row0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kvh = lax.div(head, _i32(g))

            def src_index(step):
                return (lo + step,)
            copies = [(lambda j: k_ref.at[bi, pl.ds(j * bk, bk), kvh], k_smem),
                      (lambda j: v_ref.at[bi, pl.ds(j * bk, bk), kvh], v_smem)]
            _stream(copies, (k_bars, v_bars), (k_cons, v_cons), steps, slots, src_index)

    scratch = [plgpu.SMEM((wgs, bq, h), dtype, transforms=tr), plgpu.SMEM((slots, bk, h), dtype, transforms=tr),
               plgpu.SMEM((slots, bk, h), dtype, transforms=tr), plgpu.SMEM((wgs, bq), F32),
               plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=wgs),
               plgpu.Barrier(num_arrivals=wgs, num_barriers=slots), plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
               plgpu.Barrier(num_arrivals=wgs), *_stage_scratch(c, wgs, (bq, bk), dtype)]
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, n, t), F32))
    out, lse = _kernel_call(body, out_type, scratch, (n, n_tiles, b), ("heads", "q", "batch"), wgs + 1, c,
                            q, k, v, q_pos, k_pos, *_seg_args(q_seg, k_seg, c), *_slope_args(slopes, c),
                            q_info.reshape(-1), k_info.reshape(-1), kv_range.reshape(-1), window)
    return out, lse


# --------------------------------------------------------------------------------------------
# dQ: grid (N, T / (wgs * block_q_dq), B); K/V streamed over the visible key range.


def _dq(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, window, c: KernelConfig, slopes):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    dtype = q.dtype
    wgs = 2 if h <= 128 else 1  # SMEM: q, dO per warpgroup plus the K/V ring must fit in 227 KiB
    bq, bk = c.block_q_dq, c.block_kv_dq
    tile = wgs * bq
    n_tiles, nqb, nk = t // tile, t // bq, s // bk
    slots = min(2, nk)
    q_info, k_info = block_info(q_pos, q_seg, bq), block_info(k_pos, k_seg, bk)
    kv_range, _ = block_ranges(block_info(q_pos, q_seg, tile), k_info, window[0], c)
    tr = _transforms(dtype)

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, kp_ref, *refs):
        if c.has_segments:
            qs_ref, ks_ref, *refs = refs
        sl_ref, refs = _split_slopes(refs, c)
        bi, head, qt, wg = (lax.axis_index(a) for a in ("batch", "heads", "q", "wg"))
        refs, stage = _split_stage(refs, c, wg)
        qi_ref, ki_ref, kvr_ref, w_ref, dq_ref, q_smem2, do_smem2, k_smem, v_smem, \
            k_bars, v_bars, q_bars, do_bars, k_cons, v_cons = refs
        lo = kvr_ref[(bi * n_tiles + qt) * 2]
        steps = kvr_ref[(bi * n_tiles + qt) * 2 + 1] - lo + 1

        @pl.when(wg < wgs)
        def _compute():
            plgpu.set_max_registers(_compute_registers(wgs), action="increase")
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            row0 = qt * tile + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, bq), head], q_smem, q_bars.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[bi, pl.ds(row0, bq), head], do_smem, do_bars.at[wg])
            row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
            q_info_wg = _info(qi_ref, bi, qt * wgs + wg, nqb)
            window_s = w_ref[0]
            lse_r = _load_vec(lse_ref.at[bi, head, pl.ds(row0, bq)], row_layout)
            delta_r = _load_vec(delta_ref.at[bi, head, pl.ds(row0, bq)], row_layout)
            q_pos_r = _load_vec(qp_ref.at[bi, pl.ds(row0, bq)], row_layout)
            q_seg_r = _load_vec(qs_ref.at[bi, pl.ds(row0, bq)], row_layout) if c.has_segments else None
            slope_r = _load_vec(sl_ref.at[head, pl.ds(0, bq)], row_layout) if c.alibi else None
            plgpu.barrier_wait(q_bars.at[wg])
            plgpu.barrier_wait(do_bars.at[wg])

            def masked(p, j):
                mask = _kv_tile_mask(kp_ref, ks_ref if c.has_segments else None, bi, j, bq, bk, q_pos_r, q_seg_r,
                                     window_s, col_layout, c)
                return jnp.where(mask, p, 0.0)

            def kv_step(step, dq_acc):
                slot = lax.rem(step, _i32(slots))
                j = lo + step
                plgpu.barrier_wait(k_bars.at[slot])
                sc, t_cap = _scores(_wgmma(q_smem, k_smem.at[slot].transpose((1, 0)), (bq, bk)), c)
                if c.alibi:
                    k_pos_c = _load_vec(kp_ref.at[bi, pl.ds(j * bk, bk)], col_layout)
                    sc = sc - _alibi_bias(slope_r, q_pos_r, k_pos_c, sc.shape)
                p = jnp.exp2((sc - _row(lse_r, sc.shape)) * LOG2E)
                full = _flags(q_info_wg, _info(ki_ref, bi, j, nk), window_s, c, j, nk)
                p = _maybe_mask(p, full, lambda x: masked(x, j), c)
                plgpu.barrier_wait(v_bars.at[slot])
                dp = _wgmma(do_smem, v_smem.at[slot].transpose((1, 0)), (bq, bk))
                plgpu.barrier_arrive(v_cons.at[slot])
                ds = p * (dp - _row(delta_r, dp.shape))
                if t_cap is not None:
                    ds = ds * (1.0 - t_cap * t_cap)
                dq_acc = _wgmma_acc(dq_acc, ds.astype(dtype), k_smem.at[slot], stage)
                plgpu.barrier_arrive(k_cons.at[slot])
                return dq_acc

            dq_acc = lax.fori_loop(0, steps, kv_step, _zeros((bq, h), plgpu.Layout.WGMMA))
            q_smem[...] = (dq_acc * c.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, pl.ds(row0, bq), head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kvh = lax.div(head, _i32(g))
            copies = [(lambda j: k_ref.at[bi, pl.ds(j * bk, bk), kvh], k_smem),
                      (lambda j: v_ref.at[bi, pl.ds(j * bk, bk), kvh], v_smem)]
            _stream(copies, (k_bars, v_bars), (k_cons, v_cons), steps, slots, lambda step: (lo + step,))

    scratch = [plgpu.SMEM((wgs, bq, h), dtype, transforms=tr), plgpu.SMEM((wgs, bq, h), dtype, transforms=tr),
               plgpu.SMEM((slots, bk, h), dtype, transforms=tr), plgpu.SMEM((slots, bk, h), dtype, transforms=tr),
               plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=wgs),
               plgpu.Barrier(num_barriers=wgs),
               plgpu.Barrier(num_arrivals=wgs, num_barriers=slots), plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
               *_stage_scratch(c, wgs, (bq, bk), dtype)]
    return _kernel_call(body, jax.ShapeDtypeStruct(q.shape, dtype), scratch, (n, n_tiles, b), ("heads", "q", "batch"),
                        wgs + 1, c, q, k, v, do, lse, delta, q_pos, k_pos, *_seg_args(q_seg, k_seg, c),
                        *_slope_args(slopes, c), q_info.reshape(-1), k_info.reshape(-1), kv_range.reshape(-1), window)


# --------------------------------------------------------------------------------------------
# dK/dV: grid (K, S / (wgs * block_kv_dkv), B); (query head of the group, query block) pairs
# streamed over the visible query range. Scores are transposed, [bk, bq]: dV += P^T dO and
# dK += dS^T Q take P^T/dS^T straight from registers.


def _dkv(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, window, c: KernelConfig, slopes):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    dtype = q.dtype
    wgs = 2 if h <= 128 else 1
    bq, bk = c.block_q_dkv, c.block_kv_dkv
    tile = wgs * bk
    n_tiles, nkb, nq = s // tile, s // bk, t // bq
    slots = 2
    q_info, k_info = block_info(q_pos, q_seg, bq), block_info(k_pos, k_seg, bk)
    _, q_range = block_ranges(q_info, block_info(k_pos, k_seg, tile), window[0], c)
    tr = _transforms(dtype)

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, kp_ref, *refs):
        if c.has_segments:
            qs_ref, ks_ref, *refs = refs
        sl_ref, refs = _split_slopes(refs, c)
        bi, kvh, kt, wg = (lax.axis_index(a) for a in ("batch", "kv_heads", "kv", "wg"))
        refs, stage = _split_stage(refs, c, wg)
        qi_ref, ki_ref, qr_ref, w_ref, dk_ref, dv_ref, k_smem2, v_smem2, q_smem, do_smem, \
            q_bars, do_bars, k_bars, v_bars, q_cons, do_cons = refs
        lo = qr_ref[(bi * n_tiles + kt) * 2]
        per_head = qr_ref[(bi * n_tiles + kt) * 2 + 1] - lo + 1
        steps = g * per_head

        def src_index(step):  # step -> (query head, query block)
            return kvh * g + lax.div(step, per_head), lo + lax.rem(step, per_head)

        @pl.when(wg < wgs)
        def _compute():
            plgpu.set_max_registers(_compute_registers(wgs), action="increase")
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            row0 = kt * tile + wg * bk
            kv_blk = kt * wgs + wg
            plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(row0, bk), kvh], k_smem, k_bars.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[bi, pl.ds(row0, bk), kvh], v_smem, v_bars.at[wg])
            row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
            k_info_wg = _info(ki_ref, bi, kv_blk, nkb)
            window_s = w_ref[0]
            k_pos_r = _load_vec(kp_ref.at[bi, pl.ds(row0, bk)], row_layout)
            k_seg_r = _load_vec(ks_ref.at[bi, pl.ds(row0, bk)], row_layout) if c.has_segments else None
            plgpu.barrier_wait(k_bars.at[wg])
            plgpu.barrier_wait(v_bars.at[wg])

            def masked(p_t, i):
                shape = (bk, bq)
                q_pos_c = _load_vec(qp_ref.at[bi, pl.ds(i * bq, bq)], col_layout)
                q_seg_c = _load_vec(qs_ref.at[bi, pl.ds(i * bq, bq)], col_layout) if c.has_segments else None
                kv_index = None
                if c.kv_padded:  # built here, not hoisted: a [bk, bq] int32 tile would hold 32 registers
                    kv_index = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                mask = tile_mask(_col(q_pos_c, shape), _row(k_pos_r, shape),
                             None if q_seg_c is None else _col(q_seg_c, shape),
                             None if k_seg_r is None else _row(k_seg_r, shape), window_s, kv_index, c)
                return jnp.where(mask, p_t, 0.0)

            def q_step(step, carry):
                dk_acc, dv_acc = carry
                slot = lax.rem(step, _i32(slots))
                head, i = src_index(step)
                lse_c = _load_vec(lse_ref.at[bi, head, pl.ds(i * bq, bq)], col_layout)
                delta_c = _load_vec(delta_ref.at[bi, head, pl.ds(i * bq, bq)], col_layout)
                plgpu.barrier_wait(q_bars.at[slot])
                s_t, t_cap = _scores(_wgmma(k_smem, q_smem.at[slot].transpose((1, 0)), (bk, bq)), c)
                if c.alibi:
                    q_pos_c = _load_vec(qp_ref.at[bi, pl.ds(i * bq, bq)], col_layout)
                    slope_c = _load_vec(sl_ref.at[head, pl.ds(0, bq)], col_layout)
                    s_t = s_t - _alibi_bias(slope_c, q_pos_c, k_pos_r, s_t.shape, transposed=True)
                p_t = jnp.exp2((s_t - _col(lse_c, s_t.shape)) * LOG2E)
                full = _flags(_info(qi_ref, bi, i, nq), k_info_wg, window_s, c, kv_blk, nkb)
                p_t = _maybe_mask(p_t, full, lambda x: masked(x, i), c)
                plgpu.barrier_wait(do_bars.at[slot])
                dv_acc = _wgmma_acc(dv_acc, p_t.astype(dtype), do_smem.at[slot], stage)
                dp_t = _wgmma(v_smem, do_smem.at[slot].transpose((1, 0)), (bk, bq))
                plgpu.barrier_arrive(do_cons.at[slot])
                ds_t = p_t * (dp_t - _col(delta_c, dp_t.shape))
                if t_cap is not None:
                    ds_t = ds_t * (1.0 - t_cap * t_cap)
                dk_acc = _wgmma_acc(dk_acc, ds_t.astype(dtype), q_smem.at[slot], stage)
                plgpu.barrier_arrive(q_cons.at[slot])
                return dk_acc, dv_acc

            zeros = _zeros((bk, h), plgpu.Layout.WGMMA)
            dk_acc, dv_acc = lax.fori_loop(0, steps, q_step, (zeros, zeros))
            k_smem[...] = (dk_acc * c.scale).astype(dtype)
            v_smem[...] = dv_acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, pl.ds(row0, bk), kvh])
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, pl.ds(row0, bk), kvh])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            copies = [(lambda hd, i: q_ref.at[bi, pl.ds(i * bq, bq), hd], q_smem),
                      (lambda hd, i: do_ref.at[bi, pl.ds(i * bq, bq), hd], do_smem)]
            _stream(copies, (q_bars, do_bars), (q_cons, do_cons), steps, slots, src_index)

    scratch = [plgpu.SMEM((wgs, bk, h), dtype, transforms=tr), plgpu.SMEM((wgs, bk, h), dtype, transforms=tr),
               plgpu.SMEM((slots, bq, h), dtype, transforms=tr), plgpu.SMEM((slots, bq, h), dtype, transforms=tr),
               plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=wgs),
               plgpu.Barrier(num_barriers=wgs),
               plgpu.Barrier(num_arrivals=wgs, num_barriers=slots), plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
               *_stage_scratch(c, wgs, (bk, bq), dtype)]
    kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
    return _kernel_call(body, (kv_type, kv_type), scratch, (kh, n_tiles, b), ("kv_heads", "kv", "batch"), wgs + 1, c,
                        q, k, v, do, lse, delta, q_pos, k_pos, *_seg_args(q_seg, k_seg, c), *_slope_args(slopes, c),
                        q_info.reshape(-1), k_info.reshape(-1), q_range.reshape(-1), window)


def backward(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, window, c: KernelConfig, slopes=None):
    """dq, dk, dv on padded inputs. lse, delta: [B, N, T] f32 (delta = rowsum(dO * O) - dlse)."""
    _check(q, c)
    dq = _dq(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, window, c, slopes)
    dk, dv = _dkv(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, window, c, slopes)
    return dq, dk, dv
