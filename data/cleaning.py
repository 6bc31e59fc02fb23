"""Document cleaning: quality filters, exact and near deduplication, PII scrubbing.

Each step is a small object with a `config` dict (the matching section of configs/data/clean.py)
and one method; `data/prepare.py` chains them over a source and writes the report.

Quality (`QualityFilter.reason(text)` -> the first rule a document fails, or None), after
Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020):
  length in characters and words; mean word length; symbol-to-word ratio ('#', '...', '…');
  share of alphanumeric characters; share of words with a letter; share of lines starting with
  a bullet or ending with an ellipsis; duplicate lines and the characters in them; the share of
  characters in the most frequent 2/3/4-gram; the share in duplicated 5..10-grams; English stop
  words; C4's "lorem ipsum" and curly-brace rules.
Exact dedup: a 16-byte BLAKE2 digest of the whitespace-normalised text in a set, or a Bloom
filter (rbloom) of bounded memory for streams too large for a set.
Near dedup (`NearDedup`, threshold 0.8 on the Jaccard similarity of word 5-gram sets by
default): MinHash LSH only proposes candidates, with bands tuned for recall (`lsh_params`: a pair
at exactly the threshold escapes with probability <= 0.5%, rather than datasketch's balance of
false positives and negatives, which misses many pairs just above the threshold); every candidate
is then decided by the exact Jaccard of the two documents' shingle-hash sets, so the decision has
no estimator variance. Hashing is vectorised NumPy over batches of documents; kept documents'
shingle hashes wait in a temporary file, read back only for candidates. `deduplicate` chains
exact and near dedup over a stream (benchmarks/dedup.py measures it against datasketch).
PII: e-mail addresses, phone numbers and IPv4/IPv6 addresses replaced by <EMAIL>, <PHONE>,
<IP_ADDRESS>.
"""

from __future__ import annotations

import array
import collections
import hashlib
import ipaddress
import math
import os
import re
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

# --------------------------------------------------------------------------------------------
# Quality

_WORD = re.compile(r"\S+")
_BULLETS = ("•", "●", "○", "▪", "▫", "■", "□", "➢", "►", "-", "*", "·")
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's list
_DEFAULT_QUALITY = dict(
    min_chars=200, max_chars=1_000_000, min_words=50, max_words=100_000,
    min_mean_word_length=3.0, max_mean_word_length=10.0,
    max_symbol_word_ratio=0.1, min_alnum_fraction=0.6, min_alpha_word_fraction=0.8,
    max_bullet_line_fraction=0.9, max_ellipsis_line_fraction=0.3,
    max_duplicate_line_fraction=0.3, max_duplicate_line_char_fraction=0.2,
    max_top_ngram_char_fraction=(0.20, 0.18, 0.16),  # n = 2, 3, 4
    max_duplicate_ngram_char_fraction=(0.15, 0.14, 0.13, 0.12, 0.11, 0.10),  # n = 5 .. 10
    min_stop_words=2, drop_lorem_ipsum=True, drop_curly_braces=False,
)


def _ngram_stats(words: list[str], n: int):
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return grams, collections.Counter(grams)


class QualityFilter:
    """Document-level heuristics; `reason(text)` names the first failed rule (None = keep)."""

    RULES = ("length_chars", "length_words", "mean_word_length", "symbol_word_ratio", "alnum_fraction",
             "alpha_words", "bullet_lines", "ellipsis_lines", "duplicate_lines", "duplicate_line_chars",
             "top_ngram", "duplicate_ngrams", "stop_words", "lorem_ipsum", "curly_braces")

    def __init__(self, config: Mapping[str, Any] | None = None):
        unknown = sorted(set(config or {}) - set(_DEFAULT_QUALITY) - {"enabled"})
        if unknown:
            raise ValueError(f"quality: unknown keys {unknown}; valid keys: {sorted(_DEFAULT_QUALITY)}")
        self.c = {**_DEFAULT_QUALITY, **{k: v for k, v in (config or {}).items() if k != "enabled"}}

    def reason(self, text: str) -> str | None:
        c = self.c
        n_chars = len(text)
        if not c["min_chars"] <= n_chars <= c["max_chars"]:
            return "length_chars"
        words = _WORD.findall(text)
        n_words = len(words)
        if not c["min_words"] <= n_words <= c["max_words"]:
            return "length_words"
        mean_len = sum(map(len, words)) / max(n_words, 1)
        if not c["min_mean_word_length"] <= mean_len <= c["max_mean_word_length"]:
            return "mean_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / max(n_words, 1) > c["max_symbol_word_ratio"]:
            return "symbol_word_ratio"
        non_space = [ch for ch in text if not ch.isspace()]
        if sum(ch.isalnum() for ch in non_space) / max(len(non_space), 1) < c["min_alnum_fraction"]:
            return "alnum_fraction"
        if sum(any(ch.isalpha() for ch in w) for w in words) / max(n_words, 1) < c["min_alpha_word_fraction"]:
            return "alpha_words"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        n_lines = max(len(lines), 1)
        if sum(ln.startswith(_BULLETS) for ln in lines) / n_lines > c["max_bullet_line_fraction"]:
            return "bullet_lines"
        if sum(ln.endswith(("...", "…")) for ln in lines) / n_lines > c["max_ellipsis_line_fraction"]:
            return "ellipsis_lines"
        counts = collections.Counter(lines)
        dup_lines = sum(v for v in counts.values() if v > 1)
        if dup_lines / n_lines > c["max_duplicate_line_fraction"]:
            return "duplicate_lines"
        dup_chars = sum(len(k) * v for k, v in counts.items() if v > 1)
        if dup_chars / max(sum(map(len, lines)), 1) > c["max_duplicate_line_char_fraction"]:
            return "duplicate_line_chars"
        total_chars = max(sum(map(len, words)), 1)
        for n, limit in zip((2, 3, 4), c["max_top_ngram_char_fraction"]):
            grams, cnt = _ngram_stats(words, n)
            if cnt:
                gram, freq = cnt.most_common(1)[0]
                if freq > 1 and freq * sum(map(len, gram)) / total_chars > limit:
                    return "top_ngram"
        for n, limit in zip(range(5, 11), c["max_duplicate_ngram_char_fraction"]):
            grams, cnt = _ngram_stats(words, n)
            covered = np.zeros(n_words, bool)
            for i, g in enumerate(grams):
                if cnt[g] > 1:
                    covered[i:i + n] = True
            if sum(len(w) for w, cov in zip(words, covered) if cov) / total_chars > limit:
                return "duplicate_ngrams"
        if c["min_stop_words"] and len(_STOP_WORDS & {w.lower() for w in words}) < c["min_stop_words"]:
            return "stop_words"
        if c["drop_lorem_ipsum"] and "lorem ipsum" in text.lower():
            return "lorem_ipsum"
        if c["drop_curly_braces"] and "{" in text:
            return "curly_braces"
        return None


# --------------------------------------------------------------------------------------------
# Exact dedup


def normalize_for_hash(text: str) -> str:
    return " ".join(text.split())


class ExactDedup:
    """`seen(text)` -> True if an identical document (up to whitespace) was seen before."""

    METHODS = ("hash", "bloom")

    def __init__(self, method: str = "hash", bloom_capacity: int = 10_000_000, bloom_error_rate: float = 1e-6,
                 normalize_whitespace: bool = True):
        if method not in self.METHODS:
            raise ValueError(f"exact_dedup.method={method!r} is not valid; expected one of {self.METHODS}")
        self.normalize = normalize_whitespace
        self.method = method
        if method == "bloom":
            from rbloom import Bloom

            # rbloom hashes with Python's per-process hash by default; a stable digest keeps runs repeatable
            self._set = Bloom(int(bloom_capacity), float(bloom_error_rate), hash_func=_bloom_hash)
        else:
            self._set = set()

    def seen(self, text: str) -> bool:
        key = hashlib.blake2b((normalize_for_hash(text) if self.normalize else text).encode(), digest_size=16).digest()
        if key in self._set:
            return True
        self._set.add(key)
        return False


def _bloom_hash(obj: bytes) -> int:
    return int.from_bytes(obj[:16], "little", signed=True)


# --------------------------------------------------------------------------------------------
# Near dedup: MinHash LSH proposes candidates, the exact Jaccard of the shingle sets decides

_SHINGLE_MULT = 0x9E3779B97F4A7C15  # odd: combines n word hashes into one shingle hash mod 2^64
# str.split()'s whitespace: the ASCII bytes (found in the UTF-8 bytes, where no multi-byte
# character contains one), and the other code points (texts with those go through str.split)
_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_UNICODE_SPACES = "\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_UNICODE_SPACE = re.compile(f"[{_UNICODE_SPACES}]")
_BYTE_MULT = 0xD6E8FEB86659FD93  # odd, so it has an inverse mod 2^64
_CHUNK_BYTES = 1 << 20  # bytes hashed per vectorised pass (bounds the power tables)
_powers = (np.ones(1, np.uint64), np.ones(1, np.uint64))  # BYTE_MULT^k and BYTE_MULT^-k mod 2^64


def _byte_powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(M^k, M^-k) mod 2^64 for k < at least n, M = _BYTE_MULT; grown by doubling, kept."""
    global _powers
    if len(_powers[0]) < n:
        size = max(n, 2 * len(_powers[0]))
        inverse = pow(_BYTE_MULT, -1, 1 << 64)
        up, down = np.full(size, _BYTE_MULT, np.uint64), np.full(size, inverse, np.uint64)
        up[0] = down[0] = 1
        _powers = (np.cumprod(up), np.cumprod(down))  # integer products wrap: mod 2^64
    return _powers


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (a bijection whose every output bit depends on every input bit)."""
    h = h ^ (h >> np.uint64(33))
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def _chunk_word_hashes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start byte, 64-bit hash) of every word of x, a uint8 array that begins and ends with
    whitespace: hash = fmix64(sum_i byte_i * M^(end-1-i) mod 2^64), a polynomial over the word's
    bytes, computed for all words at once from one prefix sum: with G[j] = sum_{i<j} byte_i M^-i,
    a word [s, e) has sum = (G[e] - G[s]) M^(e-1)."""
    ws = _WHITESPACE[x]
    starts = np.flatnonzero(ws[:-1] & ~ws[1:]) + 1
    ends = np.flatnonzero(~ws[:-1] & ws[1:]) + 1
    up, down = _byte_powers(len(x) + 1)
    with np.errstate(over="ignore"):
        g = np.zeros(len(x) + 1, np.uint64)
        np.cumsum(np.multiply(x, down[:len(x)], dtype=np.uint64), out=g[1:])
        return starts, _fmix64((g[ends] - g[starts]) * up[ends - 1])


def _word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hashes_W uint64, words_D int64): 64-bit hashes of the words of `text.lower().split()`
    for every text, concatenated, and how many words each text has."""
    pieces = [t.lower().encode("utf-8", "surrogatepass") if t.isascii() or not _UNICODE_SPACE.search(t)
              else " ".join(t.lower().split()).encode("utf-8", "surrogatepass") for t in texts]
    bounds = np.cumsum([0] + [len(p) + 1 for p in pieces])  # text i's bytes: [bounds[i], bounds[i+1] - 1)
    x = np.frombuffer(b" ".join(pieces) + b" ", np.uint8)
    # chunks cut at whitespace, each hashed with positions of its own (a word hash does not
    # depend on where the word is)
    cuts = [0]
    if len(x) > _CHUNK_BYTES:
        spaces = np.flatnonzero(_WHITESPACE[x])  # x ends with one, so every search finds one
        while len(x) - cuts[-1] > _CHUNK_BYTES:
            cuts.append(int(spaces[np.searchsorted(spaces, cuts[-1] + _CHUNK_BYTES)]))
    cuts.append(len(x))
    starts, hashes = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        chunk = np.concatenate([[32], x[a:b], [32]]).astype(np.uint8)
        s, h = _chunk_word_hashes(chunk)
        starts.append(s - 1 + a)
        hashes.append(h)
    starts = np.concatenate(starts)
    return np.concatenate(hashes), np.diff(np.searchsorted(starts, bounds))


def _poly(values, n: int) -> np.ndarray:
    """sum_k values[i + k] * MULT^(n-1-k) mod 2^64 for every window start i: [len - n + 1] uint64."""
    with np.errstate(over="ignore"):
        out = values[:len(values) - n + 1].copy()
        for k in range(1, n):
            out *= np.uint64(_SHINGLE_MULT)
            out += values[k:len(values) - n + 1 + k]
    return out


def shingle_sets(texts: list[str], ngram: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The distinct word n-grams of each text as sorted 32-bit hashes, concatenated.

    Returns (hashes_S uint32, offsets_D+1 int64): text i's set is hashes[offsets[i]:offsets[i+1]].
    Words are the lower-cased whitespace-separated tokens (`text.lower().split()`); a text of
    fewer than n words is one shingle of all of them (an empty text: the empty shingle), so no
    set is empty. A shingle's hash is the top 32 bits of a polynomial in its words' 64-bit
    hashes, so two distinct shingles of a pair of documents collide with probability ~2^-32: for
    documents of m shingles each, the Jaccard computed on the hashes differs from the true one
    with probability about m^2 / 2^32 (2e-4 at m = 1000), and then by about 1/m.
    """
    all_words, lengths = _word_hashes(texts)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    # full n-grams: windows over the concatenated words that stay inside one text
    counts = np.maximum(lengths - ngram + 1, 0)
    polys = _poly(all_words, ngram) if len(all_words) >= ngram else np.zeros(0, np.uint64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    window = np.arange(counts.sum()) + np.repeat(starts - first, counts)
    hashes, doc = polys[window], np.repeat(np.arange(len(texts), dtype=np.uint64), counts)
    short = np.flatnonzero(lengths < ngram)
    if len(short):  # rare: one shingle of all the words
        extra = np.array([_poly(all_words[starts[i]:starts[i] + lengths[i]], lengths[i])[0] if lengths[i] else 0
                          for i in short], np.uint64)
        hashes, doc = np.concatenate([hashes, extra]), np.concatenate([doc, short.astype(np.uint64)])
    # one sort orders by (text, hash); equal neighbours are repeated shingles of one text
    keys = np.sort((doc << np.uint64(32)) | (hashes >> np.uint64(32)))
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    offsets = np.searchsorted(keys >> np.uint64(32), np.arange(len(texts) + 1, dtype=np.uint64)).astype(np.int64)
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), offsets


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """One text's distinct word n-grams as sorted 32-bit hashes (see `shingle_sets`)."""
    return shingle_sets([text], ngram)[0]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity |a & b| / |a | b| of two sorted arrays of distinct values."""
    if len(a) > len(b):
        a, b = b, a
    if len(b) == 0:
        return 1.0
    idx = np.searchsorted(b, a)
    idx[idx == len(b)] = 0
    inter = int(np.count_nonzero(b[idx] == a))
    return inter / (len(a) + len(b) - inter)


class MinHasher:
    """`num_perm` hash functions h_i(x) = (a_i x + b_i mod 2^64) >> 32 of 32-bit shingle hashes x
    (multiply-add-shift, strongly universal for 32-bit keys: Dietzfelbinger 1996); row i of a
    signature is the minimum of h_i over a set, equal for two sets with probability ~ their
    Jaccard similarity."""

    _CHUNK = 4096  # shingles per vectorised block: num_perm x 4096 x 8 bytes stays in cache

    def __init__(self, num_perm: int = 128, seed: int = 0):
        r = np.random.default_rng(seed)
        self.a = r.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False)
        self.b = r.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False)
        self.num_perm = num_perm

    def signatures(self, hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """[D, num_perm] uint32 signatures of the D sets hashes[offsets[i]:offsets[i+1]] (none empty)."""
        x = hashes.astype(np.uint64)
        a, b = self.a[:, None], self.b[:, None]
        mins = np.empty((self.num_perm, len(offsets) - 1), np.uint64)
        buf = np.empty((self.num_perm, self._CHUNK), np.uint64)
        d, n_docs = 0, len(offsets) - 1
        with np.errstate(over="ignore"):
            while d < n_docs:
                # as many whole sets as fit in one block (at least one); >> 32 is monotone, so it
                # is applied once to the minima instead of to every value
                e = max(int(np.searchsorted(offsets, offsets[d] + self._CHUNK, side="right")) - 1, d + 1)
                e = min(e, n_docs)
                lo, hi = offsets[d], offsets[e]
                if hi - lo <= self._CHUNK:
                    v = buf[:, :hi - lo]
                    np.multiply(a, x[lo:hi], out=v)
                    v += b
                    mins[:, d:e] = np.minimum.reduceat(v, offsets[d:e] - lo, axis=1)
                else:  # one set larger than a block
                    m = np.full(self.num_perm, np.iinfo(np.uint64).max, np.uint64)
                    for c in range(lo, hi, self._CHUNK):
                        v = buf[:, :min(hi - c, self._CHUNK)]
                        np.multiply(a, x[c:c + v.shape[1]], out=v)
                        v += b
                        np.minimum(m, v.min(axis=1), out=m)
                    mins[:, d] = m
                d = e
        return (mins >> np.uint64(32)).astype(np.uint32).T


def candidate_miss(threshold: float, bands: int, rows: int) -> float:
    """Probability that LSH with `bands` bands of `rows` rows misses a pair of Jaccard similarity
    `threshold` (no band of the two signatures equal): (1 - J^rows)^bands."""
    return (1.0 - threshold ** rows) ** bands


def lsh_params(threshold: float, num_perm: int, max_miss: float = 0.005) -> tuple[int, int]:
    """(bands, rows) of an LSH index tuned for recall: the decision is made afterwards by exact
    Jaccard, so LSH only has to propose every pair at or above `threshold`.

    Among the (bands, rows) with bands * rows <= num_perm whose miss probability at exactly
    `threshold`, (1 - threshold^rows)^bands, is at most `max_miss` (pairs above the threshold
    are missed less often still), pick the one that proposes the fewest false candidates: the
    least area under the S-curve 1 - (1 - s^rows)^bands over s in [0, threshold). For a given
    number of rows more bands only add candidates, so each rows count is tried with its fewest
    sufficient bands. At threshold 0.8 with 128 permutations and max_miss 0.005 this gives 18
    bands of 6 rows (108 permutations; miss 0.42% at J = 0.8, 0.03% at 0.85; a pair at J = 0.5 is
    a candidate 25% of the time and costs one exact-Jaccard check).
    """
    s = np.linspace(0.0, threshold, 2001)
    best, best_area = None, float("inf")
    for rows in range(1, num_perm + 1):
        p = threshold ** rows
        bands = 1 if p >= 1.0 else max(1, math.ceil(math.log(max_miss) / math.log1p(-p)))
        if bands * rows > num_perm:
            continue
        area = float(np.trapezoid(1.0 - (1.0 - s ** rows) ** bands, s))
        if area < best_area - 1e-12:
            best, best_area = (bands, rows), area
    if best is None:
        needed = min(r * max(1, math.ceil(math.log(max_miss) / math.log1p(-threshold ** r))) for r in range(1, 65))
        raise ValueError(f"near_dedup: no LSH bands x rows <= num_perm={num_perm} keep the miss probability at "
                         f"threshold {threshold} within max_miss={max_miss} (that needs num_perm >= {needed}); "
                         f"raise num_perm or max_miss")
    return best


class _HashStore:
    """Append-only store of the kept documents' shingle hashes in an unlinked temporary file.

    RAM holds one 8-byte offset per document; only candidates are read back (the page cache
    serves those reads), so memory does not grow with the corpus's text. Disk: 4 bytes per
    distinct shingle of each kept document, freed when the store is closed.
    """

    def __init__(self, directory: str | None = None):
        self._directory, self._file = directory, None  # the file is made at the first append
        self._ends = array.array("q", [0])

    def __len__(self) -> int:
        return len(self._ends) - 1

    def append(self, hashes: np.ndarray) -> int:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._directory, buffering=0)
            self._fd = self._file.fileno()
        data, pos = memoryview(hashes.astype(np.uint32, copy=False).tobytes()), self._ends[-1]
        while data:
            n = os.pwrite(self._fd, data, pos)
            data, pos = data[n:], pos + n
        self._ends.append(pos)
        return len(self._ends) - 2

    def size(self, i: int) -> int:
        return (self._ends[i + 1] - self._ends[i]) // 4

    def get(self, i: int) -> np.ndarray:
        start, stop = self._ends[i], self._ends[i + 1]
        return np.frombuffer(os.pread(self._fd, stop - start, start), np.uint32)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class NearDedup:
    """Streaming near-duplicate removal: a document is a near duplicate when the exact Jaccard
    similarity of its word n-gram set to a kept document's is >= `threshold`.

    `duplicates(texts)` -> for each text in order, the id (0, 1, ... in keeping order) of a kept
    document it near-duplicates, or None, in which case it is kept and indexed; the decisions are
    those of feeding the texts one at a time (`duplicate_of`), batches only vectorise the hashing.
    Candidates come from MinHash LSH with bands tuned for recall (`lsh_params`: a pair at exactly
    `threshold` escapes with probability <= `max_miss`); each candidate is then decided by the
    exact Jaccard of the two hash sets (`jaccard`), so no estimate's variance drops or admits a
    pair. Memory per kept document: ~130 bytes per band in the LSH table (RAM; ~2.4 KB at 18
    bands), and 4 bytes per shingle in a temporary file in `spill_dir` (default: the system's
    temporary directory).
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 0,
                 max_miss: float = 0.005, spill_dir: str | None = None):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near_dedup.threshold={threshold} is not valid: expected a Jaccard similarity in (0, 1]")
        for name, value in (("num_perm", num_perm), ("ngram", ngram)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"near_dedup.{name}={value!r} is not valid: expected an integer >= 1")
        if not 0.0 < max_miss < 1.0:
            raise ValueError(f"near_dedup.max_miss={max_miss} is not valid: expected a probability in (0, 1)")
        self.threshold, self.ngram, self.max_miss = float(threshold), int(ngram), float(max_miss)
        self.bands, self.rows = lsh_params(self.threshold, int(num_perm), self.max_miss)
        self.hasher = MinHasher(self.bands * self.rows, seed)
        r = np.random.default_rng([seed, 1])
        # a band's key: a random linear form of its rows plus a per-band salt, mod 2^64 (a false
        # key match only adds a candidate, which the exact check then rejects)
        self._row_mult = r.integers(0, 2**64, self.rows, dtype=np.uint64, endpoint=False) | np.uint64(1)
        self._band_salt = r.integers(0, 2**64, self.bands, dtype=np.uint64, endpoint=False)
        self._table: dict[int, int | list[int]] = {}
        self._store = _HashStore(spill_dir)
        self.stats = collections.Counter(documents=0, candidates=0, jaccard_checks=0, near_duplicates=0)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kw) -> "NearDedup":
        """From a `near_dedup` section of configs/data/clean.py (missing keys keep the defaults)."""
        keys = ("threshold", "num_perm", "ngram", "seed", "max_miss")
        return cls(**{k: config[k] for k in keys if k in config}, **kw)

    def duplicate_of(self, text: str) -> int | None:
        return self.duplicates([text])[0]

    def duplicates(self, texts: list[str]) -> list[int | None]:
        if not texts:
            return []
        hashes, offsets = shingle_sets(texts, self.ngram)
        sig = self.hasher.signatures(hashes, offsets).reshape(len(texts), self.bands, self.rows)
        with np.errstate(over="ignore"):
            keys = ((sig.astype(np.uint64) * self._row_mult).sum(axis=2, dtype=np.uint64) + self._band_salt).tolist()
        out: list[int | None] = []
        table = self._table
        for i, doc_keys in enumerate(keys):
            mine = hashes[offsets[i]:offsets[i + 1]]
            match = self._match(mine, doc_keys)
            out.append(match)
            if match is None:
                doc_id = self._store.append(mine)
                for k in doc_keys:
                    v = table.get(k)
                    if v is None:
                        table[k] = doc_id  # most buckets hold one document: no list for those
                    elif isinstance(v, list):
                        v.append(doc_id)
                    else:
                        table[k] = [v, doc_id]
        self.stats["documents"] += len(texts)
        self.stats["near_duplicates"] += sum(m is not None for m in out)
        return out

    def _match(self, mine: np.ndarray, keys: list[int]) -> int | None:
        candidates = set()
        for k in keys:
            v = self._table.get(k)
            if v is None:
                continue
            if isinstance(v, list):
                candidates.update(v)
            else:
                candidates.add(v)
        self.stats["candidates"] += len(candidates)
        n, t = len(mine), self.threshold
        for j in sorted(candidates):  # the earliest kept document first
            m = self._store.size(j)
            if min(n, m) / max(n, m) < t:  # |A & B| / |A | B| <= min / max: cannot reach t
                continue
            self.stats["jaccard_checks"] += 1
            if jaccard(mine, self._store.get(j)) >= t:
                return j
        return None

    def summary(self) -> dict[str, Any]:
        """The method's settings and counts, for a report."""
        return {"threshold": self.threshold, "ngram": self.ngram, "bands": self.bands, "rows": self.rows,
                "max_miss": self.max_miss,
                "miss_probability_at_threshold": candidate_miss(self.threshold, self.bands, self.rows),
                "kept_documents": len(self._store), **self.stats}

    def close(self) -> None:
        self._store.close()


def deduplicate(items: Iterable, text_of: Callable[[Any], str], exact: "ExactDedup | None" = None,
                near: NearDedup | None = None, batch_size: int = 256) -> Iterator[tuple[Any, str | None]]:
    """Yields (item, verdict) for every item, in input order: verdict "exact_duplicate",
    "near_duplicate", or None (kept). Exact dedup runs first; the items it keeps go to `near`
    in batches of `batch_size` (vectorised hashing), with the decisions of one-at-a-time streaming.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"near_dedup.batch_size={batch_size!r} is not valid: expected an integer >= 1")
    pending: list[tuple[Any, str | None, str | None]] = []  # (item, text to near-dedup or None, verdict)
    n_texts = 0

    def flush():
        verdicts = iter(near.duplicates([t for _, t, _ in pending if t is not None]))
        for item, text, verdict in pending:
            if text is not None:
                verdict = "near_duplicate" if next(verdicts) is not None else None
            yield item, verdict
        pending.clear()

    for item in items:
        text = text_of(item)
        if exact is not None and exact.seen(text):
            verdict, text = "exact_duplicate", None
        else:
            verdict = None
        if near is None:
            yield item, verdict
            continue
        pending.append((item, text, verdict))
        n_texts += text is not None
        # exact duplicates wait in order with the batch; a long run of them flushes it too
        if n_texts >= batch_size or len(pending) >= 4 * batch_size:
            yield from flush()
            n_texts = 0
    if pending:
        yield from flush()


# --------------------------------------------------------------------------------------------
# PII

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
# +1 (555) 123-4567, 555-123-4567, 555.123.4567, +44 20 7946 0958, +33 1 23 45 67 89: 9-15 digits
# in groups separated by space, dot or dash, optionally with a +country code and (area code)
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?![\w-])")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def _digits(s: str) -> int:
    return sum(ch.isdigit() for ch in s)


class PiiScrubber:
    """Replaces e-mail addresses, phone numbers and IP addresses; counts what it replaced."""

    def __init__(self, email: bool = True, phone: bool = True, ip: bool = True):
        self.email, self.phone, self.ip = email, phone, ip

    def scrub(self, text: str) -> tuple[str, collections.Counter]:
        counts: collections.Counter = collections.Counter()

        def sub(pattern, placeholder, kind, valid=lambda m: True):
            nonlocal text

            def repl(m):
                if not valid(m.group(0)):
                    return m.group(0)
                counts[kind] += 1
                return placeholder

            text = pattern.sub(repl, text)

        if self.email:
            sub(EMAIL, "<EMAIL>", "email")
        if self.ip:
            sub(IPV4, "<IP_ADDRESS>", "ip", _valid_ip)
            sub(IPV6, "<IP_ADDRESS>", "ip", _valid_ip)
        if self.phone:
            sub(PHONE, "<PHONE>", "phone", lambda s: 9 <= _digits(s) <= 15 and not _looks_like_date_or_number(s))
        return text, counts


def _valid_ip(s: str) -> bool:
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        return False
    return not (addr.version == 6 and s.count(":") < 3)  # "a:b:c" times and ratios are not addresses


def _looks_like_date_or_number(s: str) -> bool:
    """2024-01-15, 2024.01.15, 1 000 000 and 3.14159265 are not phone numbers."""
    return bool(re.fullmatch(r"(1[89]|20)\d\d[-./](0?[1-9]|1[0-2])[-./](0?[1-9]|[12]\d|3[01])", s)
                or re.fullmatch(r"\d{1,3}(?: \d{3})+", s) or re.fullmatch(r"\d+\.\d+", s))
