"""Perplexity / bits per byte against a direct computation, windows over long documents."""

import math

import numpy as np
import pytest

from evals.perplexity import document_ids, mean_loss, perplexity, windows
from models import transformer as T
from tests.evals.stubs import VOCAB, CharTokenizer
from tests.helpers import tiny_model_config

TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog; " * 4 + "naïve café"]  # 2nd: 190 tokens


@pytest.fixture(scope="module")
def model():
    return T.build(tiny_model_config(vocab_size=VOCAB, max_seq_len=256), seed=5)


def _logp(model, inputs, targets):
    logits = np.asarray(model(np.asarray([inputs], np.int32)), np.float64)[0]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logp[np.arange(len(targets)), targets]


@pytest.mark.parametrize("n,length,stride", [(2, 4, 4), (5, 4, 4), (23, 8, 8), (23, 8, 3), (23, 8, 1), (9, 30, 7)])
def test_windows_score_every_token_once(n, length, stride):
    ids = list(range(100, 100 + n))
    seen = []
    for seq, k in windows(ids, length, stride):
        assert 2 <= len(seq) <= length + 1 and 1 <= k <= len(seq) - 1
        assert seq == ids[ids.index(seq[0]):ids.index(seq[0]) + len(seq)]  # a contiguous slice
        seen += seq[-k:]
        if seq[0] != ids[0]:
            assert len(seq) == length + 1  # later windows use a full window of context
    assert seen == ids[1:]


def test_perplexity_equals_direct_computation(model):
    tok = CharTokenizer()
    docs = [document_ids(tok, t) for t in TEXTS]
    assert docs[0] == [1] + [ord(c) for c in "hello world"] + [2]
    # one window per document (256 >= length): the plain full-sequence log-likelihood
    nats = -sum(_logp(model, d[:-1], d[1:]).sum() for d in docs)
    tokens = sum(len(d) - 1 for d in docs)
    num_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    r = perplexity(model, tok, TEXTS, progress=False)
    assert (r["documents"], r["tokens"], r["bytes"], r["windows"]) == (2, tokens, num_bytes, 2)
    assert r["nats"] == pytest.approx(nats, rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-6)


def test_document_longer_than_the_window(model):
    tok = CharTokenizer()
    ids = document_ids(tok, TEXTS[1])
    n, L = len(ids), 64
    assert n > 2 * L
    # disjoint windows: targets [1, L], [L+1, 2L], ...; each chunk sees the L tokens before its last target
    nats, start = 0.0, 1
    while start < n:
        end = min(start + L, n)  # targets ids[start:end]
        inputs = ids[max(0, end - 1 - L):end - 1]
        lp = _logp(model, inputs, ids[max(0, end - 1 - L) + 1:end])
        nats -= lp[-(end - start):].sum()
        start = end
    r = perplexity(model, tok, [TEXTS[1]], max_length=L, progress=False)
    assert r["tokens"] == n - 1 and r["windows"] == math.ceil((n - 1) / L)
    assert r["nats"] == pytest.approx(nats, rel=1e-6)
    # overlapping windows give each token more context: same tokens, a different (here lower) loss
    overlapped = perplexity(model, tok, [TEXTS[1]], max_length=L, stride=16, progress=False)
    assert overlapped["tokens"] == n - 1 and overlapped["windows"] > r["windows"]
    full = perplexity(model, tok, [TEXTS[1]], progress=False)
    assert abs(overlapped["nats"] - full["nats"]) < abs(r["nats"] - full["nats"])


def test_errors(model):
    with pytest.raises(ValueError, match="max_seq_len=256"):
        perplexity(model, CharTokenizer(), ["x"], max_length=512, progress=False)
    with pytest.raises(ValueError, match="stride=9"):
        windows([1, 2, 3], 8, 9)


def test_mean_loss_weights_tokens_by_the_loss_mask(model):
    """Batches in the training batch format: the mean over masked-in targets of a float64
    log-softmax of each row's own logits (packed rows: positions restart per segment)."""
    r = np.random.default_rng(4)
    batches, nll = [], []
    for b, t in ((2, 24), (3, 16)):
        inputs = r.integers(0, VOCAB, (b, t), dtype=np.int32)
        targets = r.integers(0, VOCAB, (b, t), dtype=np.int32)
        mask = (r.random((b, t)) < 0.7).astype(np.float32)
        batches.append({"inputs_BT": inputs, "targets_BT": targets, "loss_mask_BT": mask,
                        "positions_BT": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                        "segment_ids_BT": np.ones((b, t), np.int32)})
        for i in range(b):
            nll += list(-_logp(model, inputs[i], targets[i])[mask[i] > 0])
    assert mean_loss(model, batches) == pytest.approx(float(np.mean(nll)), rel=1e-5)
