"""The policy-gradient loop's pieces (rl/train.py) on a toy task with a known optimum: a tiny
random model learns to start every completion with one target token."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from models import peft
from models import transformer as T
from rl import losses, reward_model
from rl.rollout import sample_groups
from rl.train import (VARIANTS, Learner, forward, loss_settings, make_loss_fn, policy_of, prompts_for_step,
                      update_inputs)
from tests.helpers import random_tokens, tiny_model_config
from train.state import TrainState, make_train_step

TARGET = 7


def _rl_config(algorithm, loss="grpo", **kw):
    from ml_collections import config_dict

    d = dict(algorithm=algorithm, loss=loss, group_size=8, advantage=None, aggregation=None, level=None,
             clip_low=None, clip_high=None, dynamic_sampling=None, epochs=1, microbatches=1, max_new_tokens=2,
             kl=dict(beta=0.0, estimator="k3", mode="loss"),
             ppo=dict(gamma=1.0, lam=0.95, whiten=True, value_coef=0.5, value_clip=0.2))
    d.update(kw)
    return config_dict.ConfigDict(d)


def _toy_policy(algorithm, method="full", seed=0):
    """(graphdef, trained params, frozen rest) of a random 2-layer policy (a value head for PPO)."""
    # LoRA on a random model needs an output head of its own to adapt: the tied table's rows are
    # N(0, 0.02) small, so the residual stream alone barely moves the logits
    cfg = tiny_model_config(num_layers=2, vocab_size=61, tie_embeddings=method == "full")
    model = T.build(cfg, seed=seed)
    if method == "lora":
        model = peft.apply(model, {"method": "lora", "lora": {"rank": 4, "alpha": 8.0,
                                                              "targets": ("q", "v", "down", "lm_head")}})
    trainable = peft.trainable_filter(method)
    if algorithm == "ppo":
        model, trainable = reward_model.RewardModel(model), reward_model.trainable_filter(method)
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


def _toy_run(algorithm, loss="grpo", *, steps, method="full", lr=3e-2, seed=0):
    """(success rate of the first 3 steps' samples, of the last 3 steps'), each step as rl.train
    takes it: sample_groups, then Learner.learn (scoring, update_inputs, the update)."""
    rl = _rl_config(algorithm, loss)
    graphdef, params, frozen = _toy_policy(algorithm, method, seed)
    tx = optax.adam(lr)
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    learner = Learner(graphdef, frozen, tx, loss_settings(rl), rl, temperature=1.0,
                      ref_params=jax.tree.map(jax.numpy.copy, params) if method == "full" else None)
    assert learner.fused == (algorithm != "ppo")
    rng = np.random.default_rng(seed)
    pool = [list(random_tokens(rng, (4,), 61)) for _ in range(16)]
    rates = []
    for step in range(steps):
        idx = prompts_for_step(len(pool), 4, seed, step)
        ro = sample_groups(policy_of(nnx.merge(graphdef, state.params, frozen)), [pool[i] for i in idx],
                           group_size=8, max_new_tokens=2, temperature=1.0, seed=step)
        r = np.array([float(c[0] == TARGET) for c in ro.completions], np.float32)
        rates.append(r.mean())
        state, m = learner.learn(state, ro.batch(prompt_len=4, completion_len=2), r)
        assert m["logprob_gap"] < 1e-5, m["logprob_gap"]
    return float(np.mean(rates[:3])), float(np.mean(rates[-3:]))


def test_fused_scoring_equals_a_separate_scoring_pass():
    """One update per batch: the update's own forward as the scoring pass gives the update and the
    metrics (gap, entropy, kl) of a separate pass first."""
    rl = _rl_config("grpo", kl=dict(beta=0.05, estimator="k3", mode="loss"))
    graphdef, params, frozen = _toy_policy("grpo", seed=2)
    ref = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), params)
    rng = np.random.default_rng(2)
    prompts = [list(random_tokens(rng, (4,), 61)) for _ in range(4)]
    ro = sample_groups(nnx.merge(graphdef, params, frozen), prompts, group_size=8, max_new_tokens=2, seed=3)
    host = ro.batch(prompt_len=4, completion_len=2)
    r = rng.normal(0, 1, len(ro.completions)).astype(np.float32)
    out = []
    for fused in (True, False):
        tx = optax.adam(1e-2)
        learner = Learner(graphdef, frozen, tx, loss_settings(rl), rl, temperature=1.0, ref_params=ref)
        learner.fused = fused
        p = jax.tree.map(jax.numpy.copy, params)  # the update donates its state
        state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=p, opt_state=tx.init(p),
                           rng=jax.random.key_data(jax.random.key(0)))
        out.append(learner.learn(state, host, r))
    (a, ma), (b, mb) = out
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a.params, b.params)
    for k in ("loss", "kl", "entropy", "logprob_gap", "clip_fraction", "advantage_std"):
        np.testing.assert_allclose(ma[k], mb[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert ma["kl"] > 0 and ma["entropy"] > 0


@pytest.mark.parametrize("algorithm,loss", [("grpo", "grpo"), ("grpo", "dapo"), ("rloo", "grpo"),
                                            ("reinforce", "grpo"), ("ppo", "grpo")])
def test_policy_gradient_learns_a_target_token(algorithm, loss):
    first, last = _toy_run(algorithm, loss, steps=25)
    assert first < 0.2 and last > 0.8, (first, last)


def test_lora_policy_learns_and_its_reference_is_the_base():
    first, last = _toy_run("grpo", steps=40, method="lora")
    assert first < 0.2 and last > 0.6, (first, last)  # measured 0.75 (seed 0), 1.0 (seed 1) at step 40


def test_variants_and_bad_settings():
    from ml_collections import config_dict

    def rl(**kw):
        d = dict(algorithm="grpo", loss="grpo", group_size=4, advantage=None, aggregation=None, level=None,
                 clip_low=None, clip_high=None, dynamic_sampling=None, kl=dict(beta=0.0, estimator="k3", mode="loss"))
        d.update(kw)
        return config_dict.ConfigDict(d)

    assert loss_settings(rl(loss="dapo"))["clip_high"] == 0.28 and VARIANTS["dr_grpo"]["aggregation"] == "constant"
    assert loss_settings(rl(loss="gspo", clip_low=1e-3))["clip_low"] == 1e-3  # an override wins
    assert loss_settings(rl(algorithm="rloo"))["advantage"] == "rloo"
    with pytest.raises(ValueError, match="rl.algorithm='ppo2'"):
        loss_settings(rl(algorithm="ppo2"))
    with pytest.raises(ValueError, match="rl.loss='grp'"):
        loss_settings(rl(loss="grp"))
    with pytest.raises(ValueError, match="GAE needs PPO's value head"):
        loss_settings(rl(advantage="gae"))
    with pytest.raises(ValueError, match="dynamic_sampling=True with PPO"):
        loss_settings(rl(algorithm="ppo", dynamic_sampling=True))
    assert loss_settings(rl(algorithm="ppo"))["aggregation"] == "token_mean"
    with pytest.raises(ValueError, match="group_size >= 2"):
        loss_settings(rl(group_size=1))
    # prompts per step are a function of (seed, step): a resumed run draws the same
    np.testing.assert_array_equal(prompts_for_step(100, 8, 3, 17), prompts_for_step(100, 8, 3, 17))
    assert not np.array_equal(prompts_for_step(100, 8, 3, 17), prompts_for_step(100, 8, 3, 18))


def _ppo_setup(seed=3):
    """(graphdef, params, a scored PPO batch as update_inputs makes it, loss_fn) on a random tiny
    policy with a value head: 8 rows, completions of 1-3 tokens after a 3-token prompt."""
    from ml_collections import config_dict

    rl = config_dict.ConfigDict(dict(algorithm="ppo", loss="grpo", group_size=4, advantage=None, aggregation=None,
                                     level=None, clip_low=None, clip_high=None, dynamic_sampling=None,
                                     kl=dict(beta=0.1, estimator="k1", mode="reward")))
    settings = loss_settings(rl)
    model = reward_model.RewardModel(T.build(tiny_model_config(num_layers=2, vocab_size=61), seed=seed), seed=seed)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(seed + 2)
    B, T_ = 8, 7
    inputs = random_tokens(rng, (B, T_), 61)
    mask = np.zeros((B, T_), np.float32)
    for i, n in enumerate(rng.integers(1, 4, B)):
        mask[i, 3:3 + n] = 1.0
    values = rng.normal(0, 1, (B, T_)).astype(np.float32)
    batch = {"inputs_BT": inputs, "targets_BT": np.roll(inputs, -1, 1), "loss_mask_BT": mask,
             "positions_BT": np.tile(np.arange(T_, dtype=np.int32), (B, 1)), "segment_ids_BT": np.ones((B, T_), np.int32)}
    old = np.asarray(losses.token_logprobs(forward(graphdef, params, batch)[0], batch["targets_BT"]))
    ref = old + rng.normal(0, 0.1, old.shape).astype(np.float32)
    extra, _, _ = update_inputs(batch, rng.normal(0, 1, B), old - 0.05, ref, values, settings, group_size=4,
                                kl=rl.kl, ppo=config_dict.ConfigDict(dict(gamma=0.9, lam=0.8, whiten=True)))
    batch = {**batch, **{k: np.asarray(v) for k, v in extra.items()}}
    loss_fn = make_loss_fn(graphdef, settings, temperature=1.0, max_len=3, beta=0.1, kl_estimator="k1",
                           kl_in_loss=False, value_coef=0.5, value_clip=0.2)
    return graphdef, params, batch, loss_fn


def _steps(params, batch, loss_fn, tx, microbatches, n=1):
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    step = jax.jit(make_train_step(loss_fn, tx, microbatches=microbatches))
    for _ in range(n):
        state, m = step(state, batch)
    return jax.device_get(state.params), m


def test_ppo_micro_batches_equal_one_batch():
    """PPO's policy + value loss states one weight: 2 micro-batches update exactly as one batch."""
    _, params, batch, loss_fn = _ppo_setup()
    tx = optax.sgd(1.0)
    (one, m), (two, _) = (_steps(params, batch, loss_fn, tx, k) for k in (1, 2))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), one, two)
    assert float(m["value_loss"]) > 0
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), one, params)
    assert moved["head"]["kernel"] > 0 and moved["decoder"]["embed"] > 0


@pytest.mark.parametrize("strategy", ["dp", pytest.param("fsdp_tp", marks=pytest.mark.slow)])
def test_rl_step_on_a_mesh_equals_one_device(strategy):
    """The loop's update (PPO: policy, value head, GAE inputs) on 8 fake devices, parameters by their
    logical axes and rollout rows placed as rl.train places them, 2 micro-batches = one device."""
    from models.sharding import named_shardings, use_rules
    from rl.train import place_rows
    from train import mesh as mesh_lib
    from train.sft import _axes_tree

    graphdef, params, batch, loss_fn = _ppo_setup(seed=4)
    tx = optax.adam(1e-2)
    want, want_m = _steps(params, batch, loss_fn, tx, 1, n=2)
    spec = mesh_lib.resolve({"strategy": strategy}, 8, tiny_model_config(num_layers=2, vocab_size=61), 8)
    mesh = mesh_lib.make_mesh(spec["shape"])
    with jax.set_mesh(mesh), use_rules(spec["rules"]):
        state = nnx.merge(graphdef, params)
        sh = named_shardings(_axes_tree(nnx.state(state)), params, mesh, spec["rules"])
        got, got_m = _steps(jax.device_put(params, sh), place_rows(batch, mesh, spec["rules"]), loss_fn, tx, 2, n=2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
    np.testing.assert_allclose(float(got_m["loss"]), float(want_m["loss"]), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The program


def _rl(workdir, base, *extra, env=None, check=True, preset="grpo_arith"):
    from tests.helpers import run_program

    return run_program("rl.train", f"--config=configs/rl.py:{preset}", f"--workdir={workdir}",
                       f"--config.init.workdir={base}", "--config.init.build=", "--config.train.steps=6",
                       "--config.rl.group_size=4", "--config.rl.prompts_per_step=4", "--config.data.eval_examples=8",
                       "--config.train.log_every=2", "--config.train.eval_every=6", "--config.train.checkpoint_every=3",
                       "--config.train.async_checkpoint=False", "--config.rl.epochs=2", "--config.rl.kl.beta=0.05",
                       *extra, env=env, check=check)


@pytest.fixture(scope="module")
def rl_run(tiny_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rl_run")
    _rl(workdir, tiny_run)
    return workdir


def test_rl_program_logs_the_pinned_metrics(rl_run):
    from train.metrics import read_metrics

    rows = read_metrics(rl_run)
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [0, 6]
    assert all("reward_mean" not in r for r in evals)
    for r in train:
        for k in ("reward_mean", "kl", "logprob_gap", "rollout_fraction", "accuracy", "entropy", "clip_fraction",
                  "response_length", "advantage_std"):
            assert k in r and np.isfinite(r[k]), k
        assert r["logprob_gap"] < 1e-5 and 0 < r["rollout_fraction"] < 1
    assert train[-1]["kl"] > 0  # the policy moved away from its start
    assert (rl_run / "reward.png").stat().st_size > 0 and (rl_run / "loss.png").is_file()
    from models.checkpoint import load

    model, _ = load(rl_run)  # an RL run is a language model to load (its config's `reward` is the policy's)
    assert model.config.vocab_size > 0


def test_kill_and_resume_equal_the_uninterrupted_run(rl_run, tiny_run, tmp_path):
    from models.checkpoint import restore_params

    proc = _rl(tmp_path, tiny_run, env={"LOOM_FAULT_KILL_AFTER_STEP": "3"}, check=False)
    assert proc.returncode != 0
    _rl(tmp_path, tiny_run)
    got, _ = restore_params(tmp_path)
    want, _ = restore_params(rl_run)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), got, want)


@pytest.mark.slow
def test_ppo_program_with_a_reward_model(rm_run, tiny_run, tmp_path):
    """ppo_arith with a trained reward model as its reward: value metrics logged, and the run loads
    as a language model (its policy; the value head stays behind)."""
    from models.checkpoint import load, restore_params
    from train.metrics import read_metrics

    _rl(tmp_path, tiny_run, "--config.reward.kind=model", f"--config.reward.workdir={rm_run}", preset="ppo_arith")
    train = [r for r in read_metrics(tmp_path) if "reward_mean" in r]
    assert len(train) == 3
    for r in train:
        for k in ("value_loss", "value_error", "value_clip_fraction", "advantage_std", "logprob_gap", "kl"):
            assert k in r and np.isfinite(r[k]), k
        assert r["logprob_gap"] < 1e-5
    assert any(r["reward_std"] > 0 for r in train)
    saved, _ = restore_params(tmp_path)
    assert set(saved) == {"decoder", "head"}
    model, cfg = load(tmp_path)
    got = nnx.to_pure_dict(nnx.state(model, peft.trainable_filter("lora")))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, saved["decoder"])
    with pytest.raises(ValueError, match="reward.workdir"):
        from configs.rl import get_config
        from rl.train import resolve

        c = get_config("ppo_arith")
        c.reward.kind = "model"
        resolve(c, 1)


def test_moe_policy_loss_adds_its_auxiliary_losses_and_balances_router_biases():
    """An MoE policy: the GRPO loss is the dense loss plus the model's aux_loss (balance and router
    z-loss, as pretraining adds them), routing metrics are reported, and with bias balancing each
    update moves the router biases by +-rate from the step's load (in PPO's wrapper too)."""
    from rl.train import router_bias_update

    rl = _rl_config("grpo")
    settings = loss_settings(rl)
    moe = dict(num_experts=4, experts_per_token=2, aux_loss_weight=0.3, z_loss_weight=0.05, bias_balancing=True,
               bias_update_rate=0.01)
    cfg = tiny_model_config(num_layers=2, vocab_size=61, moe=moe)
    graphdef, params = nnx.split(T.build(cfg, seed=4))
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(9)
    B, T_ = 8, 6
    inputs = random_tokens(rng, (B, T_), 61)
    mask = np.zeros((B, T_), np.float32)
    mask[:, 3:] = 1.0
    batch = {"inputs_BT": inputs, "targets_BT": np.roll(inputs, -1, 1), "loss_mask_BT": mask,
             "positions_BT": np.tile(np.arange(T_, dtype=np.int32), (B, 1)),
             "segment_ids_BT": np.ones((B, T_), np.int32), "advantages_BT": np.repeat(rng.normal(0, 1, (B, 1)), T_, 1),
             "ref_logp_BT": rng.normal(-4, 0.1, (B, T_)).astype(np.float32)}
    loss_fn = make_loss_fn(graphdef, settings, temperature=1.0, max_len=3, beta=0.0, kl_estimator="k3",
                           kl_in_loss=True)
    loss, m = loss_fn(params, batch, None)
    _, aux = T.apply_with_aux(graphdef, params, batch)
    np.testing.assert_allclose(float(loss), float(m["loss"]) + float(aux["aux_loss"]), rtol=1e-6)
    assert float(aux["aux_loss"]) > 0.3 and m["moe_expert_load"].shape == (4,)
    # the policy term alone is the dense computation's: a model without aux weights gives the same "loss"
    plain = make_loss_fn(nnx.split(T.build(cfg.replace(moe=cfg.moe.__class__(**{**moe, "aux_loss_weight": 0.0,
                                                                                   "z_loss_weight": 0.0})),
                                           seed=4))[0], settings, temperature=1.0, max_len=3, beta=0.0,
                         kl_estimator="k3", kl_in_loss=True)
    loss0, _ = plain(params, batch, None)
    np.testing.assert_allclose(float(loss0), float(m["loss"]), rtol=1e-6)

    tx = optax.sgd(0.0)  # only the balancing moves anything
    load = np.asarray(m["moe_layer_load"])  # [L, E]
    want = np.sign(load.mean(-1, keepdims=True) - load) * 0.01
    new, _ = _steps_with(params, batch, loss_fn, tx, router_bias_update(cfg))
    np.testing.assert_allclose(new["layers"]["mlp"]["router"]["bias"] - params["layers"]["mlp"]["router"]["bias"],
                               want, atol=1e-7)
    wrapped = {"decoder": params, "head": {"kernel": np.ones((cfg.hidden_size, 1), np.float32)}}
    moved = router_bias_update(cfg, ppo=True)(wrapped, jax.tree.map(lambda x: x, wrapped), m)
    np.testing.assert_allclose(moved["decoder"]["layers"]["mlp"]["router"]["bias"]
                               - params["layers"]["mlp"]["router"]["bias"], want, atol=1e-7)
    assert router_bias_update(tiny_model_config()) is None


def _steps_with(params, batch, loss_fn, tx, post_update):
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    state, m = jax.jit(make_train_step(loss_fn, tx, microbatches=1, post_update=post_update))(state, batch)
    return jax.device_get(state.params), m
