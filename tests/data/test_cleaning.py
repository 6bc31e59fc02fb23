"""Cleaning: quality rules, exact and near dedup against planted ground truth, PII, the CLI."""

import collections
import json

import numpy as np
import pytest

from configs.data import clean as clean_config
from data import cleaning

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
    """The reference shingle set: distinct word n-gram tuples of the lower-cased text (a text of
    fewer than n words is one shingle of all of them, as in data.cleaning)."""
    w = text.lower().split()
    return {tuple(w[i:i + n]) for i in range(max(len(w) - n + 1, 1))}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def reference_dedup(docs, threshold=0.8):
    """Streaming near-dedup truth from exact Jaccard with Python sets: document i is a duplicate
    when it is at least `threshold` similar to a document kept before it (kept = not a duplicate
    by this same rule). An inverted index of shingles finds every earlier document sharing a
    shingle, so every pair with J > 0 is compared. Returns (duplicate [N] bool, best [N]: each
    document's highest Jaccard to any earlier document)."""
    sets = [_shingles(d) for d in docs]
    postings: dict[tuple, list[int]] = {}
    duplicate, best = np.zeros(len(docs), bool), np.zeros(len(docs))
    for i, sh in enumerate(sets):
        shared = collections.Counter(j for g in sh for j in postings.get(g, ()))
        for j, n in shared.items():
            sim = n / (len(sh) + len(sets[j]) - n)
            best[i] = max(best[i], sim)
            duplicate[i] |= sim >= threshold and not duplicate[j]
        for g in sh:
            postings.setdefault(g, []).append(i)
    return duplicate, best


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


def _near_copy(r, words, target, vocab):
    """An edited copy of `words` whose word-5-gram Jaccard to them is about `target`: scattered
    substitutions / insertions / deletions, or a cut or an added block of new words."""
    w = list(words)
    n = len(w) - 4
    style = r.random()
    if style < 0.6:
        for _ in range(max(1, round(n * (1 - target) / (5 * (1 + target))))):
            i, kind = int(r.integers(len(w))), r.random()
            if kind < 0.5:
                w[i] = vocab[r.integers(len(vocab))]
            elif kind < 0.75:
                w.insert(i, vocab[r.integers(len(vocab))])
            else:
                del w[i]
        return w
    m = max(1, round(n * (1 - target)))
    if style < 0.8:
        return w[m:] if r.random() < 0.5 else w[:-m]
    block = [vocab[r.integers(len(vocab))] for _ in range(max(1, round(n * (1 - target) / target)))]
    return block + w if r.random() < 0.5 else w + block


def _pair_corpus(seed, n_single=100, n_above=300, n_below=100, n_exact=40):
    """Shuffled documents: unrelated ones, near copies of their own originals with a target
    Jaccard in [0.8, 0.99] (`n_above`) and in [0.3, 0.6] (`n_below`), and exact copies re-spaced."""
    r = np.random.default_rng(seed)
    vocab = _vocab(seed=seed)
    originals = [_prose(r, vocab, int(r.integers(60, 200))) for _ in range(n_single + n_above + n_below + n_exact)]
    docs = list(originals)
    for k, o in enumerate(originals[n_single:]):
        if k < n_above + n_below:
            lo, hi = (0.8, 0.99) if k < n_above else (0.3, 0.6)
            docs.append(" ".join(_near_copy(r, o.split(), r.uniform(lo, hi), vocab)))
        else:
            docs.append("  " + o.replace(". ", ".\n"))
    return [docs[i] for i in r.permutation(len(docs))]


@pytest.mark.parametrize("seed", [21, 22])
def test_near_dedup_recall_and_precision_against_exact_jaccard(seed):
    docs = _pair_corpus(seed)
    truth, best = reference_dedup(docs)
    exact, near = cleaning.ExactDedup(), cleaning.NearDedup()  # defaults: threshold 0.8, 5-grams, 128 perms
    verdicts = [v for _, v in cleaning.deduplicate(docs, str, exact, near, batch_size=64)]
    near.close()
    flagged = np.array([v is not None for v in verdicts])
    near_flagged = np.array([v == "near_duplicate" for v in verdicts])
    # the corpus covers the hard region: many true duplicates just above the threshold
    assert truth.sum() >= 300 and ((best >= 0.8) & (best < 0.85) & truth).sum() >= 40
    tp = (flagged & truth).sum()
    precision, recall = tp / max(flagged.sum(), 1), tp / truth.sum()
    assert recall >= 0.98 and precision >= 0.99, (recall, precision)
    near_truth = truth & (best < 1.0)  # not exact copies: these are near dedup's alone
    assert (near_flagged & near_truth).sum() / near_truth.sum() >= 0.98
    # pairs clearly below the threshold are never merged
    assert ((best <= 0.6) & (best > 0.2)).sum() >= 60
    assert not flagged[best <= 0.6].any()


def test_one_at_a_time_equals_batches():
    docs = _pair_corpus(23, n_single=20, n_above=40, n_below=20, n_exact=0)
    a, b = cleaning.NearDedup(), cleaning.NearDedup()
    one = [a.duplicate_of(d) for d in docs]
    batched = b.duplicates(docs[:37]) + b.duplicates(docs[37:])
    assert one == batched and sum(v is not None for v in one) >= 30


def test_shingle_hashes_equal_python_shingle_sets(monkeypatch):
    """The vectorised byte-level tokenizer agrees with str.lower().split(): odd whitespace, case,
    non-ASCII words and Unicode spaces, short texts; also when a text spans hashing chunks."""
    r = np.random.default_rng(5)
    words = ["Alpha", "beta", "GAMMA", "déjà", "vu", "naïve", "Straße", "x", "ÉCOLE", "日本", "a.b", "z"]
    spaces = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\xa0", "\u3000", "\u2003"]

    def text(n, ascii_words=False, ascii_spaces=False):  # each kind of text takes its own code path
        pool_w = [w for w in words if w.isascii() or not ascii_words]
        pool_s = [s for s in spaces if s.isascii() or not ascii_spaces]
        return "".join(pool_w[r.integers(len(pool_w))] + pool_s[r.integers(len(pool_s))] for _ in range(n))

    texts = [text(int(n), *kind) for kind in [(False, False), (True, True), (False, True)]
             for n in r.integers(0, 40, 30)]
    texts += ["", "one", "a b c d", "  \n ", "Déjà vu, naïve café: CRÈME brûlée au «chocolat» ok"]
    for chunk in (None, 16):
        if chunk:
            monkeypatch.setattr(cleaning, "_CHUNK_BYTES", chunk)
        hashes, offsets = cleaning.shingle_sets(texts)
        sets = [hashes[offsets[i]:offsets[i + 1]] for i in range(len(texts))]
        for i, t in enumerate(texts):
            assert len(sets[i]) == len(_shingles(t)), t
            assert (np.diff(sets[i].astype(np.int64)) > 0).all()  # sorted, distinct
        for i in range(len(texts)):
            j = (i * 7 + 3) % len(texts)
            assert cleaning.jaccard(sets[i], sets[j]) == _jaccard(_shingles(texts[i]), _shingles(texts[j]))
    # the tokenizer's list of non-ASCII whitespace is str.isspace()'s
    unicode_spaces = {c for c in map(chr, range(128, 0x110000)) if c.isspace()}
    assert {c for c in map(chr, range(128, 0x3001)) if cleaning._UNICODE_SPACE.match(c)} == unicode_spaces
    # the same text whatever its whitespace and case
    assert (cleaning.shingle_hashes("The cat\tsat on\n the MAT today") ==
            cleaning.shingle_hashes("the  cat sat on the mat\u3000today")).all()


def test_lsh_params_meet_the_miss_bound_with_fewest_false_candidates():
    from scipy.integrate import quad

    assert cleaning.lsh_params(0.8, 128, 0.005) == (18, 6)
    for threshold, num_perm, max_miss in [(0.8, 128, 0.005), (0.5, 64, 0.01), (0.9, 256, 0.001), (0.7, 100, 0.05)]:
        bands, rows = cleaning.lsh_params(threshold, num_perm, max_miss)
        assert bands * rows <= num_perm
        assert (1 - threshold ** rows) ** bands <= max_miss
        assert cleaning.candidate_miss(threshold, bands, rows) == pytest.approx((1 - threshold ** rows) ** bands)

        def false_area(b, r):
            return quad(lambda s: 1 - (1 - s ** r) ** b, 0, threshold)[0]

        feasible = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)
                    if (1 - threshold ** r) ** b <= max_miss]
        assert false_area(bands, rows) <= min(false_area(b, r) for b, r in feasible) + 1e-6


def test_minhash_bands_collide_as_the_s_curve_says():
    """Signature rows agree with probability J, bands independently: pairs of sets with exact
    Jaccard 0.6 share at least one band with probability 1 - (1 - 0.6^rows)^bands."""
    r = np.random.default_rng(7)
    near = cleaning.NearDedup()
    n_pairs, inter, only = 1500, 180, 60  # |A & B| = 180, |A - B| = |B - A| = 60: J = 180 / 300
    sets = []
    for _ in range(n_pairs):
        v = r.choice(2**32, inter + 2 * only, replace=False).astype(np.uint32)
        sets += [np.sort(v[:inter + only]), np.sort(np.concatenate([v[:inter], v[inter + only:]]))]
    offsets = np.cumsum([0] + [len(x) for x in sets])
    sig = near.hasher.signatures(np.concatenate(sets), offsets)
    a, b = sig[0::2], sig[1::2]
    assert abs((a == b).mean() - 0.6) < 0.01
    band_equal = (a == b).reshape(n_pairs, near.bands, near.rows).all(axis=2).any(axis=1)
    expected = 1 - (1 - 0.6 ** near.rows) ** near.bands
    assert abs(band_equal.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / n_pairs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=0.0), "threshold=0.0 is not valid"), (dict(threshold=1.5), "threshold=1.5 is not valid"),
    (dict(num_perm=0), "num_perm=0 is not valid"), (dict(ngram=0), "ngram=0 is not valid"),
    (dict(max_miss=1.0), "max_miss=1.0 is not valid"),
    (dict(threshold=0.3, num_perm=4), "num_perm=4 .*needs num_perm >= 15"),
])
def test_near_dedup_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cleaning.NearDedup(**kwargs)


def test_deduplicate_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size=0 is not valid"):
        list(cleaning.deduplicate(["a"], str, None, cleaning.NearDedup(), batch_size=0))


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
    assert report["dedup"]["exact_duplicates"] == 1 and report["dedup"]["near_duplicates"] == 2
    near = report["dedup"]["near"]  # 32 documents reach it: 30 kept, 2 near duplicates
    assert (near["documents"], near["kept_documents"], near["near_duplicates"]) == (32, 30, 2)
    assert (near["bands"], near["rows"]) == (18, 6)
    md = (out / "report.md").read_text()
    assert md.startswith("# Cleaning report") and "Duplicates removed: 1 exact, 2 near (exact Jaccard" in md
    # the near-dedup spill file never shows: only shards, the report, the plot and dropped/
    assert {p.name for p in out.iterdir()} == {*report["output"]["shards"], "report.json", "report.md",
                                                "length_histogram.png", "dropped"}
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


def test_prepare_rejects_bad_near_dedup_settings_before_writing(tmp_path):
    from data import prepare

    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "a b c d e f"}) + "\n")
    cfg = clean_config.get_config()
    cfg.source.path, cfg.output_dir = str(tmp_path / "in.jsonl"), str(tmp_path / "out")
    cfg.near_dedup.threshold = 1.5
    with pytest.raises(ValueError, match=r"near_dedup.threshold=1.5 is not valid: expected .* \(0, 1\]"):
        prepare.run(cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]  # no output, no temporary directory
