"""NF4 (QLoRA's frozen base) against a float64 NumPy encoder written from the definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from inference import decode_layout as DL
from models import transformer as T
from models.lora import LoraKernel, LoraParam, apply_lora
from models.projection import Einsum, Kernel
from models.quant import NF4_LEVELS, NF4Kernel, nf4_dequantize, nf4_quantize, param_bytes, quantize_base
from tests.helpers import random_tokens, randomize_adapters, tiny_model_config

# the largest distance from a value in [-1, 1] to its nearest NF4 level: half the widest gap
HALF_GAP = float(np.max(np.diff(NF4_LEVELS.astype(np.float64))) / 2)


def _np_nf4(w_KN, bs):
    """float64 reference: per output column, blocks of `bs` along K scaled by their absmax and
    rounded to the nearest level; returns the dequantized [K, N] weight and the absmaxes."""
    w = np.asarray(w_KN, np.float64)
    k, n = w.shape
    levels = NF4_LEVELS.astype(np.float64)
    out = np.empty_like(w)
    absmax = np.empty((n, k // bs))
    for j in range(n):
        for b in range(k // bs):
            blk = w[b * bs:(b + 1) * bs, j]
            m = np.abs(blk).max() or 1.0
            absmax[j, b] = m
            idx = np.abs(blk[:, None] / m - levels[None, :]).argmin(1)
            out[b * bs:(b + 1) * bs, j] = levels[idx] * m
    return out, absmax


@pytest.mark.parametrize("shape,n_lead,n_contract,bs", [((128, 24), 0, 1, 64), ((4, 16, 40), 0, 2, 32),
                                                       ((3, 64, 8), 1, 1, 16)])
def test_nf4_equals_the_float64_definition(shape, n_lead, n_contract, bs):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 2.0, shape[-1])).astype(np.float32)
    arrays = nf4_quantize(jnp.asarray(w), n_lead, n_contract, block_size=bs)
    lead, w_shape = shape[:n_lead], shape[n_lead:]
    k = int(np.prod(w_shape[:n_contract]))
    assert arrays["codes"].shape == lead + (int(np.prod(w_shape[n_contract:])), k // bs, bs // 2)
    assert arrays["codes"].dtype == jnp.uint8
    got = np.asarray(nf4_dequantize(arrays, w_shape, jnp.float32)).reshape((-1, k, w.size // k // max(1, int(np.prod(lead)))))
    ws = w.reshape(got.shape)
    for layer in range(got.shape[0]):
        want, absmax = _np_nf4(ws[layer], bs)
        np.testing.assert_allclose(got[layer], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(arrays["absmax"]).reshape((-1,) + absmax.shape)[layer], absmax, rtol=1e-7)
        # the stated bound: every weight within half the widest level gap times its block's absmax
        err = np.abs(got[layer] - ws[layer])
        assert np.all(err <= HALF_GAP * np.repeat(absmax.T, bs, axis=0) + 1e-7)


def test_double_quantization_error_and_size():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((2, 512, 256)).astype(np.float32) * 0.02  # two stacked layers
    single = nf4_quantize(jnp.asarray(w), 1, 1, block_size=64)
    double = nf4_quantize(jnp.asarray(w), 1, 1, block_size=64, double_quant=True)
    assert double["absmax_codes"].shape == (2, 256 * 8 // 256, 256) and double["absmax_codes"].dtype == jnp.int8
    a1 = np.asarray(single["absmax"]).reshape(2, -1)
    q = np.asarray(double["absmax_codes"], np.float64) * np.asarray(double["absmax_scale"])[..., None]
    a2 = q.reshape(2, -1) + np.asarray(double["absmax_mean"])[:, None]
    # each absmax within half a step of its 8-bit block
    step = np.repeat(np.asarray(double["absmax_scale"]), 256, axis=-1)
    assert np.all(np.abs(a2 - a1) <= 0.5 * step + 1e-9)
    w1 = np.asarray(nf4_dequantize(single, (512, 256), jnp.float32))
    w2 = np.asarray(nf4_dequantize(double, (512, 256), jnp.float32))
    rel = lambda a: np.sqrt(np.mean((a - w) ** 2) / np.mean(w ** 2))  # noqa: E731
    assert rel(w1) < 0.12 and rel(w2) < rel(w1) * 1.02, (rel(w1), rel(w2))
    # storage: 4 bits + 32/64 of an absmax, or 4 + 8/64 + 32/(64*256) with double quantization
    n = w.size
    bits = lambda arrs: 8 * sum(np.asarray(v).nbytes for v in arrs.values()) / n  # noqa: E731
    assert bits(single) == pytest.approx(4.5, abs=1e-9)
    assert bits(double) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n * 2, abs=1e-9)
    # slicing the stacked arrays (what the layer scan does) dequantizes one layer
    layer1 = np.asarray(nf4_dequantize(jax.tree.map(lambda t: t[1], double), (512, 256), jnp.float32))
    np.testing.assert_array_equal(layer1, w2[1])


def test_quantize_base_keeps_the_embedding_and_the_function_close():
    cfg = tiny_model_config(num_layers=2, tie_embeddings=False, hidden_size=64, head_dim=16, intermediate_size=128)
    model = T.build(cfg, seed=10)
    base = quantize_base(model, block_size=32, double_quant=True)
    kernels = {"/".join(map(str, p)): m.kernel for p, m in nnx.iter_modules(base) if isinstance(m, Einsum)}
    assert all(isinstance(k, NF4Kernel) for p, k in kernels.items() if p.startswith("layers/"))
    assert type(kernels["lm_head"]) is Kernel and type(base.embed) is type(model.embed)
    x = random_tokens(np.random.default_rng(10), (2, 16), cfg.vocab_size)
    ref, got = np.asarray(model(x)), np.asarray(base(x))
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean())
    assert 1e-4 < rel < 0.2, rel
    # the stacked layers' projections take ~4.13/16 of their bf16 bytes
    layer_bytes = lambda m: param_bytes(m.layers)  # noqa: E731
    norms = sum(np.asarray(v).nbytes for v in jax.tree.leaves(nnx.state(model.layers)) if np.asarray(v).ndim == 2)
    bf16_proj = (layer_bytes(model) - norms) / 2
    assert (layer_bytes(base) - norms) / bf16_proj < 0.3
    with pytest.raises(ValueError, match="NF4 blocks of 48 do not divide the 64 input features"):
        quantize_base(model, block_size=48)


def test_qlora_adapters_train_alone_over_a_frozen_nf4_base_and_decode_in_the_layout():
    cfg = tiny_model_config(num_layers=2, dtype="bfloat16")
    base = quantize_base(T.build(cfg, seed=11), block_size=32)
    fresh = apply_lora(base, rank=4, alpha=8.0, seed=11)
    x = random_tokens(np.random.default_rng(11), (2, 10), cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(base(x)))
    model = randomize_adapters(fresh, seed=11)
    lk = [m.kernel for _, m in nnx.iter_modules(model) if isinstance(m, Einsum) and isinstance(m.kernel, LoraKernel)]
    assert len(lk) == 7 and all(isinstance(k.base, NF4Kernel) for k in lk)
    graphdef, adapters, frozen = nnx.split(model, LoraParam, ...)

    def loss(adapters):
        logits = nnx.merge(graphdef, adapters, frozen)(x).astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0])

    grads = jax.tree.leaves(jax.grad(loss)(adapters))
    assert len(grads) == 14 and all(float(jnp.abs(g.astype(jnp.float32)).max()) > 0 for g in grads)
    # the CPU decode layout leaves NF4 kernels (not plain weights) as they are, adapters included
    f32 = T.build(cfg.replace(dtype="float32"), seed=11)
    q32 = randomize_adapters(apply_lora(quantize_base(f32, block_size=32), rank=4, alpha=8.0, seed=11), seed=11)
    layout = DL.lay_out(q32, panel=16)
    blocks = [m.kernel for b in layout.blocks for _, m in nnx.iter_modules(b) if isinstance(m, Einsum)]
    assert all(isinstance(k, LoraKernel) and isinstance(k.base, NF4Kernel) for k in blocks)
    full = np.asarray(q32(x))
    cache = T.init_cache(q32.config, 2, 16)
    logits, cache = q32(x[:, :6], cache=cache)
    cache = DL.LayerCache.of(cache)
    steps = [np.asarray(logits)]
    for t in range(6, 10):
        lg, cache = layout(x[:, t:t + 1], cache=cache)
        steps.append(np.asarray(lg))
    np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)
