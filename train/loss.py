"""Loss functions: pure `loss_fn(params, batch, rng, frozen=None) -> (loss, metrics)`.

`params` are the parameters being trained; `frozen` (parameter-efficient fine-tuning) the rest of
the model, merged with them into one module and not differentiated (see train/state.py).

A training loop differs from another mostly by its data and its loss; SFT, reward modelling
and RL add theirs here. Every loss reports `num_tokens` (the weight of the batch), so gradient
accumulation can weight micro-batches exactly (see train/state.py).
"""

from __future__ import annotations

import jax.numpy as jnp

from models.logprobs import token_nll
from models.transformer import apply_with_aux


def lm_loss_fn(graphdef, *, z_loss: float = 0.0):
    """Next-token cross-entropy over `loss_mask_BT`, plus z-loss `z_loss * mean(log Z ** 2)`, plus
    the model's auxiliary losses (MoE load balancing and router z-loss, models/moe.py).

    The returned loss (the one differentiated) is the masked mean of nll + z-loss + the model's
    `aux_loss`; metrics carry the cross-entropy alone (`loss`), the z-loss term, token accuracy,
    `num_tokens`, and the model's auxiliary metrics under their own keys (`moe_*`).
    `rng` (or None) drives dropout. With `frozen`, `graphdef` is the three-way split's
    (`nnx.split(model, LoraParam, ...)`): the trained state first, the frozen one second.
    """

    def loss_fn(params, batch, rng, frozen=None):
        logits, aux = apply_with_aux(graphdef, params if frozen is None else (params, frozen), batch, dropout_rng=rng)
        nll, log_z = token_nll(logits, batch["targets_BT"])
        mask = batch["loss_mask_BT"].astype(jnp.float32)
        n = mask.sum()
        denom = jnp.maximum(n, 1.0)
        ce = (nll * mask).sum() / denom
        z = z_loss * (jnp.square(log_z) * mask).sum() / denom if z_loss else jnp.zeros((), jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch["targets_BT"]).astype(jnp.float32)
        metrics = {"loss": ce, "z_loss": z, "accuracy": (correct * mask).sum() / denom, "num_tokens": n}
        aux = dict(aux)
        model_aux = aux.pop("aux_loss", jnp.zeros((), jnp.float32))
        metrics.update(aux)
        return ce + z + model_aux, metrics

    return loss_fn
