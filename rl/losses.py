"""The policy-gradient math of the RL loop (rl/train.py): advantage estimators, KL estimators,
the clipped surrogate with its aggregations, the PPO pieces, entropy and log-probs. Pure JAX,
float32 throughout; every function names the paper (or the TRL 1.16 code) it follows.

Layout. A rollout batch has B = P * G rows grouped contiguously: rows [i * G, (i + 1) * G) are
prompt i's G samples (rl/rollout.py). Completions are [B, T]; `mask_BT` (float, 0/1) is 1 on
completion tokens, including the EOS that stopped a row, and 0 on prompt and padding. A row whose
mask is all 0 is a filler row: it counts in no weight.

Gradient accumulation. Every loss returns `(numerator, weight, metrics)`: the loss of a batch
split into micro-batches k is `sum_k numerator_k / sum_k weight_k`, equal to the one-batch loss
for every aggregation, and so is its gradient, because weights do not depend on the parameters:
accumulate `grad(numerator_k)` (or `grad(numerator_k / weight_k) * weight_k`, as
train/state.make_train_step does with `num_tokens`) and divide by `sum_k weight_k` once. Metrics
are `{name: (numerator, denominator)}` pairs, already stop-gradient: add them across micro-batches
(`jax.tree.map(jnp.add, m1, m2)`) and divide once (`finalize`). Per-batch statistics that must
see the whole batch (group advantages, whitening) are computed before the batch is split.

Log-probs. A log-prob is `log_softmax(logits / T)` over the full vocabulary on sampler and
trainer alike (TRL divides by T and does not truncate for top-k / top-p); under top-k / top-p
the sampler's real distribution is the truncated one, so importance ratios against the full
distribution are biased (small when the truncated mass is small).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from models.logprobs import token_logprobs  # noqa: F401  (re-exported: the one definition)

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce")
KL_ESTIMATORS = ("k1", "k2", "k3")
LEVELS = ("token", "sequence", "sequence_token", "trajectory")
AGGREGATIONS = ("sequence_mean", "token_mean", "constant", "sequence_sum")

_f32 = jnp.float32


# ----------------------------------------------------------------------------- advantages


def _grouped(rewards_B, group_size: int):
    r = jnp.asarray(rewards_B, _f32)
    if r.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {r.shape}")
    if group_size < 1 or r.shape[0] % group_size:
        raise ValueError(f"B={r.shape[0]} rows is not a whole number of groups of {group_size}")
    return r.reshape(-1, group_size)


def _std(x, axis=None):
    """Standard deviation with Bessel's correction (torch.std's default); 0 for one element."""
    n = x.size if axis is None else x.shape[axis]
    d = x - x.mean(axis=axis, keepdims=True)
    return jnp.sqrt(jnp.sum(d * d, axis=axis, keepdims=True) / max(n - 1, 1))


def advantages(rewards_B, group_size: int, estimator: str = "grpo", *, scale: str = "group",
               baseline: bool = True, eps: float = 1e-4):
    """Sequence advantages [B] float32 from scalar rewards [B] (rows grouped by prompt, G each).

    - "grpo" (DeepSeekMath, arXiv 2402.03300; TRL 1.16 `GRPOTrainer`): (r - group mean) /
      (std + eps), std with Bessel's correction. `scale` (TRL's `scale_rewards`): "group" (the
      paper, default) divides by the group's std, "batch" by the whole batch's std (the mean stays
      the group's), "none" does not divide (= "dr_grpo"). Identical rewards in a group give 0
      (0 / eps), never NaN; G = 1 gives 0 (the sample is its own group mean, and the std of one
      sample is taken as 0).
    - "dr_grpo" (Dr. GRPO, "Understanding R1-Zero-Like Training", arXiv 2503.20783): r - group
      mean, no std normalisation.
    - "rloo" (REINFORCE Leave-One-Out, "Back to Basics", arXiv 2402.14740): r_i minus the mean of
      the other G - 1 rewards of its group, = G / (G - 1) * (r_i - group mean). Needs G >= 2.
    - "reinforce" (Williams 1992; the REINFORCE baseline of 2402.14740): r - batch mean with
      `baseline=True` (default), r itself with `baseline=False`.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r} not in {ADVANTAGE_ESTIMATORS}")
    r_PG = _grouped(rewards_B, group_size)
    centred_PG = r_PG - r_PG.mean(axis=1, keepdims=True)
    if estimator == "grpo":
        if scale == "group":
            std = _std(r_PG, axis=1)
        elif scale == "batch":
            std = _std(r_PG)
        elif scale == "none":
            return centred_PG.reshape(-1)
        else:
            raise ValueError(f"scale={scale!r} not in ('group', 'batch', 'none')")
        return (centred_PG / (std + eps)).reshape(-1)
    if estimator == "dr_grpo":
        return centred_PG.reshape(-1)
    if estimator == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs group_size >= 2 (the baseline is the mean of the other samples)")
        others = (r_PG.sum(axis=1, keepdims=True) - r_PG) / (group_size - 1)
        return (r_PG - others).reshape(-1)
    r_B = r_PG.reshape(-1)
    return r_B - r_B.mean() if baseline else r_B


def varied_groups(rewards_B, group_size: int):
    """[B] float32, 1 on rows whose group's rewards are not all equal (DAPO's dynamic sampling,
    arXiv 2503.14476, keeps only those groups: the others have zero advantage under every
    group baseline and contribute nothing but weight)."""
    r_PG = _grouped(rewards_B, group_size)
    varied_P = jnp.any(r_PG != r_PG[:, :1], axis=1)
    return jnp.repeat(varied_P, group_size).astype(_f32)


def overlong_penalty(lengths_B, max_len: int, cache_len: int):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to the reward [B]: 0 up to
    max_len - cache_len tokens, then linear down to -1 at max_len, -1 beyond."""
    L = jnp.asarray(lengths_B, _f32)
    start = max_len - cache_len
    if cache_len <= 0:
        return jnp.where(L > max_len, -1.0, 0.0).astype(_f32)
    return jnp.clip((start - L) / cache_len, -1.0, 0.0).astype(_f32)


# ----------------------------------------------------------------------------- KL


def kl_penalty(logp_BT, ref_logp_BT, estimator: str = "k3"):
    """Per-token KL(pi_theta || pi_ref) estimate on samples of pi_theta, float32 [B, T]
    (J. Schulman, "Approximating KL Divergence", 2020), with log r = ref_logp - logp:

    - "k1" = -log r = logp - ref_logp: unbiased, can be negative;
    - "k2" = (log r)^2 / 2: biased (E_pi[k2] = E_pi[(log pi/ref)^2] / 2, equal to KL only to second
      order), low variance;
    - "k3" = r - 1 - log r (>= 0): unbiased, low variance (GRPO's loss term, TRL's `per_token_kl`).

    As a differentiated loss term (GRPO's beta * KL) with samples held fixed, the expected
    gradients differ from the estimates' meaning: k1's is 0, k2's is grad KL(pi || ref), k3's is
    grad KL(ref || pi). As a reward penalty (PPO, RLOO) the estimate is a number, not
    differentiated. Masked positions are not zeroed here; the losses mask them.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator {estimator!r} not in {KL_ESTIMATORS}")
    log_r = jnp.asarray(ref_logp_BT, _f32) - jnp.asarray(logp_BT, _f32)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    return jnp.expm1(log_r) - log_r


# ----------------------------------------------------------------------------- the surrogate


def _aggregate(term_BT, mask_BT, aggregation: str, max_len):
    """(numerator, weight) of the masked per-token `term_BT` under `aggregation`."""
    m = mask_BT
    n_B = m.sum(axis=1)
    rows = (n_B > 0).astype(_f32).sum()
    masked = term_BT * m
    if aggregation == "token_mean":
        return masked.sum(), m.sum()
    if aggregation == "sequence_mean":
        return (masked.sum(axis=1) / jnp.maximum(n_B, 1.0)).sum(), rows
    if aggregation == "sequence_sum":
        return masked.sum(), rows
    if aggregation == "constant":
        if not max_len:
            raise ValueError("aggregation='constant' (Dr. GRPO) needs max_len, the configured max completion length")
        return masked.sum() / max_len, rows
    raise ValueError(f"aggregation {aggregation!r} not in {AGGREGATIONS}")


def policy_loss(logp_BT, old_logp_BT, advantages, mask_BT, *, clip_low: float | None = 0.2,
                clip_high: float | None = 0.2, level: str = "token", aggregation: str = "sequence_mean",
                max_len: int | None = None, kl_BT=None, beta: float = 0.0):
    """The clipped policy-gradient surrogate (PPO, Schulman et al. 2017, arXiv 1707.06347, as GRPO
    uses it, arXiv 2402.03300): `(numerator, weight, metrics)`, loss = numerator / weight, summed
    over micro-batches separately (module docstring).

    Per token, with A the advantage ([B] broadcast over tokens, or [B, T]) and rho the ratio:
        term = -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A) + beta * kl_BT
    `kl_BT` (e.g. `kl_penalty(logp_BT, ref_logp_BT, "k3")`, computed from the differentiated
    `logp_BT`) adds the KL as a loss term (GRPO); leave it None for KL as a reward penalty or off.

    `old_logp_BT`: the log-probs of the policy that sampled (or of the previous epoch's policy);
    None means `stop_gradient(logp_BT)` (on-policy, one update per batch: rho = 1 in value and
    grad rho = grad logp). `clip_low=None` disables clipping (clip_high is then ignored): the
    plain importance-weighted policy gradient -rho * A, whose gradient at rho = 1 is the vanilla
    REINFORCE gradient -A * grad logp (advantages and old log-probs are constants: this function
    stops their gradients). `clip_high=None` with a `clip_low` clips the low side only. DAPO's
    clip-higher (arXiv 2503.14476) is clip_low=0.2, clip_high=0.28.

    `level`, the importance ratio:
    - "token": rho_it = exp(logp_it - old_it) (PPO / GRPO / DAPO);
    - "sequence": GSPO (arXiv 2507.18071), s_i = exp(mean_t (logp_it - old_it)) over the row's
      tokens, clipped per sequence, each token's term using s_i (TRL's importance_sampling_level=
      "sequence"); grad s_i = s_i * mean_t grad logp_it. GSPO's epsilons are ~3e-4 / 4e-4
      (clip_low / clip_high): with 0.2 a length-normalised ratio almost never clips;
    - "sequence_token": GSPO-token, s_it = sg[s_i] * exp(logp_it - sg[logp_it]): the value of s_i
      with the gradient s_i * grad logp_it of each token; equal to "sequence" (value and gradient
      under "sequence_mean") when A is per sequence, and allows per-token advantages;
    - "trajectory": the whole completion as one action, rho_i = exp(sum_t (logp_it - old_it)) =
      pi(y_i|x) / pi_old(y_i|x), clipped per sequence (RLOO, arXiv 2402.14740, as TRL 1.16's
      `RLOOTrainer` computes it; use it with "sequence_mean").

    `aggregation`, how terms become a loss (weights for accumulation in brackets):
    - "sequence_mean" (GRPO, 2402.03300; GSPO; RLOO per sequence): mean over sequences of the mean
      over the sequence's tokens [numerator sum_i mean_t term_it, weight = number of rows];
    - "token_mean" (DAPO, 2503.14476; TRL's "dapo"/"bnpo"): sum over tokens / number of tokens
      [weight = number of tokens];
    - "constant" (Dr. GRPO, 2503.20783; TRL's "dr_grpo"): sum over tokens / (B * max_len) with
      max_len the configured maximum completion length, not the batch's T [numerator
      sum / max_len, weight = number of rows];
    - "sequence_sum" (REINFORCE with the sequence's summed log-prob, 2402.14740): sum over a
      sequence's tokens, mean over sequences [weight = number of rows].
    "Number of rows" counts rows with at least one mask token.

    metrics (pairs, see `finalize`; token means over mask tokens): `clip_fraction` (tokens whose
    surrogate gradient is zero because of clipping: A > 0 and rho > 1 + clip_high, or A < 0 and
    rho < 1 - clip_low, with rho the level's ratio), `clip_fraction_low`, `clip_fraction_high`,
    `ratio_mean`, `advantage_mean`, `surrogate` (the loss without the KL term, same aggregation)
    and `kl` when `kl_BT` is given.
    """
    if level not in LEVELS:
        raise ValueError(f"level {level!r} not in {LEVELS}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r} not in {AGGREGATIONS}")
    logp = jnp.asarray(logp_BT, _f32)
    old = jax.lax.stop_gradient(logp if old_logp_BT is None else jnp.asarray(old_logp_BT, _f32))
    m = jnp.asarray(mask_BT, _f32)
    A = jax.lax.stop_gradient(jnp.asarray(advantages, _f32))
    A_BT = jnp.broadcast_to(A[:, None] if A.ndim == 1 else A, logp.shape)

    log_ratio = (logp - old) * m
    n_B1 = jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)
    if level == "token":
        ratio_BT = jnp.exp(log_ratio)
    elif level == "sequence":
        ratio_BT = jnp.broadcast_to(jnp.exp(log_ratio.sum(axis=1, keepdims=True) / n_B1), logp.shape)
    elif level == "sequence_token":
        s_B1 = jax.lax.stop_gradient(jnp.exp(log_ratio.sum(axis=1, keepdims=True) / n_B1))
        ratio_BT = s_B1 * jnp.exp(logp - jax.lax.stop_gradient(logp))
    else:  # trajectory
        ratio_BT = jnp.broadcast_to(jnp.exp(log_ratio.sum(axis=1, keepdims=True)), logp.shape)

    if clip_low is None:
        surrogate_BT = -ratio_BT * A_BT
        low_BT = high_BT = jnp.zeros_like(m)
    else:
        lo = 1.0 - clip_low
        hi = jnp.inf if clip_high is None else 1.0 + clip_high
        clipped_BT = jnp.clip(ratio_BT, lo, hi)
        surrogate_BT = -jnp.minimum(ratio_BT * A_BT, clipped_BT * A_BT)
        low_BT = ((A_BT < 0) & (ratio_BT < lo)).astype(_f32) * m
        high_BT = ((A_BT > 0) & (ratio_BT > hi)).astype(_f32) * m

    term_BT = surrogate_BT
    if kl_BT is not None and not (isinstance(beta, (int, float)) and beta == 0):  # beta may be traced
        term_BT = term_BT + beta * jnp.asarray(kl_BT, _f32)
    numerator, weight = _aggregate(term_BT, m, aggregation, max_len)

    sg = jax.lax.stop_gradient
    n_tok = m.sum()
    surr_num, surr_w = _aggregate(sg(surrogate_BT), m, aggregation, max_len)
    metrics = {
        "clip_fraction": (sg(low_BT + high_BT).sum(), n_tok),
        "clip_fraction_low": (sg(low_BT).sum(), n_tok),
        "clip_fraction_high": (sg(high_BT).sum(), n_tok),
        "ratio_mean": (sg(ratio_BT * m).sum(), n_tok),
        "advantage_mean": ((A_BT * m).sum(), n_tok),
        "surrogate": (surr_num, surr_w),
    }
    if kl_BT is not None:
        metrics["kl"] = (sg(jnp.asarray(kl_BT, _f32) * m).sum(), n_tok)
    return numerator, weight, metrics


def finalize(metrics: Mapping[str, tuple]) -> dict:
    """{name: numerator / denominator} (0 where the denominator is 0) from summed metric pairs."""
    return {k: jnp.where(d > 0, n / jnp.where(d > 0, d, 1.0), 0.0) for k, (n, d) in metrics.items()}


# ----------------------------------------------------------------------------- PPO


def token_rewards(scores_B, mask_BT, kl_BT, beta: float):
    """PPO's per-token rewards [B, T] (Ouyang et al. 2022, arXiv 2203.02155; TRL's PPOTrainer):
    -beta * kl_BT on every mask token, plus the scalar score on the row's last mask token (its EOS,
    or its last token when `max_new_tokens` cut it). 0 off the mask; a row with no mask token gets
    nothing. `kl_BT` is a number here (e.g. k1 of the rollout's log-probs), not differentiated."""
    m = jnp.asarray(mask_BT, _f32)
    T = m.shape[1]
    last_B = T - 1 - jnp.argmax(m[:, ::-1] > 0, axis=1)
    has_B = m.sum(axis=1) > 0
    score_BT = jax.nn.one_hot(last_B, T, dtype=_f32) * jnp.where(has_B, jnp.asarray(scores_B, _f32), 0.0)[:, None]
    kl = jnp.zeros_like(m) if kl_BT is None else jax.lax.stop_gradient(jnp.asarray(kl_BT, _f32))
    return (score_BT - beta * kl) * m


def gae(rewards_BT, values_BT, mask_BT, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438):
    (advantages_BT, returns_BT), float32, 0 off the mask, returns = advantages + values.

        delta_t = r_t + gamma * V_next - V_t,  A_t = delta_t + gamma * lam * A_next

    where "next" is the row's next mask token; the value (and advantage) after the last mask token
    is 0. Positions off the mask are skipped (neither read nor bootstrapped through), so a mask
    with holes chains its valid tokens. A `jax.lax.scan` over time, backwards; not differentiated
    (values are stop-gradient)."""
    m = jnp.asarray(mask_BT, _f32)
    r = jnp.asarray(rewards_BT, _f32) * m
    v = jax.lax.stop_gradient(jnp.asarray(values_BT, _f32)) * m

    def step(carry, x):
        next_v, next_a = carry
        r_t, v_t, m_t = x
        delta = r_t + gamma * next_v - v_t
        a_t = delta + gamma * lam * next_a
        valid = m_t > 0
        carry = (jnp.where(valid, v_t, next_v), jnp.where(valid, a_t, next_a))
        return carry, jnp.where(valid, a_t, 0.0)

    B = m.shape[0]
    init = (jnp.zeros((B,), _f32), jnp.zeros((B,), _f32))
    _, adv_TB = jax.lax.scan(step, init, (r.T, v.T, m.T), reverse=True)
    adv = adv_TB.T
    return adv, (adv + v) * m


def whiten(x_BT, mask_BT, *, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) over mask tokens only (variance with Bessel's correction, as
    TRL's `masked_whiten`); 0 off the mask. `shift_mean=False` keeps the mean (TRL does so for
    rewards). Whiten the whole rollout batch before splitting it into micro-batches."""
    m = jnp.asarray(mask_BT, _f32)
    x = jnp.asarray(x_BT, _f32)
    n = m.sum()
    mean = (x * m).sum() / jnp.maximum(n, 1.0)
    var = (jnp.square(x - mean) * m).sum() / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def value_loss(values_BT, old_values_BT, returns_BT, mask_BT, clip: float | None = 0.2, *,
               aggregation: str = "token_mean", max_len: int | None = None):
    """PPO's clipped value loss (arXiv 1707.06347; as TRL's PPOTrainer): per token
    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2), token-mean aggregation
    by default: `(numerator, weight, metrics)` with weight = number of mask tokens; any of
    `policy_loss`'s aggregations otherwise (the policy's, so the two share one accumulation
    weight). `clip=None`: unclipped 0.5 (V - R)^2. V_t is the value head at the position that
    predicts token t. metrics:
    `value_clip_fraction` (tokens where the clipped branch is the larger, so the gradient is
    the clipped one's), `value_mean`, `value_error` (mean (V - R)^2)."""
    m = jnp.asarray(mask_BT, _f32)
    V = jnp.asarray(values_BT, _f32)
    V_old = jax.lax.stop_gradient(jnp.asarray(old_values_BT, _f32))
    R = jax.lax.stop_gradient(jnp.asarray(returns_BT, _f32))
    unclipped = jnp.square(V - R)
    if clip is None:
        loss_BT = 0.5 * unclipped
        frac_BT = jnp.zeros_like(m)
    else:
        clipped = jnp.square(V_old + jnp.clip(V - V_old, -clip, clip) - R)
        loss_BT = 0.5 * jnp.maximum(unclipped, clipped)
        frac_BT = (clipped > unclipped).astype(_f32) * m
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r} not in {AGGREGATIONS}")
    sg = jax.lax.stop_gradient
    n = m.sum()
    metrics = {"value_clip_fraction": (frac_BT.sum(), n), "value_mean": (sg(V * m).sum(), n),
               "value_error": (sg(unclipped * m).sum(), n)}
    numerator, weight = _aggregate(loss_BT, m, aggregation, max_len)
    return numerator, weight, metrics


# ----------------------------------------------------------------------------- logits


def _scaled(logits_BTV, temperature):
    t = float(temperature) if temperature else 1.0
    z = jnp.asarray(logits_BTV).astype(_f32)
    return z if t == 1.0 else z / jnp.float32(t)


def entropy_from_logits(logits_BTV, mask_BT, temperature: float = 1.0):
    """Entropy of softmax(logits / T) per token, float32 [B, T], 0 off the mask: logsumexp(z) -
    sum_v softmax(z)_v z_v over the full vocabulary (`temperature` 0 means 1). The loop's
    `entropy` metric is `(sum(entropy_BT), sum(mask_BT))`."""
    z = _scaled(logits_BTV, temperature)
    log_z = jax.nn.logsumexp(z, axis=-1)
    p = jax.nn.softmax(z, axis=-1)
    pz = jnp.where(p > 0, p * z, 0.0)  # a -inf logit has p = 0 and contributes 0, not NaN
    return (log_z - jnp.sum(pz, axis=-1)) * jnp.asarray(mask_BT, _f32)
