"""The models' `dot_product_attention(impl="pallas")` and a training run with the kernels.

On CPU `impl="pallas"` runs the TPU kernels in interpret mode; it must agree with `impl="xla"`
(the blockwise XLA path at T=256, the definition below that) in the forward pass, the gradients
and a few optimizer steps of the `tiny` preset's shape.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import dot_product_attention
from models.positions import alibi_slopes
from models.sharding import use_rules
from tests.helpers import random_tokens, tiny_model_config
from tests.pallas_kernels.cases import rel_err
from train import mesh as M
from train.loss import lm_loss_fn
from train.optimizer import make_optimizer
from train.state import create_state, make_train_step


def _packed(b, t, rng):
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    for i, cut in enumerate(rng.integers(t // 4, 3 * t // 4, b)):
        seg[i, cut:] = 2
        pos[i, cut:] = np.arange(t - cut)
        if i % 2:
            seg[i, -3:] = 0
    return seg, pos


@pytest.mark.parametrize("t,window,softcap,alibi", [
    (256, None, None, False), (256, 48, 20.0, False), (72, 16, None, False), (256, 48, None, True), (72, None, 20.0, True),
])
def test_dot_product_attention_pallas_matches_xla(t, window, softcap, alibi):
    rng = np.random.default_rng(t + (window or 0))
    b, n, kh, h = 2, 4, 2, 64
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, t, n, h), (b, t, kh, h), (b, t, kh, h)))
    seg, pos = _packed(b, t, rng)
    kw = dict(segment_ids=seg, positions=pos, causal=True, window=window, softcap=softcap, return_lse=True)
    if alibi:  # the blockwise XLA path (t=256) and the definition (t=72) against the kernels
        kw["alibi_slopes"] = jnp.asarray(alibi_slopes(n), jnp.float32)
    w = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)

    def run(impl):
        def loss(q, k, v):
            out, lse = dot_product_attention(q, k, v, impl=impl, **kw)
            return (out * w).sum() + (lse * (seg > 0)[:, None, :]).sum(), (out, lse)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, (out, lse)), grads = run("pallas")
    (_, (ref_out, ref_lse)), ref_grads = run("xla")
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def _batch(seed, b, t, vocab):
    r = np.random.default_rng(seed)
    inputs = random_tokens(r, (b, t), vocab)
    seg, pos = _packed(b, t, r)
    return {"inputs_BT": inputs, "targets_BT": (inputs * 7 + 3) % vocab, "positions_BT": pos,
            "segment_ids_BT": seg, "loss_mask_BT": (seg > 0).astype(np.float32)}


def _train(impl, steps=3, b=4, t=64):
    # The `tiny` preset's attention shape (d 256, 4 heads over 2 kv heads, head_dim 64, SwiGLU
    # 704), test-sized: 2 layers, a small vocabulary, 64-token rows; float32 compute.
    cfg = tiny_model_config(vocab_size=128, hidden_size=256, intermediate_size=704, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=64, max_seq_len=t, attention_impl=impl)
    mesh = M.make_mesh(M.resolve_shape({}, 1), devices=jax.devices()[:1])
    # SGD: Adam's normalisation turns 1e-9 gradient noise on untouched parameters into lr-sized
    # steps, which would hide (or fake) a mismatch in the parameters.
    tx, _ = make_optimizer(dict(name="sgd", lr=0.5, momentum=0.9, schedule="constant", warmup_steps=0,
                                weight_decay=0.0, clip_norm=1.0), steps)
    with jax.set_mesh(mesh), use_rules(None):
        graphdef, state = create_state(cfg, tx, seed=0, mesh=mesh)
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx))
        losses, norms = [], []
        for i in range(steps):
            state, m = step(state, _batch(i, b, t, cfg.vocab_size))
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
        return np.array(losses), np.array(norms), jax.device_get(state.params)


def test_training_tiny_shape_with_pallas_matches_xla():
    losses, norms, params = _train("pallas")
    ref_losses, ref_norms, ref_params = _train("xla")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
    assert losses[-1] < losses[0]  # training, not just agreeing
    for a, r in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, r, atol=1e-6, rtol=1e-5)
