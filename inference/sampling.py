"""Token sampling from logits: greedy, temperature, top-k, top-p (nucleus) and min-p filters.

Filters compose in the order temperature -> top-k -> top-p -> min-p, each removing tokens from
the support (their logits become -inf); the survivors keep their relative probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sampling(*, temperature: float = 0.0, top_k=None, top_p=None, min_p=None) -> None:
    """ValueError naming the first sampling setting outside its valid range (None means off)."""
    def bad(name, value, valid):
        raise ValueError(f"{name}={value!r} is not valid: expected {valid}")

    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        bad("temperature", temperature, "a number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        bad("top_k", top_k, "an integer >= 0 (0 or None = off)")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        bad("top_p", top_p, "a probability in (0, 1] (None or 1 = off)")
    if min_p is not None and not (isinstance(min_p, (int, float)) and 0.0 <= min_p < 1.0):
        bad("min_p", min_p, "a fraction in [0, 1) (None or 0 = off)")


def filter_logits(logits_BV, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None):
    """Logits of the sampling distribution (float32), with removed tokens at -inf."""
    if temperature <= 0:
        raise ValueError(f"filter_logits needs temperature > 0; got {temperature} (use greedy for 0)")
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    x = logits_BV.astype(jnp.float32) / temperature
    neg = jnp.float32(-jnp.inf)
    if top_k is not None and top_k > 0:
        k = min(int(top_k), x.shape[-1])
        kth = jax.lax.top_k(x, k)[0][..., -1:]
        x = jnp.where(x >= kth, x, neg)
    if top_p is not None and 0.0 < top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < p
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        x = jnp.where(keep, x, neg)
    if min_p is not None and min_p > 0.0:
        probs = jax.nn.softmax(x, axis=-1)
        x = jnp.where(probs >= min_p * probs.max(-1, keepdims=True), x, neg)
    return x


def sample(logits_BV, key, *, temperature: float = 0.0, top_k=None, top_p=None, min_p=None):
    """Token ids [B] (int32). temperature 0 is greedy (argmax; filters do not matter)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    x = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def filter_logits_rows(logits_BV, temperature_B, top_k_B, top_p_B, min_p_B):
    """`filter_logits` with settings per row, as arrays (a batch of requests that each chose their
    own): temperature > 0, top_k 0 = off, top_p 1 = off, min_p 0 = off. Row by row it keeps the
    tokens `filter_logits` keeps, with the same values (one sort serves top-k and top-p)."""
    x = logits_BV.astype(jnp.float32) / temperature_B[:, None]
    neg = jnp.float32(-jnp.inf)
    v = x.shape[-1]
    order = jnp.argsort(-x, axis=-1)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    k = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, v), v)
    kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)
    x = jnp.where(x >= kth, x, neg)
    sorted_x = jnp.where(sorted_x >= kth, sorted_x, neg)  # x's order is unchanged by masking its tail
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (before < top_p_B[:, None]) | (top_p_B[:, None] >= 1.0)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
    x = jnp.where(keep, x, neg)
    probs = jax.nn.softmax(x, axis=-1)
    return jnp.where(probs >= min_p_B[:, None] * probs.max(-1, keepdims=True), x, neg)


def sample_rows(logits_BV, keys_B, temperature_B, top_k_B, top_p_B, min_p_B):
    """Token ids [B] with each row's own settings and key (see `filter_logits_rows`); rows at
    temperature 0 take the argmax. Row i draws what `sample(logits[i:i+1], keys[i], ...)` draws
    with row i's settings. When every row is greedy the filters are skipped at run time."""
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def sampled(_):
        t = jnp.where(temperature_B > 0, temperature_B, 1.0)
        x = filter_logits_rows(logits_BV, t, top_k_B, top_p_B, min_p_B)
        drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(keys_B, x)
        return jnp.where(temperature_B > 0, drawn.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda _: greedy, None)
