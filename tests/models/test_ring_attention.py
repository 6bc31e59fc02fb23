"""Ring attention over the `sequence` axis equals full attention: outputs, lse and gradients."""

import jax
import numpy as np
import pytest

from models.attention import dot_product_attention
from models.ring_attention import zigzag_order
from pallas_kernels.reference import masked_attention
from train.mesh import make_mesh, resolve_shape


def _case(seed, b=2, t=64, n=4, kh=2, h=8, packed=True):
    r = np.random.default_rng(seed)
    q = r.standard_normal((b, t, n, h)).astype(np.float32)
    k = r.standard_normal((b, t, kh, h)).astype(np.float32)
    v = r.standard_normal((b, t, kh, h)).astype(np.float32)
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    if packed:  # row 0: two documents; row 1: padding at the end
        seg[0, 30:], pos[0, 30:] = 2, np.arange(t - 30)
        seg[1, 58:] = 0
    return q, k, v, pos, seg


@pytest.mark.parametrize("shards,zigzag,window,softcap,packed", [
    (4, True, None, None, True),  # causal, packed, load-balanced
    (4, False, None, None, False),  # contiguous blocks
    (2, True, 9, None, True),  # sliding window
    (8, True, None, 3.0, True),  # soft-capped, one chunk pair per device
])
def test_ring_equals_full_attention(shards, zigzag, window, softcap, packed):
    q, k, v, pos, seg = _case(shards + (window or 0), packed=packed)
    h = q.shape[-1]
    real = seg > 0
    order = zigzag_order(q.shape[1], shards) if zigzag else np.arange(q.shape[1])
    inv = np.argsort(order)
    cols = lambda x: x[:, order]  # noqa: E731
    mesh = make_mesh(resolve_shape({"data": 8 // shards, "sequence": shards}, 8))
    w = np.random.default_rng(1).standard_normal(q.shape[:2]).astype(np.float32)

    def ring_loss(q, k, v):
        o, lse = dot_product_attention(q, k, v, positions=cols(pos), segment_ids=cols(seg), window=window,
                                       softcap=softcap, return_lse=True)
        m = cols(real)
        return (o ** 2 * m[..., None, None]).sum() + (lse * (cols(w) * m)[:, None, :]).sum(), (o, lse)

    def ref_loss(q, k, v):
        o, lse = masked_attention(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True, window=window,
                                  softcap=softcap, scale=h ** -0.5, return_lse=True)
        return (o ** 2 * real[..., None, None]).sum() + (lse * (w * real)[:, None, :]).sum(), (o, lse)

    with jax.set_mesh(mesh):
        (_, (o, lse)), g = jax.jit(jax.value_and_grad(ring_loss, argnums=(0, 1, 2), has_aux=True))(
            cols(q), cols(k), cols(v))
        text = jax.jit(ring_loss).lower(cols(q), cols(k), cols(v)).compile().as_text()
    assert "collective-permute" in text  # really the ring, not a gather
    (_, (ro, rlse)), rg = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    o, lse = np.asarray(o)[:, inv], np.asarray(lse)[:, :, inv]
    np.testing.assert_allclose(o[real], np.asarray(ro)[real], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.moveaxis(lse, 1, 2)[real], np.moveaxis(np.asarray(rlse), 1, 2)[real],
                               atol=2e-5, rtol=1e-5)
    for a, b in zip(g, rg):
        a = np.asarray(a)[:, inv]
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-4 * np.abs(b).max(), rtol=1e-4)


def test_zigzag_order_and_errors():
    order = zigzag_order(16, 2)  # chunks of 4: device 0 gets chunks 0 and 3, device 1 chunks 1 and 2
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    with pytest.raises(ValueError, match="divisible by 2 x 4"):
        zigzag_order(20, 4)
    q, k, v, pos, seg = _case(0, t=36)
    mesh = make_mesh(resolve_shape({"data": 2, "sequence": 4}, 8))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="divisible by 2 x 4"):
        jax.jit(lambda q, k, v: dot_product_attention(q, k, v, positions=pos, segment_ids=seg))(q, k, v)


def test_ring_with_values_of_their_own_head_dim():
    """Multi-head latent attention's values (head dim 5 against q/k's 8) around a ring of 4."""
    q, k, _, pos, seg = _case(11)
    v = np.random.default_rng(12).standard_normal(k.shape[:3] + (5,)).astype(np.float32)
    real = seg > 0
    mesh = make_mesh(resolve_shape({"data": 2, "sequence": 4}, 8))

    def loss(fn):
        def f(q, k, v):
            o, lse = fn(q, k, v)
            return (o ** 2 * real[..., None, None]).sum() + (lse * real[:, None, :]).sum(), o
        return f

    ring = loss(lambda q, k, v: dot_product_attention(q, k, v, positions=pos, segment_ids=seg, return_lse=True))
    ref = loss(lambda q, k, v: masked_attention(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True,
                                                window=None, softcap=None, scale=8 ** -0.5, return_lse=True))
    with jax.set_mesh(mesh):
        (_, o), g = jax.jit(jax.value_and_grad(ring, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, ro), rg = jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert o.shape == q.shape[:3] + (5,)
    np.testing.assert_allclose(np.asarray(o)[real], np.asarray(ro)[real], atol=2e-5, rtol=1e-5)
    for a, b in zip(g, rg):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
