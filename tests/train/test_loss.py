"""The language-modelling loss against a float64 NumPy computation."""

import jax
import numpy as np

from models import transformer as T
from tests.helpers import random_tokens, tiny_model_config
from train.loss import lm_loss_fn


def _numpy_loss(logits, targets, mask, z_loss):
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    nll = log_z - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    n = mask.sum()
    return (nll * mask).sum() / n, z_loss * (log_z ** 2 * mask).sum() / n


def test_cross_entropy_and_z_loss():
    cfg = tiny_model_config(init_std=0.3)  # larger logits: log Z far from log V
    graphdef, params = T.split_params(T.build(cfg, seed=12))
    r = np.random.default_rng(12)
    batch = {"inputs_BT": random_tokens(r, (3, 10), cfg.vocab_size),
             "targets_BT": random_tokens(r, (3, 10), cfg.vocab_size),
             "loss_mask_BT": (r.random((3, 10)) > 0.3).astype(np.float32)}
    logits = T.apply(graphdef, params, batch)
    ce, z = _numpy_loss(logits, batch["targets_BT"], batch["loss_mask_BT"], 1e-2)
    loss, m = jax.jit(lm_loss_fn(graphdef, z_loss=1e-2))(params, batch, None)
    np.testing.assert_allclose(float(m["loss"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(m["z_loss"]), z, rtol=1e-5)
    np.testing.assert_allclose(float(loss), ce + z, rtol=1e-5)
    assert float(m["num_tokens"]) == batch["loss_mask_BT"].sum()
    _, m0 = lm_loss_fn(graphdef)(params, batch, None)
    assert float(m0["z_loss"]) == 0.0


def test_masked_tokens_do_not_matter():
    cfg = tiny_model_config()
    graphdef, params = T.split_params(T.build(cfg, seed=13))
    r = np.random.default_rng(13)
    batch = {"inputs_BT": random_tokens(r, (2, 8), cfg.vocab_size),
             "targets_BT": random_tokens(r, (2, 8), cfg.vocab_size),
             "loss_mask_BT": np.array([[1] * 5 + [0] * 3] * 2, np.float32)}
    other = dict(batch, targets_BT=batch["targets_BT"].copy())
    other["targets_BT"][:, 5:] = (other["targets_BT"][:, 5:] + 1) % cfg.vocab_size
    loss_fn = lm_loss_fn(graphdef)
    assert float(loss_fn(params, batch, None)[0]) == float(loss_fn(params, other, None)[0])
