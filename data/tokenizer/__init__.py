"""Tokenizers behind one small interface: encode / decode / bos_id / eos_id / pad_id / vocab_size.

`SentencePieceTokenizer` wraps a sentencepiece model trained for an exact byte round trip
(identity normalisation, no dummy prefix, whitespace kept, byte fallback): for any string s,
`decode(encode(s)) == s`. `corpus_tokenizer` trains one on the embedded corpus on first use and
caches it (keyed by the corpus's file list, vocabulary size and model type).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import tempfile
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import sentencepiece as spm

from configs.cli import cache_dir

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def special(token_id) -> list[int]:
    """[token_id], or [] for a tokenizer without that special token (None or negative)."""
    return [] if token_id is None or token_id < 0 else [int(token_id)]


def with_specials(tokenizer: Tokenizer, ids: Sequence[int], *, bos: bool = True, eos: bool = False) -> list[int]:
    """`ids` with the tokenizer's bos in front and eos at the end, where it has them."""
    return (special(tokenizer.bos_id) if bos else []) + list(ids) + (special(tokenizer.eos_id) if eos else [])


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """What a scored or generated text starts with: [bos], or [eos] for a tokenizer without a BOS
    (lm-evaluation-harness's convention: its end-of-text token is the prefix), or []."""
    return special(tokenizer.bos_id) or special(tokenizer.eos_id)


class SentencePieceTokenizer:
    """A sentencepiece model. Picklable (grain worker processes receive it by value)."""

    def __init__(self, model_proto: bytes, name: str = "sentencepiece"):
        self._proto = bytes(model_proto)
        self.name = name
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {path} does not exist")
        return cls(path.read_bytes(), name=path.name)

    def save(self, path: str | os.PathLike) -> None:
        _atomic_write(pathlib.Path(path), self._proto)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and each token's (start, end) character span in `text` (the bytes of one
        character split by byte fallback: all but the last have an empty span at its start)."""
        enc = self._sp.encode(text, return_type="offset_mapping")
        return list(enc["ids"]), list(enc["offsets"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __getstate__(self):
        return {"proto": self._proto, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["name"])

    def __repr__(self):
        return f"SentencePieceTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    # sentencepiece trains on lines; "\n" is a user-defined piece so encoding keeps newlines.
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int, model_type: str = "bpe",
                        max_sentences: int = 1_000_000, num_threads: int | None = None) -> SentencePieceTokenizer:
    """Trains an exact-round-trip sentencepiece model on `texts`."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"tokenizer model_type={model_type!r} is not valid; expected one of {MODEL_TYPES}")
    if vocab_size < 260:
        raise ValueError(f"tokenizer vocab_size={vocab_size} is too small: byte fallback needs 256 "
                         "byte pieces plus 4 specials")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts), model_writer=out, vocab_size=vocab_size,
        model_type=model_type, normalization_rule_name="identity", byte_fallback=True,
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_digits=True, user_defined_symbols=["\n"], character_coverage=0.9995,
        input_sentence_size=max_sentences, shuffle_input_sentence=True, max_sentence_length=1 << 14,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        num_threads=num_threads or max(1, os.cpu_count() or 1), minloglevel=2, hard_vocab_limit=False)
    return SentencePieceTokenizer(out.getvalue(), name=f"{model_type}{vocab_size}")


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: concurrent trainers never see half a file


def _cache_path(fingerprint: str, vocab_size: int, model_type: str, directory=None) -> pathlib.Path:
    key = hashlib.sha256(f"{fingerprint}:{vocab_size}:{model_type}:v1".encode()).hexdigest()[:16]
    return pathlib.Path(directory or cache_dir() / "tokenizers") / f"{model_type}{vocab_size}-{key}.model"


def corpus_tokenizer(texts: Sequence[str] | Callable[[], Sequence[str]], *, fingerprint: str, vocab_size: int,
                     model_type: str = "bpe", directory: str | os.PathLike | None = None) -> SentencePieceTokenizer:
    """The tokenizer for a corpus: loaded from the cache, or trained on `texts` and cached.

    `texts` may be a callable, so that a cached tokenizer never reads the corpus.
    """
    path = _cache_path(fingerprint, vocab_size, model_type, directory)
    if path.is_file():
        try:
            return SentencePieceTokenizer.from_file(path)
        except Exception as e:  # a truncated or foreign file: retrain rather than fail
            logging.warning("tokenizer cache %s is unreadable (%s); retraining", path, e)
    texts = texts() if callable(texts) else texts
    logging.info("training a %s tokenizer (vocab %d) on %d documents -> %s", model_type, vocab_size,
                 len(texts), path)
    tok = train_sentencepiece(texts, vocab_size=vocab_size, model_type=model_type)
    tok.save(path)
    return SentencePieceTokenizer.from_file(path)

KINDS = ("sentencepiece", "hf")
_LATER_FIELDS = {"schema": "text", "messages_field": "messages", "prompt_field": "prompt",
                 "completion_field": "completion", "instruction_field": "instruction", "input_field": "input",
                 "output_field": "output", "task": "", "size": 0, "num_examples": 10_000, "heldout": None,
                 "chosen_field": "chosen", "rejected_field": "rejected"}


def sources_fingerprint(specs) -> str:
    """Identifies what a tokenizer was trained on: the source specs and their files' sizes and times."""
    from data import corpus
    from data.sources import STREAMING, expand_paths

    h = hashlib.sha256()
    for spec in specs:
        # The chat, preference, synthetic and held-out fields count only when set, so text sources keep
        # the fingerprints, and cached tokenizers, they had before those fields existed.
        h.update(repr(sorted((k, v) for k, v in vars(spec).items()
                             if k not in _LATER_FIELDS or v != _LATER_FIELDS[k])).encode())
        if spec.format == "embedded":
            h.update(corpus.load(spec.split, validation_fraction=spec.validation_fraction).fingerprint().encode())
        elif spec.format in STREAMING + ("array_record",):
            for f in expand_paths(spec.path, spec.format):
                st = os.stat(f)
                h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def training_texts(specs, num_documents: int) -> list[str]:
    """Up to `num_documents` texts from the sources, shared by weight (for training a tokenizer).

    Raises `data.sources.EmptySourceError` naming a source that has no document (sentencepiece
    would fail with an opaque `[!sentences_.empty()]`)."""
    from data.sources import read_all

    total = sum(s.weight for s in specs)
    texts = []
    for spec in specs:
        want = max(1, int(round(num_documents * spec.weight / total)))
        records = read_all(spec)
        n = 0
        for rec in records:
            if n >= want:
                break
            texts.append(rec["text"])
            n += 1
        if n == 0:
            raise records.no_documents_error()
    return texts


def from_config(tok_cfg, train_specs=()) -> Tokenizer:
    """The tokenizer a config names: a file, or one trained (once, then cached) on `train_specs`."""
    kind = tok_cfg.get("kind", "sentencepiece")
    if kind not in KINDS:
        raise ValueError(f"tokenizer.kind={kind!r} is not valid; expected one of {KINDS}")
    path = tok_cfg.get("path")
    if kind == "hf":
        if not path:
            raise ValueError("tokenizer.kind='hf' needs tokenizer.path (a tokenizer.json or its directory)")
        from data.tokenizer.hf import load_hf_tokenizer

        return load_hf_tokenizer(path)
    if path:
        return SentencePieceTokenizer.from_file(path)
    if not train_specs:
        raise ValueError("tokenizer.path is unset and there are no sources to train a tokenizer on")
    n = int(tok_cfg.get("train_documents", 200_000))
    fingerprint = f"{sources_fingerprint(train_specs)}:{n}"
    return corpus_tokenizer(lambda: training_texts(train_specs, n), fingerprint=fingerprint,
                            vocab_size=int(tok_cfg["vocab_size"]), model_type=tok_cfg.get("model_type", "bpe"))
