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
Near dedup: MinHash signatures of word n-gram shingles and locality-sensitive hashing (bands of
rows chosen for the Jaccard threshold, as datasketch does); a candidate is a duplicate when its
signature agrees with a kept document's on at least `threshold` of the permutations. The
MinHash is vectorised NumPy over all permutations at once (benchmarks/data_pipeline.py measures
it against datasketch's at equal precision and recall).
PII: e-mail addresses, phone numbers and IPv4/IPv6 addresses replaced by <EMAIL>, <PHONE>,
<IP_ADDRESS>.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import re
from typing import Any, Mapping

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
# Near dedup: MinHash + LSH

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _word_hashes(text: str) -> np.ndarray:
    """A stable 64-bit hash per (lower-cased) word."""
    words = text.lower().split()
    return np.frombuffer(b"".join(hashlib.blake2b(w.encode(), digest_size=8).digest() for w in words),
                         dtype=np.uint64)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Hashes of the distinct word n-grams of `text` (a text shorter than n is one shingle)."""
    h = _word_hashes(text)
    if len(h) == 0:
        return np.zeros(1, np.uint64)
    if len(h) < ngram:
        ngram = len(h)
    # polynomial combination of the n word hashes, wrapping mod 2^64
    out = np.zeros(len(h) - ngram + 1, np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for k in range(ngram):
            out = out * mult + h[k:len(h) - ngram + 1 + k]
    return np.unique(out)


class MinHasher:
    """`num_perm` multiply-shift hash functions h_i(x) = (a_i x + b_i mod 2^64) >> 32; the
    signature is the minimum of each over a document's shingles."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        r = np.random.default_rng(seed)
        self.a = (r.integers(1, 2**63, num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)  # odd
        self.b = r.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.num_perm, self.ngram = num_perm, ngram

    def signature(self, text: str) -> np.ndarray:
        x = shingle_hashes(text, self.ngram)
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, np.uint32)
        with np.errstate(over="ignore"):
            for i in range(0, len(x), 2048):  # bounded memory: num_perm x 2048 at a time
                block = (self.a[:, None] * x[None, i:i + 2048] + self.b[:, None]) >> np.uint64(32)
                sig = np.minimum(sig, block.min(axis=1).astype(np.uint32))
        return sig


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted false-positive and
    false-negative probability mass around `threshold` (the S-curve 1 - (1 - s^r)^b)."""
    s = np.linspace(0, 1, 1001)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1 - (1 - s ** r) ** b
            fp = np.trapezoid(np.where(s < threshold, p, 0), s)
            fn = np.trapezoid(np.where(s >= threshold, 1 - p, 0), s)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class NearDedup:
    """Streaming near-duplicate detection: `duplicate_of(text)` -> the id of a kept document it
    near-duplicates (estimated Jaccard >= threshold), or None (and the text is kept and indexed)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near_dedup.threshold={threshold} must be in (0, 1]")
        self.threshold = threshold
        self.hasher = MinHasher(num_perm, ngram, seed)
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.tables: list[dict[bytes, list[int]]] = [collections.defaultdict(list) for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []

    def duplicate_of(self, text: str) -> int | None:
        sig = self.hasher.signature(text)
        keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {j for table, key in zip(self.tables, keys) for j in table.get(key, ())}
        for j in sorted(candidates):
            if np.mean(self.signatures[j] == sig) >= self.threshold:
                return j
        doc_id = len(self.signatures)
        self.signatures.append(sig)
        for table, key in zip(self.tables, keys):
            table[key].append(doc_id)
        return None


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
