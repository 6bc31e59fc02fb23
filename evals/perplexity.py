"""Perplexity and bits per byte of a model on documents.

Each document is tokenized as `[bos] + tokens + [eos]` (the layout pretraining uses); every token
after the first is predicted exactly once. A document longer than the window is scored in
consecutive windows of at most `max_length` input tokens:

    window 1 predicts tokens 1 .. L from tokens 0 .. L-1 (L = max_length);
    each next window predicts the next `stride` tokens from a full window of L inputs ending
    just before the last of them, so the first of them sees L - stride + 1 tokens of context.

`stride = max_length` (the default) gives disjoint windows, as lm-evaluation-harness's rolling
log-likelihood does; a smaller stride gives every predicted token more context at the cost of
max_length / stride times the compute. The last window of a document takes as much earlier
context as fits.

Reported: documents, tokens (predicted), bytes (UTF-8 of the documents), nats (total negative
log-likelihood), nll_per_token, perplexity = exp(nats / tokens), bits_per_byte = nats / ln 2 / bytes.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.tokenizer import special, start_ids
from evals.scoring import token_logprobs
from models.logprobs import token_nll
from models.transformer import apply, split_params


def windows(ids: Sequence[int], max_length: int, stride: int | None = None) -> list[tuple[list[int], int]]:
    """(tokens, n_scored) windows covering targets ids[1:] once each: the window's sequence is
    scored by `token_logprobs` and only its last `n_scored` log-probabilities count."""
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride} must be in [1, max_length={max_length}]")
    n = len(ids)
    if n < 2:
        return []
    out = []
    end = min(max_length, n - 1)  # targets ids[1 .. end]
    out.append((list(ids[:end + 1]), end))
    p = end + 1  # the next target
    while p < n:
        e = min(p + stride, n)  # targets ids[p .. e-1]
        out.append((list(ids[max(0, e - 1 - max_length):e]), e - p))
        p = e
    return out


def document_ids(tokenizer, text: str, *, add_bos: bool = True) -> list[int]:
    """`[bos] + tokens + [eos]`; without a BOS id (some Hugging Face tokenizers) EOS starts the
    document, as lm-evaluation-harness uses its end-of-text token as the prefix."""
    return (start_ids(tokenizer) if add_bos else []) + list(tokenizer.encode(text)) + special(tokenizer.eos_id)


def perplexity(model, tokenizer, texts: Iterable[str], *, max_length: int = 0, stride: int = 0,
               add_bos: bool = True, max_tokens_per_batch: int = 16384, desc: str = "perplexity",
               progress: bool = True) -> dict:
    """Perplexity / bits per byte of `texts` (see the module doc); `max_length` 0 = the model's max_seq_len."""
    t0 = time.perf_counter()
    max_length = max_length or int(model.config.max_seq_len)
    if max_length > model.config.max_seq_len:
        raise ValueError(f"max_length={max_length} exceeds the model's max_seq_len={model.config.max_seq_len}")
    seqs, owners, counts = [], [], []
    num_bytes, docs = 0, 0
    for text in texts:
        num_bytes += len(text.encode("utf-8"))
        for seq, k in windows(document_ids(tokenizer, text, add_bos=add_bos), max_length, stride or None):
            seqs.append(seq)
            counts.append(k)
            owners.append(docs)
        docs += 1
    if not seqs:
        raise ValueError("no tokens to score: the documents are empty")
    lps = token_logprobs(model, seqs, max_tokens_per_batch=max_tokens_per_batch, desc=desc, progress=progress)
    per_doc = np.zeros(docs, np.float64)
    tokens = 0
    for lp, k, d in zip(lps, counts, owners):
        per_doc[d] -= float(np.sum(lp[-k:], dtype=np.float64))
        tokens += k
    nats = float(per_doc.sum())
    seconds = time.perf_counter() - t0
    return {
        "documents": docs,
        "windows": len(seqs),
        "tokens": tokens,
        "bytes": num_bytes,
        "nats": nats,
        "nll_per_token": nats / tokens,
        "perplexity": math.exp(nats / tokens),
        "bits_per_byte": nats / math.log(2) / max(num_bytes, 1),
        "tokens_per_sec": tokens / max(seconds, 1e-9),
        "seconds": seconds,
    }


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nll_sum(graphdef, params, batch):
    nll_BT, _ = token_nll(apply(graphdef, params, batch), batch["targets_BT"])
    mask_BT = batch["loss_mask_BT"].astype(jnp.float32)
    return (nll_BT * mask_BT).sum(), mask_BT.sum()


def mean_loss(model, batches: Iterable[dict]) -> float:
    """Token-weighted mean cross-entropy (nats per target) of `model` over batches in the batch
    format (`inputs_BT`, `targets_BT`, `positions_BT`, `segment_ids_BT`, `loss_mask_BT`, as
    `data.pipeline` makes them), e.g. a quantized model against the original."""
    graphdef, params = split_params(model)
    total = count = 0.0
    for batch in batches:
        s, n = jax.device_get(_nll_sum(graphdef, params, batch))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)
