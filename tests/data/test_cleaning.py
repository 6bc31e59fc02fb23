"""Cleaning: quality rules, exact and near dedup against planted ground truth, PII, the CLI."""

import json

import numpy as np
import pytest

from configs.data import clean as clean_config
from data import cleaning

WORDS = None


def _vocab(n=5000, seed=0):
    r = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(r.choice(letters, r.integers(3, 9))) for _ in range(n)]


def _prose(r, vocab, n_words):
    """Random prose that passes the web quality rules: stop words, sentences, varied words."""
    stops = ["the", "of", "and", "to", "with", "that", "be", "have"]
    words = []
    for i in range(n_words):
        words.append(stops[r.integers(len(stops))] if r.random() < 0.25 else vocab[r.integers(len(vocab))])
    sentences = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, len(words), 12)]
    return " ".join(sentences)


def _shingles(text, n=5):
    w = text.lower().split()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def duplicate_truth(docs, threshold=0.8) -> np.ndarray:
    """Ground truth from exact Jaccard similarities: a document is a duplicate when it is at
    least `threshold` similar to one kept before it (whichever of a family comes first is kept)."""
    truth = np.zeros(len(docs), bool)
    kept: list[set] = []
    for i, d in enumerate(docs):
        sh = _shingles(d)
        truth[i] = any(len(sh & k) / len(sh | k) >= threshold for k in kept)
        if not truth[i]:
            kept.append(sh)
    return truth


def test_library_defaults_equal_the_web_preset():
    cfg = clean_config.get_config().quality.to_dict()
    cfg.pop("enabled")
    assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()} == \
        {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cleaning._DEFAULT_QUALITY.items()}


def test_quality_rules_each_fire_on_their_case():
    r = np.random.default_rng(1)
    vocab = _vocab()
    good = _prose(r, vocab, 200)
    q = cleaning.QualityFilter()
    assert q.reason(good) is None
    cases = {
        "length_chars": "too short",
        "length_words": "x" * 300,
        "mean_word_length": " ".join(["a"] * 200) + " the and of " + "b" * 100,
        "symbol_word_ratio": good + " #" * 40,
        "alnum_fraction": good + " " + " ".join(["!?;:"] * 250),
        "alpha_words": good + " " + " ".join(str(i) for i in range(200)),
        "bullet_lines": "\n".join(f"- {_prose(r, vocab, 12)}" for _ in range(30)),
        "ellipsis_lines": "\n".join(f"{_prose(r, vocab, 12)}..." for _ in range(30)),
        "duplicate_lines": "\n".join([_prose(r, vocab, 12)] * 5 + [_prose(r, vocab, 12) for _ in range(5)]),
        "top_ngram": good + " " + " ".join(["buy now"] * 60),
        "duplicate_ngrams": good + " " + " ".join([_prose(r, vocab, 30)] * 3),
        "stop_words": " ".join(vocab[i] for i in range(100, 400)),
        "lorem_ipsum": good + " Lorem ipsum dolor sit amet.",
    }
    for rule, text in cases.items():
        assert q.reason(text) == rule, (rule, q.reason(text))
    assert cleaning.QualityFilter({"drop_curly_braces": True}).reason(good + " {x}") == "curly_braces"
    with pytest.raises(ValueError, match="unknown keys \\['min_wrds'\\]"):
        cleaning.QualityFilter({"min_wrds": 3})


def _planted_corpus(seed=0, n_base=400, n_near=80, n_exact=40):
    """Base documents, near duplicates (about 1% of words changed) and exact copies (re-spaced)."""
    r = np.random.default_rng(seed)
    vocab = _vocab(seed=seed)
    docs, dup = [], []
    for _ in range(n_base):
        docs.append(_prose(r, vocab, int(r.integers(120, 300))))
        dup.append(False)
    for _ in range(n_near):
        w = docs[int(r.integers(n_base))].split()
        for i in r.choice(len(w), max(1, len(w) // 100), replace=False):
            w[i] = vocab[r.integers(len(vocab))]
        docs.append(" ".join(w))
        dup.append(True)
    for _ in range(n_exact):
        docs.append("  " + docs[int(r.integers(n_base))].replace(". ", ".\n"))
        dup.append(True)
    order = r.permutation(len(docs))
    # originals first within each dup group doesn't matter: keep the first occurrence of each family
    return [docs[i] for i in order], np.array([dup[i] for i in order]), docs[:n_base]


def test_dedup_precision_and_recall_on_planted_duplicates():
    docs, planted, bases = _planted_corpus()
    exact, near = cleaning.ExactDedup(), cleaning.NearDedup()  # defaults: threshold 0.8, 5-grams, 128 perms
    flagged = np.array([exact.seen(d) or near.duplicate_of(d) is not None for d in docs])
    truth = duplicate_truth(docs)
    assert truth.sum() == planted.sum()  # the planted duplicates are exactly the true ones
    tp = (flagged & truth).sum()
    precision, recall = tp / max(flagged.sum(), 1), tp / max(truth.sum(), 1)
    assert truth.sum() >= 100
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def test_bloom_exact_dedup():
    d = cleaning.ExactDedup(method="bloom", bloom_capacity=10_000, bloom_error_rate=1e-6)
    assert not d.seen("a b  c") and d.seen("a b c") and not d.seen("a b d")
    with pytest.raises(ValueError, match="method='set'"):
        cleaning.ExactDedup(method="set")


@pytest.mark.parametrize("text,expected", [
    ("write to jane.doe+news@example.co.uk today", "write to <EMAIL> today"),
    ("call +1 (555) 123-4567 now", "call <PHONE> now"),
    ("or 555-123-4567, or 555.123.4567", "or <PHONE>, or <PHONE>"),
    ("London +44 20 7946 0958.", "London <PHONE>."),
    ("host 192.168.10.254 up", "host <IP_ADDRESS> up"),
    ("v6 2001:db8:85a3::8a2e:370:7334 ok", "v6 <IP_ADDRESS> ok"),
    # not PII
    ("version 3.12.1 on 2024-01-15 at 12:30:45", "version 3.12.1 on 2024-01-15 at 12:30:45"),
    ("pi is 3.14159265 and 1 000 000 people", "pi is 3.14159265 and 1 000 000 people"),
    ("not an ip 999.1.1.1; isbn 978-3-16-148410-0", "not an ip 999.1.1.1; isbn 978-3-16-148410-0"),
    ("user@localhost is not an address", "user@localhost is not an address"),
])
def test_pii(text, expected):
    assert cleaning.PiiScrubber().scrub(text)[0] == expected


def test_prepare_end_to_end(tmp_path):
    from data import prepare
    from data.sources import SourceSpec, read_all

    r = np.random.default_rng(3)
    vocab = _vocab(seed=3)
    good = [_prose(r, vocab, 150) for _ in range(30)]
    lines = [json.dumps({"id": i, "body": {"text": t}}) for i, t in enumerate(good)]
    lines.append(json.dumps({"id": 100, "body": {"text": good[0]}}))  # exact duplicate
    lines.append(json.dumps({"id": 101, "body": {"text": "too short"}}))  # quality: length
    lines.append(json.dumps({"id": 102, "body": {"text": good[1] + " Mail me: a.b@example.com."}}))  # near dup
    lines.append(json.dumps({"id": 103, "body": {"text": good[2].replace("the", "teh", 1) + " Call 555-123-4567."}}))
    lines.append("{broken json")  # bad input
    lines.append(json.dumps({"id": 104, "other": 1}))  # missing field
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    cfg = clean_config.get_config()
    cfg.source.path, cfg.source.text_field, cfg.output_dir = str(src), "body.text", str(tmp_path / "out")
    report = prepare.run(cfg)
    out = tmp_path / "out"
    t = report["total"]
    assert t["documents_in"] == 34 and t["kept"]["documents"] == 30
    assert t["dropped"]["exact_duplicate"]["documents"] == 1
    assert t["dropped"]["quality:length_chars"]["documents"] == 1
    assert t["dropped"]["near_duplicate"]["documents"] == 2
    assert t["bad_records"] == {"malformed_json": 1, "missing_field": 1}
    assert any("in.jsonl:35: malformed JSON" in e for e in report["sources"]["input"]["bad_examples"])
    kept = list(read_all(SourceSpec("out", "array_record", path=str(out / "*.array_record"), text_field="body.text"),
                         keep_fields=True))
    assert sorted(k["fields"]["id"] for k in kept) == list(range(30))  # every field survives, ids included
    assert {(out / f).name for f in report["output"]["shards"]} == {p.name for p in out.glob("*.array_record")}
    assert (out / "report.md").read_text().startswith("# Cleaning report")
    assert (out / "length_histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "dropped" / "near_duplicate.jsonl").read_text().splitlines()) == 2
    with pytest.raises(FileExistsError, match="not empty"):
        prepare.run(cfg)


def test_prepare_scrubs_pii_in_kept_records(tmp_path):
    from data import prepare
    from data.sources import SourceSpec, read_all

    r = np.random.default_rng(4)
    text = _prose(r, _vocab(seed=4), 120) + " Reach me at x.y@example.org or +1 (555) 987-6543 from 10.0.0.7."
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": text}) + "\n")
    cfg = clean_config.get_config()
    cfg.source.path, cfg.output_dir = str(tmp_path / "in.jsonl"), str(tmp_path / "out")
    report = prepare.run(cfg)
    assert report["pii_replacements"] == {"email": 1, "phone": 1, "ip": 1}
    (rec,) = list(read_all(SourceSpec("o", "array_record", path=str(tmp_path / "out" / "*.array_record"))))
    assert "<EMAIL>" in rec["text"] and "<PHONE>" in rec["text"] and "<IP_ADDRESS>" in rec["text"]
