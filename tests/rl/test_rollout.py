"""Rollouts (rl/rollout.py): the sampler's log-probs against the trainer's on the same tokens, the
trainer batch's layout, and distinct draws within a group."""

import jax
import numpy as np
import pytest

from models import transformer as T
from models.logprobs import token_logprobs
from rl.rollout import sample_groups
from tests.helpers import random_tokens, tiny_model_config

EOS = 5


@pytest.fixture(scope="module")
def model():
    return T.build(tiny_model_config(num_layers=2, vocab_size=61), seed=11)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [list(random_tokens(rng, (k,), 61)) for k in rng.integers(2, 9, n)]


@pytest.mark.parametrize("temperature,top_p,layout", [(1.0, 0.9, None), (0.7, None, False), (1.3, None, True)])
def test_sampler_and_trainer_logprobs_agree(model, temperature, top_p, layout):
    """Before any update, the trainer's log_softmax(logits / T) of the sampled completion tokens
    (one cache-free forward of the padded batch) equals what the sampler recorded: f32, 1e-5."""
    ro = sample_groups(model, _prompts(3), group_size=4, max_new_tokens=10, temperature=temperature, top_p=top_p,
                       stop_tokens=[EOS], seed=7, decode_layout=layout)
    batch = ro.batch()
    logits = model(batch["inputs_BT"], positions_BT=batch["positions_BT"], segment_ids_BT=batch["segment_ids_BT"])
    trainer = np.asarray(token_logprobs(logits, batch["targets_BT"], temperature))
    mask = batch["loss_mask_BT"] > 0
    assert mask.sum() == ro.lengths().sum() > 0
    np.testing.assert_allclose(trainer[mask], batch["sampler_logprobs_BT"][mask], atol=1e-5)
    # the log-probs are those of the tempered full distribution, not of the filtered one
    assert np.all(batch["sampler_logprobs_BT"][mask] < 0)


def test_batch_layout_and_stop_tokens(model):
    ro = sample_groups(model, _prompts(4, seed=1), group_size=3, max_new_tokens=12, temperature=1.0,
                       stop_tokens=[EOS, 7], seed=3)
    batch = ro.batch()
    lp = max(len(p) for p in ro.prompts)
    for r in range(ro.num_rows):
        p, c = ro.prompt_of(r), ro.completions[r]
        row = np.concatenate([[0] * (lp - len(p)), p, c])
        n = len(row)
        np.testing.assert_array_equal(batch["inputs_BT"][r, :n - 1], row[:-1])
        np.testing.assert_array_equal(batch["targets_BT"][r, :n - 1], row[1:])
        width = batch["inputs_BT"].shape[1] + 1
        pad, n_real = lp - len(p), len(p) + len(c)
        seg = np.array([0] * pad + [1] * n_real + [0] * (width - pad - n_real))
        pos = np.concatenate([np.zeros(pad), np.arange(n_real), np.zeros(width - pad - n_real)])
        np.testing.assert_array_equal(batch["segment_ids_BT"][r], seg[:-1])
        np.testing.assert_array_equal(batch["positions_BT"][r], pos[:-1])
        # the loss mask is exactly the completion (its stop token included), as targets
        assert batch["loss_mask_BT"][r].sum() == len(c)
        assert np.all(batch["loss_mask_BT"][r, lp - 1:lp - 1 + len(c)] == 1)
        stopped = len(c) > 0 and c[-1] in (EOS, 7)
        assert stopped == ro.stopped()[r]
        assert stopped or len(c) == 12
        assert not any(t in (EOS, 7) for t in c[:-1])  # nothing after a stop token


def test_group_samples_are_distinct_draws(model):
    """Each row draws its own stream: the G samples of a prompt differ (a shared stream would give G
    copies and every group advantage zero); the same seed reproduces them."""
    prompts = _prompts(2, seed=2)
    ro = sample_groups(model, prompts, group_size=8, max_new_tokens=8, temperature=1.0, seed=5)
    for i in range(2):
        group = {tuple(c) for c in ro.completions[i * 8:(i + 1) * 8]}
        assert len(group) == 8
    again = sample_groups(model, prompts, group_size=8, max_new_tokens=8, temperature=1.0, seed=5)
    assert again.completions == ro.completions
    other = sample_groups(model, prompts, group_size=8, max_new_tokens=8, temperature=1.0, seed=6)
    assert other.completions != ro.completions
    with pytest.raises(ValueError, match="temperature=0"):
        sample_groups(model, prompts, group_size=2, max_new_tokens=4, temperature=0)
