"""inference.generate against full recomputation, and the sampling filters' supports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference import generate
from inference.sampling import filter_logits, sample
from models import transformer as T
from tests.helpers import random_tokens, tiny_model_config


@pytest.fixture(scope="module")
def model():
    return T.build(tiny_model_config(), seed=11)


def _greedy_by_recompute(model, prompt, n):
    seq = list(prompt)
    out, lps = [], []
    for _ in range(n):
        logits = np.asarray(model(np.asarray([seq], np.int32)))[0, -1]
        tok = int(np.argmax(logits))
        lp = logits - logits.max()
        lps.append(float(lp[tok] - np.log(np.exp(lp).sum())))
        out.append(tok)
        seq.append(tok)
    return out, lps


def test_greedy_equals_full_recompute_for_ragged_batch(model):
    r = np.random.default_rng(0)
    prompts = [random_tokens(r, (n,), 97).tolist() for n in (5, 12, 1)]
    ids, lps = generate(model, prompts, max_new_tokens=8, return_logprobs=True)
    for p, got, got_lp in zip(prompts, ids, lps):
        ref, ref_lp = _greedy_by_recompute(model, p, 8)
        assert got == ref
        np.testing.assert_allclose(got_lp, ref_lp, atol=1e-4)


def test_stop_tokens_end_rows_and_are_included(model):
    r = np.random.default_rng(1)
    prompts = [random_tokens(r, (6,), 97).tolist() for _ in range(2)]
    full = generate(model, prompts, max_new_tokens=10)
    stop = full[0][3]
    ids = generate(model, prompts, max_new_tokens=10, stop_tokens=(stop,))
    first = full[0].index(stop)
    assert ids[0] == full[0][:first + 1]
    if stop in full[1]:
        assert ids[1] == full[1][:full[1].index(stop) + 1]
    else:
        assert ids[1] == full[1]


def test_seeds(model):
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, max_new_tokens=12, temperature=1.5, seed=3)
    b = generate(model, prompts, max_new_tokens=12, temperature=1.5, seed=3)
    c = generate(model, prompts, max_new_tokens=12, temperature=1.5, seed=4)
    assert a == b and a != c


def test_errors(model):
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"outside \[0, 97\)"):
        generate(model, [[1, 500]], max_new_tokens=2)


def test_filter_supports():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    finite = lambda x: np.isfinite(np.asarray(x))[0]  # noqa: E731
    assert finite(filter_logits(logits, top_k=2)).tolist() == [True, True, False, False, False]
    # top-p 0.7: 0.4 + 0.3 reaches 0.7 -> two tokens; 0.71 needs a third
    assert finite(filter_logits(logits, top_p=0.7)).sum() == 2
    assert finite(filter_logits(logits, top_p=0.71)).sum() == 3
    # min-p 0.3: keep p >= 0.12
    assert finite(filter_logits(logits, min_p=0.3)).tolist() == [True, True, True, False, False]


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = jnp.log(jnp.array([0.4, 0.3, 0.15, 0.1, 0.05]))[None].repeat(20000, 0)
    draws = np.asarray(sample(logits, jax.random.key(0), temperature=1.0, top_k=3))
    freq = np.bincount(draws, minlength=5) / draws.size
    np.testing.assert_allclose(freq, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)
    assert (np.asarray(sample(logits[:4], jax.random.key(1))) == 0).all()  # temperature 0 is greedy
