"""Ring attention: context parallelism over the mesh's `sequence` axis.

With the sequence sharded over s devices, each device keeps its block of queries and passes its
block of keys and values around a ring (`jax.lax.ppermute`) s times, attending to each arriving
block and merging the partial results through their log-sum-exp:

    lse = logaddexp(lse_a, lse_b),  out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.

Masks come from positions and segment ids carried with the blocks, so token order inside the
sequence does not matter. That makes causal load balancing a data layout: `zigzag_order(T, s)`
puts chunks i and 2s-1-i of the sequence on device i (every device then holds an early and a
late chunk, and the same amount of unmasked work), and the train loop permutes each batch's
columns that way before sharding (a loss summed over tokens does not change). Each device
splits its query and key blocks in two and skips (`lax.cond`) the sub-block pairs the mask
empties entirely, so causal attention does about half the work of full attention.

ALiBi (`alibi_slopes`) needs nothing more: its bias is a function of the positions that travel
with the blocks, so each block pair adds its own part before the merge.

Only the `sequence` axis is manual (`jax.shard_map(..., axis_names={"sequence"})`); batch and
heads stay sharded by the compiler as everywhere else. Gradients are autodiff's: ppermute's
transpose sends the key / value gradients back around the ring.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels.reference import MASK_VALUE, attention_mask, masked_attention

AXIS = "sequence"


def sequence_shards() -> int:
    """Size of the current mesh's `sequence` axis (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[AXIS])


def zigzag_order(seq_len: int, shards: int) -> np.ndarray:
    """Column order that gives device i chunks i and 2s-1-i of 2s equal chunks (causal balance)."""
    if seq_len % (2 * shards):
        raise ValueError(f"zig-zag ring attention needs the sequence length {seq_len} divisible by 2 x "
                         f"{shards} sequence shards")
    c = seq_len // (2 * shards)
    chunks = np.arange(seq_len).reshape(2 * shards, c)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)])


def _merge(out, lse, out_i, lse_i):
    """Combine two partial attentions [B,T,N,H] (f32) with their lse [B,N,T]."""
    new = jnp.logaddexp(lse, lse_i)
    w, w_i = jnp.exp(lse - new), jnp.exp(lse_i - new)
    to_btn = lambda x: jnp.swapaxes(x, 1, 2)[..., None]  # noqa: E731  [B,N,T] -> [B,T,N,1]
    return out * to_btn(w) + out_i * to_btn(w_i), new


def _attend_block(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, *, causal, window, softcap, scale):
    """Attention of a query block to a key block, skipped when the mask is empty. f32 out, lse."""
    b, t, n, h = q.shape[:3] + v.shape[-1:]  # the output has v's head dim

    def compute(_):
        out, lse = masked_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg, causal=causal,
                                    window=window, softcap=softcap, scale=scale, return_lse=True,
                                    alibi_slopes=slopes)
        return out.astype(jnp.float32), lse

    def skip(_):
        return jnp.zeros((b, t, n, h), jnp.float32), jnp.full((b, n, t), MASK_VALUE, jnp.float32)

    live = attention_mask(q_pos, k_pos, q_seg, k_seg, causal=causal, window=window).any()
    return jax.lax.cond(live, compute, skip, None)


def _local(q, k, v, pos, seg, window, slopes=None, *, causal, softcap, scale, shards):
    """One device's share: its query block against every key block, arriving around the ring."""
    b, t, n, h = q.shape[:3] + v.shape[-1:]  # the output has v's head dim
    half = t // 2
    q_parts = [(q[:, :half], pos[:, :half], seg[:, :half]), (q[:, half:], pos[:, half:], seg[:, half:])]
    perm = [(i, (i + 1) % shards) for i in range(shards)]

    def step(carry, _):
        outs, k, v, kpos, kseg = carry
        new_outs = []
        for (qb, qpos, qseg), (out, lse) in zip(q_parts, outs):
            for lo, hi in ((0, half), (half, t)):  # key sub-blocks: skip the empty pairs
                o_i, l_i = _attend_block(qb, k[:, lo:hi], v[:, lo:hi], qpos, kpos[:, lo:hi], qseg, kseg[:, lo:hi],
                                         slopes, causal=causal, window=window, softcap=softcap, scale=scale)
                out, lse = _merge(out, lse, o_i, l_i)
            new_outs.append((out, lse))
        k, v, kpos, kseg = (jax.lax.ppermute(x, AXIS, perm) for x in (k, v, kpos, kseg))
        return (new_outs, k, v, kpos, kseg), None

    init_out = [(jnp.zeros((b, half, n, h), jnp.float32), jnp.full((b, n, half), MASK_VALUE, jnp.float32))
                for _ in range(2)]
    (outs, *_), _ = jax.lax.scan(step, (init_out, k, v, pos, seg), None, length=shards)
    out = jnp.concatenate([o for o, _ in outs], axis=1).astype(q.dtype)
    lse = jnp.concatenate([lse for _, lse in outs], axis=2)
    return out, lse


def ring_attention(q_BTNH, k_BSKH, v_BSKH, *, positions, segment_ids=None, causal=True, window=None, softcap=None,
                   scale=None, return_lse=False, alibi_slopes=None):
    """Self-attention of a sequence sharded over the mesh's `sequence` axis (T == S; one set of
    positions / segment ids shared by queries and keys). Same semantics as
    `dot_product_attention` on real tokens (ALiBi slopes [N] included); padding queries
    (segment 0) get zeros."""
    shards = sequence_shards()
    b, t, n, h = q_BTNH.shape
    if t % (2 * shards):
        raise ValueError(f"ring attention needs the sequence length {t} divisible by 2 x {shards} sequence shards")
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    scale = (1.0 / h ** 0.5) if scale is None else scale
    window = jnp.asarray(0 if window is None else window, jnp.int32)  # 0 = global
    seq = P(None, AXIS)
    fn = functools.partial(_local, causal=causal, softcap=softcap, scale=float(scale), shards=shards)
    args = [q_BTNH, k_BSKH, v_BSKH, positions, segment_ids, window]
    specs = [P(None, AXIS, None, None)] * 3 + [seq, seq, P()]
    if alibi_slopes is not None:  # replicated over the ring: every block pair uses every head's slope
        args.append(jax.lax.stop_gradient(jnp.asarray(alibi_slopes, jnp.float32)))
        specs.append(P())
    out, lse = jax.shard_map(fn, in_specs=tuple(specs), out_specs=(P(None, AXIS, None, None), P(None, None, AXIS)),
                             axis_names=frozenset({AXIS}), check_vma=False)(*args)
    return (out, lse) if return_lse else out
