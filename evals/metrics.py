"""Generation metrics: exact match (with named normalisations), BLEU (sacrebleu) and ROUGE (rouge-score).

BLEU and ROUGE come from the reference libraries, called the standard way:
  bleu     `sacrebleu.corpus_bleu(predictions, reference_streams)`: corpus-level BLEU (0-100) with
           sacrebleu's defaults (13a tokenizer, exp smoothing); several references per example
           are allowed (missing ones are None, which sacrebleu skips).
  rouge    `rouge_score.rouge_scorer.RougeScorer(types, use_stemmer=True)`: per example the
           F-measure against the best-matching reference (`score_multi`), averaged (0-1).
  exact_match  per example, 1 if the normalised prediction equals any normalised reference;
           averaged (0-1). Both sides are always stripped of surrounding whitespace, then
           normalised by the steps named in `normalize`, in this order:
             "lower"        lowercase
             "punctuation"  remove ASCII punctuation (string.punctuation)
             "articles"     remove the words a / an / the (SQuAD)
             "whitespace"   collapse runs of whitespace to one space
"""

from __future__ import annotations

import re
import string
from typing import Sequence

NORMALIZATIONS = ("lower", "punctuation", "articles", "whitespace")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str, normalize: Sequence[str] = ("whitespace",)) -> str:
    unknown = [n for n in normalize if n not in NORMALIZATIONS]
    if unknown:
        raise ValueError(f"exact-match normalisation {unknown} is not valid; expected some of {NORMALIZATIONS}")
    text = text.strip()
    if "lower" in normalize:
        text = text.lower()
    if "punctuation" in normalize:
        text = text.translate(_PUNCT)
    if "articles" in normalize:
        text = _ARTICLES.sub(" ", text)
    if "whitespace" in normalize:
        text = " ".join(text.split())
    return text.strip()


def _refs(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _check(predictions, references):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                normalize: Sequence[str] = ("whitespace",)) -> float:
    """Mean over examples of [normalised prediction == some normalised reference]."""
    _check(predictions, references)
    if not predictions:
        return float("nan")
    hits = [normalize_text(p, normalize) in {normalize_text(r, normalize) for r in refs}
            for p, refs in zip(predictions, _refs(references))]
    return sum(hits) / len(hits)


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (0-100) by sacrebleu."""
    import sacrebleu

    _check(predictions, references)
    refs = _refs(references)
    width = max((len(r) for r in refs), default=1)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """Mean F-measure (0-1) of each ROUGE type by rouge-score, against the best reference."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = {t: 0.0 for t in types}
    for p, refs in zip(predictions, _refs(references)):
        scores = scorer.score_multi(refs, p)
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(len(predictions), 1)
    return {t: v / n for t, v in totals.items()}
