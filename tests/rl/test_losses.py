"""rl/losses.py against hand-computed values and independent float64 NumPy loops; fresh random
inputs (never zeros); gradient accumulation equal to one big batch for every aggregation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import losses as L

AGGREGATIONS = ["sequence_mean", "token_mean", "constant", "sequence_sum"]
MAX_LEN = 9


def completion_mask(rng, B, T, holes=False):
    """[B, T] float32: each row a prompt (0s), a completion of >= 1 token (1s), right padding (0s)."""
    m = np.zeros((B, T), np.float32)
    for i in range(B):
        start = int(rng.integers(0, T // 3))
        n = int(rng.integers(1, T - start + 1))
        m[i, start:start + n] = 1.0
        if holes and n > 3:
            m[i, start + 1 + int(rng.integers(0, n - 2))] = 0.0
    return m


def rollout(seed, B=8, T=9, spread=0.3, per_token_adv=False):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.95, (B, T))).astype(np.float32)
    old = (logp + rng.normal(0.0, spread, (B, T))).astype(np.float32)
    adv = rng.normal(0.0, 1.0, (B, T) if per_token_adv else (B,)).astype(np.float32)
    ref = (logp + rng.normal(0.0, 0.2, (B, T))).astype(np.float32)
    return logp, old, adv, completion_mask(rng, B, T), ref


# ----------------------------------------------------------------------------- advantages


def np_advantages(r, G, estimator, scale="group", baseline=True):
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    for p in range(len(r) // G):
        g = r[p * G:(p + 1) * G]
        for j in range(G):
            i = p * G + j
            if estimator == "grpo":
                std = (np.std(g, ddof=1) if G > 1 else 0.0) if scale == "group" else np.std(r, ddof=1)
                out[i] = (r[i] - g.mean()) / (1.0 if scale == "none" else std + 1e-4)
            elif estimator == "dr_grpo":
                out[i] = r[i] - g.mean()
            elif estimator == "rloo":
                out[i] = r[i] - (g.sum() - g[j]) / (G - 1)
            else:
                out[i] = r[i] - (r.mean() if baseline else 0.0)
    return out


def test_advantages_hand_values():
    r = jnp.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    np.testing.assert_allclose(L.advantages(r, 3, "grpo"), [-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(L.advantages(r, 3, "dr_grpo"), [-1, 0, 1, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(L.advantages(r, 3, "rloo"), [-1.5, 0, 1.5, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(L.advantages(r, 3, "reinforce"), np.array([1, 2, 3, 5, 5, 5]) - 3.5, atol=1e-6)
    np.testing.assert_allclose(L.advantages(r, 3, "reinforce", baseline=False), r)
    # batch std: (mean per group, std of all six rewards)
    std = np.std([1, 2, 3, 5, 5, 5], ddof=1)
    np.testing.assert_allclose(L.advantages(r, 3, "grpo", scale="batch"),
                               np.array([-1, 0, 1, 0, 0, 0]) / (std + 1e-4), rtol=1e-6)


@pytest.mark.parametrize("estimator,kw", [("grpo", {}), ("grpo", {"scale": "batch"}), ("grpo", {"scale": "none"}),
                                          ("dr_grpo", {}), ("rloo", {}), ("reinforce", {}),
                                          ("reinforce", {"baseline": False})])
def test_advantages_match_numpy(estimator, kw):
    r = np.random.default_rng(1).normal(0.5, 2.0, 24).astype(np.float32)
    for G in (4, 6):
        got = L.advantages(jnp.asarray(r), G, estimator, **kw)
        np.testing.assert_allclose(got, np_advantages(r, G, estimator, **kw), rtol=2e-5, atol=2e-5)


def test_rloo_is_scaled_group_centring():
    r = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, 12), jnp.float32)
    G = 4
    np.testing.assert_allclose(L.advantages(r, G, "rloo"), G / (G - 1) * L.advantages(r, G, "dr_grpo"), atol=1e-6)


@pytest.mark.parametrize("estimator", L.ADVANTAGE_ESTIMATORS)
def test_identical_rewards_give_zero_advantage(estimator):
    r = jnp.full((8,), 0.7312, jnp.float32)
    a = L.advantages(r, 4, estimator)
    assert np.all(np.isfinite(a)) and np.all(np.asarray(a) == 0.0)


def test_group_of_one():
    r = jnp.asarray([0.3, 1.7, -2.0], jnp.float32)
    for estimator in ("grpo", "dr_grpo"):
        a = L.advantages(r, 1, estimator)
        assert np.all(np.asarray(a) == 0.0)
    with pytest.raises(ValueError, match="rloo"):
        L.advantages(r, 1, "rloo")
    with pytest.raises(ValueError, match="groups"):
        L.advantages(r, 2, "grpo")


def test_varied_groups_and_overlong_penalty():
    r = jnp.asarray([1.0, 1.0, 1.0, 0.0, 1.0, 0.5], jnp.float32)
    np.testing.assert_array_equal(L.varied_groups(r, 3), [0, 0, 0, 1, 1, 1])
    # DAPO: max 20, cache 4: 0 up to 16 tokens, linear to -1 at 20, -1 beyond
    np.testing.assert_allclose(L.overlong_penalty(jnp.asarray([3, 16, 17, 19, 20, 25]), 20, 4),
                               [0, 0, -0.25, -0.75, -1, -1], atol=1e-7)


# ----------------------------------------------------------------------------- KL


def categorical(seed, V=7):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0, 1, V), rng.normal(0, 1, V)
    logpi = a - np.log(np.exp(a).sum())
    logref = b - np.log(np.exp(b).sum())
    return logpi, logref


def test_kl_estimators_closed_forms():
    logpi, logref = categorical(3)
    pi = np.exp(logpi)
    kl = np.sum(pi * (logpi - logref))  # KL(pi || ref), exact on the support
    lp, lref = jnp.asarray(logpi[None], jnp.float32), jnp.asarray(logref[None], jnp.float32)
    est = {k: np.asarray(L.kl_penalty(lp, lref, k))[0] for k in L.KL_ESTIMATORS}
    np.testing.assert_allclose(np.sum(pi * est["k1"]), kl, rtol=1e-5)
    np.testing.assert_allclose(np.sum(pi * est["k3"]), kl, rtol=1e-5)
    # k2 is biased: its expectation is half the second moment of log(pi / ref)
    second = 0.5 * np.sum(pi * (logpi - logref) ** 2)
    np.testing.assert_allclose(np.sum(pi * est["k2"]), second, rtol=1e-5)
    assert abs(second - kl) > 1e-2 * kl
    assert np.all(est["k3"] >= 0)
    # per-sample closed forms
    lr = logref - logpi
    np.testing.assert_allclose(est["k1"], -lr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(est["k3"], np.exp(lr) - 1 - lr, rtol=1e-5, atol=1e-6)


def test_kl_zero_when_policy_is_reference():
    logp, *_ = rollout(4)
    for k in L.KL_ESTIMATORS:
        assert np.all(np.asarray(L.kl_penalty(logp, logp, k)) == 0.0)


def test_kl_as_loss_expected_gradients():
    """Samples fixed (weights pi stop-gradient): k1's expected gradient is 0, k2's is grad KL(pi||ref),
    k3's grad KL(ref||pi)."""
    logpi, logref = categorical(5)
    a = jnp.asarray(logpi, jnp.float32)  # logits of pi (already normalised)
    ref = jnp.asarray(logref, jnp.float32)

    def expected_loss(theta, k):
        lp = jax.nn.log_softmax(theta)
        w = jax.lax.stop_gradient(jnp.exp(lp))
        return jnp.sum(w * L.kl_penalty(lp[None], ref[None], k)[0])

    kl_fwd = lambda t: jnp.sum(jnp.exp(jax.nn.log_softmax(t)) * (jax.nn.log_softmax(t) - ref))  # noqa: E731
    kl_rev = lambda t: jnp.sum(jnp.exp(ref) * (ref - jax.nn.log_softmax(t)))  # noqa: E731
    np.testing.assert_allclose(jax.grad(expected_loss)(a, "k1"), 0.0, atol=1e-6)
    np.testing.assert_allclose(jax.grad(expected_loss)(a, "k2"), jax.grad(kl_fwd)(a), atol=1e-6)
    np.testing.assert_allclose(jax.grad(expected_loss)(a, "k3"), jax.grad(kl_rev)(a), atol=1e-6)


# ----------------------------------------------------------------------------- policy loss


def np_policy_loss(logp, old, adv, mask, *, clip_low, clip_high, level, aggregation, max_len=None, kl=None, beta=0.0):
    logp, old, mask = (np.asarray(x, np.float64) for x in (logp, old, mask))
    adv = np.asarray(adv, np.float64)
    B, T = logp.shape
    total, rows, ntok = 0.0, 0, 0
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t] > 0]
        if not toks:
            continue
        rows += 1
        lr = [logp[i, t] - old[i, t] for t in toks]
        seq_terms = []
        for j, t in enumerate(toks):
            rho = {"token": math.exp(lr[j]), "sequence": math.exp(sum(lr) / len(lr)),
                   "sequence_token": math.exp(sum(lr) / len(lr)), "trajectory": math.exp(sum(lr))}[level]
            a = adv[i, t] if adv.ndim == 2 else adv[i]
            if clip_low is None:
                term = -rho * a
            else:
                c = min(max(rho, 1 - clip_low), 1 + clip_high)
                term = -min(rho * a, c * a)
            if kl is not None:
                term += beta * float(kl[i, t])
            seq_terms.append(term)
        ntok += len(toks)
        total += sum(seq_terms) / len(toks) if aggregation == "sequence_mean" else sum(seq_terms)
    if aggregation == "constant":
        return total / (rows * max_len)
    return {"sequence_mean": total / rows, "token_mean": total / ntok, "sequence_sum": total / rows}[aggregation]


def loss_of(num, w):
    return float(num) / float(w)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", ["token", "sequence", "trajectory"])
def test_policy_loss_matches_numpy(level, aggregation):
    logp, old, adv, mask, ref = rollout(10, spread=0.3 if level == "token" else 0.05)
    kl = np.asarray(L.kl_penalty(logp, ref, "k3"))
    for kw in (dict(clip_low=0.2, clip_high=0.28), dict(clip_low=None, clip_high=None),
               dict(clip_low=0.2, clip_high=0.2, kl=kl, beta=0.04)):
        kl_ = kw.pop("kl", None)
        beta = kw.pop("beta", 0.0)
        num, w, _ = L.policy_loss(logp, old, adv, mask, level=level, aggregation=aggregation, max_len=MAX_LEN,
                                  kl_BT=kl_, beta=beta, **kw)
        want = np_policy_loss(logp, old, adv, mask, level=level, aggregation=aggregation, max_len=MAX_LEN,
                              kl=kl_, beta=beta, **kw)
        np.testing.assert_allclose(loss_of(num, w), want, rtol=1e-5, atol=1e-6)


def test_policy_loss_per_token_advantages():
    logp, old, adv, mask, _ = rollout(11, per_token_adv=True)
    for level in ("token", "sequence_token"):
        num, w, _ = L.policy_loss(logp, old, adv, mask, level=level, aggregation="token_mean")
        want = np_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, level=level, aggregation="token_mean")
        np.testing.assert_allclose(loss_of(num, w), want, rtol=1e-5)


def test_weights_per_aggregation():
    logp, old, adv, mask, _ = rollout(12)
    mask[3] = 0.0  # a filler row counts in no weight
    want = {"sequence_mean": 7, "token_mean": mask.sum(), "constant": 7, "sequence_sum": 7}
    for agg, w_want in want.items():
        _, w, _ = L.policy_loss(logp, old, adv, mask, aggregation=agg, max_len=MAX_LEN)
        assert float(w) == w_want
    with pytest.raises(ValueError, match="max_len"):
        L.policy_loss(logp, old, adv, mask, aggregation="constant")


def grad_wrt_logp(logp, old, adv, mask, **kw):
    """d(numerator / weight) / d logp (the weight is a constant)."""
    loss = lambda lp: (lambda num, w, _: num / w)(*L.policy_loss(lp, old, adv, mask, **kw))  # noqa: E731
    return np.asarray(jax.grad(loss)(jnp.asarray(logp)))


@pytest.mark.parametrize("level,clip,spread", [("token", (0.2, 0.28), 0.3), ("sequence", (3e-4, 4e-4), 1e-3),
                                               ("sequence_token", (3e-4, 4e-4), 1e-3),
                                               ("trajectory", (0.2, 0.2), 0.15)])
def test_clip_fraction_counts_exactly_the_zero_gradient_tokens(level, clip, spread):
    logp, old, adv, mask, _ = rollout(13, B=24, T=7, spread=spread, per_token_adv=(level == "token"))
    kw = dict(clip_low=clip[0], clip_high=clip[1], level=level, aggregation="sequence_mean")
    num, w, metrics = L.policy_loss(logp, old, adv, mask, **kw)
    g = grad_wrt_logp(logp, old, adv, mask, **kw)
    on = mask > 0
    zero = (g == 0.0) & on
    # the clipped tokens, from the definition (A > 0 and rho > 1 + eps_high, or A < 0 and rho < 1 - eps_low)
    lr = (logp.astype(np.float64) - old) * mask
    rho = {"token": np.exp(lr),
           "sequence": np.exp(lr.sum(1, keepdims=True) / mask.sum(1, keepdims=True)) * np.ones_like(lr),
           "sequence_token": np.exp(lr.sum(1, keepdims=True) / mask.sum(1, keepdims=True)) * np.ones_like(lr),
           "trajectory": np.exp(lr.sum(1, keepdims=True)) * np.ones_like(lr)}[level]
    A = adv if adv.ndim == 2 else np.broadcast_to(adv[:, None], lr.shape)
    clipped = (((A > 0) & (rho > 1 + clip[1])) | ((A < 0) & (rho < 1 - clip[0]))) & on
    assert 0 < clipped.sum() < on.sum(), "the example must clip some tokens and not others"
    np.testing.assert_array_equal(zero, clipped)
    num_c, den_c = metrics["clip_fraction"]
    assert float(num_c) == clipped.sum() and float(den_c) == on.sum()
    assert float(metrics["clip_fraction_low"][0]) + float(metrics["clip_fraction_high"][0]) == clipped.sum()
    assert float(metrics["clip_fraction_low"][0]) > 0 and float(metrics["clip_fraction_high"][0]) > 0


def test_gspo_sequence_ratio_hand_example():
    # log ratios: row 0 [0.1, -0.3, 0.5] (mean 0.1, A = +1, inside the clip range);
    # row 1 [0.4, 0.4] (s = e^0.4 > 1.2, A = +2: clipped); row 2 [-0.5, -0.1, -0.3] (s = e^-0.3 < 0.8, A = -1: clipped)
    old = np.array([[-1.0, -2.0, -0.5, -1.5], [-0.7, -1.1, -3.0, -2.0], [-0.2, -0.9, -1.3, -0.4]], np.float32)
    lr = np.array([[0.1, -0.3, 0.5, 0.9], [0.7, 0.4, 0.4, -0.2], [-0.5, -0.1, -0.3, 0.6]], np.float32)
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 0], [1, 1, 1, 0]], np.float32)  # off-mask log ratios are ignored
    logp = old + lr
    adv = np.array([1.0, 2.0, -1.0], np.float32)
    kw = dict(level="sequence", aggregation="sequence_mean")
    num, w, metrics = L.policy_loss(logp, old, adv, mask, **kw)
    s0 = math.exp(0.1)
    want = (-s0 * 1.0 + -1.2 * 2.0 + 0.8) / 3  # row 2: -min(e^-0.3 * -1, 0.8 * -1) = 0.8
    np.testing.assert_allclose(loss_of(num, w), want, rtol=1e-6)
    assert float(metrics["clip_fraction"][0]) == 5 and float(metrics["clip_fraction"][1]) == 8
    np.testing.assert_allclose(loss_of(*metrics["ratio_mean"]),
                               (3 * s0 + 2 * math.exp(0.4) + 3 * math.exp(-0.3)) / 8, rtol=1e-6)
    # gradient: s_0 * A_0 * mean_t grad logp on row 0 (through the sequence ratio), 0 on the clipped rows
    g = grad_wrt_logp(logp, old, adv, mask, **kw)
    want_g = np.zeros_like(g)
    want_g[0, :3] = -s0 * 1.0 / 3 / 3
    np.testing.assert_allclose(g, want_g, atol=1e-7)
    # GSPO-token with per-sequence advantages: the same value and gradient
    num_t, w_t, _ = L.policy_loss(logp, old, adv, mask, level="sequence_token", aggregation="sequence_mean")
    np.testing.assert_allclose(loss_of(num_t, w_t), want, rtol=1e-6)
    np.testing.assert_allclose(grad_wrt_logp(logp, old, adv, mask, level="sequence_token",
                                             aggregation="sequence_mean"), want_g, atol=1e-7)


def test_vanilla_policy_gradient():
    """clip_low=None and old=None (on-policy): rho = 1, loss -A per token, gradient -A * d logp."""
    logp, _, adv, mask, _ = rollout(14)
    n = mask.sum(1)
    for agg, scale in (("sequence_mean", 1 / n[:, None] / len(n)), ("token_mean", 1 / mask.sum()),
                       ("constant", 1 / MAX_LEN / len(n)), ("sequence_sum", 1 / len(n))):
        for clip_low in (None, 0.2):  # at rho = 1 the clip never engages either
            kw = dict(clip_low=clip_low, aggregation=agg, max_len=MAX_LEN)
            num, w, m = L.policy_loss(logp, None, adv, mask, **kw)
            g = grad_wrt_logp(logp, None, adv, mask, **kw)
            np.testing.assert_allclose(g, -adv[:, None] * mask * scale, rtol=1e-5, atol=1e-8)
            assert float(m["clip_fraction"][0]) == 0.0
            np.testing.assert_allclose(loss_of(*m["ratio_mean"]), 1.0, rtol=1e-6)
    # trajectory level (RLOO, 2402.14740): gradient -A_i * sum_t d logp_it per sequence, averaged over sequences
    g = grad_wrt_logp(logp, None, adv, mask, clip_low=None, level="trajectory", aggregation="sequence_mean")
    np.testing.assert_allclose(g, -adv[:, None] * mask / len(n), rtol=1e-5, atol=1e-8)


CASES = [(lvl, agg) for lvl in ("token", "sequence", "sequence_token", "trajectory") for agg in AGGREGATIONS]


@pytest.mark.parametrize("level,aggregation", CASES)
def test_accumulation_equals_one_big_batch(level, aggregation):
    logp, old, adv, mask, ref = rollout(20 + AGGREGATIONS.index(aggregation), B=8, T=9,
                                         spread=0.3 if level == "token" else 0.05)
    mask[5] = 0.0  # a filler row
    kw = dict(clip_low=0.2, clip_high=0.28, level=level, aggregation=aggregation, max_len=MAX_LEN, beta=0.05)

    def loss_parts(lp, rows):
        kl = L.kl_penalty(lp, ref[rows], "k3")
        return L.policy_loss(lp, old[rows], adv[rows], mask[rows], kl_BT=kl, **kw)

    every = np.arange(8)
    num, w, metrics = loss_parts(jnp.asarray(logp), every)
    full = float(num) / float(w)
    full_g = np.asarray(jax.grad(lambda lp: (lambda n_, w_, _: n_ / w_)(*loss_parts(lp, every)))(jnp.asarray(logp)))
    full_m = L.finalize(metrics)
    for k in (2, 4):
        nums, ws, grads, ms = [], [], [], []
        for rows in np.split(every, k):
            n_k, w_k, m_k = loss_parts(jnp.asarray(logp[rows]), rows)
            nums.append(float(n_k))
            ws.append(float(w_k))
            grads.append(np.asarray(jax.grad(lambda lp: loss_parts(lp, rows)[0])(jnp.asarray(logp[rows]))))
            ms.append(m_k)
        np.testing.assert_allclose(sum(nums) / sum(ws), full, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.concatenate(grads) / sum(ws), full_g, rtol=1e-6, atol=1e-6)
        summed = ms[0]
        for m_k in ms[1:]:
            summed = jax.tree.map(jnp.add, summed, m_k)
        for name, v in L.finalize(summed).items():
            np.testing.assert_allclose(v, full_m[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_finalize():
    out = L.finalize({"a": (jnp.float32(3.0), jnp.float32(4.0)), "b": (jnp.float32(0.0), jnp.float32(0.0))})
    assert float(out["a"]) == 0.75 and float(out["b"]) == 0.0


# ----------------------------------------------------------------------------- PPO


def np_gae(r, v, mask, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the row's valid tokens, value 0 after the last."""
    B, T = r.shape
    adv = np.zeros((B, T))
    for i in range(B):
        idx = [t for t in range(T) if mask[i, t] > 0]
        vals = [float(v[i, t]) for t in idx] + [0.0]
        deltas = [float(r[i, t]) + gamma * vals[j + 1] - vals[j] for j, t in enumerate(idx)]
        for j, t in enumerate(idx):
            adv[i, t] = sum((gamma * lam) ** l * deltas[j + l] for l in range(len(idx) - j))
    return adv, (adv + np.asarray(v, np.float64)) * mask


@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_numpy(holes):
    rng = np.random.default_rng(30)
    B, T = 5, 11
    mask = completion_mask(rng, B, T, holes=holes)
    r = rng.normal(0, 1, (B, T)).astype(np.float32)
    v = rng.normal(0, 1, (B, T)).astype(np.float32)
    gamma, lam = 0.97, 0.9
    adv, ret = L.gae(r, v, mask, gamma, lam)
    want_adv, want_ret = np_gae(r, v, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    # gamma = lam = 1: A_t = sum of rewards from t on - V_t (values after the last token are 0)
    adv1, _ = L.gae(r, v, mask, 1.0, 1.0)
    rm = (r * mask)[:, ::-1].cumsum(1)[:, ::-1]
    np.testing.assert_allclose(adv1, (rm - v) * mask, rtol=1e-5, atol=1e-5)


def test_token_rewards():
    mask = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]], np.float32)
    kl = np.random.default_rng(31).normal(0, 0.1, mask.shape).astype(np.float32)
    scores = np.array([2.0, -1.0, 5.0, 0.5], np.float32)
    got = np.asarray(L.token_rewards(scores, mask, kl, 0.1))
    want = -0.1 * kl * mask
    want[0, 3] += 2.0
    want[1, 1] += -1.0
    want[3, 4] += 0.5
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_whiten():
    rng = np.random.default_rng(32)
    mask = completion_mask(rng, 6, 8)
    x = rng.normal(3.0, 2.0, mask.shape).astype(np.float32)
    vals = x[mask > 0].astype(np.float64)
    want = (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8) * mask
    np.testing.assert_allclose(L.whiten(x, mask), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(L.whiten(x, mask, shift_mean=False), (want + vals.mean()) * mask, rtol=1e-5, atol=1e-5)


def test_value_loss():
    rng = np.random.default_rng(33)
    mask = completion_mask(rng, 6, 8)
    V = rng.normal(0, 1, mask.shape).astype(np.float32)
    V_old = (V + rng.normal(0, 0.4, mask.shape)).astype(np.float32)
    R = rng.normal(0, 1, mask.shape).astype(np.float32)
    num, w, m = L.value_loss(V, V_old, R, mask, 0.2)
    V64, Vo, R64 = (a.astype(np.float64) for a in (V, V_old, R))
    un = (V64 - R64) ** 2
    cl = (Vo + np.clip(V64 - Vo, -0.2, 0.2) - R64) ** 2
    np.testing.assert_allclose(float(num) / float(w), (0.5 * np.maximum(un, cl) * mask).sum() / mask.sum(), rtol=1e-5)
    assert float(w) == mask.sum()
    frac = ((cl > un) & (mask > 0)).sum()
    assert 0 < frac < mask.sum() and float(m["value_clip_fraction"][0]) == frac
    # the gradient w.r.t. V is zero exactly where the clipped branch wins
    g = np.asarray(jax.grad(lambda v: L.value_loss(v, V_old, R, mask, 0.2)[0])(jnp.asarray(V)))
    np.testing.assert_array_equal((g == 0) & (mask > 0), (cl > un) & (mask > 0))
    num_u, w_u, _ = L.value_loss(V, V_old, R, mask, None)
    np.testing.assert_allclose(float(num_u) / float(w_u), (0.5 * un * mask).sum() / mask.sum(), rtol=1e-5)
    # aggregated as the policy term (PPO under another aggregation shares the policy's weight)
    per = 0.5 * np.maximum(un, cl) * mask
    n_B = mask.sum(1)
    rows = (n_B > 0).sum()
    expect = {"sequence_mean": ((per.sum(1) / np.maximum(n_B, 1)).sum(), rows),
              "sequence_sum": (per.sum(), rows), "constant": (per.sum() / MAX_LEN, rows)}
    for aggregation, (want_num, want_w) in expect.items():
        num_a, w_a, _ = L.value_loss(V, V_old, R, mask, 0.2, aggregation=aggregation, max_len=MAX_LEN)
        np.testing.assert_allclose(float(num_a), want_num, rtol=1e-5, err_msg=aggregation)
        assert float(w_a) == want_w == float(L.policy_loss(V, V_old, V, mask, aggregation=aggregation,
                                                            max_len=MAX_LEN)[1])
    with pytest.raises(ValueError, match="aggregation 'mean'"):
        L.value_loss(V, V_old, R, mask, aggregation="mean")


# ----------------------------------------------------------------------------- logits


def test_token_logprobs_and_entropy():
    rng = np.random.default_rng(34)
    B, T, V = 3, 5, 11
    logits = rng.normal(0, 2, (B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = completion_mask(rng, B, T)
    for temp in (0.7, 1.0):
        z = logits.astype(np.float64) / temp
        logsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
        want_lp = np.take_along_axis(logsm, targets[..., None], -1)[..., 0]
        np.testing.assert_allclose(L.token_logprobs(logits, targets, temp), want_lp, rtol=1e-5, atol=1e-5)
        want_h = -(np.exp(logsm) * logsm).sum(-1) * mask
        np.testing.assert_allclose(L.entropy_from_logits(logits, mask, temp), want_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(L.token_logprobs(logits, targets, 0.0), L.token_logprobs(logits, targets, 1.0))
    assert L.token_logprobs(logits.astype(jnp.bfloat16), targets).dtype == jnp.float32
    # a -inf logit (masked vocabulary entry) adds nothing to the entropy
    logits[..., 0] = -np.inf
    assert np.all(np.isfinite(L.entropy_from_logits(logits, mask, 1.0)))
