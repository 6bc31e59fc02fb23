"""Batched, jitted log-likelihood scoring: the one function perplexity and multiple choice share.

    lps = token_logprobs(model, [[1, 5, 9, 2], [1, 7]])   # [array([lp(5|1), lp(9|1 5), lp(2|1 5 9)]), array([lp(7|1)])]

Sequences are sorted by length, right-padded to a length bucket (`inference.engine.bucket`, as
decoding pads prompts: powers of two from `min_bucket` up to 256, then multiples of 256; capped
at the model's `max_seq_len`) and batched so that a batch holds about
`max_tokens_per_batch` tokens; the batch size of a bucket's last, partial batch is rounded up to
a power of two. Compilations are therefore bounded by (number of buckets) x (log2 of the batch
size) whatever the data. Padding carries segment id 0 and position 0, so it never reaches a
real token (attention masks other segments, and causal order keeps right padding out of view
anyway), and each real row sees positions 0..n-1 exactly as it would alone.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evals.progress import Progress
from inference.engine import bucket
from models.logprobs import token_nll
from models.transformer import apply, split_params


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, params, inputs_BT, targets_BT, positions_BT, segment_ids_BT):
    logits_BTV = apply(graphdef, params, {"inputs_BT": inputs_BT, "positions_BT": positions_BT,
                                          "segment_ids_BT": segment_ids_BT})
    nll_BT, _ = token_nll(logits_BTV, targets_BT)
    greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    real_BT = segment_ids_BT > 0
    return jnp.where(real_BT, -nll_BT, 0.0), greedy_BT & real_BT


def token_logprobs(model, sequences: Sequence[Sequence[int]], *, max_tokens_per_batch: int = 16384,
                   min_bucket: int = 32, return_greedy: bool = False, desc: str = "scoring",
                   progress: bool = True):
    """Per-token log-probabilities of each sequence under `model`.

    Args:
      model: a `models.transformer.Decoder` (or any nnx module with its call signature and a
        `config.max_seq_len`); its logits are float32 [B, T, V].
      sequences: token-id lists of 2 to max_seq_len + 1 tokens (the first token is context only).
      max_tokens_per_batch: padded tokens per forward pass (memory: batch x length x vocab floats).
      return_greedy: also return, per scored token, whether it is the model's argmax.
    Returns:
      A list of float32 arrays, one per sequence, of length len(seq) - 1: entry i is
      log p(seq[i + 1] | seq[:i + 1]) in nats; with `return_greedy`, (logprobs, greedy) where
      greedy is a matching list of bool arrays.
    """
    max_len = int(model.config.max_seq_len)
    lengths = np.array([len(s) - 1 for s in sequences], np.int64)
    if len(sequences) and lengths.min() < 1:
        raise ValueError(f"sequence {int(lengths.argmin())} has {int(lengths.min()) + 1} tokens; scoring needs >= 2")
    if len(sequences) and lengths.max() > max_len:
        raise ValueError(f"sequence {int(lengths.argmax())} has {int(lengths.max())} input tokens, more than the "
                         f"model's max_seq_len={max_len}")
    vocab = int(model.config.vocab_size)
    for i, s in enumerate(sequences):
        if len(s) and (min(s) < 0 or max(s) >= vocab):
            raise ValueError(f"sequence {i} has token ids outside [0, {vocab})")
    graphdef, params = split_params(model)
    out_lp: list = [None] * len(sequences)
    out_greedy: list = [None] * len(sequences)
    order = np.argsort(-lengths, kind="stable")
    buckets: dict[int, list[int]] = {}
    for i in order:
        buckets.setdefault(min(bucket(int(lengths[i]), min_bucket), max_len), []).append(int(i))
    with Progress(len(sequences), desc, enabled=progress) as bar:
        for t, members in sorted(buckets.items(), reverse=True):
            rows = max(1, max_tokens_per_batch // t)
            for start in range(0, len(members), rows):
                idx = members[start:start + rows]
                b = rows if len(idx) == rows else min(rows, 1 << (len(idx) - 1).bit_length())
                inputs = np.zeros((b, t), np.int32)
                targets = np.zeros((b, t), np.int32)
                positions = np.zeros((b, t), np.int32)
                segments = np.zeros((b, t), np.int32)
                for r, i in enumerate(idx):
                    s = np.asarray(sequences[i], np.int32)
                    n = len(s) - 1
                    inputs[r, :n], targets[r, :n] = s[:-1], s[1:]
                    positions[r, :n] = np.arange(n)
                    segments[r, :n] = 1
                lp, greedy = jax.device_get(_score(graphdef, params, inputs, targets, positions, segments))
                for r, i in enumerate(idx):
                    n = int(lengths[i])
                    out_lp[i] = np.asarray(lp[r, :n], np.float32)
                    out_greedy[i] = np.asarray(greedy[r, :n], bool)
                bar.update(len(idx))
    return (out_lp, out_greedy) if return_greedy else out_lp
