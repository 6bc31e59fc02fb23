"""The jitted, bucketed scorer against a float64 log-softmax of unpadded logits."""

import numpy as np
import pytest

from evals import scoring
from evals.scoring import token_logprobs
from models import transformer as T
from tests.helpers import random_tokens, tiny_model_config


@pytest.fixture(scope="module")
def model():
    return T.build(tiny_model_config(), seed=3)


def _reference(model, seq):
    logits = np.asarray(model(np.asarray([seq[:-1]], np.int32)), np.float64)[0]  # unpadded, eager
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return logp[np.arange(len(seq) - 1), seq[1:]], logits.argmax(-1) == np.asarray(seq[1:])


def test_ragged_batch_matches_float64_log_softmax(model):
    r = np.random.default_rng(0)
    # lengths across two buckets (32; 64 = max_seq_len + 1 tokens), full and partial batches
    seqs = [random_tokens(r, (n,), 97).tolist() for n in (2, 17, 33, 65, 9, 31)]
    lps, greedy = token_logprobs(model, seqs, max_tokens_per_batch=96, return_greedy=True, progress=False)
    worst = 0.0
    for s, lp, g in zip(seqs, lps, greedy):
        ref_lp, ref_g = _reference(model, s)
        assert lp.shape == (len(s) - 1,) and lp.dtype == np.float32
        worst = max(worst, float(np.abs(lp - ref_lp).max()))
        np.testing.assert_array_equal(g, ref_g)
    assert worst < 1e-5, worst


def test_batch_composition_does_not_change_scores(model):
    r = np.random.default_rng(1)
    seqs = [random_tokens(r, (n,), 97).tolist() for n in (12, 30, 7)]
    together = token_logprobs(model, seqs, progress=False)
    alone = [token_logprobs(model, [s], progress=False)[0] for s in seqs]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_lengths_in_one_bucket_share_one_program(model):
    """Inputs of 9, 20 and 31 tokens pad to the 32-token bucket: one compilation; 39 tokens
    pad to 64 (inference.engine.bucket, capped at max_seq_len): one more."""
    r = np.random.default_rng(2)
    scoring._score.clear_cache()
    for n in (10, 21, 32):
        token_logprobs(model, [random_tokens(r, (n,), 97).tolist()], progress=False)
    assert scoring._score._cache_size() == 1
    token_logprobs(model, [random_tokens(r, (40,), 97).tolist()], progress=False)
    assert scoring._score._cache_size() == 2


def test_errors(model):
    with pytest.raises(ValueError, match="max_seq_len=64"):
        token_logprobs(model, [[1] * 66], progress=False)
    with pytest.raises(ValueError, match="needs >= 2"):
        token_logprobs(model, [[1]], progress=False)
    with pytest.raises(ValueError, match="outside"):
        token_logprobs(model, [[1, 97]], progress=False)
