"""Preference losses (rl/preference.py) and the reward model (rl/reward_model.py): hand-computed
values, response-only log-probs, the LoRA reference, accumulation per pair, and short toy runs
(DPO raises the margin; the reward model separates separable pairs)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data.preferences import sequence_row
from models import transformer
from models.lora import LoraParam, apply_lora
from rl import preference, reward_model
from tests.helpers import randomize_adapters, tiny_model_config
from train.state import TrainState, make_train_step

EOS = 2


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("seed", [0, 1])
def test_losses_equal_hand_computed_float64(seed):
    rng = np.random.default_rng(seed)
    lc, lr, rc, rr = (rng.normal(-20, 5, 7) for _ in range(4))
    nc, nr = rng.integers(1, 30, 7).astype(np.float64), rng.integers(1, 30, 7).astype(np.float64)
    beta, eps, gamma = rng.uniform(0.05, 0.5), rng.uniform(0.0, 0.3), rng.uniform(0.1, 2.0)
    f32 = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]  # noqa: E731
    h = (lc - rc) - (lr - rr)
    want = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    np.testing.assert_allclose(preference.dpo_losses(*f32(lc, lr, rc, rr), beta=beta, label_smoothing=eps), want,
                               rtol=2e-5)
    np.testing.assert_allclose(preference.dpo_losses(*f32(lc, lr, rc, rr), beta=beta), -_log_sigmoid(beta * h),
                               rtol=2e-5)
    np.testing.assert_allclose(preference.ipo_losses(*f32(lc, lr, rc, rr), beta=beta), (h - 1 / (2 * beta)) ** 2,
                               rtol=2e-5)
    z = beta * (lc / nc - lr / nr) - gamma
    np.testing.assert_allclose(preference.simpo_losses(*f32(lc, lr, nc, nr), beta=beta, gamma=gamma,
                                                       label_smoothing=eps),
                               -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z), rtol=2e-5)
    a, b = rng.normal(0, 2, 7), rng.normal(0, 2, 7)
    np.testing.assert_allclose(preference.bradley_terry_losses(*f32(a, b), center=0.01),
                               -_log_sigmoid(a - b) + 0.01 * (a + b) ** 2, rtol=2e-5)


def test_sequence_logprobs_sum_response_tokens_only():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (4, 9, 31)).astype(np.float32)
    targets = rng.integers(0, 31, (4, 9)).astype(np.int32)
    mask = (rng.random((4, 9)) < 0.4).astype(np.float32)
    lp, n = preference.sequence_logprobs(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    x = logits.astype(np.float64)
    logsm = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    want = (np.take_along_axis(logsm, targets[..., None], -1)[..., 0] * mask).sum(-1)
    np.testing.assert_allclose(lp, want, rtol=1e-5)
    np.testing.assert_array_equal(n, mask.sum(-1))
    # prompt (unmasked) positions contribute exactly nothing, to the value or the gradient
    g = jax.grad(lambda z: preference.sequence_logprobs(z, jnp.asarray(targets), jnp.asarray(mask))[0].sum())(
        jnp.asarray(logits))
    assert float(jnp.abs(g[mask == 0]).max()) == 0.0 and float(jnp.abs(g[mask == 1]).max()) > 0
    changed = logits.copy()
    changed[mask == 0] = rng.normal(0, 3, changed[mask == 0].shape)
    np.testing.assert_array_equal(preference.sequence_logprobs(jnp.asarray(changed), jnp.asarray(targets),
                                                               jnp.asarray(mask))[0], lp)


def _pairs(rng, n, vocab, *, prompt_len=(3, 8), chosen=None, rejected=None, resp_len=(1, 5), seq_len=16):
    """A pair batch (the [P, 2, T] keys of data/preferences.py) of random prompts and responses;
    `chosen` / `rejected` fix a response token (then "token, EOS")."""
    rows = []
    for _ in range(n):
        prompt = list(rng.integers(3, vocab, rng.integers(*prompt_len)))
        sides = []
        for fixed in (chosen, rejected):
            resp = [fixed, EOS] if fixed is not None else list(rng.integers(3, vocab, rng.integers(*resp_len))) + [EOS]
            ids = np.asarray(prompt + resp, np.int32)
            sides.append(sequence_row(ids, np.asarray([0] * len(prompt) + [1] * len(resp)), seq_len))
        rows.append({f"{k}_BCT": np.stack([s[k] for s in sides]) for k in sides[0]})
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _lora_model(seed=0):
    cfg = tiny_model_config()
    base = transformer.build(cfg, seed=seed)
    model = randomize_adapters(apply_lora(base, rank=4, alpha=8.0, targets=("q", "v", "up", "down")), seed=seed)
    return base, model


def test_lora_reference_is_the_base_exactly():
    base, model = _lora_model()
    batch = _pairs(np.random.default_rng(4), 5, 97)
    graphdef, adapters, rest = nnx.split(model, LoraParam, ...)
    adapters, rest = nnx.to_pure_dict(adapters), nnx.to_pure_dict(rest)
    rows = preference.pair_rows(batch)
    zeroed = jax.tree.map(jnp.zeros_like, adapters)
    ref = transformer.apply(graphdef, (zeroed, rest), rows)
    want = base(rows["inputs_BT"], positions_BT=rows["positions_BT"], segment_ids_BT=rows["segment_ids_BT"])
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(want))
    policy = transformer.apply(graphdef, (adapters, rest), rows)
    assert float(jnp.abs(policy - want).max()) > 1e-3  # the adapters do move the policy
    # the loss's implicit rewards are beta * (policy - base) log-probs
    beta = 0.3
    _, m = preference.dpo_loss_fn(graphdef, beta=beta, reference="zeroed")(adapters, batch, None, {"rest": rest})
    lp_pol, _ = preference.sequence_logprobs(policy, rows["targets_BT"], rows["loss_mask_BT"])
    lp_ref, _ = preference.sequence_logprobs(want, rows["targets_BT"], rows["loss_mask_BT"])
    r = beta * (lp_pol - lp_ref)
    np.testing.assert_allclose(m["reward_chosen"], r[:5].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["reward_margin"], (r[:5] - r[5:]).mean(), rtol=1e-5)


def _full_dpo(loss):
    model = transformer.build(tiny_model_config(), seed=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    ref = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(5), x.shape), params)
    return preference.dpo_loss_fn(graphdef, loss=loss, beta=0.2, label_smoothing=0.1, reference="frozen"), params, \
        {"rest": rest, "ref": ref}


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "reward"])
def test_micro_batches_equal_one_big_batch_per_pair(loss):
    """Pairs with very different response lengths: a per-token weighting of micro-batches would differ."""
    rng = np.random.default_rng(6)
    batch = _pairs(rng, 8, 97, resp_len=(1, 9))
    if loss == "reward":
        model = reward_model.RewardModel(transformer.build(tiny_model_config(), seed=2), seed=2)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        loss_fn = preference.reward_loss_fn(graphdef)
    else:
        loss_fn, params, frozen = _full_dpo(loss)
    tx = optax.sgd(1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    out = {}
    for k in (1, 4):
        new, m = jax.jit(make_train_step(loss_fn, tx, microbatches=k))(state, batch, frozen)
        out[k] = (new.params, m)
    for k in (4,):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out[k][0], out[1][0])
        for key in ("loss", "accuracy", "reward_margin"):
            np.testing.assert_allclose(out[k][1][key], out[1][1][key], rtol=1e-5, atol=1e-6)
    # and a micro-batch's loss is its pairs' mean: the same as the mean over the big batch's pairs
    _, m = loss_fn(params, batch, None, frozen)
    np.testing.assert_allclose(out[1][1]["loss"], m["loss"], rtol=1e-5)
    assert float(m["weight"]) == 8


def test_padding_pairs_count_for_nothing():
    loss_fn, params, frozen = _full_dpo("dpo")
    batch = _pairs(np.random.default_rng(7), 3, 97)
    padded = {k: jnp.concatenate([v, jnp.zeros_like(v[:2])]) for k, v in batch.items()}
    (l0, m0), (l1, m1) = loss_fn(params, batch, None, frozen), loss_fn(params, padded, None, frozen)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert float(m1["weight"]) == 3


def _adam_steps(loss_fn, params, frozen, batches, lr):
    tx = optax.adam(lr)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    step = jax.jit(make_train_step(loss_fn, tx))
    for b in batches:
        state, _ = step(state, b, frozen)
    return state.params


def test_dpo_raises_the_margin_on_a_toy_preference():
    """Prefer token 5 over token 6 after any prompt: 40 LoRA steps on a tiny random model take the
    held-out margin from 0 to clearly positive (beta 0.5: 1.14) and every held-out pair ranked right."""
    _, model = _lora_model(seed=8)
    graphdef, adapters, rest = nnx.split(model, LoraParam, ...)
    adapters, frozen = nnx.to_pure_dict(adapters), {"rest": nnx.to_pure_dict(rest)}
    # B = 0 (a fresh adapter): the policy starts as the base
    adapters = jax.tree_util.tree_map_with_path(lambda path, x: x * 0 if path[-1].key == "b" else x, adapters)
    loss_fn = preference.dpo_loss_fn(graphdef, beta=0.5, reference="zeroed")
    rng = np.random.default_rng(9)
    held = _pairs(rng, 32, 97, chosen=5, rejected=6)
    _, before = loss_fn(adapters, held, None, frozen)
    trained = _adam_steps(loss_fn, adapters, frozen, [_pairs(rng, 16, 97, chosen=5, rejected=6) for _ in range(40)], 1e-2)
    _, after = loss_fn(trained, held, None, frozen)
    assert float(before["reward_margin"]) == 0.0 and float(before["loss"]) == pytest.approx(np.log(2), abs=1e-6)
    assert float(after["reward_margin"]) > 0.8 and float(after["accuracy"]) == 1.0
    assert float(after["loss"]) < 0.4 and float(after["logp_accuracy"]) == 1.0


def test_reward_model_separates_separable_pairs():
    """Chosen sequences end with token 5, rejected ones with 6: 40 steps give held-out accuracy 1."""
    model = reward_model.RewardModel(transformer.build(tiny_model_config(), seed=10), seed=10)
    graphdef, params, rest = nnx.split(model, reward_model.trainable_filter("full"), ...)
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    loss_fn = preference.reward_loss_fn(graphdef)
    rng = np.random.default_rng(11)
    held = _pairs(rng, 32, 97, chosen=5, rejected=6)
    _, before = loss_fn(params, held, None, frozen)
    trained = _adam_steps(loss_fn, params, frozen, [_pairs(rng, 16, 97, chosen=5, rejected=6) for _ in range(40)], 3e-3)
    _, after = loss_fn(trained, held, None, frozen)
    assert abs(float(before["reward_margin"])) < 0.5
    assert float(after["accuracy"]) == 1.0 and float(after["reward_margin"]) > 2.0


def test_reward_is_read_at_the_last_real_token_left_or_right_padded():
    model = reward_model.RewardModel(transformer.build(tiny_model_config(), seed=12), seed=12)
    ids = np.random.default_rng(13).integers(3, 97, 7).astype(np.int32)
    alone = model(jnp.asarray(ids[None]))
    right = np.zeros((1, 12), np.int32)
    right[0, :7] = ids
    seg_r = (np.arange(12) < 7).astype(np.int32)[None]
    left = np.zeros((1, 12), np.int32)
    left[0, 5:] = ids
    seg_l = (np.arange(12) >= 5).astype(np.int32)[None]
    pos_l = np.maximum(np.arange(12) - 5, 0).astype(np.int32)[None]
    got_r = model(jnp.asarray(right), segment_ids_BT=jnp.asarray(seg_r))
    got_l = model(jnp.asarray(left), positions_BT=jnp.asarray(pos_l), segment_ids_BT=jnp.asarray(seg_l))
    np.testing.assert_allclose(got_r, alone, rtol=1e-5)
    np.testing.assert_allclose(got_l, alone, rtol=1e-5)
    scorer = reward_model.RewardScorer(model)
    np.testing.assert_allclose(scorer.score([ids.tolist(), ids[:4].tolist()])[0], alone[0], rtol=1e-5)
    np.testing.assert_allclose(scorer.score(left, segment_ids=seg_l), alone, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["dp", pytest.param("fsdp_tp", marks=pytest.mark.slow)])
def test_dpo_step_on_a_mesh_equals_one_device(strategy):
    """The programs' step (rl/pairwise.py shardings: pairs over the batch axes, parameters by their
    logical axes) on 8 fake devices, with 2 micro-batches = one device, one batch."""
    from models.sharding import use_rules
    from rl import pairwise
    from train import mesh as mesh_lib

    cfg = tiny_model_config()
    batch = _pairs(np.random.default_rng(14), 8, 97, seq_len=16)
    tx = optax.adam(1e-2)

    def two_steps(params, frozen, loss_fn, microbatches, batch):
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(0)))
        step = jax.jit(make_train_step(loss_fn, tx, microbatches=microbatches))
        for _ in range(2):
            state, m = step(state, batch, frozen)
        return jax.device_get(state.params), float(m["loss"])

    loss_fn, params, frozen = _full_dpo("dpo")
    want, want_loss = two_steps(params, frozen, loss_fn, 1, batch)
    spec = mesh_lib.resolve({"strategy": strategy}, 8, cfg, 16)
    mesh = mesh_lib.make_mesh(spec["shape"])
    with jax.set_mesh(mesh), use_rules(spec["rules"]):
        model = transformer.build(cfg, seed=1)
        graphdef, params, rest, _ = pairwise.split_on_mesh(model, nnx.Param, mesh, spec["rules"])
        ref = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(5), x.shape), params)
        loss_fn = preference.dpo_loss_fn(graphdef, beta=0.2, label_smoothing=0.1, reference="frozen")
        sh = pairwise.pair_shardings(mesh, spec["rules"], 8, 16)
        got, got_loss = two_steps(params, {"rest": rest, "ref": ref}, loss_fn, 2,
                                  {k: jax.device_put(v, sh[k]) for k, v in batch.items()})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)


def test_moe_policy_dpo_loss_adds_its_auxiliary_losses():
    """DPO on an MoE policy: the loss is the preference loss plus the policy's aux_loss (load
    balancing and router z-loss, on the pair rows as pretraining adds them); routing metrics are
    reported; the reference pass adds nothing."""
    moe = dict(num_experts=4, experts_per_token=2, aux_loss_weight=0.2, z_loss_weight=0.02)
    model = transformer.build(tiny_model_config(moe=moe), seed=3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    ref = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(8), x.shape), params)
    batch = _pairs(np.random.default_rng(11), 6, 97)
    loss, m = preference.dpo_loss_fn(graphdef, beta=0.2)(params, batch, None, {"rest": rest, "ref": ref})
    _, aux = transformer.apply_with_aux(graphdef, (params, rest), preference.pair_rows(batch))
    assert float(aux["aux_loss"]) > 0.2 and m["moe_expert_load"].shape == (4,)
    np.testing.assert_allclose(float(loss), float(m["loss"]) + float(aux["aux_loss"]), rtol=1e-6)
    # m["loss"] is the DPO loss itself: the mean of -log sigmoid(margin / ...) over the pairs
    rows = preference.pair_rows(batch)
    lp, _ = preference.sequence_logprobs(transformer.apply(graphdef, (params, rest), rows), rows["targets_BT"],
                                         rows["loss_mask_BT"])
    lr, _ = preference.sequence_logprobs(transformer.apply(graphdef, (ref, rest), rows), rows["targets_BT"],
                                         rows["loss_mask_BT"])
    z = 0.2 * ((lp[:6] - lr[:6]) - (lp[6:] - lr[6:]))
    np.testing.assert_allclose(float(m["loss"]), float(jnp.mean(jax.nn.softplus(-z))), rtol=1e-5)
