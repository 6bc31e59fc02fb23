"""Optimizers reach a known optimum; schedules have their closed-form shapes; decay masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.optimizer import OPTIMIZERS, decay_mask, make_optimizer, make_schedule, warmup_steps


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizers_minimise_a_quadratic(name):
    """Least squares with a known solution: every optimizer drives the loss close to 0."""
    r = np.random.default_rng(0)
    a = jnp.asarray(r.standard_normal((64, 8)), jnp.float32)
    w_true = jnp.asarray(r.standard_normal((8, 4)), jnp.float32)
    y = a @ w_true
    params = {"kernel": jnp.asarray(r.standard_normal((8, 4)) * 0.1, jnp.float32)}
    lr = {"adamw": 0.05, "lamb": 0.05, "lion": 0.01, "adafactor": 0.05, "sgd": 0.02}[name]
    opt = dict(name=name, lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
    tx, _ = make_optimizer(opt, 600)
    state = tx.init(params)
    loss = lambda p: jnp.mean((a @ p["kernel"] - y) ** 2)  # noqa: E731

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    first = float(loss(params))
    for _ in range(600):
        params, state = step(params, state)
    assert float(loss(params)) < 0.02 * first, name


def test_cosine_schedule_shape():
    s = make_schedule(dict(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), 110)
    assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.5) < 1e-6 and abs(float(s(10)) - 1.0) < 1e-6
    assert abs(float(s(60)) - (0.1 + 0.9 * 0.5)) < 1e-5  # half-way through the decay
    assert abs(float(s(110)) - 0.1) < 1e-6


def test_linear_constant_inverse_sqrt_wsd():
    lin = make_schedule(dict(lr=2.0, schedule="linear", warmup_steps=0, min_lr_ratio=0.0), 100)
    assert abs(float(lin(50)) - 1.0) < 1e-6
    const = make_schedule(dict(lr=2.0, schedule="constant", warmup_steps=4), 100)
    assert float(const(2)) == 1.0 and float(const(99)) == 2.0
    inv = make_schedule(dict(lr=1.0, schedule="inverse_sqrt", warmup_steps=16), 1000)
    assert abs(float(inv(16)) - 1.0) < 1e-6 and abs(float(inv(16 + 48)) - 0.5) < 1e-6
    wsd = make_schedule(dict(lr=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0), 100)
    assert float(wsd(50)) == 1.0 and float(wsd(79)) == 1.0
    assert abs(float(wsd(90)) - 0.5) < 1e-6 and float(wsd(100)) == 0.0


def test_warmup_from_fraction_and_errors():
    assert warmup_steps({"warmup_steps": None, "warmup_fraction": 0.05}, 80) == 4
    with pytest.raises(ValueError, match="schedule='cosinus'"):
        make_schedule(dict(lr=1.0, schedule="cosinus"), 10)
    with pytest.raises(ValueError, match="optimizer.name='adam'"):
        make_optimizer(dict(name="adam", lr=1.0), 10)


def test_decay_mask_and_effect():
    params = {"embed": jnp.ones((4, 2)), "layers": {"attn": {"q": {"kernel": jnp.ones((2, 2)),
                                                                  "bias": jnp.ones((2,))}},
                                                    "attn_norm": {"scale": jnp.ones((2,))}}}
    m = decay_mask(params)
    assert m == {"embed": False, "layers": {"attn": {"q": {"kernel": True, "bias": False}},
                                            "attn_norm": {"scale": False}}}
    tx, _ = make_optimizer(dict(name="adamw", lr=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5,
                                clip_norm=0.0), 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(u["layers"]["attn"]["q"]["kernel"]).max()) > 0  # decayed
    assert float(jnp.abs(u["embed"]).max()) == 0 and float(jnp.abs(u["layers"]["attn_norm"]["scale"]).max()) == 0


def test_clipping_bounds_the_update():
    tx, _ = make_optimizer(dict(name="sgd", lr=1.0, schedule="constant", warmup_steps=0, momentum=0.0,
                                weight_decay=0.0, clip_norm=1.0), 10)
    p = {"kernel": jnp.zeros((3,))}
    u, _ = tx.update({"kernel": jnp.array([30.0, 40.0, 0.0])}, tx.init(p), p)
    np.testing.assert_allclose(u["kernel"], [-0.6, -0.8, 0.0], rtol=1e-6)
