"""Speculative decoding with a draft model (greedy): the target's own greedy output, faster.

Each round, per row: the draft proposes k tokens one at a time; the target scores the last
emitted token and the k proposals in one forward pass; the longest prefix of proposals equal to
the target's argmax is accepted, and the target's next argmax (a correction, or a bonus token
when all k match) is emitted too, so every round emits between 1 and k+1 tokens, each exactly
the token the target alone would have chosen.

Both models keep a KV cache. All rows write k+1 slots per round; the slots of rejected
proposals get segment id 0, which masks them from every later query (positions are tracked per
row), so rows that accept different numbers of tokens share one batched program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inference.engine import bucket, check_prompts, left_pad
from models.transformer import KVCache, init_cache, split_params


@dataclasses.dataclass
class SpeculativeStats:
    rounds: int  # target forward passes of the batch
    row_rounds: int  # ... summed over the rows still decoding
    proposed: int  # draft tokens proposed to the target (for rows still decoding)
    accepted: int  # ... of which the target accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_round(self) -> float:
        """New tokens per row per target forward pass (1 for plain decoding, at most k + 1)."""
        return (self.accepted + self.row_rounds) / max(self.row_rounds, 1)


def _invalidate(cache: KVCache, start, keep_B, width: int) -> KVCache:
    """Slots start..start+width-1: keep the first keep_B[b] of row b, mask the rest (segment 0)."""
    seg = jnp.where(jnp.arange(width)[None, :] < keep_B[:, None], 1, 0).astype(jnp.int32)
    return dataclasses.replace(cache, segment_ids=jax.lax.dynamic_update_slice(cache.segment_ids, seg, (0, start)))


@functools.partial(jax.jit, static_argnames=("t_graphdef", "d_graphdef", "k", "cache_len", "n_buf", "stop_tokens"))
def _speculate(t_graphdef, t_params, d_graphdef, d_params, tokens_BP, seg_BP, pos_BP, padded_B, max_new, *, k,
               cache_len, n_buf, stop_tokens):
    target, draft = nnx.merge(t_graphdef, t_params), nnx.merge(d_graphdef, d_params)
    b = tokens_BP.shape[0]
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    t_logits, t_cache = target(tokens_BP, positions_BT=pos_BP, segment_ids_BT=seg_BP,
                               cache=init_cache(target.config, b, cache_len))
    _, d_cache = draft(tokens_BP, positions_BT=pos_BP, segment_ids_BT=seg_BP,
                       cache=init_cache(draft.config, b, cache_len))
    cur = jnp.argmax(t_logits[:, -1], -1).astype(jnp.int32)  # the target's first token
    pos = pos_BP[:, -1] + 1  # position of `cur`
    out = jnp.full((b, n_buf + k + 1), -1, jnp.int32).at[:, 0].set(cur)
    count = jnp.ones((b,), jnp.int32)  # tokens emitted per row
    done = padded_B | jnp.isin(cur, stops) | (count >= max_new)

    def cond(c):
        return ~jnp.all(c[4])

    def body(c):
        cur, pos, t_cache, d_cache, done, out, count, rounds, proposed, accepted = c
        start = t_cache.index
        # draft: k proposals, then its cache also takes the last one, so both caches hold k+1 new slots
        props = []
        x, d = cur, d_cache
        for j in range(k + 1):
            logits, d = draft(x[:, None], positions_BT=(pos + j)[:, None], cache=d)
            if j < k:
                x = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
                props.append(x)
        props = jnp.stack(props, 1)  # [B, k]
        chunk = jnp.concatenate([cur[:, None], props], 1)  # [B, k+1]
        positions = pos[:, None] + jnp.arange(k + 1)[None]
        logits, t_cache = target(chunk, positions_BT=positions, cache=t_cache)
        greedy = jnp.argmax(logits, -1).astype(jnp.int32)  # [B, k+1]: the target's choice after each
        match = jnp.cumprod((props == greedy[:, :k]).astype(jnp.int32), 1)
        n_acc = match.sum(1)  # accepted proposals per row
        emitted = jnp.where(jnp.arange(k + 1)[None] < n_acc[:, None], jnp.pad(props, ((0, 0), (0, 1))),
                            jnp.take_along_axis(greedy, n_acc[:, None], 1))  # [B, k+1]; valid: first n_acc+1
        # stop at a stop token or at max_new, inside the round
        valid = jnp.arange(k + 1)[None] <= n_acc[:, None]
        is_stop = jnp.isin(emitted, stops) & valid
        first_stop = jnp.where(is_stop.any(1), jnp.argmax(is_stop, 1), k + 1)
        n_emit = jnp.minimum(jnp.minimum(n_acc + 1, first_stop + 1), max_new - count)
        n_emit = jnp.where(done, 0, n_emit)
        cols = count[:, None] + jnp.arange(k + 1)[None]
        write = jnp.arange(k + 1)[None] < n_emit[:, None]
        out = out.at[jnp.arange(b)[:, None], jnp.where(write, cols, n_buf + k)].set(
            jnp.where(write, emitted, out[:, -1:]))
        new_count = count + n_emit
        new_done = done | (first_stop < n_acc + 1) | (new_count >= max_new)
        # caches: keep the slots of cur and the accepted proposals
        t_cache = _invalidate(t_cache, start, n_acc + 1, k + 1)
        d_cache = _invalidate(d, start, n_acc + 1, k + 1)
        live = ~done
        nxt = jnp.take_along_axis(emitted, n_acc[:, None], 1)[:, 0]
        return (nxt, pos + n_acc + 1, t_cache, d_cache, new_done, out, new_count, rounds + 1,
                proposed + jnp.where(live, k, 0).sum(), accepted + jnp.where(live, jnp.minimum(n_acc, n_emit), 0).sum())

    init = (cur, pos, t_cache, d_cache, done, out, count, jnp.asarray(0), jnp.asarray(0), jnp.asarray(0))
    c = jax.lax.while_loop(cond, body, init)
    return c[5][:, :n_buf], c[7], c[8] // k, c[8], c[9]


def speculative_generate(target, draft, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                         num_draft_tokens: int = 4, stop_tokens: Sequence[int] = (), temperature: float = 0.0,
                         return_stats: bool = False, pad_id: int = 0):
    """Greedy decoding of `target` accelerated by `draft` (same tokenizer / vocabulary).

    Returns the new token ids per prompt, identical to `generate(target, prompts,
    max_new_tokens=..., stop_tokens=...)`; with `return_stats`, also a `SpeculativeStats`
    (acceptance rate, tokens per target pass).
    """
    if temperature != 0.0:
        raise ValueError(f"speculative decoding here is greedy: temperature must be 0, got {temperature}")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} must be >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocabulary {draft.config.vocab_size} != target vocabulary "
                         f"{target.config.vocab_size}: the models must share a tokenizer")
    check_prompts(prompts, target.config.vocab_size)
    k = int(num_draft_tokens)
    p_len, n_buf = bucket(max(len(p) for p in prompts)), bucket(max_new_tokens)
    cache_len = p_len + n_buf * (k + 1)  # every round writes k+1 slots and emits >= 1 token
    for m in (target, draft):
        if m.config.position_embedding == "learned" and max(len(p) for p in prompts) + max_new_tokens + k > \
                m.config.max_seq_len:
            raise ValueError("prompt + max_new_tokens + num_draft_tokens exceeds a model's learned positions")
    n = len(prompts)
    b = 1 << (n - 1).bit_length()
    tokens, seg, pos = left_pad(prompts, p_len, b, pad_id)
    tg, tp = split_params(target)
    dg, dp = split_params(draft)
    ids, rounds, row_rounds, proposed, accepted = _speculate(
        tg, tp, dg, dp, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos), jnp.arange(b) >= n,
        jnp.asarray(max_new_tokens, jnp.int32), k=k, cache_len=cache_len, n_buf=n_buf,
        stop_tokens=tuple(int(s) for s in stop_tokens))
    ids = np.asarray(ids)
    outs = [ids[i][ids[i] >= 0][:max_new_tokens].tolist() for i in range(n)]
    if return_stats:
        return outs, SpeculativeStats(int(rounds), int(row_rounds), int(proposed), int(accepted))
    return outs
