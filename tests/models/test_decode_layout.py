"""The CPU decode layout (`models.transformer.decode_layout`): column-panel matmuls and unrolled
layers with per-layer caches compute what the model computes."""

import jax.numpy as jnp
import numpy as np
import pytest

from models import transformer as T
from models.quant import quantize_model
from tests.helpers import random_tokens, tiny_model_config


@pytest.mark.parametrize("spec,x_lead,w_shape", [
    ("BTD,DF->BTF", (2, 3), (48, 96)),
    ("BTD,DNH->BTNH", (3, 1), (40, 4, 16)),
    ("BTNH,NHD->BTD", (2, 5), (4, 8, 64)),
])
@pytest.mark.parametrize("many_rows", [False, True], ids=["panels", "reformed"])
def test_panel_matmul_matches_float64(spec, x_lead, w_shape, many_rows):
    r = np.random.default_rng(len(spec) + many_rows)
    n_contracted = len(T._contracted(spec))
    if many_rows:  # more rows than PANEL_MAX_ROWS: the matrix is re-formed and multiplied whole
        x_lead = (x_lead[0], T.PANEL_MAX_ROWS)
    x = r.standard_normal(x_lead + w_shape[:n_contracted]).astype(np.float32)
    w = r.standard_normal(w_shape).astype(np.float32)
    out_features = w_shape[n_contracted:]
    k, n = int(np.prod(w_shape[:n_contracted])), int(np.prod(out_features))
    panels = T.to_panels(jnp.asarray(w.reshape(k, n)), 16)
    # the layout: panel p holds columns p*16 .. p*16+15, row after row
    np.testing.assert_array_equal(np.asarray(panels[2, 5]), w.reshape(k, n)[5, 32:48])
    y = T.panel_matmul(jnp.asarray(x), panels, n_contracted, out_features, jnp.float32, jnp.float32)
    ref = np.einsum(spec, x.astype(np.float64), w.astype(np.float64))
    assert y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5, rtol=1e-5)


def _einsums(module):
    from flax import nnx
    return [m for _, m in nnx.iter_modules(module) if isinstance(m, T.Einsum)]


@pytest.mark.parametrize("overrides", [
    dict(vocab_size=96),  # Llama-like: GQA, untied head
    dict(num_layers=3, layer_windows=(4, 0, 6), attn_logit_softcap=30.0, post_norms=True, num_heads=4,
         num_kv_heads=1, tie_embeddings=True, vocab_size=128, attention_bias=True),  # Gemma-2-like, tied head
], ids=["llama", "gemma2"])
def test_decode_layout_decodes_like_the_model(overrides):
    cfg = tiny_model_config(**overrides)
    model = T.build(cfg, seed=21)
    r = np.random.default_rng(21)
    x = random_tokens(r, (2, 21), cfg.vocab_size)
    full = np.asarray(model(x))
    logits, cache = model(x[:, :7], cache=T.init_cache(cfg, 2, 32))  # prefill: the model's own layout
    fast = T.decode_layout(model, panel=16)
    packed = [m for block in fast.layer_list for m in _einsums(block) if m.panel]
    assert packed and all(m.kernel[...].ndim == 3 for m in packed)
    assert fast.head_panels is not None and fast.head_panels[...].shape == (cfg.vocab_size // 16, 32, 16)
    cache = cache.per_layer()
    assert len(cache.k) == cfg.num_layers and cache.max_len == 32
    outs = [np.asarray(logits)]
    for lo, hi in [(7, 8), (8, 13), (13, 14), (14, 21)]:
        logits, cache = fast(x[:, lo:hi], cache=cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
    # the model itself is untouched: stacked layers, plain kernels
    assert model.layer_list is None and not any(m.panel for m in _einsums(model))


def test_decode_layout_keeps_quantized_kernels():
    cfg = tiny_model_config()
    q = quantize_model(T.build(cfg, seed=22), "int8")
    r = np.random.default_rng(22)
    x = random_tokens(r, (2, 12), cfg.vocab_size)
    full = np.asarray(q(x))
    logits, cache = q(x[:, :5], cache=T.init_cache(cfg, 2, 16))
    fast = T.decode_layout(q, panel=16)
    assert all(m.quant is not None and m.panel is None for b in fast.layer_list for m in _einsums(b))
    assert fast.head_panels is None  # the int8 table stays the head
    step, _ = fast(x[:, 5:12], cache=cache.per_layer())
    np.testing.assert_allclose(np.asarray(step), full[:, 5:12], atol=1e-5, rtol=1e-5)


def test_the_cache_format_picks_the_layers():
    """A decode-layout model runs its stacked layers with the stacked cache (prefill) and its
    own blocks with the per-layer cache; the model as built has no blocks for the latter."""
    cfg = tiny_model_config(vocab_size=96)
    model = T.build(cfg, seed=23)
    fast = T.decode_layout(model, panel=16)
    x = random_tokens(np.random.default_rng(23), (2, 4), cfg.vocab_size)
    ref, ref_cache = model(x, cache=T.init_cache(cfg, 2, 8))
    got, got_cache = fast(x, cache=T.init_cache(cfg, 2, 8))
    assert fast.head_panels is not None
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))  # the same stacked layers and head
    assert not isinstance(got_cache.k, tuple)
    with pytest.raises(ValueError, match="decode_layout"):
        model(x, cache=T.init_cache(cfg, 2, 8).per_layer())


def test_bad_panel_widths_name_the_value():
    model = T.build(tiny_model_config(), seed=24)
    for bad in (0, -32, 16.0, True):
        with pytest.raises(ValueError, match=f"panel={bad!r} must be a positive int"):
            T.decode_layout(model, panel=bad)
    with pytest.raises(ValueError, match="96 output features do not divide into panels of 64"):
        T.to_panels(jnp.ones((8, 96)), 64)
