"""Cleaning presets: `python -m data.prepare --config=configs/data/clean.py[:code] --config.source.path=...`.

Presets: web (default: Gopher / C4 thresholds for prose) and code (prose heuristics off).
Steps run in this order, each with `enabled` (all on by default): quality -> exact_dedup ->
near_dedup -> pii (PII is scrubbed from the documents that are kept).
"""

from ml_collections import config_dict
from ml_collections.config_dict import placeholder

PRESETS = ("web", "code")


def get_config(arg=None):
    preset = arg or "web"
    if preset not in PRESETS:
        raise ValueError(f"unknown cleaning preset {preset!r}; valid presets: {PRESETS}")
    c = config_dict.ConfigDict()
    c.name = preset
    c.source = config_dict.ConfigDict(dict(
        path=placeholder(str),  # globs (comma-separated), files or directories; tfds: the dataset name
        format="jsonl",  # text | jsonl | parquet | hf | array_record | tfds | embedded
        text_field="text",  # dots reach nested keys
        text_unit="file",  # text format: file | line | paragraph
        split="train",  # tfds / hf / embedded
        data_dir="",  # tfds
        strict=False,  # stop at the first bad record (else skip, count and report it)
    ))
    c.output_dir = placeholder(str)  # <output_dir>/*.array_record, report.{json,md}, length_histogram.png
    c.overwrite = False  # replace an existing non-empty output_dir
    c.shard_size = 50_000  # records per ArrayRecord shard
    c.keep_dropped = 1000  # dropped records kept per rule in <output_dir>/dropped/<rule>.jsonl
    c.tokenizer = config_dict.ConfigDict(dict(
        kind="sentencepiece",  # "sentencepiece" | "hf"
        path=placeholder(str),  # unset: the report counts whitespace-separated words instead of tokens
    ))

    prose = preset == "web"
    c.quality = config_dict.ConfigDict(dict(
        enabled=True,
        min_chars=200 if prose else 20,  # document length in characters
        max_chars=1_000_000,
        min_words=50 if prose else 5,  # ... in whitespace-separated words (Gopher: 50 .. 100k)
        max_words=100_000 if prose else 1_000_000,
        min_mean_word_length=3.0 if prose else 1.0,  # Gopher: 3 .. 10
        max_mean_word_length=10.0 if prose else 40.0,
        max_symbol_word_ratio=0.1 if prose else 1.0,  # ('#', '...', '…') per word
        min_alnum_fraction=0.6 if prose else 0.3,  # alphanumeric share of non-space characters
        min_alpha_word_fraction=0.8 if prose else 0.0,  # words with at least one letter
        max_bullet_line_fraction=0.9,  # lines starting with a bullet
        max_ellipsis_line_fraction=0.3,  # lines ending with an ellipsis
        max_duplicate_line_fraction=0.3 if prose else 0.5,  # lines that occur more than once
        max_duplicate_line_char_fraction=0.2 if prose else 0.5,  # characters in those lines
        max_top_ngram_char_fraction=(0.20, 0.18, 0.16) if prose else (1.0, 1.0, 1.0),  # most frequent 2/3/4-gram
        max_duplicate_ngram_char_fraction=(0.15, 0.14, 0.13, 0.12, 0.11, 0.10) if prose else (1.0,) * 6,  # 5..10
        min_stop_words=2 if prose else 0,  # distinct English stop words (Gopher)
        drop_lorem_ipsum=True,  # C4
        drop_curly_braces=False,  # C4 drops pages with '{' (off: it also drops code and math)
    ))
    c.exact_dedup = config_dict.ConfigDict(dict(
        enabled=True,
        method="hash",  # "hash" (exact, 16 bytes per document) | "bloom" (bounded memory, false-positive rate)
        bloom_capacity=10_000_000,  # bloom: documents expected
        bloom_error_rate=1e-6,  # bloom: false-positive rate at capacity
        normalize_whitespace=True,  # documents equal up to whitespace are duplicates
    ))
    c.near_dedup = config_dict.ConfigDict(dict(
        enabled=True,
        threshold=0.8,  # exact Jaccard similarity of shingle sets at or above which a document is a near duplicate
        ngram=5,  # shingles are word n-grams
        num_perm=128,  # MinHash permutations available to the LSH bands that propose candidates (bands x rows <= this)
        max_miss=0.005,  # bands x rows chosen so a pair at exactly `threshold` escapes the candidates w.p. <= this
        batch_size=256,  # documents hashed in one vectorised pass (same decisions as one at a time)
        seed=0,  # MinHash permutations and band keys
    ))
    c.pii = config_dict.ConfigDict(dict(
        enabled=True,
        email=True,  # -> <EMAIL>
        phone=True,  # -> <PHONE>
        ip=True,  # IPv4 and IPv6 -> <IP_ADDRESS>
    ))
    return c
