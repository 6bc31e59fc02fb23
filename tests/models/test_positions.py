"""Position schemes (models/positions.py): ALiBi and the sinusoidal table against closed forms in
float64, every implementation of ALiBi attention (blockwise XLA, the definition, the KV cache,
ring attention), and the model-level properties of each scheme (packing, shifts, NoPE training)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import transformer as T
from models.attention import cached_attention, dot_product_attention
from models.logprobs import token_nll
from models.positions import alibi_slopes, sinusoidal_embedding
from models.ring_attention import zigzag_order
from pallas_kernels.reference import masked_attention
from tests.helpers import random_tokens, tiny_model_config

SCHEMES = ("rope", "learned", "sinusoidal", "alibi", "none")


# --------------------------------------------------------------------------------------------
# ALiBi


def test_alibi_slopes_closed_form():
    # a power of two: the geometric sequence 2^(-8k/N)
    np.testing.assert_array_equal(alibi_slopes(8), [2.0 ** -k for k in range(1, 9)])
    np.testing.assert_array_equal(alibi_slopes(4), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])
    np.testing.assert_array_equal(alibi_slopes(1), [2.0 ** -8])
    # 12 heads: the 8-head slopes, then the odd terms of the 16-head sequence 2^(-k/2), k = 1, 3, 5, 7
    np.testing.assert_allclose(alibi_slopes(12), [2.0 ** -k for k in range(1, 9)]
                               + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5], rtol=1e-15)
    # 6 heads: the 4-head slopes 2^(-2k), then 2^(-1), 2^(-3) from the 8-head sequence
    np.testing.assert_allclose(alibi_slopes(6), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3],
                               rtol=1e-15)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"num_heads={bad!r} must be a positive integer"):
            alibi_slopes(bad)


def test_alibi_slopes_equal_bloom_in_transformers():
    """Hugging Face's BLOOM (`build_alibi_tensor`) for power-of-two and other head counts (it raises a
    float32 base to integer powers: a few float32 ulps apart)."""
    torch = pytest.importorskip("torch")
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for n in list(range(1, 18)) + [24, 40, 71, 112]:
        alibi = bloom.build_alibi_tensor(torch.ones(1, 2), n, torch.float32)  # [N, 1, 2]: slope * position
        np.testing.assert_allclose(np.float32(alibi_slopes(n)), alibi[:, 0, 1].numpy(), rtol=1e-6, err_msg=f"{n}")


def reference(q, k, v, *, q_pos, k_pos, q_seg, k_seg, slopes, causal=True, window=None, softcap=None):
    """Float64 NumPy, from the definition: scores q.k / sqrt(H), capped, minus slope * |dpos|,
    masked by segments / causality / window. Returns (out [B,T,N,H], lse [B,N,T]); rows with no
    visible key get 0 and -inf."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    out, lse = np.zeros((b, t, n, h)), np.full((b, n, t), -np.inf)
    for bi, ni in itertools.product(range(b), range(n)):
        ki = ni // (n // kh)
        scores = q[bi, :, ni] @ k[bi, :, ki].T / np.sqrt(h)
        if softcap:
            scores = softcap * np.tanh(scores / softcap)
        d = q_pos[bi][:, None].astype(np.int64) - k_pos[bi][None, :]
        scores = scores - slopes[ni] * np.abs(d)
        allowed = q_seg[bi][:, None] == k_seg[bi][None, :]
        if causal:
            allowed &= d >= 0
        if window:
            allowed &= (d < window) if causal else (np.abs(d) < window)
        for ti in range(t):
            if allowed[ti].any():
                sc = scores[ti][allowed[ti]]
                m = sc.max()
                p = np.exp(sc - m)
                lse[bi, ni, ti] = m + np.log(p.sum())
                out[bi, ti, ni] = (p / p.sum()) @ v[bi, allowed[ti], ki]
    return out, lse


def _packed_qkv(seed, b=2, t=40, n=4, kh=2, h=16):
    r = np.random.default_rng(seed)
    q, k, v = (r.standard_normal(shape).astype(np.float32) for shape in ((b, t, n, h), (b, t, kh, h), (b, t, kh, h)))
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    cut = t // 3
    seg[0, cut:], pos[0, cut:] = 2, np.arange(t - cut)  # two documents, positions restarting
    seg[1, t - 5:] = 0  # padding
    return q, k, v, pos, seg


@pytest.mark.parametrize("t,n,kh,window,softcap,causal", [
    (40, 4, 2, None, None, True),  # the definition's path (no blocks at this length)
    (40, 6, 3, 7, 4.0, True),  # six heads (non-power-of-two slopes), window, soft-cap
    (40, 4, 4, 9, None, False),  # bidirectional: a symmetric bias and window
    (256, 4, 1, None, None, True),  # the blockwise path (blocks of 64), MQA
    (256, 8, 2, 40, 3.0, True),  # blockwise with a window and soft-cap
])
def test_alibi_attention_matches_float64_reference(t, n, kh, window, softcap, causal):
    q, k, v, pos, seg = _packed_qkv(t + n + (window or 0), t=t, n=n, kh=kh)
    slopes = np.asarray(alibi_slopes(n))
    out, lse = dot_product_attention(q, k, v, segment_ids=seg, positions=pos, causal=causal, window=window,
                                     softcap=softcap, return_lse=True, alibi_slopes=np.float32(slopes))
    ref_out, ref_lse = reference(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, slopes=slopes, causal=causal,
                                 window=window, softcap=softcap)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(out)[real], ref_out[real], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.moveaxis(np.asarray(lse), 1, 2)[real], np.moveaxis(ref_lse, 1, 2)[real],
                               atol=2e-5, rtol=1e-5)
    without = dot_product_attention(q, k, v, segment_ids=seg, positions=pos, causal=causal, window=window,
                                    softcap=softcap)
    assert np.abs(np.asarray(out) - np.asarray(without))[real].max() > 1e-2  # the bias matters here


@pytest.mark.parametrize("t,window", [(40, None), (256, 33)])
def test_alibi_gradients_equal_autodiff_of_the_definition(t, window):
    """The blockwise path's custom VJP (and the plain path) against autodiff of the masked
    definition; no gradient reaches the slopes."""
    q, k, v, pos, seg = _packed_qkv(5 + t, t=t)
    slopes = jnp.asarray(alibi_slopes(4), jnp.float32)
    w = np.random.default_rng(0).standard_normal(q.shape).astype(np.float32)
    real = (seg > 0)[:, None, :]

    def loss(fn):
        def f(q, k, v, sl):
            out, lse = fn(q, k, v, sl)
            return (out * w).sum() + jnp.where(real, lse, 0.0).sum()
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

    ours = loss(lambda q, k, v, sl: dot_product_attention(q, k, v, segment_ids=seg, positions=pos, window=window,
                                                          return_lse=True, alibi_slopes=sl))(q, k, v, slopes)
    ref = loss(lambda q, k, v, sl: masked_attention(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True,
                                                    window=window, softcap=None, scale=0.25, return_lse=True,
                                                    alibi_slopes=jax.lax.stop_gradient(sl)))(q, k, v, slopes)
    for a, b in zip(ours[:3], ref[:3]):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=1e-4)
    np.testing.assert_array_equal(ours[3], np.zeros(4, np.float32))


@pytest.mark.parametrize("t,window", [(1, None), (3, 5)])
def test_alibi_cached_attention_decode_shape(t, window):
    """Queries against a heads-first cache with empty (segment 0) and left-padded slots: the bias
    comes from the cache's positions, not its slot indices."""
    s, n, kh, h = 16, 4, 2, 16
    r = np.random.default_rng(t)
    q = r.standard_normal((2, t, n, h)).astype(np.float32)
    k, v = (r.standard_normal((2, s, kh, h)).astype(np.float32) for _ in range(2))
    k_seg = np.array([[1] * 13 + [0] * 3, [0] * 3 + [1] * 13], np.int32)
    k_pos = np.array([list(range(13)) + [0] * 3, [0] * 3 + list(range(13))], np.int32)
    q_seg, q_pos = np.ones((2, t), np.int32), np.tile(np.arange(13 - t, 13, dtype=np.int32), (2, 1))
    slopes = np.asarray(alibi_slopes(n))
    out = cached_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids=(q_seg, k_seg),
                           positions=(q_pos, k_pos), window=window, alibi_slopes=np.float32(slopes))
    ref, _ = reference(q, k, v, q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg, slopes=slopes, window=window)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    # the same through dot_product_attention's (q, kv) pairs
    out2 = dot_product_attention(q, k, v, segment_ids=(q_seg, k_seg), positions=(q_pos, k_pos), window=window,
                                 alibi_slopes=np.float32(slopes))
    np.testing.assert_allclose(out2, ref, atol=2e-5, rtol=1e-5)


def test_alibi_ring_attention_equals_full_attention():
    """4 sequence shards, zig-zag order, packed rows: outputs and gradients (the bias rides with the
    positions each block carries)."""
    from train.mesh import make_mesh, resolve_shape

    q, k, v, pos, seg = _packed_qkv(3, t=64, h=8)
    slopes = jnp.asarray(alibi_slopes(4), jnp.float32)
    order = zigzag_order(64, 4)
    inv = np.argsort(order)
    cols = lambda x: x[:, order]  # noqa: E731
    real = seg > 0
    mesh = make_mesh(resolve_shape({"data": 2, "sequence": 4}, 8))

    def ring_loss(q, k, v):
        o = dot_product_attention(q, k, v, positions=cols(pos), segment_ids=cols(seg), window=20, alibi_slopes=slopes)
        return (o ** 2 * cols(real)[..., None, None]).sum(), o

    def ref_loss(q, k, v):
        o = masked_attention(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True, window=20, softcap=None,
                             scale=8 ** -0.5, return_lse=False, alibi_slopes=slopes)
        return (o ** 2 * real[..., None, None]).sum(), o

    with jax.set_mesh(mesh):
        (_, o), g = jax.jit(jax.value_and_grad(ring_loss, argnums=(0, 1, 2), has_aux=True))(cols(q), cols(k), cols(v))
        text = jax.jit(ring_loss).lower(cols(q), cols(k), cols(v)).compile().as_text()
    assert "collective-permute" in text
    (_, ro), rg = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(np.asarray(o)[:, inv][real], np.asarray(ro)[real], atol=2e-5, rtol=1e-5)
    for a, b in zip(g, rg):
        np.testing.assert_allclose(np.asarray(a)[:, inv], b, atol=1e-4 * np.abs(b).max(), rtol=1e-4)


def test_alibi_errors_name_the_value():
    q, k, v, pos, seg = _packed_qkv(0)
    with pytest.raises(ValueError, match=r"alibi_slopes must be a float \[N=4\] array .* got float32\[2\]"):
        dot_product_attention(q, k, v, alibi_slopes=np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"alibi_slopes must be a float \[N=4\] array .* got int32\[4\]"):
        dot_product_attention(q, k, v, alibi_slopes=np.ones(4, np.int32))
    with pytest.raises(ValueError, match="impl='cudnn' does not support alibi_slopes; use impl='xla' or 'pallas'"):
        dot_product_attention(q, k, v, impl="cudnn", alibi_slopes=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="position_embedding='alibi' .* model.attention_impl='cudnn'"):
        tiny_model_config(position_embedding="alibi", attention_impl="cudnn")
    with pytest.raises(ValueError, match=r"position_embedding='rotary' is not valid; expected one of \('rope', "
                                         r"'learned', 'sinusoidal', 'alibi', 'none'\)"):
        tiny_model_config(position_embedding="rotary")


@pytest.mark.parametrize("scheme", ["alibi", "sinusoidal", "none"])
def test_no_importable_family_expresses_the_new_schemes(scheme):
    """Llama, Mistral, Qwen, Gemma and GPT-2 use RoPE or a learned table: export names the
    difference instead of writing a checkpoint that computes something else."""
    from models.hf.families import infer_architecture

    with pytest.raises(ValueError, match=f"LlamaForCausalLM: differs in position_embedding='{scheme}' "
                                         f"\\(it has 'rope'\\)"):
        infer_architecture(tiny_model_config(position_embedding=scheme))


# --------------------------------------------------------------------------------------------
# Sinusoidal


def test_sinusoidal_table_closed_form():
    d = 64
    pos = np.array([[0, 1, 2, 7, 100, 511, 1000, 4095]], np.int32)
    got = np.asarray(sinusoidal_embedding(jnp.asarray(pos), d), np.float64)
    i = np.arange(d // 2, dtype=np.float64)
    angle = pos[0, :, None].astype(np.float64) / 10000.0 ** (2 * i / d)
    ref = np.zeros((pos.shape[1], d))
    ref[:, 0::2], ref[:, 1::2] = np.sin(angle), np.cos(angle)
    # float32 angles: an error of about position x 6e-8 radians
    err = np.abs(got[0] - ref)
    assert (err <= 2e-7 * (1 + pos[0, :, None])).all(), err.max(axis=1)
    np.testing.assert_array_equal(got[0, 0], np.tile([0.0, 1.0], d // 2))  # position 0: sin 0, cos 0
    with pytest.raises(ValueError, match="must be even for sinusoidal positions"):
        tiny_model_config(position_embedding="sinusoidal", hidden_size=33)


def test_sinusoidal_model_adds_the_table_and_has_no_parameters():
    """Same seed, same parameters as NoPE (the table is not a parameter); the first residual
    stream differs from NoPE's by exactly the table at each token's position, packed rows included."""
    sin_model = T.build(tiny_model_config(position_embedding="sinusoidal"), seed=4)
    nope = T.build(tiny_model_config(position_embedding="none"), seed=4)
    sin_params, nope_params = T.split_params(sin_model)[1], T.split_params(nope)[1]
    assert jax.tree.structure(sin_params) == jax.tree.structure(nope_params)
    for a, b in zip(jax.tree.leaves(sin_params), jax.tree.leaves(nope_params)):
        np.testing.assert_array_equal(a, b)
    x = random_tokens(np.random.default_rng(0), (1, 12), 97)
    pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]], np.int32)  # two packed documents
    diff = np.asarray(sin_model.embed_inputs(x, pos)) - np.asarray(nope.embed_inputs(x, pos))
    np.testing.assert_allclose(diff, sinusoidal_embedding(jnp.asarray(pos), 32), atol=1e-7)


# --------------------------------------------------------------------------------------------
# Every scheme in the model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_packed_documents_equal_each_alone(scheme):
    model = T.build(tiny_model_config(position_embedding=scheme), seed=3)
    r = np.random.default_rng(1)
    d1, d2 = random_tokens(r, (1, 9), 97), random_tokens(r, (1, 13), 97)
    packed = np.concatenate([d1, d2, np.zeros((1, 2), np.int32)], 1)
    seg = np.array([[1] * 9 + [2] * 13 + [0] * 2], np.int32)
    pos = np.array([list(range(9)) + list(range(13)) + [0, 0]], np.int32)
    out = np.asarray(model(packed, positions_BT=pos, segment_ids_BT=seg))
    np.testing.assert_allclose(out[:, :9], np.asarray(model(d1)), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[:, 9:22], np.asarray(model(d2)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_what_each_scheme_reads_from_positions(scheme):
    """Relative schemes (RoPE, ALiBi) ignore a shift of every position; NoPE ignores any
    order-preserving relabelling; absolute tables (learned, sinusoidal) see both."""
    model = T.build(tiny_model_config(position_embedding=scheme), seed=5)
    x = random_tokens(np.random.default_rng(2), (2, 16), 97)
    base = np.asarray(model(x))
    shifted = np.asarray(model(x, positions_BT=np.tile(np.arange(16, dtype=np.int32) + 21, (2, 1))))
    stretched = np.asarray(model(x, positions_BT=np.tile(3 * np.arange(16, dtype=np.int32) + 2, (2, 1))))
    shift_free = scheme in ("rope", "alibi", "none")
    if shift_free:
        np.testing.assert_allclose(shifted, base, atol=2e-5, rtol=1e-5)
    else:
        assert np.abs(shifted - base).max() > 1e-4
    if scheme == "none":
        np.testing.assert_allclose(stretched, base, atol=1e-6, rtol=1e-6)
        attn = model.layers.attn
        assert model.pos_embed is None and attn.rope_config is None and attn.alibi is None
    else:
        assert np.abs(stretched - base).max() > 1e-4  # a random model: small, but 30x float error


def _progression_batch(rng, b, length, vocab):
    """Rows start + step * i (mod vocab) with a random start and step per row: the next token
    follows from the previous ones."""
    start, step = rng.integers(0, vocab, (b, 1)), rng.integers(1, 6, (b, 1))
    seq = ((start + step * np.arange(length + 1)) % vocab).astype(np.int32)
    return seq[:, :-1], seq[:, 1:]


def test_nope_trains():
    """No RoPE, no table: the loss still falls far below chance on a task that needs the previous
    tokens, and the trained model decodes through the KV cache as its cache-free forward does."""
    from inference import generate

    vocab, length = 32, 32
    cfg = tiny_model_config(vocab_size=vocab, hidden_size=64, intermediate_size=128, head_dim=16, max_seq_len=length,
                            position_embedding="none")
    graphdef, params = T.split_params(T.build(cfg, seed=0))
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss(p):
            return token_nll(T.apply(graphdef, p, {"inputs_BT": x}), y)[0][:, 2:].mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(50):
        params, opt_state, value = step(params, opt_state, *_progression_batch(rng, 16, length, vocab))
        losses.append(float(value))
    assert losses[0] > 0.9 * np.log(vocab)  # chance at the start
    assert np.mean(losses[-5:]) < 0.3 * losses[0], losses[::10]
    model = T.merge_params(graphdef, params)
    x, _ = _progression_batch(np.random.default_rng(1), 1, 8, vocab)
    seq = x[0].tolist()
    expected = []
    for _ in range(6):
        expected.append(int(np.argmax(np.asarray(model(np.asarray([seq + expected], np.int32)))[0, -1])))
    assert generate(model, [seq], max_new_tokens=6) == [expected]
