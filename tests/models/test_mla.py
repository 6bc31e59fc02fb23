"""Multi-head latent attention (models/mla.py): the absorbed decode against the naive form and
the cache-free forward, the latent-sized cache, training, generation, meshes, options."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import transformer as T
from models.config import ModelConfig, flops_per_token, param_count
from models.mla import MlaAttention, absorbed_attention, absorbed_is_cheaper, softmax_scale
from pallas_kernels.reference import masked_attention
from tests.helpers import random_tokens, tiny_model_config

# Hq = 8 + 4 = 12 query/key dims per head against Hv = 8 value dims; rope dims = head_dim = 4
MLA = dict(q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


def mla_config(**overrides):
    mla = {**MLA, **overrides.pop("mla", {})}
    base = dict(num_heads=4, num_kv_heads=4, head_dim=mla["qk_rope_head_dim"], mla=mla)
    return tiny_model_config(**{**base, **overrides})


@pytest.fixture(scope="module")
def mla_model():
    cfg = mla_config()
    return T.build(cfg, seed=1), cfg


def _set_form(model, form):
    model.layers.attn.cache_form = form
    return model


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, params, x, cache=None, positions=None, segment_ids=None):
    """The model's call, compiled (the eager call re-traces its layer scan every time)."""
    return T.merge_params(graphdef, params)(x, cache=cache, positions_BT=positions, segment_ids_BT=segment_ids)


def _forward(model, x, **kw):
    return _run(*T.split_params(model), x, **kw)


def test_config_round_trips_and_selects_the_layer(mla_model):
    model, cfg = mla_model
    assert isinstance(model.layers.attn, MlaAttention) and cfg.attention == "mla"
    assert tiny_model_config().attention == "mha" and not tiny_model_config().mla.enabled
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg)
    assert cfg.to_dict()["mla"] == MLA


@pytest.mark.parametrize("change,match", [
    (dict(head_dim=8), r"model.head_dim=8 must equal model.mla.qk_rope_head_dim=4"),
    (dict(num_kv_heads=2), r"model.num_kv_heads=2 must equal model.num_heads=4"),
    (dict(position_embedding="learned"), "decoupled keys need 'rope'"),
    (dict(qk_norm=True), "qk_norm=True is not supported with latent attention"),
    (dict(mla=dict(qk_rope_head_dim=3), head_dim=3), "must be even"),
    (dict(mla=dict(v_head_dim=0)), r"v_head_dim=0 > 0"),
    (dict(mla=dict(kv_lora_rank=-1)), r"kv_lora_rank=-1 must be >= 0"),
])
def test_config_errors_name_the_value(change, match):
    with pytest.raises(ValueError, match=match):
        mla_config(**change)


def test_config_errors_for_unknown_keys_and_q_rank_alone():
    with pytest.raises(ValueError, match=r"unknown model.mla keys \['kv_rank'\]"):
        tiny_model_config(mla=dict(kv_rank=4))
    with pytest.raises(ValueError, match="q_lora_rank=8 needs model.mla.kv_lora_rank > 0"):
        tiny_model_config(mla=dict(q_lora_rank=8))


@pytest.mark.parametrize("overrides", [{}, dict(mla=dict(q_lora_rank=0)),
                                       dict(attention_bias=True, attention_out_bias=True)])
def test_param_count_axes_and_flops(overrides):
    cfg = mla_config(**overrides)
    model = T.build(cfg)
    _, params = T.split_params(model)
    assert sum(x.size for x in jax.tree.leaves(params)) == param_count(cfg)
    axes = T.logical_axes(model)
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))[path]
        assert len(a) == p.ndim and (a[0] == "layers") == (str(path[0].key) == "layers"), (path, a)
    d, n, m = cfg.hidden_size, cfg.num_heads, cfg.mla
    q = d * m.q_lora_rank + m.q_lora_rank * n * 12 if m.q_lora_rank else d * n * 12
    attn = q + d * (16 + 4) + 16 * n * (8 + 8) + n * 8 * d
    matmul = cfg.num_layers * (attn + 3 * d * cfg.intermediate_size) + d * cfg.vocab_size
    assert flops_per_token(cfg, 32)["forward"] == 2 * matmul + cfg.num_layers * 2 * n * 32 * (12 + 8)


def test_softmax_scale_with_yarn_mscale():
    assert softmax_scale(mla_config()) == pytest.approx(12 ** -0.5)
    cfg = mla_config(rope_scaling="yarn", rope_scaling_factor=40.0, rope_original_max_seq_len=16, rope_mscale=0.707,
                     rope_mscale_all_dim=0.707)
    mscale = 0.1 * 0.707 * np.log(40.0) + 1.0
    assert softmax_scale(cfg) == pytest.approx(12 ** -0.5 * mscale ** 2)
    assert softmax_scale(mla_config(query_pre_attn_scalar=9.0)) == pytest.approx(1 / 3)


def test_causal_and_packed_documents_equal_each_alone(mla_model):
    model, cfg = mla_model
    r = np.random.default_rng(1)
    d1, d2 = random_tokens(r, (1, 9), cfg.vocab_size), random_tokens(r, (1, 13), cfg.vocab_size)
    packed = np.concatenate([d1, d2, np.zeros((1, 2), np.int32)], 1)
    seg = np.array([[1] * 9 + [2] * 13 + [0] * 2], np.int32)
    pos = np.array([list(range(9)) + list(range(13)) + [0, 0]], np.int32)
    out = np.asarray(model(packed, positions_BT=pos, segment_ids_BT=seg))
    np.testing.assert_allclose(out[:, :9], np.asarray(model(d1)), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[:, 9:22], np.asarray(model(d2)), atol=1e-5, rtol=1e-5)


def test_absorbed_attention_equals_expanded_keys_and_values():
    """The absorbed form against the definition on explicitly expanded per-head keys and values
    (float64 reference), with left padding, a window and a soft-cap."""
    r = np.random.default_rng(2)
    b, t, s, n, hn, hr, hv, rank = 2, 3, 11, 4, 8, 4, 6, 16
    q_nope, q_pe = r.standard_normal((b, t, n, hn)), r.standard_normal((b, t, n, hr))
    c, k_pe = r.standard_normal((b, s, rank)), r.standard_normal((b, s, hr))
    w_uk, w_uv = r.standard_normal((rank, n, hn)) / 4, r.standard_normal((rank, n, hv)) / 4
    k_seg = np.ones((b, s), np.int32)
    k_seg[1, :4] = 0  # left padding
    k_pos = np.stack([np.arange(s), np.r_[np.zeros(4), np.arange(s - 4)]]).astype(np.int32)
    q_pos, q_seg = k_pos[:, -t:], k_seg[:, -t:]
    kw = dict(segment_ids=(q_seg, k_seg), positions=(q_pos, k_pos), window=6, softcap=5.0, scale=0.3)
    f32 = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]  # noqa: E731
    out, lse = absorbed_attention(*f32(q_nope, q_pe, c, k_pe, w_uk, w_uv), return_lse=True, **kw)
    with jax.enable_x64():
        k = np.concatenate([np.einsum("bsr,rnh->bsnh", c, w_uk), np.broadcast_to(k_pe[:, :, None], (b, s, n, hr))], -1)
        v = np.einsum("bsr,rnv->bsnv", c, w_uv)
        ref, ref_lse = masked_attention(np.concatenate([q_nope, q_pe], -1), k, v, q_pos=q_pos, k_pos=k_pos, q_seg=q_seg,
                                        k_seg=k_seg, causal=True, window=6, softcap=5.0, scale=0.3, return_lse=True)
    err = float(np.abs(np.asarray(out) - np.asarray(ref)).max())
    print(f"absorbed vs expanded (float64) max abs error {err:.2e}")
    assert out.shape == (b, t, n, hv) and err < 1e-5
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_form_choice_by_cost():
    cfg = ModelConfig(vocab_size=102400, hidden_size=5120, intermediate_size=12288, num_layers=60, num_heads=128,
                      num_kv_heads=128, head_dim=64, max_seq_len=4096,
                      mla=dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                               v_head_dim=128))
    # T (2R - Hn - Hv) <= R (Hn + Hv): 170 queries at DeepSeek-V2's sizes
    assert absorbed_is_cheaper(1, cfg) and absorbed_is_cheaper(170, cfg) and not absorbed_is_cheaper(171, cfg)


@pytest.mark.parametrize("overrides", [
    {},
    dict(mla=dict(q_lora_rank=0), attention_bias=True, attention_out_bias=True),  # DeepSeek-V2-Lite's q
    dict(num_layers=3, layer_windows=(4, 0, 6), attn_logit_softcap=20.0),
    dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=16, rope_mscale=1.0,
         rope_mscale_all_dim=0.8),
])
def test_absorbed_and_naive_decode_equal_the_cache_free_forward(overrides):
    """Prefill 8, then 1-token steps and a 3-token chunk against the latent cache: the absorbed
    form and the expanded ("naive") form over the cached latents give the cache-free forward's
    logits (float32, 1e-5). (At these sizes "auto" absorbs up to 16 new queries.)"""
    cfg = mla_config(**overrides)
    model = T.build(cfg, seed=3)
    r = np.random.default_rng(3)
    x = random_tokens(r, (3, 16), cfg.vocab_size)
    full = np.asarray(_forward(model, x))
    assert model.layers.attn.absorbs(16) and not model.layers.attn.absorbs(17)
    for form in ("absorbed", "naive"):
        _set_form(model, form)
        cache = T.init_cache(cfg, 3, 24)
        logits, cache = _forward(model, x[:, :8], cache=cache)
        outs = [np.asarray(logits)]
        for lo, hi in [(8, 9), (9, 12), *[(i, i + 1) for i in range(12, 16)]]:
            logits, cache = _forward(model, x[:, lo:hi], cache=cache)
            outs.append(np.asarray(logits))
        err = float(np.abs(np.concatenate(outs, 1) - full).max())
        print(f"{form} decode vs cache-free forward: max abs logit error {err:.2e}")
        assert err < 1e-5, (form, err)
    _set_form(model, "auto")


def test_decode_of_left_padded_rows(mla_model):
    model, cfg = mla_model
    r = np.random.default_rng(4)
    a, b = random_tokens(r, (1, 10), cfg.vocab_size), random_tokens(r, (1, 6), cfg.vocab_size)
    toks = np.concatenate([a, np.concatenate([np.zeros((1, 4), np.int32), b], 1)], 0)
    seg = np.array([[1] * 10, [0] * 4 + [1] * 6], np.int32)
    pos = np.array([list(range(10)), [0] * 4 + list(range(6))], np.int32)
    for form in ("absorbed", "naive"):
        _set_form(model, form)
        logits, cache = _forward(model, toks, positions=pos, segment_ids=seg, cache=T.init_cache(cfg, 2, 16))
        np.testing.assert_allclose(np.asarray(logits[1, 4:]), np.asarray(model(b))[0], atol=1e-5, rtol=1e-5)
        nxt = random_tokens(r, (2, 1), cfg.vocab_size)
        step, _ = _forward(model, nxt, positions=np.array([[10], [6]], np.int32), cache=cache)
        np.testing.assert_allclose(np.asarray(step[1, 0]), np.asarray(model(np.concatenate([b, nxt[1:]], 1)))[0, -1],
                                   atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(step[0, 0]), np.asarray(model(np.concatenate([a, nxt[:1]], 1)))[0, -1],
                                   atol=1e-5, rtol=1e-5)
    _set_form(model, "auto")


def test_cache_holds_only_the_latent(mla_model):
    """The cache is c_kv [L, B, S, R] and k_pe [L, B, S, Hr]: R + Hr numbers per token and layer,
    against N (Hq + Hv) for the keys and values the naive form would cache."""
    model, cfg = mla_model
    b, s = 2, 24
    cache = T.init_cache(cfg, b, s)
    assert cache.k.shape == (cfg.num_layers, b, s, 16) and cache.v.shape == (cfg.num_layers, b, s, 4)
    _, cache = model(random_tokens(np.random.default_rng(5), (b, 5), cfg.vocab_size), cache=cache)
    assert cache.k.shape == (cfg.num_layers, b, s, 16) and cache.v.shape == (cfg.num_layers, b, s, 4)
    latent = cache.k.nbytes + cache.v.nbytes
    assert latent == cfg.num_layers * b * s * (16 + 4) * 4
    naive = cfg.num_layers * b * s * cfg.num_heads * (12 + 8) * 4
    print(f"tiny: latent cache {latent} bytes, naive {naive} bytes ({naive / latent:.1f}x)")
    assert naive / latent == 4.0

    # DeepSeek-V2's attention (60 layers, 128 heads, R 512, Hr 64, Hn 128, Hv 128), bfloat16, per token
    v2 = ModelConfig(vocab_size=102400, hidden_size=5120, intermediate_size=12288, num_layers=60, num_heads=128,
                     num_kv_heads=128, head_dim=64, max_seq_len=4096, dtype="bfloat16",
                     mla=dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                              v_head_dim=128))
    shapes = jax.eval_shape(lambda: T.init_cache(v2, 1, 1))
    per_token = shapes.k.size * 2 + shapes.v.size * 2
    naive_v2 = 60 * 128 * (192 + 128) * 2
    print(f"DeepSeek-V2 bf16 per token: latent {per_token} bytes, naive {naive_v2} bytes ({naive_v2 / per_token:.1f}x)")
    assert per_token == 60 * 576 * 2 == 69_120 and naive_v2 == 4_915_200


def test_training_gradients_are_finite_and_train():
    """T = 256 in float32 (the blockwise attention path with values of their own head dim), T =
    32 in bfloat16 compute: every parameter's gradient is finite and non-zero, and a few Adam
    steps lower the loss."""
    import optax

    for dtype, t in (("float32", 256), ("bfloat16", 32)):
        cfg = mla_config(dtype=dtype, max_seq_len=256)
        graphdef, params = T.split_params(T.build(cfg, seed=6))
        x = random_tokens(np.random.default_rng(6), (2, t + 1), cfg.vocab_size)
        batch = {"inputs_BT": x[:, :-1], "targets_BT": x[:, 1:]}

        def loss_fn(p):
            logits = T.apply(graphdef, p, batch)
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets_BT"][..., None], -1).mean()

        tx = optax.adam(3e-3)
        opt = tx.init(params)

        @jax.jit
        def step(p, o):
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o, loss, g

        losses = []
        for i in range(4):
            params, opt, loss, grads = step(params, opt)
            losses.append(float(loss))
            if i == 0:
                for path, g in jax.tree_util.tree_leaves_with_path(grads):
                    g = np.asarray(g, np.float32)
                    assert np.isfinite(g).all() and np.abs(g).max() > 0, path
        assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, (dtype, losses)


@pytest.mark.parametrize("decode_layout", [False, True])
def test_greedy_generate_equals_argmax_of_cache_free_forwards(mla_model, decode_layout):
    from inference import generate

    model, cfg = mla_model
    r = np.random.default_rng(7)
    prompts = [random_tokens(r, (n,), cfg.vocab_size).tolist() for n in (5, 11, 2)]
    out = generate(model, prompts, max_new_tokens=6, decode_layout=decode_layout)
    for p, o in zip(prompts, out):
        seq = list(p)
        for _ in range(6):  # causal: right padding to one length leaves the last real token's logits alone
            logits = _forward(model, np.array([seq + [0] * (17 - len(seq))], np.int32))
            seq.append(int(np.argmax(np.asarray(logits)[0, len(seq) - 1])))
        assert o == seq[len(p):]


def test_speculative_decoding_with_a_latent_attention_target(mla_model):
    """The target verifies k + 1 tokens per round against its latent cache (the absorbed form)
    and invalidates rejected slots: the tokens are greedy `generate`'s."""
    from inference import generate
    from inference.speculative import speculative_generate

    model, cfg = mla_model
    draft = T.build(tiny_model_config(num_layers=1), seed=2)
    prompts = [[3, 5, 7, 11], [2, 9]]
    assert speculative_generate(model, draft, prompts, max_new_tokens=8, num_draft_tokens=3) == generate(
        model, prompts, max_new_tokens=8)


def test_decode_layout_keeps_kv_b_whole_and_reaches_through_lora(mla_model):
    """LoRA on every latent projection; the decode layout panels o's base kernel, leaves kv_b's
    (read whole by the absorbed form) as it is, and decodes the same tokens and log-probs."""
    from inference import generate
    from inference.decode_layout import PanelKernel, lay_out
    from models.lora import LoraKernel, apply_lora
    from models.projection import Kernel
    from tests.helpers import randomize_adapters

    model, cfg = mla_model
    adapted = randomize_adapters(apply_lora(model, rank=2, alpha=4, targets=("q_a", "q_b", "kv_a", "kv_b", "o")),
                                 seed=2)
    layout = lay_out(adapted)
    attn = layout.blocks[0].attn
    assert isinstance(attn.kv_b.kernel, LoraKernel) and type(attn.kv_b.kernel.base) is Kernel
    assert isinstance(attn.o.kernel.base, PanelKernel)
    prompts = [[3, 5, 7, 11, 13], [2]]
    a = generate(adapted, prompts, max_new_tokens=5, decode_layout=False, return_logprobs=True)
    b = generate(adapted, prompts, max_new_tokens=5, decode_layout=True, return_logprobs=True)
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)
    base = generate(model, prompts, max_new_tokens=5, decode_layout=False, return_logprobs=True)
    assert max(abs(x - y) for ra, rb in zip(a[1], base[1]) for x, y in zip(ra, rb)) > 1e-3  # the adapters act


@pytest.mark.parametrize("shape", [{"fsdp": 4, "tensor": 2}, pytest.param({"data": 2, "tensor": 4}, marks=pytest.mark.slow)])
def test_sharded_forward_and_decode_equal_one_device(shape):
    """8 fake devices: parameters sharded by the logical-axis rules; forward logits and a cached
    decode step equal one device's (float32, 1e-5)."""
    from models.sharding import use_rules
    from train.mesh import make_mesh, resolve_shape

    cfg = mla_config(dtype="float32")
    x = random_tokens(np.random.default_rng(8), (4, 12), cfg.vocab_size)
    graphdef, ref_params = T.init_params(cfg, 0)
    ref = np.asarray(T.apply(graphdef, ref_params, {"inputs_BT": x}))

    def decode(graphdef, params):
        model = T.merge_params(graphdef, params)
        _, cache = model(x[:, :11], cache=T.init_cache(cfg, 4, 16))
        return model(x[:, 11:], cache=cache)[0]

    ref_step = np.asarray(jax.jit(decode, static_argnums=0)(graphdef, ref_params))
    mesh = make_mesh(resolve_shape(shape, 8))
    with jax.set_mesh(mesh), use_rules(None):
        graphdef, params = T.init_params(cfg, 0, mesh=mesh)
        kv_b = params["layers"]["attn"]["kv_b"]["kernel"]  # [L, R, N, Hn + Hv]: heads over tensor
        assert kv_b.sharding.spec[2] == "tensor"
        logits = jax.jit(lambda p, b: T.apply(graphdef, p, b))(params, {"inputs_BT": x})
        step = jax.jit(decode, static_argnums=0)(graphdef, params)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(step), ref_step, atol=1e-5, rtol=1e-5)


def test_pallas_impl_matches_xla():
    """attention_impl="pallas" (interpreted on CPU): the kernels take q/k at Hq = 12 and v at
    Hv = 8 (zero-padded inside flash_attention)."""
    cfg = mla_config()
    model = T.build(cfg, seed=9)
    x = random_tokens(np.random.default_rng(9), (2, 16), cfg.vocab_size)
    pallas = T.build(cfg.replace(attention_impl="pallas"), seed=9)
    np.testing.assert_allclose(np.asarray(pallas(x)), np.asarray(model(x)), atol=1e-5, rtol=1e-5)


def test_prefix_tuning_refuses_latent_attention(mla_model):
    from models.prefix import apply_prefix

    with pytest.raises(ValueError, match="prefix tuning needs grouped-query attention.*MlaAttention"):
        apply_prefix(mla_model[0], length=2)


def test_bad_cache_form_names_the_valid_ones(mla_model):
    model, cfg = mla_model
    _set_form(model, "latent")
    try:
        with pytest.raises(ValueError, match=r"cache_form='latent' is not valid; expected one of \('auto'"):
            model(np.ones((1, 2), np.int32), cache=T.init_cache(cfg, 1, 4))
    finally:
        _set_form(model, "auto")
