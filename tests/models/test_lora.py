"""LoRA adapters (models/lora.py) against float64 NumPy and against the model they adapt."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import transformer as T
from models.lora import LoraKernel, LoraParam, adapter_count, apply_lora, merge_lora, target_paths, unmerge_lora
from models.projection import Einsum, Kernel
from models.quant import QuantKernel, quantize_model
from tests.helpers import random_tokens, randomize_adapters, tiny_model_config

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def _lora_kernels(model):
    return {"/".join(map(str, p)): m.kernel for p, m in nnx.iter_modules(model)
            if isinstance(m, Einsum) and isinstance(m.kernel, LoraKernel)}


def test_fresh_adapters_leave_the_model_unchanged_and_train_only_a_and_b():
    cfg = tiny_model_config(num_layers=2)
    base = T.build(cfg, seed=1)
    x = random_tokens(np.random.default_rng(1), (2, 10), cfg.vocab_size)
    model = apply_lora(base, rank=4, alpha=8.0, seed=1)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(base(x)))  # B = 0
    assert set(_lora_kernels(model)) == {f"layers/{'attn' if n in 'qkvo' else 'mlp'}/{n}" for n in ALL}
    d, f, n, k, h, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 2
    q = _lora_kernels(model)["layers/attn/q"]
    assert q.a.shape == (L, d, 4) and q.b.shape == (L, 4, n, h) and float(np.abs(q.b[...]).max()) == 0.0
    assert float(np.abs(q.a[...]).max()) <= 1 / np.sqrt(d) and float(np.abs(q.a[...]).max()) > 0.5 / np.sqrt(d)
    o = _lora_kernels(model)["layers/attn/o"]
    assert o.a.shape == (L, n, h, 4) and o.b.shape == (L, 4, d)  # o contracts heads x head_dim
    expected = L * 4 * ((d + n * h) + 2 * (d + k * h) + (n * h + d) + 2 * (d + f) + (f + d))
    assert adapter_count(model) == expected
    assert all(isinstance(v, LoraParam) for v in jax.tree.leaves(nnx.state(model, LoraParam),
                                                                  is_leaf=lambda v: isinstance(v, nnx.Variable)))
    # base untouched
    assert all(type(m.kernel) is Kernel for _, m in nnx.iter_modules(base) if isinstance(m, Einsum))


def _np_projection(x, w, a, b, scale, spec):
    """float64 reference: einsum(spec, x, W + scale A B) with A B the [in..., out...] weight."""
    x, w, a, b = (np.asarray(t, np.float64) for t in (x, w, a, b))
    r = a.shape[-1]
    delta = (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(w.shape)
    return np.einsum(spec, x, w + scale * delta)


@pytest.mark.parametrize("name,spec", [("q", "BTD,DNH->BTNH"), ("o", "BTNH,NHD->BTD"), ("down", "BTF,FD->BTD")])
@pytest.mark.parametrize("rslora", [False, True])
def test_adapted_projection_equals_float64_reference(name, spec, rslora):
    cfg = tiny_model_config(num_layers=2)
    model = apply_lora(T.build(cfg, seed=2), rank=3, alpha=5.0, rslora=rslora, targets=(name,), seed=2)
    randomize_adapters(model, seed=2)
    kern = next(iter(_lora_kernels(model).values()))
    assert kern.scale == pytest.approx(5.0 / (np.sqrt(3) if rslora else 3))
    layer0 = jax.tree.map(lambda t: t[0], nnx.state(kern))  # one layer of the stacked kernel
    k0 = nnx.merge(nnx.graphdef(kern), layer0)
    w = k0.base[...]
    x = np.random.default_rng(2).standard_normal((2, 5) + w.shape[:len(spec.split(",")[0]) - 2]).astype(np.float32)
    got = np.asarray(k0.einsum(spec, jnp.asarray(x), jnp.float32, jnp.float32))
    want = _np_projection(x, w, k0.a[...], k0.b[...], kern.scale, spec)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # dense() is the same weight: W + scale A B
    dense = np.asarray(k0.dense(jnp.float32), np.float64)
    a2 = np.asarray(k0.a[...], np.float64).reshape(-1, 3)
    b2 = np.asarray(k0.b[...], np.float64).reshape(3, -1)
    np.testing.assert_allclose(dense, np.asarray(w, np.float64) + kern.scale * (a2 @ b2).reshape(w.shape), atol=1e-6)


def test_merge_equals_adapters_and_unmerge_gives_the_base_back():
    cfg = tiny_model_config(num_layers=2)
    base = T.build(cfg, seed=3)
    model = randomize_adapters(apply_lora(base, rank=4, alpha=16.0, seed=3), seed=3)
    x = random_tokens(np.random.default_rng(3), (2, 12), cfg.vocab_size)
    adapted = np.asarray(model(x))
    assert np.abs(adapted - np.asarray(base(x))).max() > 1e-2  # the adapters move the logits
    merged = merge_lora(model)
    assert all(type(m.kernel) is Kernel for _, m in nnx.iter_modules(merged) if isinstance(m, Einsum))
    np.testing.assert_allclose(np.asarray(merged(x)), adapted, rtol=1e-5, atol=1e-5)
    back = unmerge_lora(merged, model)
    base_kernels = {"/".join(map(str, p)): m.kernel for p, m in nnx.iter_modules(base) if isinstance(m, Einsum)}
    for path, kern in _lora_kernels(back).items():
        np.testing.assert_allclose(np.asarray(kern.base[...]), np.asarray(base_kernels[path][...]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(back(x)), adapted, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_adapters_only():
    cfg = tiny_model_config(num_layers=2)
    model = randomize_adapters(apply_lora(T.build(cfg, seed=4), rank=2, alpha=2.0, targets=("v", "up"), seed=4), seed=4)
    x = random_tokens(np.random.default_rng(4), (2, 9), cfg.vocab_size)
    graphdef, adapters, frozen = nnx.split(model, LoraParam, ...)

    def loss(adapters, frozen):
        logits = nnx.merge(graphdef, adapters, frozen)(x)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0])

    g_adapt, g_frozen = jax.grad(loss, argnums=(0, 1))(adapters, frozen)
    flat = jax.tree.leaves(g_adapt)
    assert len(flat) == 4 and all(float(jnp.abs(g).max()) > 0 for g in flat)  # A and B of v and up
    # the split is exact: every adapter weight is in `adapters`, nothing else is
    assert sum(g.size for g in flat) == adapter_count(model)
    # a frozen parameter's gradient exists mathematically, but the split lets a step skip it:
    # here it is only checked that the adapters' is not the frozen one's
    assert sum(t.size for t in jax.tree.leaves(g_frozen)) > 10 * adapter_count(model)


def test_lora_dropout_is_unbiased_and_off_without_a_key():
    cfg = tiny_model_config(num_layers=1)
    model = randomize_adapters(apply_lora(T.build(cfg, seed=5), rank=4, alpha=4.0, targets=("q",),
                                          dropout_rate=0.5, seed=5), seed=5, std=0.2)
    kern = next(iter(_lora_kernels(model).values()))
    k0 = nnx.merge(nnx.graphdef(kern), jax.tree.map(lambda t: t[0], nnx.state(kern)))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 3, cfg.hidden_size)), jnp.float32)
    spec = "BTD,DNH->BTNH"
    clean = np.asarray(k0.einsum(spec, x, jnp.float32, jnp.float32))
    base = np.asarray(k0.base.einsum(spec, x, jnp.float32, jnp.float32))
    runs = jax.vmap(lambda k: k0.einsum(spec, x, jnp.float32, jnp.float32, rng=k))(
        jax.random.split(jax.random.key(5), 4000))
    runs = np.asarray(runs)
    assert np.abs(runs[0] - clean).max() > 1e-3  # a key turns dropout on
    # inverted dropout: the adapter path's mean over masks is the clean one (4000 draws)
    err = np.abs(runs.mean(0) - clean).max()
    spread = np.abs(clean - base).max()
    assert err < 0.1 * spread, (err, spread)
    # through the model: a dropout key changes the output only where adapters have dropout
    toks = random_tokens(np.random.default_rng(5), (1, 8), cfg.vocab_size)
    eval_out = np.asarray(model(toks))
    np.testing.assert_array_equal(eval_out, np.asarray(model(toks)))
    assert np.abs(np.asarray(model(toks, dropout_rng=jax.random.key(1))) - eval_out).max() > 1e-4


def test_adapters_on_a_quantized_base():
    cfg = tiny_model_config(num_layers=2)
    q = quantize_model(T.build(cfg, seed=6), "int8")
    model = randomize_adapters(apply_lora(q, rank=2, alpha=4.0, targets=("attn/*",), seed=6), seed=6)
    kernels = _lora_kernels(model)
    assert len(kernels) == 4 and all(isinstance(k.base, QuantKernel) for k in kernels.values())
    assert all(k.a[...].dtype == jnp.float32 for k in kernels.values())
    x = random_tokens(np.random.default_rng(6), (2, 7), cfg.vocab_size)
    merged = merge_lora(model)  # dequantized W + scale A B
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="quantized base cannot take the merged weights back"):
        unmerge_lora(merged, model)


def test_targets_and_bad_values_are_named(caplog):
    model = T.build(tiny_model_config(num_layers=1, tie_embeddings=False), seed=7)
    assert target_paths(model, ("q",)) == ["layers/attn/q"]
    assert target_paths(model, ("mlp/*",)) == ["layers/mlp/down", "layers/mlp/gate", "layers/mlp/up"]
    assert target_paths(model, ("attn/[qv]",)) == ["layers/attn/q", "layers/attn/v"]
    assert target_paths(model, ("lm_head", "attn/o")) == ["layers/attn/o", "lm_head"]
    with pytest.raises(ValueError, match=r"\['q_proj', 'k_proj'\] select no projection.*layers/attn/q"):
        apply_lora(model, rank=2, alpha=2.0, targets=("q_proj", "k_proj"))
    with caplog.at_level(logging.WARNING):  # one pattern of several selecting nothing: said, not fatal
        assert target_paths(model, ("q", "q_proj")) == ["layers/attn/q"]
    assert "['q_proj'] select no projection" in caplog.text
    with pytest.raises(ValueError, match="rank=0 is not valid"):
        apply_lora(model, rank=0, alpha=2.0)
    with pytest.raises(ValueError, match="dropout=1.0 is not valid"):
        apply_lora(model, rank=2, alpha=2.0, dropout_rate=1.0)
    twice = apply_lora(model, rank=2, alpha=2.0, targets=("q",))
    with pytest.raises(ValueError, match="layers/attn/q already has a LoRA adapter"):
        apply_lora(twice, rank=2, alpha=2.0, targets=("q",))
