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


@pytest.mark.parametrize("scheme,decode_layout", [pytest.param("learned", None, marks=pytest.mark.slow),
                                                  ("sinusoidal", None), ("alibi", None), ("alibi", False),
                                                  pytest.param("none", None, marks=pytest.mark.slow)])
def test_greedy_equals_full_recompute_for_each_position_scheme(scheme, decode_layout):
    """RoPE is the fixture above; the other schemes (models/positions.py) through the KV cache, on
    the CPU decode layout (None: it applies here) and on the stacked layers (False)."""
    m = T.build(tiny_model_config(position_embedding=scheme), seed=11)
    r = np.random.default_rng(0)
    prompts = [random_tokens(r, (n,), 97).tolist() for n in (5, 12, 1)]
    ids, lps = generate(m, prompts, max_new_tokens=8, return_logprobs=True, decode_layout=decode_layout)
    for p, got, got_lp in zip(prompts, ids, lps):
        ref, ref_lp = _greedy_by_recompute(m, p, 8)
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


@pytest.mark.parametrize("bad,message", [
    (dict(top_p=2.0), r"top_p=2.0 is not valid: expected a probability in \(0, 1\]"),
    (dict(top_p=0.0), r"top_p=0.0 is not valid"),
    (dict(top_k=-5), r"top_k=-5 is not valid: expected an integer >= 0"),
    (dict(min_p=1.0), r"min_p=1.0 is not valid: expected a fraction in \[0, 1\)"),
    (dict(min_p=-0.1), r"min_p=-0.1 is not valid"),
    (dict(temperature=-1.0), r"temperature=-1.0 is not valid: expected a number >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan is not valid"),
    (dict(max_new_tokens=-3), r"max_new_tokens=-3 is not valid: expected an integer >= 1"),
])
def test_bad_sampling_values_name_the_value_and_the_range(model, bad, message):
    kw = dict(max_new_tokens=2, temperature=1.0) | bad
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2]], **kw)


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


class DigitTokenizer:
    """Token i decodes to str(i % 10): enough to test stop strings on a random model."""

    def decode(self, ids):
        return "".join(str(i % 10) for i in ids)


def test_stop_strings_and_streaming(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    full = generate(model, prompts, max_new_tokens=12)
    text = DigitTokenizer().decode(full[0])
    stop = text[4:6]  # a string that first completes at some token of row 0
    streamed = []
    out = generate(model, prompts, max_new_tokens=12, stop_strings=(stop,), tokenizer=DigitTokenizer(),
                   stream=lambda row, tok: streamed.append((row, tok)))
    cut = next(i for i in range(1, 13) if stop in DigitTokenizer().decode(full[0][:i]))
    assert out[0] == full[0][:cut]
    for row in range(2):
        assert [t for r, t in streamed if r == row] == out[row]  # streamed in order, nothing extra
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, prompts, max_new_tokens=3, stop_strings=("x",))


def test_per_request_seeds_do_not_depend_on_batch_mates(model):
    a = generate(model, [[1, 2], [3, 4, 5]], max_new_tokens=10, temperature=1.0, seed=[7, 8])
    b = generate(model, [[3, 4, 5]], max_new_tokens=10, temperature=1.0, seed=[8])
    c = generate(model, [[9], [1, 2], [6, 6]], max_new_tokens=10, temperature=1.0, seed=[1, 7, 2])
    assert a[1] == b[0] and a[0] == c[1]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        generate(model, [[1], [2], [3]], max_new_tokens=2, seed=[1, 2])


def test_repetition_penalty_matches_its_definition(model):
    prompt = [5, 6, 7, 5]
    out = generate(model, [prompt], max_new_tokens=6, repetition_penalty=1.8)[0]
    seq = list(prompt)
    for tok in out:  # greedy on logits with the CTRL penalty applied to every token seen so far
        logits = np.array(model(np.asarray([seq], np.int32)))[0, -1]
        for t in set(seq):
            logits[t] = logits[t] / 1.8 if logits[t] > 0 else logits[t] * 1.8
        assert tok == int(np.argmax(logits))
        seq.append(tok)


def test_lengths_within_a_bucket_share_one_program(model):
    from inference import engine

    generate(model, [[1] * 20], max_new_tokens=5)
    before = engine._generate._cache_size()
    generate(model, [[2] * 25, [3] * 30], max_new_tokens=9)  # same buckets: 32 prompt, 16 new, batch 2
    generate(model, [[2] * 31, [4] * 17], max_new_tokens=16)
    assert engine._generate._cache_size() - before <= 1  # batch 1 -> 2 is the only new shape
    assert engine.bucket(17) == 32 and engine.bucket(3) == 16 and engine.bucket(700) == 768


def test_sampling_chi_square_against_the_filtered_distribution():
    """top-p 0.8 + temperature 1.3 over 30000 draws: Pearson chi-square below the 0.999 quantile."""
    r = np.random.default_rng(3)
    logits = r.standard_normal(12).astype(np.float32)
    draws = np.asarray(sample(jnp.asarray(np.tile(logits, (30000, 1))), jax.random.key(4), temperature=1.3,
                              top_p=0.8))
    p = np.exp(logits / 1.3 - (logits / 1.3).max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(12, bool)
    keep[order[(np.cumsum(p[order]) - p[order]) < 0.8]] = True
    q = np.where(keep, p, 0)
    q /= q.sum()
    counts = np.bincount(draws, minlength=12)
    assert 4 <= keep.sum() < 12 and (counts[~keep] == 0).all()
    expected = q[keep] * draws.size
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = keep.sum() - 1
    # 0.999 quantile of chi-square (Wilson-Hilferty approximation)
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, limit, dof)


# --------------------------------------------------------------------------------------------
# One seed, many rows: each row draws its own stream.


def _filtered_probs(logits, temperature, top_k, top_p):
    """float64 reference of the sampling distribution: softmax(logits / T) after top-k, then
    top-p (a token stays if the mass of the more likely ones is below p), renormalised."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.zeros(p.size, bool)
    order = np.argsort(-p, kind="stable")
    keep[order[:top_k]] = True
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    before = np.cumsum(q[order]) - q[order]
    keep[order[before >= top_p]] = False
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def _chi_square_limit(dof):
    z = 3.09  # 0.999 quantile (Wilson-Hilferty approximation of the chi-square quantile)
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=1.4, top_k=12, top_p=0.9)],
                         ids=["plain", "filtered"])
def test_one_seed_gives_each_row_its_own_stream(model, sampling):
    """1024 copies of one prompt under one seed: the first new tokens follow the model's
    (filtered) next-token distribution (Pearson chi-square), and the rows' continuations differ."""
    r = np.random.default_rng(41)
    prompt = random_tokens(r, (5,), 97).tolist()
    n = 1024
    ids = generate(model, [prompt] * n, max_new_tokens=4, seed=3, **sampling)
    first = np.array([row[0] for row in ids])
    logits = np.asarray(model(np.asarray([prompt], np.int32)))[0, -1]
    q = _filtered_probs(logits, sampling["temperature"], sampling.get("top_k", 97), sampling.get("top_p", 1.0))
    counts = np.bincount(first, minlength=97)
    assert (counts[q == 0] == 0).all()  # nothing outside the filtered support
    keep = q * n >= 5  # Pearson's test needs expected counts of ~5; pool the rare tokens
    expected = np.append(q[keep] * n, q[~keep].sum() * n)
    observed = np.append(counts[keep], counts[~keep].sum())
    if expected[-1] < 5:
        expected, observed = expected[:-1], observed[:-1]
        expected = expected * observed.sum() / expected.sum()
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert keep.sum() >= 4 and chi2 < _chi_square_limit(len(expected) - 1), (chi2, len(expected))
    assert len({tuple(row) for row in ids}) > n // 2  # later steps draw per row too
    # reproducible, and row i's stream does not depend on how many rows follow it
    again = generate(model, [prompt] * 8, max_new_tokens=4, seed=3, **sampling)
    assert again == ids[:8]


def test_one_seed_gives_distinct_rows_on_the_decode_layout(model):
    prompts = [[4, 9, 2]] * 8
    plain = generate(model, prompts, max_new_tokens=8, temperature=1.5, seed=5, decode_layout=False)
    laid_out = generate(model, prompts, max_new_tokens=8, temperature=1.5, seed=5, decode_layout=True)
    assert plain == laid_out and len({tuple(r) for r in plain}) == 8


# --------------------------------------------------------------------------------------------
# The CPU decode layout (inference/decode_layout.py): what generate picks, and that it decodes
# exactly what the model's own layout decodes.


@pytest.mark.parametrize("tied", [False, True])
def test_decode_layout_gives_the_plain_layouts_tokens(tied):
    from inference import decode_layout as DL
    cfg = tiny_model_config(hidden_size=64, intermediate_size=128, head_dim=16, vocab_size=128,
                            tie_embeddings=tied)
    model = T.build(cfg, seed=31)
    r = np.random.default_rng(31)
    prompts = [random_tokens(r, (n,), cfg.vocab_size).tolist() for n in (7, 3, 11)]
    assert DL.applies(model, 4)
    ids, lps = generate(model, prompts, max_new_tokens=12, return_logprobs=True)  # auto: the layout
    layout = DL.for_model(model)[0]
    assert isinstance(layout.blocks[0].mlp.up.kernel, DL.PanelKernel) and layout.head is not None
    ref_ids, ref_lps = generate(model, prompts, max_new_tokens=12, return_logprobs=True, decode_layout=False)
    assert ids == ref_ids
    np.testing.assert_allclose(np.concatenate(lps), np.concatenate(ref_lps), atol=1e-5)


def test_decode_layout_is_rebuilt_for_new_weights():
    from flax import nnx
    from inference import decode_layout as DL
    cfg = tiny_model_config(hidden_size=64, intermediate_size=128, head_dim=16)
    model = T.build(cfg, seed=32)
    first = DL.for_model(model)
    assert DL.for_model(model) is first  # same weights: built once
    prompt = [random_tokens(np.random.default_rng(32), (6,), cfg.vocab_size).tolist()]
    before = generate(model, prompt, max_new_tokens=6, decode_layout=True)
    other = T.build(cfg, seed=33)
    nnx.update(model, nnx.state(other))  # new weights in the same model object (a training step)
    assert DL.for_model(model) is not first
    after = generate(model, prompt, max_new_tokens=6, decode_layout=True)
    assert after == generate(other, prompt, max_new_tokens=6, decode_layout=False) != before


def test_decode_layout_applies_to_single_device_float32_small_batches():
    from inference import decode_layout as DL
    cfg = tiny_model_config()
    model = T.build(cfg, seed=34)
    assert DL.applies(model, 1) and DL.applies(model, DL.MAX_ROWS)
    assert not DL.applies(model, DL.MAX_ROWS + 1)
    assert not DL.applies(T.build(cfg.replace(dtype="bfloat16"), seed=34), 1)
    mesh = jax.make_mesh((2,), ("x",))
    sharded = T.build(cfg, seed=34)
    sharded.embed.set_value(jax.device_put(sharded.embed[...], jax.sharding.NamedSharding(mesh, jax.P())))
    assert not DL.applies(sharded, 1)
    with pytest.raises(ValueError, match="decode_layout=True needs the model's weights on one device"):
        generate(sharded, [[1, 2]], max_new_tokens=2, decode_layout=True)
