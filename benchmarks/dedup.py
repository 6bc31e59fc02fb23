"""Near-dedup against datasketch on a corpus whose duplicates' true similarities are known.

    .venv/bin/python benchmarks/dedup.py                              # 20k docs, seeds 0,1,2, 5 rounds
    .venv/bin/python benchmarks/dedup.py --docs=2000 --rounds=2 --no_record   # a quick check

Corpus (one per seed, generated identically in every process): documents of Zipf-distributed
words (a 50k-word vocabulary, exponent 1.1, 2% of the words with a non-ASCII letter) with
log-normal lengths (median 250 words, 50-2,000), in sentences and paragraphs, 5% of them with a
no-break space. Planted in them, each from its own original: exact copies
(`--exact_fraction` of the documents, re-spaced and re-wrapped) and near copies
(`--near_fraction`) made with a target word-5-gram Jaccard drawn uniformly from
[`--j_min`, `--j_max`] by scattered word substitutions, insertions and deletions, or by a cut or
an added block of text; each near pair's true Jaccard is then computed exactly with Python sets
of word 5-gram tuples, in this process only. The corpus is shuffled; in each planted pair the
later document is the duplicate when its true Jaccard is >= the threshold (`--check_truth`
verifies, over every pair of documents sharing a shingle, that no unplanted pair comes close).

Sides, each in a worker process of its own (spawn), timed from building the dedup objects over
the in-memory texts to the last verdict, exact duplicates found first by hashing on both sides:
- loom: `data.cleaning.deduplicate` with `ExactDedup` and `NearDedup` built from
  configs/data/clean.py's defaults, exactly as `python -m data.prepare` runs them (threshold 0.8,
  5-grams, 128 permutations, LSH bands tuned for recall, exact Jaccard decision).
- datasketch at its best settings: one `MinHash` template copied per document, so the
  permutations are generated once (what `MinHash.bulk` / `MinHash.generator` do), with xxhash's
  `xxh32_intdigest` as the hash function (datasketch's advice for speed; SHA-1 if xxhash is
  missing), `MinHashLSH(threshold, num_perm)` with datasketch's own band choice, inserts without
  duplicate checks, exact duplicates by a BLAKE2 digest of the whitespace-normalised text. Two
  decision rules: a candidate is a duplicate when its MinHash-estimated Jaccard is >= threshold
  (what datasketch's docs advise), or every LSH candidate is a duplicate.
Rounds interleave every (side, seed) run; each figure is the median (min-max) over rounds of
documents per second over all seeds. Recall and false merges per true-Jaccard bucket come from
the first round (every round's verdicts are checked to be identical). Prints the tables and
writes benchmarks/records/dedup.json; never asserts on time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import multiprocessing
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks import records  # noqa: E402

SIDES = ("loom", "datasketch_estimate", "datasketch_lsh")
LABELS = {"loom": "Loom (LSH for recall + exact Jaccard)",
          "datasketch_estimate": "datasketch (LSH + estimated Jaccard)",
          "datasketch_lsh": "datasketch (every LSH candidate)"}
BUCKETS = ((0.5, 0.6), (0.6, 0.7), (0.7, 0.75), (0.75, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.0))
NGRAM = 5


# --------------------------------------------------------------------------------------------
# Corpus


def _vocabulary(r: np.random.Generator, size: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Random words (2-10 letters, shorter for the frequent ones) and Zipf probabilities."""
    lengths = np.clip(2 + np.log2(np.arange(size) + 2).astype(int) // 2 + r.integers(0, 4, size), 2, 10)
    letters = (r.integers(0, 26, int(lengths.sum()), dtype=np.uint8) + ord("a")).tobytes().decode()
    ends = np.cumsum(lengths)
    words = np.array([letters[e - n:e] for e, n in zip(ends.tolist(), lengths.tolist())], dtype=object)
    for i in r.choice(size, size // 50, replace=False):  # 2% of words with a non-ASCII letter, as in web text
        k = int(r.integers(len(words[i])))
        words[i] = words[i][:k] + "éèàüöçñ’"[r.integers(8)] + words[i][k + 1:]
    p = 1.0 / (np.arange(size) + 2.7) ** 1.1
    return words, p / p.sum()


def _text(words: list[str], r: np.random.Generator) -> str:
    """Words as prose: sentences of 8-20 words, paragraphs of 3-8 sentences."""
    cuts = np.cumsum(r.integers(8, 21, len(words) // 8 + 1))
    cuts = [0] + cuts[cuts < len(words)].tolist() + [len(words)]
    breaks = set(np.cumsum(r.integers(3, 9, len(cuts) // 3 + 1)).tolist())
    out = []
    for k in range(len(cuts) - 1):
        out.append(" ".join(words[cuts[k]:cuts[k + 1]]).capitalize() + ".")
        out.append("\n\n" if k + 1 in breaks else " ")
    return "".join(out).strip()


def _near_copy(words: list[str], target: float, r: np.random.Generator, draw) -> list[str]:
    """An edited copy whose word-5-gram Jaccard to `words` is about `target`."""
    w = list(words)
    n = max(len(w) - NGRAM + 1, 1)
    if r.random() < 0.6:  # scattered edits: each touches ~5 shingles of each side
        k = max(1, round(n * (1 - target) / (NGRAM * (1 + target))))
        for _ in range(k):
            i, kind = int(r.integers(len(w))), r.random()
            if kind < 0.5:
                w[i] = draw()
            elif kind < 0.75:
                w.insert(i, draw())
            elif len(w) > NGRAM + 1:
                del w[i]
        return w
    # a block: cut m words (J ~ 1 - m / n) or add n (1 - J) / J new ones (J ~ n / (n + added))
    m = max(1, round(n * (1 - target)))
    kind = r.random()
    if kind < 0.4:
        return w[m:] if r.random() < 0.5 else w[:len(w) - m]
    block = [draw() for _ in range(max(1, round(n * (1 - target) / target)))]
    return block + w if kind < 0.7 else w + block


def _respace(text: str, r: np.random.Generator) -> str:
    """The same words with other whitespace (an exact duplicate once whitespace is normalised)."""
    parts = text.split()
    seps = r.choice([" ", "  ", "\n", " \n"], len(parts))
    return "".join(p + s for p, s in zip(parts, seps)).strip()


def make_corpus(seed: int, n_docs: int, near_fraction: float, exact_fraction: float, j_min: float,
                j_max: float) -> dict:
    """Texts in stream order and the planted pairs: {"texts": [...], "pairs": [(first, second,
    kind)], where kind is "exact" or "near"; positions are in `texts`}."""
    r = np.random.default_rng(seed)
    vocab, p = _vocabulary(r)
    n_exact, n_near = round(n_docs * exact_fraction), round(n_docs * near_fraction)
    n_base = n_docs - n_exact - n_near
    if n_exact + n_near > n_base:
        raise ValueError(f"near_fraction + exact_fraction = {near_fraction + exact_fraction} leaves too few originals"
                         f" (at most 0.5)")
    lengths = np.clip(np.round(np.exp(r.normal(np.log(250), 0.7, n_base))), 50, 2000).astype(int)
    ids = r.choice(len(vocab), int(lengths.sum()), p=p)
    base_words = np.split(vocab[ids], np.cumsum(lengths)[:-1])
    texts = [_text(list(w), r) for w in base_words]
    for i in np.flatnonzero(r.random(n_base) < 0.05):  # 5% with a no-break space (Unicode whitespace)
        texts[i] = texts[i].replace(" ", "\xa0", 1)
    originals = r.permutation(n_base)[:n_exact + n_near]

    pool, used = vocab[r.choice(len(vocab), 100_000, p=p)], [0]

    def draw():  # new words for edits, from the same distribution (drawn in bulk: choice(p=) is slow)
        used[0] += 1
        return pool[used[0] % len(pool)]

    pairs = []
    for k, o in enumerate(originals):
        if k < n_exact:
            texts.append(_respace(texts[o], r))
            pairs.append((int(o), len(texts) - 1, "exact"))
        else:
            target = float(r.uniform(j_min, j_max))
            texts.append(" ".join(_near_copy(texts[o].split(), target, r, draw)))
            pairs.append((int(o), len(texts) - 1, "near"))
    order = r.permutation(len(texts))
    position = np.empty(len(texts), int)
    position[order] = np.arange(len(texts))
    stream = [texts[i] for i in order]
    pairs = [(int(min(position[a], position[b])), int(max(position[a], position[b])), kind) for a, b, kind in pairs]
    return {"texts": stream, "pairs": pairs}


def shingle_set(text: str) -> set:
    """The reference: distinct word 5-gram tuples of the lower-cased text, as Python sets."""
    w = text.lower().split()
    return {tuple(w[i:i + NGRAM]) for i in range(max(len(w) - NGRAM + 1, 1))}


def true_jaccard(a: str, b: str) -> float:
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb)


def check_truth(corpus: dict, truth: dict) -> float:
    """Verifies the planted truth against every pair of documents sharing a shingle (an
    inverted index of Python-set shingles): no document outside the planted pairs' later members
    is similar to an earlier one. Returns the highest such Jaccard (expected ~0)."""
    later = {b for b, _, _ in truth["pairs"]}
    postings: dict[tuple, list[int]] = {}
    sets, worst = [], 0.0
    for i, text in enumerate(corpus["texts"]):
        sh = shingle_set(text)
        sets.append(sh)
        if i not in later:
            shared: dict[int, int] = {}
            for g in sh:
                for j in postings.get(g, ()):
                    shared[j] = shared.get(j, 0) + 1
            worst = max([worst] + [n / (len(sh) + len(sets[j]) - n) for j, n in shared.items()])
        for g in sh:
            postings.setdefault(g, []).append(i)
    return worst


def corpus_digest(texts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Sides (run in worker processes)

_CORPORA: dict[tuple, list[str]] = {}


def _corpus(key: tuple) -> list[str]:
    if key not in _CORPORA:
        _CORPORA[key] = make_corpus(*key)["texts"]
    return _CORPORA[key]


def _loom(texts: list[str], threshold: float, num_perm: int) -> np.ndarray:
    from configs.data import clean
    from data import cleaning

    c = clean.get_config()
    c.near_dedup.threshold, c.near_dedup.num_perm = threshold, num_perm
    ed = c.exact_dedup
    exact = cleaning.ExactDedup(ed.method, ed.bloom_capacity, ed.bloom_error_rate, ed.normalize_whitespace)
    near = cleaning.NearDedup.from_config(c.near_dedup, spill_dir=tempfile.gettempdir())
    try:
        return np.array([v is not None for _, v in
                         cleaning.deduplicate(texts, str, exact, near, c.near_dedup.batch_size)])
    finally:
        near.close()


def _hashfunc():
    """datasketch's hash function: xxhash's 32-bit digest where installed (datasketch suggests a
    fast non-cryptographic hash for speed), else its default SHA-1."""
    try:
        import xxhash

        return xxhash.xxh32_intdigest, f"xxhash.xxh32_intdigest (xxhash {xxhash.VERSION})"
    except ImportError:
        from datasketch.hashfunc import sha1_hash32

        return sha1_hash32, "sha1_hash32 (xxhash not installed)"


def _datasketch(texts: list[str], threshold: float, num_perm: int, verify: bool) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    hashfunc, _ = _hashfunc()
    template = MinHash(num_perm=num_perm, hashfunc=hashfunc)  # permutations made once, shared by copies
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    seen, kept = set(), {}
    flags = np.zeros(len(texts), bool)
    for i, text in enumerate(texts):
        digest = hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()
        if digest in seen:
            flags[i] = True
            continue
        seen.add(digest)
        w = text.lower().split()
        m = template.copy()
        m.update_batch([" ".join(w[j:j + NGRAM]).encode() for j in range(max(len(w) - NGRAM + 1, 1))])
        found = lsh.query(m)
        if verify:
            found = [k for k in found if m.jaccard(kept[k]) >= threshold]
        if found:
            flags[i] = True
        else:
            lsh.insert(i, m, check_duplication=False)
            if verify:
                kept[i] = m
    return flags


def run_side(side: str, key: tuple, threshold: float, num_perm: int, warm: bool = False) -> dict:
    """Times one side over one corpus; `warm` runs it on a slice first, untimed (imports, caches)."""
    texts = _corpus(key)
    fn = {"loom": lambda t: _loom(t, threshold, num_perm),
          "datasketch_estimate": lambda t: _datasketch(t, threshold, num_perm, True),
          "datasketch_lsh": lambda t: _datasketch(t, threshold, num_perm, False)}[side]
    if warm:
        fn(texts[:300])
        return {"digest": corpus_digest(texts)}
    t = time.perf_counter()
    flags = fn(texts)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "flags": np.packbits(flags).tobytes(), "n": len(texts)}


# --------------------------------------------------------------------------------------------
# Scoring


def truth_for(corpus: dict, threshold: float) -> dict:
    """Per planted pair (later document's position, kind, true Jaccard), and the positions of
    the true duplicates."""
    texts, rows = corpus["texts"], []
    for a, b, kind in corpus["pairs"]:
        j = 1.0 if kind == "exact" else true_jaccard(texts[a], texts[b])
        rows.append((b, kind, j))
    dup = {b for b, kind, j in rows if kind == "exact" or j >= threshold}
    return {"pairs": rows, "duplicates": dup, "n": len(texts)}


def bucket_of(kind: str, j: float) -> str:
    if kind == "exact":
        return "exact copies"
    for lo, hi in BUCKETS:
        if lo <= j < hi or (hi == 1.0 and j == 1.0):
            return f"J [{lo:.2f}, {hi:.2f}{']' if hi == 1.0 else ')'}"
    return f"J < {BUCKETS[0][0]:.2f}"


def score(flags: np.ndarray, truth: dict, threshold: float) -> dict:
    """Counts per bucket (pairs, later document flagged) and overall TP / FP / FN."""
    buckets: dict[str, list[int]] = {}
    for b, kind, j in truth["pairs"]:
        cell = buckets.setdefault(bucket_of(kind, j), [0, 0])
        cell[0] += 1
        cell[1] += int(flags[b])
    dup = np.zeros(truth["n"], bool)
    dup[list(truth["duplicates"])] = True
    near_dup = dup.copy()
    near_dup[[b for b, kind, _ in truth["pairs"] if kind == "exact"]] = False
    return {"buckets": buckets, "tp": int((flags & dup).sum()), "fp": int((flags & ~dup).sum()),
            "fn": int((~flags & dup).sum()), "near_tp": int((flags & near_dup).sum()),
            "near_true": int(near_dup.sum()),
            "false_below": int(sum(flags[b] for b, kind, j in truth["pairs"] if kind == "near" and j < threshold)),
            "below": int(sum(1 for _, kind, j in truth["pairs"] if kind == "near" and j < threshold))}


def _merge(scores: list[dict]) -> dict:
    out = {"buckets": {}}
    for s in scores:
        for name, (n, f) in s["buckets"].items():
            cell = out["buckets"].setdefault(name, [0, 0])
            cell[0] += n
            cell[1] += f
        for k, v in s.items():
            if k != "buckets":
                out[k] = out.get(k, 0) + v
    return out


# --------------------------------------------------------------------------------------------
# Main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20_000, help="documents per corpus (one corpus per seed)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num_perm", type=int, default=128)
    ap.add_argument("--near_fraction", type=float, default=0.2, help="share of documents that are near copies")
    ap.add_argument("--exact_fraction", type=float, default=0.05, help="share of documents that are exact copies")
    ap.add_argument("--j_min", type=float, default=0.5, help="near copies' target Jaccard: uniform in [j_min, j_max]")
    ap.add_argument("--j_max", type=float, default=0.98)
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between runs")
    ap.add_argument("--no_record", action="store_true", help="print only; do not write benchmarks/records/dedup.json")
    ap.add_argument("--check_truth", action="store_true",
                    help="also verify that no unplanted pair of documents is similar (all pairs sharing a shingle)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    keys = {s: (s, args.docs, args.near_fraction, args.exact_fraction, args.j_min, args.j_max) for s in seeds}

    t0 = time.perf_counter()
    corpora = {s: make_corpus(*keys[s]) for s in seeds}
    truths = {s: truth_for(corpora[s], args.threshold) for s in seeds}
    digests = {s: corpus_digest(corpora[s]["texts"]) for s in seeds}
    if args.check_truth:
        for s in seeds:
            worst = check_truth(corpora[s], truths[s])
            print(f"# seed {s}: highest Jaccard of a document outside the planted pairs to an earlier one: {worst:.4f}")
            if worst >= min(args.j_min, args.threshold):
                raise RuntimeError(f"seed {s}: an unplanted pair has Jaccard {worst:.3f}; the planted truth is "
                                   f"incomplete")
    print(f"# {len(seeds)} corpora of {args.docs:,} documents built and scored in {time.perf_counter() - t0:.1f}s",
          flush=True)

    ctx = multiprocessing.get_context("spawn")
    pools = {side: concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) for side in SIDES}
    try:
        # each worker builds the corpora and warms up once, untimed (all workers at once)
        warm = {(side, s): pools[side].submit(run_side, side, keys[s], args.threshold, args.num_perm, True)
                for side in SIDES for s in seeds}
        for (side, s), future in warm.items():
            if future.result()["digest"] != digests[s]:
                raise RuntimeError(f"{side}: corpus {s} differs between processes")
        fns = {(side, s): (lambda side=side, s=s: pools[side].submit(run_side, side, keys[s], args.threshold,
                                                                     args.num_perm).result())
               for s in seeds for side in SIDES}
        samples = records.interleaved(fns, rounds=args.rounds, warmup=0, pause=args.pause)
    finally:
        for p in pools.values():
            p.shutdown()

    # verdicts are deterministic: every round must agree with the first
    flags, unstable = {}, []
    for (side, s), runs in samples.items():
        f = [np.unpackbits(np.frombuffer(r["flags"], np.uint8))[:r["n"]].astype(bool) for r in runs]
        flags[side, s] = f[0]
        if any((g != f[0]).any() for g in f[1:]):
            unstable.append(f"{side}/seed {s}")
    if unstable:
        print(f"warning: verdicts differ between rounds for {unstable}; accuracy uses round 1")

    total_docs = args.docs * len(seeds)
    seconds = {side: [sum(samples[side, s][r]["seconds"] for s in seeds) for r in range(args.rounds)]
               for side in SIDES}
    rate = {side: records.summarize([total_docs / t for t in seconds[side]]) for side in SIDES}
    scores = {side: _merge([score(flags[side, s], truths[s], args.threshold) for s in seeds]) for side in SIDES}

    speed_rows = []
    for side in SIDES:
        sc = scores[side]
        precision = sc["tp"] / max(sc["tp"] + sc["fp"], 1)
        recall = sc["near_tp"] / max(sc["near_true"], 1)
        vs = "1" if side == "loom" else records.spread(records.ratio_summary(seconds[side], seconds["loom"]),
                                                       "{:.2f}")
        speed_rows.append([LABELS[side], records.spread(rate[side], "{:,.0f}"),
                           records.spread(records.summarize(seconds[side]), "{:.2f}"), vs, f"{precision:.4f}",
                           f"{recall:.4f}", sc["fp"]])
    speed = records.table(
        f"Exact + near dedup of {len(seeds)} corpora x {args.docs:,} documents (threshold {args.threshold}, word "
        f"5-grams, {args.num_perm} permutations): documents/s and wall seconds per round (all seeds), median "
        f"(min-max) of {args.rounds} interleaved rounds; "
        f"Loom's speed-up is the side's time over Loom's in the same round; precision and recall over all "
        f"duplicates (exact and near; recall: near duplicates with true Jaccard >= {args.threshold})",
        ["implementation", "documents/s", "seconds per round", "Loom speed-up", "precision", "near recall",
         "false merges"], speed_rows)

    names = [bucket_of("near", 0.0)] + [bucket_of("near", lo) for lo, _ in BUCKETS] + ["exact copies"]
    acc_rows = []
    for name in names:
        n = scores["loom"]["buckets"].get(name, [0, 0])[0]
        if not n:
            continue
        above = name == "exact copies" or ("[" in name and float(name.split("[")[1].split(",")[0]) >= args.threshold)
        acc_rows.append([name, "duplicate" if above else "distinct", n] +
                        [f"{100 * scores[side]['buckets'][name][1] / n:.2f}%" for side in SIDES])
    accuracy = records.table(
        "Share of planted pairs merged, by true word-5-gram Jaccard (exact, Python sets): recall where the pair "
        f"is a duplicate (J >= {args.threshold}), false merges where it is not; all seeds together",
        ["true Jaccard", "truth", "pairs"] + [LABELS[s] for s in SIDES], acc_rows)
    for t in (speed, accuracy):
        records.print_table(t)

    _, hash_name = _hashfunc()
    from data import cleaning

    bands, rows = cleaning.lsh_params(args.threshold, args.num_perm)
    from datasketch import MinHashLSH

    ds = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm)
    method = (
        f"Corpus: per seed ({', '.join(map(str, seeds))}), {args.docs:,} documents of Zipf-distributed words (50k-word "
        f"vocabulary, exponent 1.1, 2% of the words with a non-ASCII letter; log-normal lengths, median 250 words, "
        f"50-2,000) in sentences and paragraphs, 5% with a no-break space. "
        f"Planted, each from its own original and shuffled into the stream: {args.exact_fraction:.0%} exact copies "
        f"(whitespace changed) and {args.near_fraction:.0%} near copies with a target word-5-gram Jaccard uniform in "
        f"[{args.j_min}, {args.j_max}] (scattered word substitutions / insertions / deletions, or a cut or added "
        f"block); each pair's true Jaccard computed exactly with Python sets; the later document of a pair is a "
        f"duplicate when it is >= {args.threshold}. Loom: `data.cleaning.deduplicate` with `ExactDedup` and "
        f"`NearDedup` from configs/data/clean.py's defaults, as `python -m data.prepare` runs them: LSH "
        f"{bands} bands x {rows} rows (miss probability at J = {args.threshold}: "
        f"{cleaning.candidate_miss(args.threshold, bands, rows):.2%}), candidates decided by exact Jaccard of "
        f"32-bit shingle hashes, hashing vectorised over batches of documents. datasketch (its defaults, scheme "
        f"affine32): a `MinHash(num_perm={args.num_perm}, hashfunc={hash_name})` template copied per document "
        f"(permutations made once, as `MinHash.bulk` does), `MinHashLSH(threshold={args.threshold}, "
        f"num_perm={args.num_perm})` ({ds.b} bands x {ds.r} rows), inserts with `check_duplication=False`, exact "
        f"duplicates first by a BLAKE2 digest of the whitespace-normalised text; decision either MinHash-estimated "
        f"Jaccard >= {args.threshold} against each candidate, or any LSH candidate. Each side runs in its own "
        f"spawned worker process, warmed up on 300 documents; {args.rounds} interleaved rounds over every (side, "
        f"seed); timed from building the dedup objects over the in-memory texts to the last verdict.")
    print(f"\n{method}")
    if not args.no_record:
        records.write_record(
            "dedup", title="Near-dedup against datasketch — `benchmarks/dedup.py`", tables=[speed, accuracy],
            method=method, params=vars(args),
            results={"seconds": {f"{side}/seed{s}": [r["seconds"] for r in samples[side, s]]
                                 for side in SIDES for s in seeds},
                     "scores": {f"{side}/seed{s}": score(flags[side, s], truths[s], args.threshold)
                                for side in SIDES for s in seeds},
                     "lsh": {"loom": [bands, rows], "datasketch": [ds.b, ds.r]}, "unstable": unstable})
    print(f"# total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
