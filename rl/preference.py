"""Preference losses: DPO, IPO, SimPO and the reward model's Bradley-Terry loss, as pure functions.

Batches hold pairs (data/preferences.py): `<key>_BCT` arrays [P, 2, T], C = (chosen, rejected).
`pair_rows` lays them out as 2P rows of the batch format, the P chosen rows first, so one forward
pass scores both sides. Per pair (β = `beta`, ε = `label_smoothing`, log-probs summed over the
response tokens, `ref` the frozen reference's):

  dpo    h = (logπ(y_c) - ref(y_c)) - (logπ(y_r) - ref(y_r));  -(1-ε) log σ(β h) - ε log σ(-β h)
         (Rafailov et al. 2023, arXiv 2305.18290; ε > 0 is cDPO's conservative smoothing)
  ipo    (h - 1 / (2β))²            (Azar et al. 2023, arXiv 2310.12036; sums, as the paper writes
                                    it: TRL averages the log-probs over tokens instead)
  simpo  z = β (logπ(y_c) / |y_c| - logπ(y_r) / |y_r|) - γ;  -(1-ε) log σ(z) - ε log σ(-z)
         (Meng et al. 2024, arXiv 2405.14734: length-normalised, a margin γ, no reference)
  bradley_terry  -log σ(r_c - r_r) (+ center · (r_c + r_r)², TRL's reward centring, when set)

Implicit rewards (what DPO's metrics call rewards): β (logπ - ref) per side (SimPO: β logπ / |y|);
`accuracy` is the share of pairs whose chosen reward is strictly higher. Every loss is a mean over
the batch's pairs and reports that count as its `weight`, so gradient accumulation over
micro-batches equals one large batch (train/state.py); empty (padding) pairs count for nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.logprobs import token_nll
from models.transformer import apply, apply_with_aux

LOSSES = ("dpo", "ipo", "simpo")


def pair_rows(batch: dict) -> dict:
    """{"inputs_BT", ...}: the pairs' 2P rows, chosen rows 0..P-1, rejected rows P..2P-1."""
    out = {}
    for k, v in batch.items():
        if k.endswith("_BCT"):
            p, c, t = v.shape
            out[k[:-3] + "BT"] = jnp.swapaxes(v, 0, 1).reshape(c * p, t)
    return out


def sequence_logprobs(logits_BTV, targets_BT, loss_mask_BT):
    """(Σ_t mask · log p(target_t) [B], Σ_t mask [B]): the log-probability of each row's marked
    tokens under `log_softmax(logits)` over the full vocabulary, float32 nats."""
    nll_BT, _ = token_nll(logits_BTV, targets_BT)
    mask_BT = loss_mask_BT.astype(jnp.float32)
    return -(nll_BT * mask_BT).sum(-1), mask_BT.sum(-1)


def _smoothed_sigmoid_loss(z, label_smoothing: float):
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def dpo_losses(logp_c, logp_r, ref_c, ref_r, *, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO losses [P] (see the module docstring)."""
    h = (logp_c - ref_c) - (logp_r - ref_r)
    return _smoothed_sigmoid_loss(beta * h, label_smoothing)


def ipo_losses(logp_c, logp_r, ref_c, ref_r, *, beta: float):
    """Per-pair IPO losses [P]."""
    h = (logp_c - ref_c) - (logp_r - ref_r)
    return jnp.square(h - 1.0 / (2.0 * beta))


def simpo_losses(logp_c, logp_r, n_c, n_r, *, beta: float, gamma: float, label_smoothing: float = 0.0):
    """Per-pair SimPO losses [P]; `n_c`, `n_r` are the responses' token counts."""
    z = beta * (logp_c / jnp.maximum(n_c, 1.0) - logp_r / jnp.maximum(n_r, 1.0)) - gamma
    return _smoothed_sigmoid_loss(z, label_smoothing)


def bradley_terry_losses(r_c, r_r, *, center: float = 0.0):
    """Per-pair reward-model losses [P]."""
    return -jax.nn.log_sigmoid(r_c - r_r) + center * jnp.square(r_c + r_r)


def _pair_means(valid_P, **values) -> dict:
    n = jnp.maximum(valid_P.sum(), 1.0)
    return {k: (v * valid_P).sum() / n for k, v in values.items()}


def pair_metrics(losses_P, reward_c, reward_r, valid_P, **extra) -> tuple:
    """(mean loss, metrics): the loss, `accuracy`, the rewards and their margin, `extra` (each a
    [P] array), means over the valid pairs, with `weight` (their count) and `z_loss` 0."""
    valid_P = valid_P.astype(jnp.float32)
    m = _pair_means(valid_P, loss=losses_P, accuracy=(reward_c > reward_r).astype(jnp.float32),
                    reward_chosen=reward_c, reward_rejected=reward_r, reward_margin=reward_c - reward_r, **extra)
    m.update(weight=valid_P.sum(), z_loss=jnp.zeros((), jnp.float32))
    return m["loss"], m


def _halves(x):
    p = x.shape[0] // 2
    return x[:p], x[p:]


def dpo_loss_fn(graphdef, *, loss: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0,
                gamma: float = 0.5, reference: str = "frozen"):
    """`loss_fn(params, batch, rng, frozen) -> (loss, metrics)` for train/state.py's step.

    `graphdef` is a three-way split's (trained params, then `frozen["rest"]`). The reference is
    `frozen["ref"]` (reference="frozen": full fine-tuning's frozen copy of the base's parameters),
    the trained state with every array zeroed (reference="zeroed": LoRA / QLoRA adapters, whose
    update scale·A·B is then exactly 0, so the reference is the base itself, sharing its arrays), or
    none (SimPO). Its log-probs are computed once per batch, under stop_gradient and without dropout.
    Metrics add the policy's summed log-probs (`logp_chosen`, `logp_rejected`) and `logp_accuracy`,
    the share of pairs whose chosen response the policy itself finds likelier. An MoE policy's
    auxiliary losses are added to the loss and its routing metrics (`moe_*`) reported.
    """
    if loss not in LOSSES:
        raise ValueError(f"dpo.loss={loss!r} is not valid; expected one of {LOSSES}")
    if reference not in ("frozen", "zeroed"):
        raise ValueError(f"reference={reference!r} is not valid; expected 'frozen' or 'zeroed'")

    def loss_fn(params, batch, rng, frozen):
        rows = pair_rows(batch)
        rest = frozen["rest"]
        logits, aux = apply_with_aux(graphdef, (params, rest), rows, dropout_rng=rng)
        aux = dict(aux)
        model_aux = aux.pop("aux_loss", jnp.zeros((), jnp.float32))
        logp, n = sequence_logprobs(logits, rows["targets_BT"], rows["loss_mask_BT"])
        (logp_c, logp_r), (n_c, n_r) = _halves(logp), _halves(n)
        valid = (n_c > 0) & (n_r > 0)
        if loss == "simpo":
            losses = simpo_losses(logp_c, logp_r, n_c, n_r, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
            reward_c, reward_r = beta * logp_c / jnp.maximum(n_c, 1.0), beta * logp_r / jnp.maximum(n_r, 1.0)
        else:
            ref_params = frozen["ref"] if reference == "frozen" else jax.tree.map(jnp.zeros_like, params)
            ref_logp, _ = sequence_logprobs(apply(graphdef, (ref_params, rest), rows), rows["targets_BT"],
                                            rows["loss_mask_BT"])
            ref_c, ref_r = _halves(jax.lax.stop_gradient(ref_logp))
            losses = (dpo_losses(logp_c, logp_r, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing)
                      if loss == "dpo" else ipo_losses(logp_c, logp_r, ref_c, ref_r, beta=beta))
            reward_c, reward_r = beta * (logp_c - ref_c), beta * (logp_r - ref_r)
        mean_loss, metrics = pair_metrics(losses, reward_c, reward_r, valid, logp_chosen=logp_c, logp_rejected=logp_r,
                                          logp_accuracy=(logp_c > logp_r).astype(jnp.float32))
        return mean_loss + model_aux, {**metrics, **aux}

    return loss_fn


def reward_loss_fn(graphdef, *, center: float = 0.0):
    """`loss_fn(params, batch, rng, frozen) -> (loss, metrics)` of a reward model (rl/reward_model.py)
    split three ways (trained, then `frozen`): Bradley-Terry on the rewards of each pair's sides."""

    def loss_fn(params, batch, rng, frozen):
        rows = pair_rows(batch)
        model = nnx.merge(graphdef, params, frozen)
        r = model(rows["inputs_BT"], positions_BT=rows["positions_BT"], segment_ids_BT=rows["segment_ids_BT"],
                  dropout_rng=rng)
        n = rows["loss_mask_BT"].astype(jnp.float32).sum(-1)  # response tokens: 0 for padding pairs
        (r_c, r_r), (n_c, n_r) = _halves(r), _halves(n)
        return pair_metrics(bradley_terry_losses(r_c, r_r, center=center), r_c, r_r, (n_c > 0) & (n_r > 0))

    return loss_fn

