"""KV-cache decoding: `generate(model, prompts, ...)`.

Prompts of different lengths are left-padded to one length; padding gets segment id 0 (masked
from every real query) and each real token keeps its own position 0..n-1, so a padded row
decodes exactly as it would alone. One jitted function runs the prefill and a `lax.scan` of
decode steps, compiled once per (batch, prompt length, new tokens, sampling settings).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inference.sampling import sample
from models.transformer import init_cache, split_params


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "min_p", "stop_tokens"))
def _generate(graphdef, params, tokens_BP, segment_ids_BP, positions_BP, key, *, max_new_tokens, temperature,
              top_k, top_p, min_p, stop_tokens):
    model = nnx.merge(graphdef, params)
    cfg = model.config
    b, p = tokens_BP.shape
    cache = init_cache(cfg, b, p + max_new_tokens)
    logits, cache = model(tokens_BP, positions_BT=positions_BP, segment_ids_BT=segment_ids_BP, cache=cache)
    next_pos = positions_BP[:, -1] + 1
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    def pick(logits_BV, key):
        tok = sample(logits_BV, key, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        logp = jax.nn.log_softmax(logits_BV.astype(jnp.float32), -1)
        return tok, jnp.take_along_axis(logp, tok[:, None], -1)[:, 0]

    key, k0 = jax.random.split(key)
    tok, logp = pick(logits[:, -1], k0)
    done = jnp.isin(tok, stops)

    def step(carry, key):
        tok, pos, done, cache = carry
        logits, cache = model(tok[:, None], positions_BT=pos[:, None], cache=cache)
        nxt, lp = pick(logits[:, -1], key)
        nxt = jnp.where(done, 0, nxt)
        return (nxt, pos + 1, done | jnp.isin(nxt, stops), cache), (nxt, lp, done)

    keys = jax.random.split(key, max_new_tokens - 1)
    _, (toks, lps, dones) = jax.lax.scan(step, (tok, next_pos, done, cache), keys)
    ids = jnp.concatenate([tok[None], toks], 0).T  # [B, N]
    logps = jnp.concatenate([logp[None], lps], 0).T
    finished_before = jnp.concatenate([jnp.zeros((1, b), bool), dones], 0).T  # token i comes after a stop
    return ids, logps, finished_before


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             stop_tokens: Sequence[int] = (), seed: int = 0, return_logprobs: bool = False, pad_id: int = 0):
    """New token ids per prompt: exactly `max_new_tokens`, or fewer when a stop token ends a row
    (the stop token is included).

    Args:
      model: a `models.transformer.Decoder` (from our programs or `models.hf.load`).
      prompts: lists of token ids, each non-empty.
      temperature: 0 = greedy; otherwise sample from softmax(logits / temperature) after the
        top-k / top-p / min-p filters.
      seed: sampling seed; the same seed gives the same output.
      return_logprobs: also return each chosen token's log-probability under the model's
        unfiltered distribution (temperature 1), as RL needs.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    cfg = model.config
    lengths = np.array([len(p) for p in prompts])
    p_len = int(lengths.max())
    if cfg.position_embedding == "learned" and p_len + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length {p_len} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's learned positions (max_seq_len={cfg.max_seq_len})")
    b = len(prompts)
    tokens = np.full((b, p_len), pad_id, np.int32)
    seg = np.zeros((b, p_len), np.int32)
    pos = np.zeros((b, p_len), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
        tokens[i, p_len - n:] = p
        seg[i, p_len - n:] = 1
        pos[i, p_len - n:] = np.arange(n)
    graphdef, params = split_params(model)
    ids, logps, after_stop = _generate(
        graphdef, params, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos), jax.random.key(seed),
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k, top_p=top_p, min_p=min_p,
        stop_tokens=tuple(int(s) for s in stop_tokens))
    ids, logps, after_stop = map(np.asarray, jax.device_get((ids, logps, after_stop)))
    out_ids, out_lp = [], []
    for i in range(b):
        n = int((~after_stop[i]).sum())
        out_ids.append(ids[i, :n].tolist())
        out_lp.append(logps[i, :n].tolist())
    return (out_ids, out_lp) if return_logprobs else out_ids
