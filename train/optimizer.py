"""Optimizers and learning-rate schedules from the config's `optimizer` section (optax).

Every optimizer is `clip_by_global_norm(clip_norm)` followed by the update rule, with weight
decay masked off norms, biases and embeddings unless the config asks for them. Schedules
start with a linear warmup from 0; `warmup_steps` unset means `warmup_fraction * train.steps`,
so a short run (`--config.train.steps=80`) stays coherent.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd", "lamb")
SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt", "wsd")


def warmup_steps(opt: Mapping[str, Any], total_steps: int) -> int:
    w = opt.get("warmup_steps")
    if w is None:
        w = int(round(opt.get("warmup_fraction", 0.0) * total_steps))
    if w < 0:
        raise ValueError(f"optimizer.warmup_steps={w} must be >= 0")
    return min(int(w), max(total_steps, 0))


def make_schedule(opt: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """lr(step) for steps 0..total_steps-1 (the update at step s uses lr(s))."""
    name = opt.get("schedule", "cosine")
    if name not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={name!r} is not valid; expected one of {SCHEDULES}")
    lr = float(opt["lr"])
    if lr <= 0:
        raise ValueError(f"optimizer.lr={lr} must be positive")
    min_lr = lr * float(opt.get("min_lr_ratio", 0.0))
    total = max(int(total_steps), 1)
    warm = warmup_steps(opt, total)
    decay = max(total - warm, 1)

    if name == "cosine":
        after = optax.cosine_decay_schedule(lr, decay, alpha=min_lr / lr)
    elif name == "linear":
        after = optax.linear_schedule(lr, min_lr, decay)
    elif name == "constant":
        after = optax.constant_schedule(lr)
    elif name == "inverse_sqrt":
        w = max(warm, 1)
        after = lambda s: lr * jnp.sqrt(w / (s + w))  # noqa: E731  (lr at the end of warmup, then 1/sqrt)
    else:  # warmup-stable-decay: hold lr, then decay linearly over the last decay_fraction of the run
        decay_steps = max(int(round(float(opt.get("decay_fraction", 0.2)) * total)), 1)
        stable = max(decay - decay_steps, 0)
        after = optax.join_schedules([optax.constant_schedule(lr),
                                      optax.linear_schedule(lr, min_lr, decay - stable)], [stable])
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def decay_mask(params, *, decay_norms: bool = False, decay_biases: bool = False, decay_embeddings: bool = False):
    """True where weight decay applies, by leaf name: kernels always; `scale` (norms), `bias`,
    `embed`/`pos_embed` (embeddings, the tied head included) as configured."""

    def f(path, _):
        leaf = getattr(path[-1], "key", str(path[-1]))
        if leaf in ("embed", "pos_embed"):
            return decay_embeddings
        if leaf == "bias":
            return decay_biases
        if leaf == "scale":
            return decay_norms
        return True

    return jax.tree_util.tree_map_with_path(f, params)


def make_optimizer(opt: Mapping[str, Any], total_steps: int):
    """(optax.GradientTransformation, schedule)."""
    name = opt.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r} is not valid; expected one of {OPTIMIZERS}")
    sched = make_schedule(opt, total_steps)
    wd = float(opt.get("weight_decay", 0.0))
    b1, b2, eps = float(opt.get("b1", 0.9)), float(opt.get("b2", 0.95)), float(opt.get("eps", 1e-8))

    def mask(params):
        return decay_mask(params, decay_norms=opt.get("decay_norms", False),
                          decay_biases=opt.get("decay_biases", False),
                          decay_embeddings=opt.get("decay_embeddings", False))

    if name == "adamw":
        tx = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask)
    elif name == "lamb":
        tx = optax.lamb(sched, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask)
    elif name == "lion":
        tx = optax.lion(sched, b1=b1, b2=b2, weight_decay=wd, mask=mask)
    elif name == "adafactor":
        tx = optax.adafactor(sched, weight_decay_rate=wd or None, weight_decay_mask=mask,
                             multiply_by_parameter_scale=False)
    else:  # sgd with (optionally Nesterov) momentum; weight decay as L2 on the gradient, like torch.optim.SGD
        tx = optax.chain(optax.add_decayed_weights(wd, mask=mask),
                         optax.sgd(sched, momentum=float(opt.get("momentum", 0.9)) or None,
                                   nesterov=bool(opt.get("nesterov", False))))
    clip = float(opt.get("clip_norm", 0.0))
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx, sched
