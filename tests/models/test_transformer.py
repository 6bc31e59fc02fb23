"""The decoder's structural properties: causality, packing, caching, precision, remat, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import transformer as T
from models.config import ModelConfig, param_count
from models.projection import mixed_einsum
from tests.helpers import random_tokens, tiny_model_config

GPT2_LIKE = dict(norm="layernorm", activation="gelu_tanh", gated_mlp=False, position_embedding="learned",
                 tie_embeddings=True, attention_bias=True, attention_out_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def llama():
    cfg = tiny_model_config()
    return T.build(cfg, seed=1), cfg


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causality(family):
    cfg = tiny_model_config(**(GPT2_LIKE if family == "gpt2" else {}))
    model = T.build(cfg, seed=2)
    r = np.random.default_rng(0)
    x = random_tokens(r, (2, 20), cfg.vocab_size)
    t = 11
    y = x.copy()
    y[:, t] = (y[:, t] + 1 + r.integers(0, cfg.vocab_size - 1, 2)) % cfg.vocab_size
    a, b = np.asarray(model(x)), np.asarray(model(y))
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-3  # and the change is seen from t on


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_documents_equal_each_alone(family):
    cfg = tiny_model_config(**(GPT2_LIKE if family == "gpt2" else {}))
    model = T.build(cfg, seed=3)
    r = np.random.default_rng(1)
    d1, d2 = random_tokens(r, (1, 9), cfg.vocab_size), random_tokens(r, (1, 13), cfg.vocab_size)
    packed = np.concatenate([d1, d2, np.zeros((1, 2), np.int32)], 1)  # 2 padding tokens
    seg = np.array([[1] * 9 + [2] * 13 + [0] * 2], np.int32)
    pos = np.array([list(range(9)) + list(range(13)) + [0, 0]], np.int32)
    out = np.asarray(model(packed, positions_BT=pos, segment_ids_BT=seg))
    np.testing.assert_allclose(out[:, :9], np.asarray(model(d1)), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[:, 9:22], np.asarray(model(d2)), atol=1e-5, rtol=1e-5)


def test_param_count_matches_built_model():
    for overrides in ({}, GPT2_LIKE, dict(qk_norm=True, attention_bias=True), dict(tie_embeddings=True)):
        cfg = tiny_model_config(**overrides)
        _, params = T.split_params(T.build(cfg))
        assert sum(x.size for x in jax.tree.leaves(params)) == param_count(cfg), overrides


def test_every_param_has_logical_axes(llama):
    model, _ = llama
    _, params = T.split_params(model)
    axes = T.logical_axes(model)
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
    for path, p in flat_p:
        assert len(flat_a[path]) == p.ndim, (path, flat_a[path], p.shape)
        if "layers" in str(path[0]):
            assert flat_a[path][0] == "layers"


def test_kv_cache_matches_full_recompute(llama):
    """Prefill then token-by-token decoding gives the full forward pass's logits (f32, 1e-5)."""
    model, cfg = llama
    r = np.random.default_rng(2)
    x = random_tokens(r, (3, 17), cfg.vocab_size)
    full = np.asarray(model(x))
    cache = T.init_cache(cfg, 3, 24)
    logits, cache = model(x[:, :8], cache=cache)
    outs = [np.asarray(logits)]
    for i in range(8, 17):
        logits, cache = model(x[:, i:i + 1], cache=cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert int(cache.index) == 17 and cache.max_len == 24


def test_kv_cache_left_padded_rows(llama):
    model, cfg = llama
    r = np.random.default_rng(3)
    a = random_tokens(r, (1, 10), cfg.vocab_size)
    b = random_tokens(r, (1, 6), cfg.vocab_size)
    toks = np.concatenate([a, np.concatenate([np.zeros((1, 4), np.int32), b], 1)], 0)
    seg = np.array([[1] * 10, [0] * 4 + [1] * 6], np.int32)
    pos = np.array([list(range(10)), [0] * 4 + list(range(6))], np.int32)
    logits, cache = model(toks, positions_BT=pos, segment_ids_BT=seg, cache=T.init_cache(cfg, 2, 16))
    np.testing.assert_allclose(np.asarray(logits[1, 4:]), np.asarray(model(b))[0], atol=1e-5, rtol=1e-5)
    nxt = random_tokens(r, (2, 1), cfg.vocab_size)
    step_logits, _ = model(nxt, positions_BT=np.array([[10], [6]], np.int32), cache=cache)
    ref_b = np.asarray(model(np.concatenate([b, nxt[1:]], 1)))[0, -1]
    np.testing.assert_allclose(np.asarray(step_logits[1, 0]), ref_b, atol=1e-5, rtol=1e-5)


def test_kv_cache_per_layer_windows_softcap_and_chunks():
    """Gemma-2-like layers (local/global windows, score softcap, post norms, MQA): decoding in
    chunks of 1 and 5 new tokens equals the full forward pass."""
    cfg = tiny_model_config(num_layers=3, layer_windows=(4, 0, 6), attn_logit_softcap=30.0, post_norms=True,
                            num_heads=4, num_kv_heads=1)
    model = T.build(cfg, seed=9)
    r = np.random.default_rng(9)
    x = random_tokens(r, (2, 23), cfg.vocab_size)
    full = np.asarray(model(x))
    logits, cache = model(x[:, :7], cache=T.init_cache(cfg, 2, 32))
    outs = [np.asarray(logits)]
    for lo, hi in [(7, 8), (8, 13), (13, 14), (14, 19), (19, 23)]:
        logits, cache = model(x[:, lo:hi], cache=cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_sliding_window_limits_context():
    cfg = tiny_model_config(sliding_window=4, num_layers=1)
    model = T.build(cfg, seed=4)
    r = np.random.default_rng(4)
    x = random_tokens(r, (1, 16), cfg.vocab_size)
    y = x.copy()
    y[0, 2] = (y[0, 2] + 5) % cfg.vocab_size
    a, b = np.asarray(model(x)), np.asarray(model(y))
    # one layer, window 4: token 2 is seen by queries 2..5 only
    assert np.abs(a[0, 2:6] - b[0, 2:6]).max() > 1e-4
    np.testing.assert_array_equal(a[0, 6:], b[0, 6:])


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_policies_give_the_same_gradients(remat):
    base = tiny_model_config()
    r = np.random.default_rng(5)
    batch = {"inputs_BT": random_tokens(r, (2, 16), base.vocab_size)}
    grads = []
    for cfg in (base, base.replace(remat=remat)):
        graphdef, params = T.split_params(T.build(cfg, seed=5))
        loss = lambda p: (T.apply(graphdef, p, batch) ** 2).mean()  # noqa: E731
        grads.append(jax.jit(jax.grad(loss))(params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_mixed_precision_dtypes():
    cfg = tiny_model_config(dtype="bfloat16")
    model = T.build(cfg, seed=6)
    _, params = T.split_params(model)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    r = np.random.default_rng(6)
    x = random_tokens(r, (2, 12), cfg.vocab_size)
    logits = model(x)
    assert logits.dtype == jnp.float32
    ref = np.asarray(T.build(cfg.replace(dtype="float32"), seed=6)(x))
    # bf16 compute stays close to f32 compute for the same weights
    assert np.abs(np.asarray(logits) - ref).max() < 0.05 * np.abs(ref).max() + 0.05
    # activations really run in bf16: the jaxpr's projections take bf16 operands
    jaxpr = str(jax.make_jaxpr(lambda x: model(x))(x))
    assert "bf16" in jaxpr and "preferred_element_type=float32" in jaxpr


def test_logit_softcap_bounds_logits():
    cfg = tiny_model_config(logit_softcap=2.0, init_std=0.5)
    logits = np.asarray(T.build(cfg, seed=7)(random_tokens(np.random.default_rng(7), (2, 8), cfg.vocab_size)))
    assert np.abs(logits).max() < 2.0
    assert np.abs(logits).max() > 1.5  # large init: the cap is active


def test_dropout_is_random_only_with_an_rng():
    cfg = tiny_model_config(dropout_rate=0.3)
    model = T.build(cfg, seed=8)
    x = random_tokens(np.random.default_rng(8), (2, 10), cfg.vocab_size)
    np.testing.assert_array_equal(model(x), model(x))
    a = model(x, dropout_rng=jax.random.key(0))
    b = model(x, dropout_rng=jax.random.key(1))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    np.testing.assert_array_equal(a, model(x, dropout_rng=jax.random.key(0)))


def test_dropout_keeps_the_expectation():
    x = jnp.ones((2000, 50))
    y = T.dropout(x, 0.25, jax.random.key(0))
    assert abs(float(y.mean()) - 1.0) < 0.01
    assert abs(float((y == 0).mean()) - 0.25) < 0.01


def test_qk_norm_changes_the_function_and_runs():
    """qk_norm normalises q and k per head: with the same weights the logits differ from
    qk_norm=False, and scaling the q and k projections leaves them unchanged, as it does not
    without qk_norm."""
    cfg = tiny_model_config(qk_norm=True)
    graphdef, params = T.split_params(T.build(cfg, seed=9))
    r = np.random.default_rng(9)
    attn = params["layers"]["attn"]
    for name in ("q_norm", "k_norm"):  # random scales: the init (ones) would hide an unused weight
        attn[name]["scale"] = jnp.asarray(1 + 0.3 * r.standard_normal(attn[name]["scale"].shape), jnp.float32)
    plain_graphdef, _ = T.split_params(T.abstract_model(cfg.replace(qk_norm=False)))
    plain = {**params, "layers": {**params["layers"], "attn": {k: v for k, v in attn.items()
                                                               if k not in ("q_norm", "k_norm")}}}

    def logits(graphdef, params, qk_scale=1.0):
        a = params["layers"]["attn"]
        a = {**a, "q": {"kernel": a["q"]["kernel"] * qk_scale}, "k": {"kernel": a["k"]["kernel"] * qk_scale}}
        params = {**params, "layers": {**params["layers"], "attn": a}}
        return np.asarray(T.apply(graphdef, params, {"inputs_BT": x}))

    x = random_tokens(r, (2, 16), cfg.vocab_size)
    normed, unnormed = logits(graphdef, params), logits(plain_graphdef, plain)
    assert np.isfinite(normed).all()
    assert np.abs(normed - unnormed).max() > 1e-2
    np.testing.assert_allclose(logits(graphdef, params, qk_scale=5.0), normed, atol=2e-4, rtol=0)
    assert np.abs(logits(plain_graphdef, plain, qk_scale=5.0) - unnormed).max() > 1e-2


def test_config_validation_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_model_config(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="remat='some'"):
        tiny_model_config(remat="some")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**tiny_model_config().to_dict(), "hiden_size": 3})


def test_init_params_sharded_on_a_mesh():
    from train.mesh import make_mesh

    cfg = tiny_model_config()
    mesh = make_mesh({"data": 1, "stage": 1, "fsdp": 4, "tensor": 2, "sequence": 1, "expert": 1})
    _, params = T.init_params(cfg, 0, mesh=mesh)
    q = params["layers"]["attn"]["q"]["kernel"]  # [L, D, N, H]: embed over fsdp, heads over tensor
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 8, 2, 8)
    # same values as an unsharded init with the same seed
    _, ref = T.init_params(cfg, 0)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(ref["layers"]["attn"]["q"]["kernel"]))


def test_mixed_einsum_gradients_and_backward_dtypes():
    r = np.random.default_rng(10)
    x = jnp.asarray(r.standard_normal((2, 5, 8)), jnp.float32)
    w = jnp.asarray(r.standard_normal((8, 3, 4)), jnp.float32)
    spec = "BTD,DNH->BTNH"

    def loss(fn):
        return lambda x, w: (fn(x, w).astype(jnp.float32) ** 2).sum()

    exact = jax.grad(loss(lambda x, w: jnp.einsum(spec, x, w)), argnums=(0, 1))
    with jax.enable_x64():
        ref = exact(np.asarray(x, np.float64), np.asarray(w, np.float64))
    f32 = jax.grad(loss(lambda x, w: mixed_einsum(spec, x, w, jnp.float32, jnp.float32)), argnums=(0, 1))(x, w)
    for g, rr in zip(f32, ref):
        np.testing.assert_allclose(g, rr, rtol=1e-5, atol=1e-5)
    bf = jax.grad(loss(lambda x, w: mixed_einsum(spec, x, w, jnp.bfloat16, jnp.bfloat16)), argnums=(0, 1))
    gx, gw = bf(x, w)
    assert gx.dtype == jnp.float32 and gw.dtype == jnp.float32  # gradients come back in the inputs' dtypes
    for g, rr in zip((gx, gw), ref):
        np.testing.assert_allclose(g, rr, rtol=5e-2, atol=5e-2 * np.abs(rr).max())
    # the backward pass's two matmuls take bf16 operands (neither silently runs in f32)
    eqns = jax.make_jaxpr(bf)(x, w).jaxpr.eqns
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def test_remat_policies_trade_memory_in_order():
    """Compiled temporary memory of a gradient: none > save_dots > full."""
    from train.loss import lm_loss_fn

    temps = {}
    for remat in ("none", "save_dots", "full"):
        cfg = tiny_model_config(remat=remat, num_layers=4, hidden_size=64, intermediate_size=256, max_seq_len=256)
        graphdef, params = T.split_params(T.abstract_model(cfg))
        shape = jax.ShapeDtypeStruct((4, 256), jnp.int32)
        batch = {"inputs_BT": shape, "targets_BT": shape, "loss_mask_BT": jax.ShapeDtypeStruct((4, 256), jnp.float32)}
        grad = jax.jit(jax.grad(lambda p, b: lm_loss_fn(graphdef)(p, b, None)[0]))
        temps[remat] = grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
    assert temps["none"] > 1.3 * temps["save_dots"] > 1.3 * temps["full"], temps
