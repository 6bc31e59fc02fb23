"""Generation metrics: the libraries' own numbers, exact-match normalisation, stop strings."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from evals import metrics as M
from evals.generation import score, truncate_at_stop

PREDS = ["the cat sat on the mat", "a quick brown dog jumped", "hello there general kenobi", "nothing matches"]
REFS = ["the cat is on the mat", "the quick brown fox jumps", "hello there general kenobi", "completely different"]


def test_bleu_is_sacrebleu_corpus_bleu():
    got = M.bleu(PREDS, REFS)
    assert got == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    sentence_mean = sum(sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDS, REFS)) / len(PREDS)
    assert abs(got - sentence_mean) > 1  # corpus level, not an average of sentence scores
    # several references, a variable number per example: sacrebleu's streams with None for the missing ones
    multi = [["the cat is on the mat", "a cat sat on the mat"], "the quick brown fox jumps",
             ["hello there general kenobi"], ["completely different", "nothing at all"]]
    streams = [[r[0] if isinstance(r, list) else r for r in multi],
               [r[1] if isinstance(r, list) and len(r) > 1 else None for r in multi]]
    assert M.bleu(PREDS, multi) == pytest.approx(sacrebleu.corpus_bleu(PREDS, streams).score)
    assert M.bleu(PREDS, multi) > got


def test_rouge_is_rouge_score_mean_fmeasure():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = M.rouge(PREDS, REFS)
    for t in ("rouge1", "rouge2", "rougeL"):
        want = sum(scorer.score(r, p)[t].fmeasure for p, r in zip(PREDS, REFS)) / len(PREDS)
        assert got[t] == pytest.approx(want)
    assert got["rouge1"] > got["rouge2"] > 0
    # best reference per example
    best = M.rouge(["the cat sat"], [["a dog", "the cat sat"]])
    assert best["rouge1"] == pytest.approx(1.0)


@pytest.mark.parametrize("pred,ref,normalize,hit", [
    (" Paris \n", "Paris", ("whitespace",), True),  # always stripped
    ("New   York", "New York", ("whitespace",), True),
    ("New   York", "New York", (), False),
    ("paris", "Paris", ("whitespace",), False),
    ("paris", "Paris", ("lower",), True),
    ("Paris.", "Paris", ("punctuation",), True),
    ("The Eiffel Tower", "eiffel tower", ("lower", "articles", "whitespace"), True),
    ("an apple", "apple", ("articles",), True),
    ("theatre", "atre", ("articles",), False),  # only whole words
    ("42", "42.0", ("punctuation",), False),
])
def test_exact_match_normalisation(pred, ref, normalize, hit):
    assert M.exact_match([pred], [ref], normalize) == float(hit)


def test_exact_match_several_references_and_errors():
    assert M.exact_match(["b", "x"], [["a", "b"], "y"]) == 0.5
    with pytest.raises(ValueError, match="not valid"):
        M.exact_match(["a"], ["a"], ("stem",))
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        M.bleu(["a", "b"], ["a"])


def test_stop_strings_and_score():
    assert truncate_at_stop("42\n\nQ: next", ("\n\n",)) == "42"
    assert truncate_at_stop("abc", ("\n", "")) == "abc"
    assert truncate_at_stop("x;y.z", (".", ";")) == "x"  # the earliest of several
    out = score([" 1399\n", "12"], [["1399"], ["13"]], ("exact_match", "verified"),
                verify=lambda o, a: o.strip() == a)
    assert out == {"exact_match": 0.5, "verified": 0.5}
    with pytest.raises(ValueError, match="synthetic"):
        score(["a"], [["a"]], ("verified",))
