"""The CPU decode layout (inference/decode_layout.py): column-panel matmuls and unrolled layers
with per-layer caches compute what the model computes, through every kernel variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from inference import decode_layout as DL
from models import transformer as T
from models.lora import LoraKernel, apply_lora
from models.projection import Einsum, Kernel, contracted
from models.quant import QuantKernel, quantize_model
from tests.helpers import random_tokens, randomize_adapters, tiny_model_config


@pytest.mark.parametrize("spec,x_lead,w_shape", [
    ("BTD,DF->BTF", (2, 3), (48, 96)),
    ("BTD,DNH->BTNH", (3, 1), (40, 4, 16)),
    ("BTNH,NHD->BTD", (2, 5), (4, 8, 64)),
])
@pytest.mark.parametrize("many_rows", [False, True], ids=["panels", "reformed"])
def test_panel_matmul_matches_float64(spec, x_lead, w_shape, many_rows):
    r = np.random.default_rng(len(spec) + many_rows)
    n_contracted = len(contracted(spec))
    if many_rows:  # more rows than MAX_ROWS: the matrix is re-formed and multiplied whole
        x_lead = (x_lead[0], DL.MAX_ROWS)
    x = r.standard_normal(x_lead + w_shape[:n_contracted]).astype(np.float32)
    w = r.standard_normal(w_shape).astype(np.float32)
    out_features = w_shape[n_contracted:]
    k, n = int(np.prod(w_shape[:n_contracted])), int(np.prod(out_features))
    panels = DL.to_panels(jnp.asarray(w.reshape(k, n)), 16)
    # the layout: panel p holds columns p*16 .. p*16+15, row after row
    np.testing.assert_array_equal(np.asarray(panels[2, 5]), w.reshape(k, n)[5, 32:48])
    y = DL.panel_matmul(jnp.asarray(x), panels, n_contracted, out_features, jnp.float32, jnp.float32)
    ref = np.einsum(spec, x.astype(np.float64), w.astype(np.float64))
    assert y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5, rtol=1e-5)
    # as a kernel: the same product, and `dense` gives the weight back exactly
    kernel = DL.PanelKernel.lay_out(Kernel(jnp.asarray(w)), spec, 16)
    np.testing.assert_array_equal(np.asarray(kernel.dense(jnp.float32)), w)
    np.testing.assert_allclose(np.asarray(kernel.einsum(spec, jnp.asarray(x), jnp.float32, jnp.float32)), ref,
                               atol=1e-5, rtol=1e-5)


def _kernels(module):
    return [m.kernel for _, m in nnx.iter_modules(module) if isinstance(m, Einsum)]


def _decode_in_chunks(model, layout, x, prefill, chunks, max_len=32):
    """Logits of x: the model's prefill of x[:, :prefill], then the layout's calls on each chunk."""
    logits, cache = model(x[:, :prefill], cache=T.init_cache(model.config, x.shape[0], max_len))
    cache = DL.LayerCache.of(cache)
    outs = [np.asarray(logits)]
    for lo, hi in chunks:
        logits, cache = layout(x[:, lo:hi], cache=cache)
        outs.append(np.asarray(logits))
    return np.concatenate(outs, 1)


@pytest.mark.parametrize("overrides", [
    dict(vocab_size=96),  # Llama-like: GQA, untied head
    dict(num_layers=3, layer_windows=(4, 0, 6), attn_logit_softcap=30.0, post_norms=True, num_heads=4,
         num_kv_heads=1, tie_embeddings=True, vocab_size=128, attention_bias=True),  # Gemma-2-like, tied head
    dict(vocab_size=96, attention_out_bias=True, mlp_bias=True, logit_softcap=20.0),  # biases, capped logits
], ids=["llama", "gemma2", "biases"])
def test_layout_decodes_like_the_model(overrides):
    cfg = tiny_model_config(**overrides)
    model = T.build(cfg, seed=21)
    x = random_tokens(np.random.default_rng(21), (2, 21), cfg.vocab_size)
    full = np.asarray(model(x))
    layout = DL.lay_out(model, panel=16)
    assert len(layout.blocks) == cfg.num_layers
    panels = [k for block in layout.blocks for k in _kernels(block) if isinstance(k, DL.PanelKernel)]
    # every stacked kernel whose output features divide into 16-column panels, once per layer
    divisible = [m for _, m in nnx.iter_modules(model.layers) if isinstance(m, Einsum)
                 and np.prod(m.kernel.shape[1 + len(contracted(m.spec)):]) % 16 == 0]
    assert len(divisible) >= 5 and len(panels) == len(divisible) * cfg.num_layers
    assert isinstance(layout.head.kernel, DL.PanelKernel)
    assert layout.head.kernel.panels.shape == (cfg.vocab_size // 16, 32, 16)
    got = _decode_in_chunks(model, layout, x, 7, [(7, 8), (8, 13), (13, 14), (14, 21)])
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=1e-5)
    # the model itself is untouched: stacked layers, plain kernels
    assert all(type(k) is Kernel for k in _kernels(model))


def test_layout_keeps_quantized_kernels():
    cfg = tiny_model_config()
    q = quantize_model(T.build(cfg, seed=22), "int8")
    x = random_tokens(np.random.default_rng(22), (2, 12), cfg.vocab_size)
    full = np.asarray(q(x))
    layout = DL.lay_out(q, panel=16)
    assert all(isinstance(k, QuantKernel) for b in layout.blocks for k in _kernels(b))
    assert layout.head is None  # the int8 table stays the head
    got = _decode_in_chunks(q, layout, x, 5, [(5, 12)], max_len=16)
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=1e-5)


def test_layout_reaches_through_lora_kernels():
    """A LoRA kernel wraps a plain `base`: the layout lays the base out as panels and keeps the
    adapters as they are; decoding equals the adapted model's full forward pass."""
    cfg = tiny_model_config(vocab_size=96, num_layers=2)
    model = apply_lora(T.build(cfg, seed=25), rank=2, alpha=4.0, targets=("attn/*", "mlp/*"), seed=25)
    randomize_adapters(model, seed=25)
    x = random_tokens(np.random.default_rng(25), (2, 14), cfg.vocab_size)
    full = np.asarray(model(x))
    plain = np.asarray(T.build(cfg, seed=25)(x))
    assert np.abs(full - plain).max() > 1e-3  # the adapters change the function
    layout = DL.lay_out(model, panel=16)
    wrapped = [k for b in layout.blocks for k in _kernels(b)]
    assert len(wrapped) == 7 * 2  # q k v o gate up down, per layer
    assert all(isinstance(k, LoraKernel) and isinstance(k.base, DL.PanelKernel) for k in wrapped)
    got = _decode_in_chunks(model, layout, x, 6, [(6, 7), (7, 11), (11, 14)])
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=1e-5)
    # the adapted model is untouched: its adapters still wrap plain stacked kernels
    assert all(isinstance(k, LoraKernel) and type(k.base) is Kernel for k in _kernels(model.layers))


def test_bad_panel_widths_name_the_value():
    model = T.build(tiny_model_config(), seed=24)
    for bad in (0, -32, 16.0, True):
        with pytest.raises(ValueError, match=f"panel={bad!r} must be a positive int"):
            DL.lay_out(model, panel=bad)
    with pytest.raises(ValueError, match="96 output features do not divide into panels of 64"):
        DL.to_panels(jnp.ones((8, 96)), 64)
