"""Mixture-of-experts layers (models/moe.py): routing and dispatch against a float64 NumPy loop,
capacity dropping, the balancing losses, bias balancing, the dense equivalence, decoding, and
expert parallelism on 8 fake devices equal to one device."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import moe
from models import transformer as tr
from models.config import MoeConfig, ModelConfig, active_param_count, param_count
from models.sharding import use_rules
from tests.helpers import random_tokens, tiny_model_config
from train import mesh as M
from train.loss import lm_loss_fn
from train.optimizer import make_optimizer
from train.state import create_state, make_train_step, state_shardings

IMPLS = ("ragged_dot", "padded")


# --------------------------------------------------------------------------------------------
# The float64 reference: token by token


def _silu(z):
    return z / (1.0 + np.exp(-z))


def reference(x_ND, router_DE, gate_EDF, up_EDF, down_EFD, m: MoeConfig, *, bias_E=None, seq_len=None):
    """(routed output [N, D], chosen experts [N, K], kept [N, K]) in float64, one token and one
    choice at a time; with capacity, each row of `seq_len` tokens hands out its slots by choice
    rank first, then position."""
    x = np.asarray(x_ND, np.float64)
    n, d = x.shape
    e, k = router_DE.shape[1], m.experts_per_token
    logits = x @ np.asarray(router_DE, np.float64)
    if m.router == "softmax":
        z = np.exp(logits - logits.max(-1, keepdims=True))
        scores = z / z.sum(-1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
    select = scores + (0.0 if bias_E is None else np.asarray(bias_E, np.float64))
    chosen = np.argsort(-select, axis=-1, kind="stable")[:, :k]
    gates = np.take_along_axis(scores, chosen, -1)
    if m.norm_topk_prob:
        gates = gates / gates.sum(-1, keepdims=True)
    gates = gates * m.routed_scaling_factor
    keep = np.ones((n, k), bool)
    t = seq_len or n
    if m.capacity_factor:
        slots = int(np.ceil(m.capacity_factor * t * k / e))
        for row in range(n // t):
            used = np.zeros(e, int)
            for j in range(k):
                for tok in range(row * t, (row + 1) * t):
                    keep[tok, j] = used[chosen[tok, j]] < slots
                    used[chosen[tok, j]] += 1
    g = None if gate_EDF is None else np.asarray(gate_EDF, np.float64)
    u, dn = np.asarray(up_EDF, np.float64), np.asarray(down_EFD, np.float64)
    out = np.zeros((n, d))
    for tok in range(n):
        for j in range(k):
            if keep[tok, j]:
                i = chosen[tok, j]
                h = _silu(x[tok] @ u[i]) if g is None else _silu(x[tok] @ g[i]) * (x[tok] @ u[i])
                out[tok] += gates[tok, j] * (h @ dn[i])
    return out, chosen, keep


def _moe_cfg(**moe_kw):
    base = dict(num_experts=8, experts_per_token=2)
    base.update(moe_kw)
    return tiny_model_config(hidden_size=16, intermediate_size=24, moe=base)


def _layer(cfg, seed=0):
    return moe.MoeMlp(cfg, rngs=nnx.Rngs(params=seed))


def _weights(layer, rng, *, scale=0.3):
    """Fresh random weights (larger than init, so routing and outputs are far from ties)."""
    ex = layer.experts
    for var in ([ex.gate] if ex.gate is not None else []) + [ex.up, ex.down, layer.router.kernel]:
        var[...] = jnp.asarray(rng.normal(0, scale, var[...].shape), jnp.float32)
    return layer


def _routed(layer, x_BTD):
    """The routed part of an MoE layer's output (float32), and its route."""
    m = layer.moe
    logits = layer.router(x_BTD)
    bias = None if layer.router.bias is None else layer.router.bias[...]
    expert, gate, _, keep = moe.route(logits, bias, m)
    ex = layer.experts
    y = moe.dispatch(x_BTD, expert, gate, keep, None if ex.gate is None else ex.gate[...], ex.up[...], ex.down[...],
                     activation=jax.nn.silu, dtype=jnp.float32, grouped_matmul=m.grouped_matmul,
                     block_size=m.block_size)
    return y, expert, keep


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("moe_kw", [
    dict(),  # Mixtral: softmax, renormalised top-2
    dict(router="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, experts_per_token=3),  # DeepSeek-V3
    dict(norm_topk_prob=False, routed_scaling_factor=1.5, experts_per_token=1),  # Switch-like top-1
    dict(bias_balancing=True),  # the bias chooses, the scores weigh
    dict(block_size=2),  # padded: many blocks, groups padded
])
def test_dropless_dispatch_equals_per_token_loop(impl, moe_kw):
    cfg = _moe_cfg(grouped_matmul=impl, **moe_kw)
    rng = np.random.default_rng(0)
    layer = _weights(_layer(cfg), rng)
    bias = None
    if layer.router.bias is not None:
        bias = rng.normal(0, 0.3, (8,)).astype(np.float32)
        layer.router.bias[...] = jnp.asarray(bias)
    x = rng.normal(0, 1, (3, 10, 16)).astype(np.float32)
    y, expert, keep = _routed(layer, jnp.asarray(x))
    gate = None if layer.experts.gate is None else layer.experts.gate[...]
    ref, chosen, _ = reference(x.reshape(-1, 16), layer.router.kernel[...], gate, layer.experts.up[...],
                               layer.experts.down[...], cfg.moe, bias_E=bias)
    np.testing.assert_array_equal(np.asarray(expert).reshape(-1, cfg.moe.experts_per_token), chosen)
    assert bool(keep.all())
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_capacity_drops_exactly_the_over_capacity_assignments(impl, capacity_factor):
    """Skewed routing (a router biased toward two experts) overflows them; the kept assignments
    are those the priority order (choice rank, then position) gives the ceil(cf T k / E) slots."""
    cfg = _moe_cfg(grouped_matmul=impl, capacity_factor=capacity_factor)
    rng = np.random.default_rng(1)
    layer = _weights(_layer(cfg), rng)
    skew = np.zeros((16, 8), np.float32)
    skew[0, :2] = 3.0  # x[0] > 0 pushes tokens to experts 0 and 1
    layer.router.kernel[...] = layer.router.kernel[...] + jnp.asarray(skew)
    x = rng.normal(0, 1, (2, 12, 16)).astype(np.float32)
    x[..., 0] = np.abs(x[..., 0]) + 0.5
    y, expert, keep = _routed(layer, jnp.asarray(x))
    ref, chosen, ref_keep = reference(x.reshape(-1, 16), layer.router.kernel[...], layer.experts.gate[...],
                                      layer.experts.up[...], layer.experts.down[...], cfg.moe, seq_len=12)
    assert not ref_keep.all()  # the test drops something
    np.testing.assert_array_equal(np.asarray(expert).reshape(-1, 2), chosen)
    np.testing.assert_array_equal(np.asarray(keep).reshape(-1, 2), ref_keep)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), ref, rtol=1e-5, atol=1e-5)
    slots = moe.capacity(cfg.moe, 12)
    assert slots == int(np.ceil(capacity_factor * 12 * 2 / 8))
    for row in range(2):  # no expert holds more than its slots in any row
        kept = np.asarray(expert)[row][np.asarray(keep)[row]]
        assert np.bincount(kept, minlength=8).max() <= slots
    # the statistic counts the same drops
    stats = moe.routing_stats(layer.router(jnp.asarray(x)), jnp.ones((2, 12, 8)) / 8, expert, keep, 8)
    np.testing.assert_allclose(float(stats["dropped"]), 1 - ref_keep.mean(), rtol=1e-6)


@pytest.mark.parametrize("gated", [True, False])
def test_one_expert_top1_is_the_dense_mlp(gated):
    """A model whose every MLP is one expert chosen with weight 1 is the dense model with the
    same weights: logits equal (float32)."""
    dense_cfg = tiny_model_config(gated_mlp=gated)
    moe_cfg = dense_cfg.replace(moe=MoeConfig(num_experts=1, experts_per_token=1))
    dense = tr.build(dense_cfg, seed=0)
    sparse = tr.build(moe_cfg, seed=1)
    _, dense_p = tr.split_params(dense)
    graphdef, p = tr.split_params(sparse)
    for name in ("attn", "attn_norm", "mlp_norm"):
        p["layers"][name] = dense_p["layers"][name]
    for name in ("embed", "final_norm", "lm_head"):
        p[name] = dense_p[name]
    for name in ("gate", "up", "down") if gated else ("up", "down"):
        p["layers"]["mlp"]["experts"][name] = dense_p["layers"]["mlp"][name]["kernel"][:, None]
    tokens = random_tokens(np.random.default_rng(0), (2, 12), dense_cfg.vocab_size)
    want = dense(jnp.asarray(tokens))
    got = tr.merge_params(graphdef, p)(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_shared_experts_and_gate_add_their_mlp():
    """Shared experts: one MLP of num_shared x width every token goes through, times
    sigmoid(x . w) with the gate (Qwen2-MoE)."""
    cfg = _moe_cfg(num_shared_experts=2, shared_intermediate_size=12, shared_expert_gate=True)
    layer = _weights(_layer(cfg), np.random.default_rng(2))
    assert layer.shared.up.kernel[...].shape == (16, 24)
    x = jnp.asarray(np.random.default_rng(3).normal(0, 1, (2, 5, 16)), jnp.float32)
    routed, _, _ = _routed(layer, x)
    s = layer.shared(x) * jax.nn.sigmoid(layer.shared_gate(x))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(routed + s), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Balancing


def test_balance_loss_is_minimal_for_uniform_routing():
    """E sum_i f_i P_i: exactly 1 when load and probabilities are uniform; for a consistent
    router (f = P) it is E sum_i f_i^2 >= 1, so any imbalance costs more; closed forms."""
    e = 8
    uniform = jnp.full((e,), 1 / e)
    assert float(moe.balance_loss(uniform, uniform)) == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.dirichlet(np.ones(e))
        assert float(moe.balance_loss(jnp.asarray(p), jnp.asarray(p))) == pytest.approx(e * np.sum(p * p), rel=1e-5)
        assert e * np.sum(p * p) > 1.0
    collapsed = jnp.zeros((e,)).at[0].set(1.0)  # every token to expert 0 with certainty: E
    assert float(moe.balance_loss(collapsed, collapsed)) == pytest.approx(e)
    # from routing: top-1 over E logits, tokens spread evenly over the experts with p = 1/E each
    logits = jnp.zeros((1, e, e))
    expert = jnp.arange(e, dtype=jnp.int32).reshape(1, e, 1)
    stats = moe.routing_stats(logits, moe.router_scores(logits, "softmax"), expert, jnp.ones((1, e, 1), bool), e)
    assert float(stats["balance"]) == pytest.approx(1.0)
    assert float(stats["entropy"]) == pytest.approx(np.log(e), rel=1e-6)
    assert float(stats["router_z"]) == pytest.approx(np.log(e) ** 2, rel=1e-6)
    # its gradient flows through P only (f has none): d/dlogits of the loss at uniform logits is 0
    grad = jax.grad(lambda l: moe.routing_stats(l, moe.router_scores(l, "softmax"), expert,
                                                jnp.ones((1, e, 1), bool), e)["balance"])(logits)
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-7)


def test_bias_balancing_moves_load_toward_uniform():
    """A router skewed toward a few experts; DeepSeek-V3's update (bias += rate x sign(mean - load))
    from each step's load, with the router weights fixed: the imbalance falls step after step."""
    rng = np.random.default_rng(0)
    e, d = 8, 16
    m = MoeConfig(num_experts=e, experts_per_token=2, router="sigmoid", bias_balancing=True)
    w = rng.normal(0, 0.3, (d, e)).astype(np.float32)
    w[:, :2] += 0.6  # with x > 0 below, experts 0 and 1 win almost always
    x = jnp.asarray(np.abs(rng.normal(0, 1, (4, 64, d))), jnp.float32)
    logits = jnp.einsum("btd,de->bte", x, jnp.asarray(w))

    @jax.jit
    def step(bias):
        expert, _, probs, keep = moe.route(logits, bias, m)
        load = moe.routing_stats(logits, probs, expert, keep, e)["load"]
        return moe.bias_update(bias, load, 0.02), load.max() * e

    bias, history = jnp.zeros((e,)), []
    for _ in range(150):
        bias, imbalance = step(bias)
        history.append(float(imbalance))
    assert history[0] > 3.0  # two experts take nearly all of k=2 choices: max load ~ E / 2
    assert np.all(np.diff(history[:8]) <= 0)  # falling while far from balance
    # then within a step's reach of balance (sign steps oscillate around it on a fixed batch)
    assert max(history[-20:]) < 2.0 and np.mean(history[-20:]) < 0.45 * history[0]


# --------------------------------------------------------------------------------------------
# Config, counts, the model around the layer


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"model.moe.router='top1' is not valid; expected one of \('softmax', 'sigmoid'\)"):
        MoeConfig(num_experts=4, router="top1")
    with pytest.raises(ValueError, match=r"experts_per_token=5 must be in \[1, model.moe.num_experts=4\]"):
        MoeConfig(num_experts=4, experts_per_token=5)
    with pytest.raises(ValueError, match=r"grouped_matmul='dense' is not valid"):
        MoeConfig(grouped_matmul="dense")
    with pytest.raises(ValueError, match=r"first_dense_layers=2 leaves no MoE layer of model.num_layers=2"):
        tiny_model_config(moe=dict(num_experts=4, first_dense_layers=2))
    with pytest.raises(ValueError, match=r"unknown model.moe config keys \['experts'\]"):
        tiny_model_config(moe=dict(experts=4))
    with pytest.raises(ValueError, match=r"pipeline_stages=2 is not supported with MoE layers"):
        tiny_model_config(moe=dict(num_experts=4), pipeline_stages=2)


@pytest.mark.parametrize("moe_kw", [
    dict(num_experts=4, experts_per_token=2),
    dict(num_experts=8, experts_per_token=3, num_shared_experts=2, shared_expert_gate=True, first_dense_layers=1,
         bias_balancing=True, expert_intermediate_size=16),
])
@pytest.mark.parametrize("gated", [True, False])
def test_parameter_counts_total_and_active(moe_kw, gated):
    cfg = tiny_model_config(num_layers=3, gated_mlp=gated, moe=moe_kw)
    _, params = tr.split_params(tr.abstract_model(cfg))
    assert param_count(cfg) == sum(x.size for x in jax.tree.leaves(params))
    # active: every parameter but the experts a token does not use
    per_expert = sum(x.size for x in jax.tree.leaves(params["layers"]["mlp"]["experts"])) // (
        cfg.num_moe_layers * cfg.moe.num_experts)
    unused = cfg.num_moe_layers * (cfg.moe.num_experts - cfg.moe.experts_per_token) * per_expert
    assert active_param_count(cfg) == param_count(cfg) - unused


def _preset(name):
    from configs import pretrain

    return ModelConfig.from_dict(pretrain.get_config(name).model.to_dict())


def test_mixtral_shape_counts():
    """Mixtral-8x7B: 46.7B parameters, 12.9B active per token (Mistral AI's figures)."""
    cfg = _preset("mixtral_8x7b")
    assert param_count(cfg) == 46_702_792_704
    assert active_param_count(cfg) == 12_879_925_248


def test_deepseek_v2_lite_shape_counts():
    """DeepSeek-V2-Lite: 15.7B parameters; 2.66B active per token counting the embedding row and
    the head, 2.45B without the embedding table (DeepSeek's "2.4B activated")."""
    cfg = _preset("deepseek_v2_lite")
    assert cfg.attention == "mla" and cfg.mla.kv_lora_rank == 512 and cfg.num_moe_layers == 26
    assert param_count(cfg) == 15_706_484_224
    assert active_param_count(cfg) == 2_661_150_208
    assert active_param_count(cfg) - cfg.vocab_size * cfg.hidden_size == 2_451_435_008


@pytest.mark.parametrize("preset", ["mixtral_8x7b", "deepseek_v2_lite"])
def test_preset_counts_equal_transformers(preset):
    """The presets' total and active counts equal those of the same shapes built by transformers
    (on the meta device: no memory), the active count removing the unused experts' weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = _preset(preset)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, num_experts_per_tok=cfg.moe.experts_per_token,
                  tie_word_embeddings=cfg.tie_embeddings)
    if preset == "mixtral_8x7b":
        hf_cfg, cls = transformers.MixtralConfig(num_local_experts=cfg.moe.num_experts, **common), \
            transformers.MixtralForCausalLM
    else:
        m = cfg.mla
        hf_cfg = transformers.DeepseekV2Config(
            n_routed_experts=cfg.moe.num_experts, n_shared_experts=cfg.moe.num_shared_experts,
            moe_intermediate_size=cfg.moe.expert_intermediate_size, first_k_dense_replace=cfg.moe.first_dense_layers,
            q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
            qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, **common)
        cls = transformers.DeepseekV2ForCausalLM
    with torch.device("meta"):
        hf_model = cls(hf_cfg)
    total = sum(p.numel() for p in hf_model.parameters())
    experts = sum(p.numel() for n, p in hf_model.named_parameters() if ".experts." in n)  # routed only
    per_expert = experts // (cfg.num_moe_layers * cfg.moe.num_experts)
    assert param_count(cfg) == total
    assert active_param_count(cfg) == total - cfg.num_moe_layers * (
        cfg.moe.num_experts - cfg.moe.experts_per_token) * per_expert


def test_moe_config_round_trips_through_a_dict():
    cfg = tiny_model_config(moe=dict(num_experts=4, router="sigmoid", capacity_factor=1.25))
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back == cfg and isinstance(back.moe, MoeConfig) and hash(back) == hash(cfg)
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "moe"}).moe == MoeConfig()


def test_dense_prefix_and_moe_layers_are_scanned_apart():
    """first_dense_layers=1 of 3: a dense stack of 1 and an MoE stack of 2, one scan each; the
    statistics come back per MoE layer."""
    cfg = tiny_model_config(num_layers=3, moe=dict(num_experts=4, first_dense_layers=1, aux_loss_weight=0.1,
                                                   z_loss_weight=0.01))
    model = tr.build(cfg)
    assert tr.layer_groups(cfg) == (("dense_layers", 0, 1, 0), ("layers", 1, 3, 0))
    assert model.dense_layers.mlp.up.kernel[...].shape == (1, 32, 64)
    assert model.layers.mlp.experts.up[...].shape == (2, 4, 32, 64)
    tokens = jnp.asarray(random_tokens(np.random.default_rng(0), (2, 8), cfg.vocab_size))
    jaxpr = jax.make_jaxpr(lambda t: model.forward_with_aux(t))(tokens)
    assert sum(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns) == 2
    logits, aux = model.forward_with_aux(tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens)), rtol=1e-6)
    assert aux["moe_expert_load"].shape == (4,)
    np.testing.assert_allclose(float(aux["moe_expert_load"].sum()), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(aux["moe_aux_loss"]), 0.1 * float(aux["moe_balance"]), rtol=1e-6)
    np.testing.assert_allclose(float(aux["aux_loss"]), float(aux["moe_aux_loss"] + aux["moe_z_loss"]), rtol=1e-6)


def test_group_limited_routing_equals_numpy():
    """DeepSeek-V2's group_limited_greedy: keep the topk_groups groups whose best score is
    highest, then the top k experts among theirs; gates are the unmasked softmax scores."""
    m = MoeConfig(num_experts=8, experts_per_token=3, num_groups=4, topk_groups=2, norm_topk_prob=False,
                  routed_scaling_factor=2.5)
    logits = np.random.default_rng(0).normal(size=(2, 16, 8)).astype(np.float32)
    expert, gate, _, _ = moe.route(jnp.asarray(logits), None, m)
    z = np.exp(logits - logits.max(-1, keepdims=True))
    scores = z / z.sum(-1, keepdims=True)
    for b in range(2):
        for t in range(16):
            best_groups = np.argsort(-scores[b, t].reshape(4, 2).max(-1), kind="stable")[:2]
            allowed = np.zeros(8, bool)
            for g in best_groups:
                allowed[2 * g:2 * g + 2] = True
            chosen = np.argsort(-np.where(allowed, scores[b, t], -1.0), kind="stable")[:3]
            assert sorted(np.asarray(expert[b, t]).tolist()) == sorted(chosen.tolist())
            np.testing.assert_allclose(np.sort(np.asarray(gate[b, t])), np.sort(2.5 * scores[b, t, chosen]),
                                       rtol=1e-6)
    # without the limit the choice differs somewhere (the test is not vacuous)
    free, _, _, _ = moe.route(jnp.asarray(logits), None, MoeConfig(num_experts=8, experts_per_token=3))
    assert (np.sort(np.asarray(free), -1) != np.sort(np.asarray(expert), -1)).any()


def test_group_limited_config_errors():
    with pytest.raises(ValueError, match=r"num_groups=3 must divide model.moe.num_experts=8"):
        MoeConfig(num_experts=8, num_groups=3, topk_groups=1)
    with pytest.raises(ValueError, match=r"experts_per_token=3 exceeds the 2 experts of model.moe.topk_groups=1"):
        MoeConfig(num_experts=8, experts_per_token=3, num_groups=4, topk_groups=1)


def test_dense_layers_anywhere_config():
    cfg = tiny_model_config(num_layers=4, moe=dict(num_experts=4, dense_layers=[3, 1]))  # a list, as JSON gives
    assert cfg.moe.dense_layers == (3, 1) and hash(cfg)
    assert [cfg.is_moe_layer(i) for i in range(4)] == [True, False, True, False] and cfg.num_moe_layers == 2
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert tr.layer_stacks(cfg) == {"dense_layers": (1, 3), "layers": (0, 2)}
    assert tr.layer_groups(cfg) == (("layers", 0, 1, 0), ("dense_layers", 1, 2, 0), ("layers", 2, 3, 1),
                                     ("dense_layers", 3, 4, 1))
    with pytest.raises(ValueError, match=r"dense_layers=\(1, 1\) must be distinct layer indices >= 0"):
        MoeConfig(num_experts=4, dense_layers=(1, 1))
    with pytest.raises(ValueError, match=r"dense_layers=\(1, 4\): layers \[4\] are not layers of model.num_layers=4"):
        tiny_model_config(num_layers=4, moe=dict(num_experts=4, dense_layers=(1, 4)))
    with pytest.raises(ValueError, match=r"leaves no MoE layer"):
        tiny_model_config(num_layers=2, moe=dict(num_experts=4, first_dense_layers=1, dense_layers=(1,)))


def _layer_by_layer(model, cfg, tokens):
    """Logits from each global layer's block run alone, taken from its row of its stack."""
    b, t = tokens.shape
    pos, seg = tr.default_positions_and_segments(b, t, None, None)
    x = model.embed_inputs(tokens, pos)
    stacks = tr.layer_stacks(cfg)
    for i in range(cfg.num_layers):
        name = next(n for n, ls in stacks.items() if i in ls)
        graphdef, state = nnx.split(getattr(model, name))
        block = nnx.merge(graphdef, jax.tree.map(lambda a, r=stacks[name].index(i): a[r], state))
        x, _ = block(x, positions_BT=pos, segment_ids_BT=seg, window=None)
    return model.output_logits(x)


def test_interleaved_dense_layers_equal_layer_by_layer():
    """Dense layers at 1 and 3 of 4: two stacks, four runs (scans) over their rows; the logits
    equal each layer's block run in turn, and the statistics come per MoE layer in order."""
    cfg = tiny_model_config(num_layers=4, moe=dict(num_experts=4, dense_layers=(1, 3), bias_balancing=True))
    model = tr.build(cfg, seed=1)
    assert model.dense_layers.mlp.up.kernel[...].shape == (2, 32, 64)
    assert model.layers.mlp.experts.up[...].shape == (2, 4, 32, 64)
    tokens = jnp.asarray(random_tokens(np.random.default_rng(0), (2, 8), cfg.vocab_size))
    jaxpr = jax.make_jaxpr(lambda t: model.forward_with_aux(t))(tokens)
    assert sum(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns) == 4
    logits, aux = model.forward_with_aux(tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(_layer_by_layer(model, cfg, tokens)), atol=1e-5)
    assert aux["moe_layer_load"].shape == (2, 4)
    # the statistics of MoE layer 2 (row 1) come second: zero its router (uniform scores)
    graphdef, params = tr.split_params(model)
    params["layers"]["mlp"]["router"]["kernel"] = params["layers"]["mlp"]["router"]["kernel"].at[1].set(0.0)
    _, aux2 = tr.merge_params(graphdef, params).forward_with_aux(tokens)
    load = np.asarray(aux2["moe_layer_load"])  # tied scores: top_k takes the lowest indices
    np.testing.assert_array_equal(load[1], [0.5, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(load[0], np.asarray(aux["moe_layer_load"])[0])


def test_dense_layers_as_a_prefix_equal_first_dense_layers():
    a = tiny_model_config(num_layers=3, moe=dict(num_experts=4, first_dense_layers=1))
    b = tiny_model_config(num_layers=3, moe=dict(num_experts=4, dense_layers=(0,)))
    assert tr.layer_groups(a) == tr.layer_groups(b)
    model_a = tr.build(a, seed=2)
    graphdef_b, _ = tr.split_params(tr.abstract_model(b))
    model_b = tr.merge_params(graphdef_b, tr.split_params(model_a)[1])
    tokens = jnp.asarray(random_tokens(np.random.default_rng(1), (2, 8), a.vocab_size))
    np.testing.assert_array_equal(np.asarray(model_a(tokens)), np.asarray(model_b(tokens)))


@pytest.mark.slow
def test_decoding_interleaved_dense_layers_equals_the_forward():
    """KV-cache decoding (plain and the CPU decode layout) with dense layers between MoE ones."""
    from inference import generate

    cfg = tiny_model_config(num_layers=4, moe=dict(num_experts=4, dense_layers=(1, 2), num_shared_experts=1))
    model = tr.build(cfg, seed=4)
    prompt = [5, 17, 33, 2, 9]
    seq = list(prompt)
    for _ in range(6):
        logits = model(jnp.asarray([seq], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, -1])))
    for layout in (False, True):
        assert generate(model, [prompt], max_new_tokens=6, decode_layout=layout)[0] == seq[len(prompt):]


def test_decoding_an_moe_model_equals_its_forward():
    """Greedy decoding (KV cache, both stacks; the CPU decode layout at float32) continues as the
    cache-free forward pass predicts."""
    from inference import generate

    cfg = tiny_model_config(num_layers=3, moe=dict(num_experts=4, first_dense_layers=1, num_shared_experts=1))
    model = tr.build(cfg, seed=3)
    prompt = [5, 17, 33, 2, 9]
    out = generate(model, [prompt], max_new_tokens=6)[0]
    seq = list(prompt)
    for _ in range(6):
        logits = model(jnp.asarray([seq], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert out == seq[len(prompt):]


# --------------------------------------------------------------------------------------------
# Expert parallelism: 8 fake devices equal one device

EP_CFG = dict(moe=dict(num_experts=8, experts_per_token=2, num_shared_experts=1, shared_expert_gate=True,
                       bias_balancing=True, aux_loss_weight=0.01, z_loss_weight=1e-3))
OPT = dict(name="adamw", lr=1e-2, schedule="cosine", warmup_steps=1, weight_decay=0.1, clip_norm=1.0)
EP_RULES = M.STRATEGY_RULES["fsdp_ep"]


def _batch(seed, b=8, t=16, vocab=97):
    r = np.random.default_rng(seed)
    inputs = random_tokens(r, (b, t), vocab)
    return {"inputs_BT": inputs, "targets_BT": (inputs * 7 + 3) % vocab,
            "positions_BT": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids_BT": np.ones((b, t), np.int32), "loss_mask_BT": np.ones((b, t), np.float32)}


def _run(shape, rules, cfg, *, steps=5, devices=None):
    """{"logits", "grads", "metrics" (of the first batch), "hlo" (of the gradient)} and, with
    steps, "history" (each train step's metrics) and "params" (after them)."""
    mesh = M.make_mesh(M.resolve_shape(shape, len(devices or jax.devices())), devices=devices)
    tx, _ = make_optimizer(OPT, max(steps, 1))
    with jax.set_mesh(mesh), use_rules(rules):
        graphdef, state = create_state(cfg, tx, seed=0, mesh=mesh, rules=rules)
        loss_fn = lm_loss_fn(graphdef)
        put = lambda b: {k: jax.device_put(v, M.batch_sharding(mesh, v.shape, rules)) for k, v in b.items()}  # noqa: E731
        first = put(_batch(0))

        def grads_and_logits(p):
            (_, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p, first, None)
            return g, metrics, tr.apply(graphdef, p, first)

        compiled = jax.jit(grads_and_logits).lower(state.params).compile()
        grads, metrics, logits = jax.device_get(compiled(state.params))
        out = {"logits": logits, "grads": grads, "metrics": metrics, "hlo": compiled.as_text()}
        if steps:
            shardings = state_shardings(cfg, tx, mesh, rules)
            step = jax.jit(make_train_step(loss_fn, tx, post_update=lambda old, new, m: moe.balance_router_biases(
                cfg, old, new, m)), in_shardings=(shardings, None), out_shardings=(shardings, None))
            out["history"], out["biases"] = [], []
            for i in range(steps):
                out["biases"].append(np.asarray(state.params["layers"]["mlp"]["router"]["bias"]))
                state, m = step(state, put(_batch(i)))
                out["history"].append(jax.device_get(m))
            out["params"] = jax.device_get(state.params)
        return out


def _assert_trees_close(got, want, **tol):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, err_msg=jax.tree_util.keystr(path), **tol)


METRICS = ("loss", "moe_aux_loss", "moe_z_loss", "moe_router_entropy", "moe_dropped_fraction", "moe_expert_load")


@pytest.fixture(scope="module")
def one_device():
    return _run({}, None, tiny_model_config(**EP_CFG), devices=jax.devices()[:1])


def test_bias_balancing_in_the_train_step(one_device):
    """The train step moves each MoE layer's router bias by rate x sign(mean - load) of the
    step's load, exactly, after the optimizer (which leaves it alone: it has no gradient)."""
    assert float(np.abs(one_device["grads"]["layers"]["mlp"]["router"]["bias"]).max()) == 0.0
    rate = EP_CFG["moe"].get("bias_update_rate", MoeConfig.bias_update_rate)
    biases = one_device["biases"] + [np.asarray(one_device["params"]["layers"]["mlp"]["router"]["bias"])]
    for before, after, m in zip(biases, biases[1:], one_device["history"]):
        load = np.asarray(m["moe_layer_load"])
        assert load.shape == (2, 8)
        np.testing.assert_allclose(after - before, rate * np.sign(load.mean(-1, keepdims=True) - load), atol=1e-7)
    assert np.abs(biases[-1]).max() > 0


@pytest.mark.parametrize("shape", [{"expert": 4, "fsdp": 2}, {"expert": 8}])
def test_expert_parallel_equals_one_device(shape, one_device):
    """fsdp_ep's rules (tokens over data x fsdp x expert, experts over expert): logits, gradients,
    and 5 AdamW steps with bias balancing from the global load equal one device's in float32 to
    1e-4; the dispatch is an all-to-all in the compiled program."""
    got = _run(shape, EP_RULES, tiny_model_config(**EP_CFG))
    assert "all-to-all" in got["hlo"]
    np.testing.assert_allclose(got["logits"], one_device["logits"], rtol=1e-4, atol=1e-4)
    _assert_trees_close(got["grads"], one_device["grads"], rtol=1e-4, atol=1e-6)
    for h, r in zip(got["history"], one_device["history"]):
        for key in METRICS + ("grad_norm", "moe_layer_load"):
            np.testing.assert_allclose(h[key], r[key], rtol=1e-4, atol=1e-6, err_msg=key)
    _assert_trees_close(got["params"], one_device["params"], rtol=1e-4, atol=1e-5)
    up = jax.tree.leaves(got["params"]["layers"]["mlp"]["experts"]["up"])[0]
    assert up.shape[1] == 8


@pytest.mark.slow
@pytest.mark.parametrize("shape,rules,collective", [
    ({"expert": 2, "tensor": 2, "fsdp": 2}, EP_RULES, "all-to-all"),  # expert hidden dims split too: partial sums
    ({"expert": 4, "data": 2}, None, "all-reduce"),  # default rules: tokens replicated over expert, outputs summed
])
def test_other_expert_layouts_equal_one_device(shape, rules, collective, one_device):
    """Logits and gradients of the other layouts equal one device's."""
    got = _run(shape, rules, tiny_model_config(**EP_CFG), steps=0)
    assert collective in got["hlo"]
    np.testing.assert_allclose(got["logits"], one_device["logits"], rtol=1e-4, atol=1e-4)
    _assert_trees_close(got["grads"], one_device["grads"], rtol=1e-4, atol=1e-6)


def test_expert_parallel_capacity_equals_one_device():
    """Capacity is per sequence, so the same assignments drop however the batch is sharded."""
    cfg = tiny_model_config(num_layers=1, moe=dict(num_experts=8, experts_per_token=2, capacity_factor=0.75))
    ref = _run({}, None, cfg, steps=0, devices=jax.devices()[:1])
    got = _run({"expert": 4, "fsdp": 2}, EP_RULES, cfg, steps=0)
    assert "all-to-all" in got["hlo"]
    assert ref["metrics"]["moe_dropped_fraction"] > 0.05
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    _assert_trees_close(got["grads"], ref["grads"], rtol=1e-4, atol=1e-6)
    for key in METRICS:
        np.testing.assert_allclose(got["metrics"][key], ref["metrics"][key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_fsdp_ep_strategy_shapes():
    """fsdp_ep: the expert axis as large as the devices and the experts allow (powers of two),
    fsdp the rest; the batch and the other parameters sharded over both; a dense model gets
    plain fsdp."""
    def shape_of(experts, n=8):
        cfg = tiny_model_config(moe=dict(num_experts=experts) if experts else {})
        resolved = M.resolve({"shape": M.DEFAULT_SHAPE, "strategy": "fsdp_ep"}, n, cfg)
        return {k: v for k, v in resolved["shape"].items() if v > 1}, dict(resolved["rules"])

    assert shape_of(8)[0] == {"expert": 8}
    assert shape_of(16)[0] == {"expert": 8}
    assert shape_of(4)[0] == {"expert": 4, "fsdp": 2}
    assert shape_of(6)[0] == {"expert": 2, "fsdp": 4}
    assert shape_of(0)[0] == {"fsdp": 8}
    rules = shape_of(8)[1]
    assert rules["batch"] == ("data", "fsdp", "expert") and rules["experts"] == ("expert",)
    assert M.batch_shards({"data": 1, "fsdp": 2, "expert": 4}, tuple(rules.items())) == 8


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_rematerialised_moe_layers_give_the_same_gradients(remat):
    cfg = tiny_model_config(moe=dict(num_experts=4, num_shared_experts=1, aux_loss_weight=0.01, z_loss_weight=0.01))
    batch = _batch(0, b=2, t=8)
    grads = []
    for c in (cfg, cfg.replace(remat=remat)):
        graphdef, params = tr.split_params(tr.build(c))
        grads.append(jax.jit(jax.grad(lambda p, g=graphdef: lm_loss_fn(g)(p, batch, None)[0]))(params))
    _assert_trees_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
