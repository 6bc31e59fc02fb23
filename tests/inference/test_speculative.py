"""Speculative decoding returns the target's greedy output exactly, whatever the draft."""

import numpy as np
import pytest

from inference import generate
from inference.speculative import speculative_generate
from models import transformer as T
from tests.helpers import random_tokens, tiny_model_config


@pytest.fixture(scope="module")
def models():
    cfg = tiny_model_config()
    target = T.build(cfg, seed=1)
    # a draft that agrees often: the target's own weights with one layer dropped
    graphdef, params = T.split_params(T.build(cfg.replace(num_layers=1), seed=9))
    tparams = T.split_params(target)[1]
    import jax

    params = jax.tree.map(lambda d, t: t[:1] if t.ndim == d.ndim and t.shape[1:] == d.shape[1:]
                          and t.shape[0] == 2 else t, params, tparams)
    close_draft = T.merge_params(graphdef, params)
    return target, close_draft, T.build(cfg.replace(num_layers=1, hidden_size=16, head_dim=4), seed=5)


@pytest.mark.parametrize("k", [1, 4])
def test_equals_target_greedy_for_any_draft(models, k):
    target, close, unrelated = models
    r = np.random.default_rng(k)
    prompts = [random_tokens(r, (n,), 97).tolist() for n in (7, 15, 2)]
    ref = generate(target, prompts, max_new_tokens=16)
    for draft in (close, unrelated, target):
        out, stats = speculative_generate(target, draft, prompts, max_new_tokens=16, num_draft_tokens=k,
                                          return_stats=True)
        assert out == ref
        if draft is target:
            assert stats.acceptance_rate == 1.0 and stats.tokens_per_round == k + 1
    stop = ref[0][10]
    assert speculative_generate(target, close, prompts, max_new_tokens=16, num_draft_tokens=k,
                                stop_tokens=(stop,)) == generate(target, prompts, max_new_tokens=16, stop_tokens=(stop,))


def test_errors(models):
    target, close, _ = models
    with pytest.raises(ValueError, match="greedy"):
        speculative_generate(target, close, [[1]], max_new_tokens=3, temperature=0.7)
    other = T.build(tiny_model_config(vocab_size=50), seed=0)
    with pytest.raises(ValueError, match="share a tokenizer"):
        speculative_generate(target, other, [[1]], max_new_tokens=3)
