"""Train state (a pytree), its shardings, and the jitted train / eval steps.

TrainState = (step, params, opt_state, rng), checkpointed whole. `params` is a plain nested
dict of arrays (`models.transformer.split_params`); its shardings come from each parameter's
logical axes, and the optimizer state takes the sharding of the parameter it mirrors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.config import ModelConfig
from models.pipeline import split_microbatches
from models.sharding import constrain, named_shardings
from models.transformer import abstract_model, init_params, logical_axes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # [] int32: updates applied so far
    params: Any  # nested dict of arrays
    opt_state: Any
    rng: jax.Array  # [2] uint32 raw key for dropout; split every step


def abstract_params(model_cfg: ModelConfig):
    return nnx.to_pure_dict(nnx.state(abstract_model(model_cfg)))


def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules=None, *,
                    offload_optimizer: bool = False) -> TrainState:
    """Shardings of the train state. With `offload_optimizer` the optimizer state lives in host
    memory (`memory_kind="pinned_host"`) between steps; the step brings it to the devices for the
    update and writes it back (on CPU host and device memory are the same: it runs, saving nothing)."""
    abstract = abstract_model(model_cfg)
    abs_params = nnx.to_pure_dict(nnx.state(abstract))
    param_sh = named_shardings(logical_axes(abstract), abs_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abs_opt = jax.eval_shape(tx.init, abs_params)
    opt_sh = optax.tree_map_params(
        tx, lambda leaf, sh, p: sh if getattr(leaf, "shape", None) == p.shape else replicated,
        abs_opt, param_sh, abs_params, transform_non_params=lambda _: replicated)
    if offload_optimizer:
        opt_sh = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_sh)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def on_device(shardings):
    """The same shardings in device memory (undoing `offload_optimizer`)."""
    return jax.tree.map(lambda s: s.with_memory_kind("device"), shardings)


def abstract_state(model_cfg: ModelConfig, tx, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    abs_params = abstract_params(model_cfg)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params, opt_state=abs_opt,
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def create_state(model_cfg: ModelConfig, tx, *, seed: int, mesh: Mesh, rules=None, offload_optimizer: bool = False):
    """(graphdef, TrainState) initialised directly into its shardings."""
    shardings = state_shardings(model_cfg, tx, mesh, rules, offload_optimizer=offload_optimizer)
    graphdef, params = init_params(model_cfg, seed, mesh=mesh, rules=rules)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)), shardings.rng)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return graphdef, TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, *, microbatches: int = 1,
                    use_dropout: bool = False, opt_device_shardings=None, post_update: Callable | None = None):
    """train_step(state, batch, frozen=None) -> (state, metrics), pure; jit it with shardings.

    `state.params` are the parameters trained; `frozen` (parameter-efficient fine-tuning: the
    base model under LoRA / QLoRA / prefixes) goes to the loss undifferentiated, and only
    `state.params` get gradients and optimizer state.

    An update whose loss or gradient norm is not finite is not applied (`metrics["nonfinite"]`
    is 1 for that step; the step counter still advances with the data).

    With k micro-batches the gradient is accumulated in float32 with each micro-batch weighted by
    its weight, which equals the gradient of one batch of k times the size exactly (up to float
    summation order): the loss's `weight` metric when it states one (RL's per-sequence or
    constant-normalised losses: rl/losses.py), else its token count `num_tokens`. The loss's other
    metrics come back averaged over the micro-batches (array metrics, e.g. MoE's per-expert load,
    element-wise). `opt_device_shardings` (with an offloaded optimizer state): where the state goes
    for the update. `post_update(old_params, params, metrics) -> params` sets parameters outside
    the gradient after the optimizer update, from the step's metrics (MoE's auxiliary-loss-free
    bias balancing: `models.moe.balance_router_biases`); a refused update refuses it too.
    """
    if microbatches < 1:
        raise ValueError(f"train.microbatches={microbatches} must be >= 1")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch, frozen=None):
        rng, step_rng = jax.random.split(state.rng)
        if not use_dropout:
            step_rng = None
        if microbatches == 1:
            (_, m), grads = grad_fn(state.params, batch, step_rng, frozen)
            n = _weight(m)
            loss_sum, aux = m["loss"] * n, m
        else:
            mbs = jax.tree.map(lambda x: split_microbatches(x, microbatches), batch)

            def body(carry, xs):
                g_acc, loss_acc, n_acc = carry
                mb, i = xs
                mb = {k: constrain(v, ("batch",) + (None,) * (v.ndim - 2) + ("length",)) for k, v in mb.items()}
                r = None if step_rng is None else jax.random.fold_in(step_rng, i)
                (_, mm), g = grad_fn(state.params, mb, r, frozen)
                w = _weight(mm)
                g_acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32) * w, g_acc, g)
                return (g_acc, loss_acc + mm["loss"] * w, n_acc + w), mm

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (g, loss_sum, n), ms = jax.lax.scan(body, (zeros, 0.0, 0.0), (mbs, jnp.arange(microbatches)))
            grads = jax.tree.map(lambda x, p: (x / jnp.maximum(n, 1.0)).astype(p.dtype), g, state.params)
            aux = jax.tree.map(lambda x: x.mean(0), ms)
        grad_norm = optax.tree.norm(grads)
        loss = loss_sum / jnp.maximum(n, 1.0)
        opt_state = state.opt_state
        if opt_device_shardings is not None:  # host -> device for the update; out_shardings take it back
            opt_state = jax.device_put(opt_state, opt_device_shardings)
        updates, new_opt_state = tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if post_update is not None:
            params = post_update(state.params, params, aux)
        # a non-finite loss or gradient is never applied: parameters and optimizer state stay
        # (selected here rather than by optax.apply_if_finite, whose extra state would change the
        # checkpoint layout); the step counter and the data advance, train/lifecycle.NanGuard counts it
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        params, new_opt_state = keep(params, state.params), keep(new_opt_state, opt_state)
        extra = {k: v for k, v in aux.items() if k not in ("loss", "num_tokens", "weight")}
        metrics = {**extra, "loss": loss, "grad_norm": grad_norm, "num_tokens": n,
                   "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return TrainState(step=state.step + 1, params=params, opt_state=new_opt_state, rng=rng), metrics

    return train_step


def _weight(metrics):
    """What a micro-batch's mean loss is weighted by: its stated `weight`, else its tokens."""
    return metrics["weight"] if "weight" in metrics else metrics["num_tokens"]


def make_eval_step(loss_fn: Callable):
    """eval_step(params, batch, frozen=None) -> {'loss_sum', 'num_tokens'} (no dropout)."""

    def eval_step(params, batch, frozen=None):
        _, m = loss_fn(params, batch, None, frozen)
        return {"loss_sum": m["loss"] * m["num_tokens"], "num_tokens": m["num_tokens"]}

    return eval_step
