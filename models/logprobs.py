"""Per-token log-likelihood of a model's logits: the one definition that training losses
(train/loss.py) and evaluation scoring (evals/scoring.py) share."""

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
