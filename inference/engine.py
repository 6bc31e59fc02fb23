"""KV-cache decoding: `generate(model, prompts, ...)`.

Prompts of different lengths are left-padded to one length; padding gets segment id 0 (masked
from every real query) and each real token keeps its own position 0..n-1, so a padded row
decodes exactly as it would alone. One jitted function runs the prefill and a `while_loop` of
decode steps that ends early when every row has stopped.

Shapes are bucketed so that a server or an eval loop compiles a handful of programs, not one
per request: the batch is padded to a power of two, the prompt length to a power of two (16 at
least; a multiple of 256 above 256), and the new-token buffer likewise; the number of steps is
a runtime argument. Stop strings and streaming go through one host callback per step
(`jax.experimental.io_callback`), compiled in only when asked for.
"""

from __future__ import annotations

import functools
import itertools
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from inference import decode_layout as layout_lib
from inference.sampling import check_sampling, sample
from models.logprobs import token_logprobs
from models.transformer import init_cache, split_params


def bucket(n: int, minimum: int = 16, step_above: int = 256) -> int:
    """Power of two >= max(n, minimum) up to `step_above`, then the next multiple of it."""
    n = max(int(n), 1)
    if n > step_above:
        return -(-n // step_above) * step_above
    return max(minimum, 1 << (n - 1).bit_length())


# Host-side handlers of running requests, keyed by a request id passed into the compiled
# program (so the program does not close over, and recompile for, each request's callback).
_HANDLERS: dict[int, Callable] = {}
_REQUEST_IDS = itertools.count()
_LOCK = threading.Lock()


def _dispatch(request_id, step, tokens):
    return _HANDLERS[int(request_id)](int(step), np.asarray(tokens))


def apply_repetition_penalty(logits_BV, seen_BV, penalty: float):
    """CTRL / Hugging Face rule: seen tokens' positive logits / penalty, negative ones * penalty."""
    if penalty == 1.0:
        return logits_BV
    pen = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, pen, logits_BV)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_buf", "temperature", "top_k", "top_p", "min_p",
                                             "repetition_penalty", "stop_tokens", "host"))
def _generate(graphdef, params, tokens_BP, segment_ids_BP, positions_BP, keys_B, padded_B, n_steps, request_id, *,
              n_buf,
              temperature, top_k, top_p, min_p, repetition_penalty, stop_tokens, host):
    # the model, or its CPU decode layout (inference/decode_layout.py): the prefill runs the
    # model's stacked layers either way, the decode steps run the layout's unrolled blocks
    runner = nnx.merge(graphdef, params)
    laid_out = isinstance(runner, layout_lib.DecodeLayout)
    model = runner.model if laid_out else runner
    b, p = tokens_BP.shape
    cache = init_cache(model.config, b, p + n_buf)
    logits, cache = model(tokens_BP, positions_BT=positions_BP, segment_ids_BT=segment_ids_BP, cache=cache)
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    vocab = logits.shape[-1]
    seen = jnp.zeros((b, vocab), bool)
    if repetition_penalty != 1.0:
        seen = seen.at[jnp.arange(b)[:, None], tokens_BP].max(segment_ids_BP > 0)

    def pick(logits_BV, seen_BV, step):
        scored = apply_repetition_penalty(logits_BV, seen_BV, repetition_penalty)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_B)
        tok = jax.vmap(lambda lg, k: sample(lg[None], k, temperature=temperature, top_k=top_k, top_p=top_p,
                                            min_p=min_p)[0])(scored, step_keys)
        # the log-prob RL pins (models/logprobs.py): log_softmax(logits / T), no penalty or filter
        return tok, token_logprobs(logits_BV[:, None], tok[:, None], temperature)[:, 0]

    def emit(step, tok, done, seen, out_ids, out_lp, lp):
        """Record token `tok` as new token number `step` of each row not yet done."""
        out_ids = out_ids.at[:, step].set(jnp.where(done, -1, tok))
        out_lp = out_lp.at[:, step].set(jnp.where(done, 0.0, lp))
        done = done | jnp.isin(tok, stops)
        if host:
            done = done | io_callback(_dispatch, jax.ShapeDtypeStruct((b,), jnp.bool_), request_id, step,
                                      jnp.where(out_ids[:, step] < 0, -1, tok), ordered=True)
        if repetition_penalty != 1.0:
            seen = seen.at[jnp.arange(b), tok].set(True)
        return done, seen, out_ids, out_lp

    out_ids = jnp.full((b, n_buf), -1, jnp.int32)
    out_lp = jnp.zeros((b, n_buf), jnp.float32)
    tok, lp = pick(logits[:, -1], seen, 0)
    done, seen, out_ids, out_lp = emit(0, tok, padded_B, seen, out_ids, out_lp, lp)  # batch padding: done
    pos = positions_BP[:, -1] + 1
    if laid_out:
        cache = layout_lib.LayerCache.of(cache)

    def cond(c):
        step, done = c[0], c[3]
        return (step < n_steps) & ~jnp.all(done)

    def body(c):
        step, tok, pos, done, seen, cache, out_ids, out_lp = c
        logits, cache = runner(tok[:, None], positions_BT=pos[:, None], cache=cache)
        nxt, lp = pick(logits[:, -1], seen, step)
        done, seen, out_ids, out_lp = emit(step, nxt, done, seen, out_ids, out_lp, lp)
        return step + 1, nxt, pos + 1, done, seen, cache, out_ids, out_lp

    init = (jnp.asarray(1, jnp.int32), tok, pos, done, seen, cache, out_ids, out_lp)
    *_, out_ids, out_lp = jax.lax.while_loop(cond, body, init)
    return out_ids, out_lp


def row_keys(seed: int | Sequence[int], n: int, b: int):
    """[b] PRNG keys for n prompts in a batch padded to b rows (see `generate`'s `seed`)."""
    if isinstance(seed, (int, np.integer)):
        base = jax.random.key(int(seed))
        return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(b))
    seeds = list(seed)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts; give one seed or one per prompt")
    return jnp.stack([jax.random.key(int(s)) for s in seeds + [0] * (b - n)])


def left_pad(prompts: Sequence[Sequence[int]], length: int, batch: int, pad_id: int = 0):
    """(tokens, segment_ids, positions) [batch, length]: prompts right-aligned; extra rows all padding."""
    tokens = np.full((batch, length), pad_id, np.int32)
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        tokens[i, length - n:] = p
        seg[i, length - n:] = 1
        pos[i, length - n:] = np.arange(n)
    return tokens, seg, pos


def check_prompts(prompts, vocab_size: int):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size})")


class _StreamState:
    """Host side of one request: streaming callback and stop-string detection."""

    def __init__(self, n_rows, stream, stop_strings, tokenizer):
        self.stream, self.stop_strings, self.tokenizer = stream, tuple(stop_strings), tokenizer
        self.ids = [[] for _ in range(n_rows)]
        self.stopped = np.zeros(n_rows, bool)

    def __call__(self, step: int, tokens: np.ndarray) -> np.ndarray:
        stop = np.zeros(len(tokens), bool)
        for i, t in enumerate(tokens[: len(self.ids)]):
            if t < 0 or self.stopped[i]:
                continue
            self.ids[i].append(int(t))
            if self.stream is not None:
                self.stream(i, int(t))
            if self.stop_strings:
                # only the tail can complete a stop string: decode a window of recent tokens
                tail = self.tokenizer.decode(self.ids[i][-64:])
                if any(s in tail for s in self.stop_strings):
                    self.stopped[i] = stop[i] = True
        return stop


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float = 1.0, stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (),
             tokenizer=None, stream: Callable[[int, int], None] | None = None, seed: int | Sequence[int] = 0,
             return_logprobs: bool = False, pad_id: int = 0, decode_layout: bool | None = None):
    """New token ids per prompt: exactly `max_new_tokens`, or fewer when a stop token or stop
    string ends a row (the token that stops it is included).

    Args:
      model: a `models.transformer.Decoder` (from our programs or `models.hf.load`).
      prompts: lists of token ids, each non-empty.
      temperature: 0 = greedy; otherwise sample from softmax(logits / temperature) after the
        top-k / top-p / min-p filters.
      repetition_penalty: > 1 discourages tokens already in the prompt or the output (CTRL rule).
      stop_tokens: ids that end a row. stop_strings: texts that end a row once its decoded
        output contains one (needs `tokenizer`).
      stream: called as stream(row, token_id) for every new token, as it is produced.
      seed: one seed for the call, each row drawing its own stream from it (row i uses
        `fold_in(key(seed), i)`: copies of one prompt give independent samples, reproducibly);
        or one seed per prompt, each row's stream `key(seed_i)` alone, so a request's samples do
        not depend on its batch-mates or its place in the batch.
      return_logprobs: also return each chosen token's log-probability log_softmax(logits / T)
        over the full vocabulary (T = `temperature`, 1 when greedy; no top-k / top-p filter, no
        repetition penalty): the sampler's log-prob RL compares with the trainer's
        (models.logprobs.token_logprobs).
      decode_layout: run the decode steps on the CPU decode layout (inference/decode_layout.py):
        None decides by `decode_layout.applies` (float32, one CPU device, batch <= 16), True
        forces it (one device), False never. Tokens and log-probs are the same either way.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is not valid: expected an integer >= 1")
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the output")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be positive")
    cfg = model.config
    check_prompts(prompts, cfg.vocab_size)
    p_len = bucket(max(len(p) for p in prompts))
    n_buf = bucket(max_new_tokens)
    if cfg.position_embedding == "learned" and p_len + n_buf > cfg.max_seq_len:
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"learned positions (max_seq_len={cfg.max_seq_len})")
        p_len, n_buf = longest, max_new_tokens  # no room to bucket: exact shapes
    n = len(prompts)
    b = 1 << (n - 1).bit_length()
    tokens, seg, pos = left_pad(prompts, p_len, b, pad_id)
    keys = row_keys(seed, n, b)
    host = stream is not None or bool(stop_strings)
    request_id = 0
    if host:
        with _LOCK:
            request_id = next(_REQUEST_IDS)
            _HANDLERS[request_id] = _StreamState(n, stream, stop_strings, tokenizer)
    if decode_layout is None:
        decode_layout = layout_lib.applies(model, b)
    elif decode_layout and len(layout_lib.model_devices(model)) > 1:
        raise ValueError("decode_layout=True needs the model's weights on one device (the panels would lose "
                         "their shardings); pass decode_layout=None or False")
    graphdef, params = layout_lib.for_model(model)[1:] if decode_layout else split_params(model)
    try:
        ids, logps = _generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos), keys,
                               jnp.arange(b) >= n, jnp.asarray(max_new_tokens, jnp.int32),
                               jnp.asarray(request_id, jnp.int32),
                               n_buf=n_buf, temperature=float(temperature), top_k=top_k, top_p=top_p, min_p=min_p,
                               repetition_penalty=float(repetition_penalty),
                               stop_tokens=tuple(int(s) for s in stop_tokens), host=host)
        ids, logps = map(np.asarray, jax.device_get((ids, logps)))
    finally:
        _HANDLERS.pop(request_id, None)
    out_ids, out_lp = [], []
    for i in range(n):
        k = int((ids[i, :max_new_tokens] >= 0).sum())
        out_ids.append(ids[i, :k].tolist())
        out_lp.append(logps[i, :k].tolist())
    return (out_ids, out_lp) if return_logprobs else out_ids
