"""Per-token log-likelihood of a model's logits: the one definition that training losses
(train/loss.py), evaluation scoring (evals/scoring.py), the sampler (inference/engine.py) and the
RL trainer (rl/) share. A log-prob at temperature T is `log_softmax(logits / T)` over the full
vocabulary, whatever top-k / top-p filter the sampler applied (as TRL computes it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BTV, targets_BT):
    """(nll_BT, log_z_BT), float32 nats: nll = logsumexp(logits) - logits[target], log Z = logsumexp(logits).

    Computed in float32 whatever the logits' dtype; log Z is what z-loss penalises.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return log_z_BT - target_logit_BT, log_z_BT


def token_logprobs(logits_BTV, targets_BT, temperature: float = 1.0):
    """log_softmax(logits / temperature)[target], float32 [B, T] (`temperature` 0 means 1: greedy
    decoding reports the model's own distribution)."""
    t = float(temperature) if temperature else 1.0
    logits_BTV = logits_BTV.astype(jnp.float32)
    if t != 1.0:
        logits_BTV = logits_BTV / jnp.float32(t)
    return -token_nll(logits_BTV, targets_BT)[0]
