"""The train step with a frozen base (LoRA / QLoRA): only the adapters are trained and carry
optimizer state; gradients equal autodiff of the merged model; accumulation equals one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import transformer as T
from models.lora import LoraParam, adapter_count, apply_lora
from models.quant import quantize_base
from tests.helpers import randomize_adapters, tiny_model_config
from tests.train.test_train_step import _batch
from train.loss import lm_loss_fn
from train.state import TrainState, make_eval_step, make_train_step


def _split(model):
    graphdef, adapters, frozen = nnx.split(model, LoraParam, ...)
    return graphdef, nnx.to_pure_dict(adapters), nnx.to_pure_dict(frozen)


def _state(params, tx):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(0)))


def _size(tree):
    return sum(np.size(x) for x in jax.tree.leaves(tree))


def test_lora_step_trains_the_adapters_only():
    cfg = tiny_model_config()
    model = apply_lora(T.build(cfg, seed=0), rank=4, alpha=8.0, seed=0)
    graphdef, adapters, frozen = _split(model)
    frozen_before = jax.tree.map(np.asarray, frozen)
    tx = optax.adamw(1e-2)
    state = _state(adapters, tx)
    # the optimizer state is the adapters' moments (Adam's mu and nu) and a step count
    n = adapter_count(model)
    assert _size(state.params) == n and _size(state.opt_state) == 2 * n + 1
    assert n < _size(frozen) / 4
    step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx))
    losses = []
    for i in range(6):
        state, m = step(state, {k: jnp.asarray(v) for k, v in _batch(0).items()}, frozen)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses  # the adapters alone learn the fixed batch
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)))
    assert float(jnp.abs(jax.tree.leaves(state.params)[0]).max()) > 0
    # the trained adapters, merged back into the model, are what the eval step scores
    ev = jax.jit(make_eval_step(lm_loss_fn(graphdef)))(state.params, {k: jnp.asarray(v) for k, v in _batch(0).items()},
                                                        frozen)
    trained = nnx.merge(graphdef, state.params, frozen)
    b = _batch(0)
    logits = trained(jnp.asarray(b["inputs_BT"]), positions_BT=jnp.asarray(b["positions_BT"]),
                     segment_ids_BT=jnp.asarray(b["segment_ids_BT"]))
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.asarray(b["targets_BT"])[..., None], -1)[..., 0]
    want = float((nll * b["loss_mask_BT"]).sum())
    np.testing.assert_allclose(float(ev["loss_sum"]), want, rtol=1e-5)


def test_adapter_gradients_equal_autodiff_of_the_merged_model_and_accumulate_exactly():
    cfg = tiny_model_config()
    model = randomize_adapters(apply_lora(quantize_base(T.build(cfg, seed=1), block_size=8), rank=2, alpha=4.0,
                                          targets=("q", "v", "down"), seed=1), seed=1)
    graphdef, adapters, frozen = _split(model)
    batch = {k: jnp.asarray(v) for k, v in _batch(1).items()}

    def reference_loss(m):  # autodiff of the whole NNX model, differentiated w.r.t. LoraParam only
        logits = m(batch["inputs_BT"], positions_BT=batch["positions_BT"], segment_ids_BT=batch["segment_ids_BT"])
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets_BT"][..., None], -1)[..., 0]
        return (nll * batch["loss_mask_BT"]).sum() / batch["loss_mask_BT"].sum()

    want = nnx.to_pure_dict(nnx.grad(reference_loss, argnums=nnx.DiffState(0, LoraParam))(model))
    # SGD with lr 1: old - new is the gradient the step computed
    tx = optax.sgd(1.0)
    updated = {}
    for k in (1, 2, 4):
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx, microbatches=k))
        new, m = step(_state(adapters, tx), batch, frozen)
        updated[k] = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), new.params, adapters)
    for got in updated.values():
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, np.asarray(w), rtol=2e-4, atol=1e-6), got, want)
