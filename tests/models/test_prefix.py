"""Prefix tuning (models/prefix.py) against a float64 NumPy attention over the concatenated keys,
and against the model it extends: packing, decoding, the decode layout, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from inference.engine import generate
from models import peft
from models import transformer as T
from models.prefix import PrefixAttention, PrefixParam, apply_prefix, fold_prefixes, peft_compatible
from train.loss import lm_loss_fn
from train.state import TrainState, make_train_step
from tests.helpers import random_tokens, tiny_model_config


def _np_prefix_attention(q, k, v, pk, pv, pos, seg, *, scale, softcap=None):
    """float64: softmax over [prefix keys (seen by every query), the row's own keys (causal within
    a segment, padding masked)] for q [B,T,N,H], k/v [B,T,K,H], pk/pv [P,K,H]."""
    q, k, v, pk, pv = (np.asarray(a, np.float64) for a in (q, k, v, pk, pv))
    b, t, n, h = q.shape
    kh, p = k.shape[2], pk.shape[0]
    g = n // kh
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for ti in range(t):
            for ni in range(n):
                kv = ni // g
                keys = np.concatenate([pk[:, kv], k[bi, :, kv]])
                vals = np.concatenate([pv[:, kv], v[bi, :, kv]])
                own = (seg[bi] == seg[bi, ti]) & (pos[bi] <= pos[bi, ti])
                live = np.concatenate([np.ones(p, bool), own])
                s = keys @ q[bi, ti, ni] * scale
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                s = np.where(live, s, -np.inf)
                w = np.exp(s - s.max())
                out[bi, ti, ni] = (w / w.sum()) @ vals
    return out


@pytest.mark.parametrize("softcap,scale", [(None, None), (5.0, 0.3)])
def test_attend_equals_float64_attention_over_prefix_and_own_keys(softcap, scale):
    cfg = tiny_model_config(num_heads=4, num_kv_heads=2, head_dim=8)
    attn = T.Attention(cfg, rngs=nnx.Rngs(0))
    attn.softcap, attn.scale = softcap, scale
    pa = PrefixAttention(attn, key=jax.random.key(3), num_layers=None, num_kv_heads=2, head_dim=8, hidden_size=32,
                         length=3, reparam=0, std=0.7, param_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    b, t = 2, 9
    q = rng.normal(size=(b, t, 4, 8)).astype(np.float32)
    k = rng.normal(size=(b, t, 2, 8)).astype(np.float32)
    v = rng.normal(size=(b, t, 2, 8)).astype(np.float32)
    # row 0: two packed examples then padding; row 1: one example
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0], [1] * 9], np.int32)
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 0], list(range(9))], np.int32)
    out, lse, _ = pa.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), positions_BT=jnp.asarray(pos),
                            segment_ids_BT=jnp.asarray(seg), window=None, return_lse=True)
    want = _np_prefix_attention(q, k, v, pa.prefix_k[...], pa.prefix_v[...], pos, seg,
                                scale=scale or 1 / np.sqrt(8), softcap=softcap)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-6)
    assert np.isfinite(np.asarray(lse)).all()


def test_prefix_model_keeps_the_base_and_trains_only_the_prefixes():
    cfg = tiny_model_config(num_layers=2)
    base = T.build(cfg, seed=1)
    model = apply_prefix(base, length=4, seed=1)
    x = random_tokens(np.random.default_rng(1), (2, 10), cfg.vocab_size)
    assert isinstance(model.layers.attn, PrefixAttention) and not isinstance(base.layers.attn, PrefixAttention)
    trained = nnx.to_pure_dict(nnx.state(model, PrefixParam))
    assert jax.tree.map(np.shape, trained) == {"layers": {"attn": {"prefix_k": (2, 4, 2, 8), "prefix_v": (2, 4, 2, 8)}}}
    # the frozen part is the base's state, array for array
    _, _, frozen = nnx.split(model, PrefixParam, ...)
    base_state = nnx.to_pure_dict(nnx.state(base))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(frozen), base_state)
    # the prefixes move the logits, and only they differ from the base
    assert float(jnp.abs(model(x) - base(x)).max()) > 1e-3
    # one train step: the prefixes change, nothing else exists in the optimizer or the update
    graphdef, params, frozen = nnx.split(model, peft.trainable_filter("prefix"), ...)
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    tx = optax.adam(1e-2)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    assert sum(np.size(a) for a in jax.tree.leaves(state.opt_state)) == 2 * 2 * (2 * 4 * 2 * 8) + 1
    step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx))
    rng = np.random.default_rng(2)
    batch = {"inputs_BT": random_tokens(rng, (2, 10), cfg.vocab_size),
             "targets_BT": random_tokens(rng, (2, 10), cfg.vocab_size),
             "loss_mask_BT": np.ones((2, 10), np.float32), "segment_ids_BT": np.ones((2, 10), np.int32),
             "positions_BT": np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))}
    new, metrics = step(state, batch, frozen)
    assert float(np.abs(new.params["layers"]["attn"]["prefix_k"] - params["layers"]["attn"]["prefix_k"]).min()) > 0
    # gradients of the base's weights (were they trained) are non-zero: the frozen split is what stops them
    g = jax.grad(lambda f: lm_loss_fn(graphdef)((params, f), batch, None)[0])(frozen)
    assert float(np.abs(g["layers"]["attn"]["q"]["kernel"]).max()) > 0


def test_packed_rows_equal_each_example_alone():
    cfg = tiny_model_config(num_layers=2)
    model = apply_prefix(T.build(cfg, seed=2), length=3, reparam=6, seed=2)
    rng = np.random.default_rng(3)
    a, b = random_tokens(rng, (5,), cfg.vocab_size), random_tokens(rng, (4,), cfg.vocab_size)
    packed = np.concatenate([a, b, [0, 0, 0]])[None].astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
    pos = np.array([list(range(5)) + list(range(4)) + [0] * 3], np.int32)
    got = np.asarray(model(packed, positions_BT=pos, segment_ids_BT=seg))
    np.testing.assert_allclose(got[0, :5], np.asarray(model(a[None]))[0], atol=1e-5)
    np.testing.assert_allclose(got[0, 5:9], np.asarray(model(b[None]))[0], atol=1e-5)


def test_reparameterised_prefixes_fold_to_the_same_function():
    cfg = tiny_model_config(num_layers=2)
    model = apply_prefix(T.build(cfg, seed=4), length=5, reparam=12, seed=4)
    assert set(nnx.to_pure_dict(nnx.state(model, PrefixParam))["layers"]["attn"]) == {"embedding", "w1", "b1", "w2",
                                                                                      "b2"}
    folded = fold_prefixes(model)
    assert folded.layers.attn.prefix_k[...].shape == (2, 5, 2, 8) and folded.layers.attn.embedding is None
    x = random_tokens(np.random.default_rng(4), (2, 11), cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(folded(x)), np.asarray(model(x)), atol=1e-5)


@pytest.mark.parametrize("layout", [False, True])
def test_generate_with_prefixes_equals_greedy_full_forwards(layout):
    """inference.generate decodes with the prefixes (KV cache, left-padded rows, the CPU decode
    layout or not): each greedy token is the argmax of a cache-free forward of the text so far."""
    cfg = tiny_model_config(num_layers=2)
    model = apply_prefix(T.build(cfg, seed=5), length=4, seed=5, std=0.5)
    rng = np.random.default_rng(5)
    prompts = [list(random_tokens(rng, (n,), cfg.vocab_size)) for n in (3, 7)]
    outs = generate(model, prompts, max_new_tokens=6, decode_layout=layout)
    for p, o in zip(prompts, outs):
        logits = np.asarray(model(np.asarray([list(p) + list(o)], np.int32)))[0]  # causal: one forward serves
        assert list(o) == [int(np.argmax(logits[len(p) - 1 + i])) for i in range(len(o))]
    base_outs = generate(T.build(cfg, seed=5), prompts, max_new_tokens=6, decode_layout=layout)
    assert base_outs != outs  # the prefixes steer generation


def test_bad_settings_are_named():
    cfg = tiny_model_config()
    with pytest.raises(ValueError, match="length=0"):
        apply_prefix(T.build(cfg), length=0)
    with pytest.raises(ValueError, match="peft.prefix.reparam=-1"):
        peft.check({"method": "prefix", "prefix": {"length": 4, "reparam": -1}})
    with pytest.raises(ValueError, match="already has prefixes"):
        apply_prefix(apply_prefix(T.build(cfg), length=2), length=2)
    assert peft_compatible(cfg) == []
    assert "learned" in peft_compatible(cfg.replace(position_embedding="learned"))[0]
    assert "dynamic" in peft_compatible(cfg.replace(rope_scaling="dynamic", rope_scaling_factor=2.0))[0]
