"""Train or try a tokenizer.

    python -m data.tokenizer train --format=jsonl --path='corpus/*.jsonl.zst' --text_field=text \
        --vocab_size=32000 --model_type=unigram --output=tok.model
    python -m data.tokenizer encode --model=tok.model --text='def f(x):'

`train` reads up to --max_documents documents from any source format (see data/sources.py) and
writes a sentencepiece model with an exact byte round trip.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from data.sources import FORMATS, TEXT_UNITS, SourceSpec
from data.tokenizer import MODEL_TYPES, SentencePieceTokenizer, train_sentencepiece, training_texts

_FORMAT = flags.DEFINE_enum("format", "text", FORMATS, "Source format.")
_PATH = flags.DEFINE_string("path", "", "Globs / files / directories (tfds: the dataset name).")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Field holding the text (dots for nested keys).")
_TEXT_UNIT = flags.DEFINE_enum("text_unit", "file", TEXT_UNITS, "text format: what a document is.")
_SPLIT = flags.DEFINE_string("split", "train", "Split (embedded, tfds, hf).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data_dir.")
_VOCAB = flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", MODEL_TYPES, "sentencepiece model type.")
_MAX_DOCS = flags.DEFINE_integer("max_documents", 200_000, "Documents read for training.")
_OUTPUT = flags.DEFINE_string("output", "tokenizer.model", "Where `train` writes the model.")
_MODEL = flags.DEFINE_string("model", "", "`encode`: the model to use.")
_TEXT = flags.DEFINE_string("text", "", "`encode`: the text to encode.")

COMMANDS = ("train", "encode")


def main(argv):
    from configs.cli import quiet_library_logs

    quiet_library_logs()
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m data.tokenizer {{{'|'.join(COMMANDS)}}} [flags]")
    try:
        return _run(argv[1])
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        sys.exit(f"error: {e}")


def _run(command: str) -> int:
    if command == "train":
        spec = SourceSpec("input", _FORMAT.value, path=_PATH.value, split=_SPLIT.value, text_field=_TEXT_FIELD.value,
                          text_unit=_TEXT_UNIT.value, data_dir=_DATA_DIR.value)
        t = time.perf_counter()
        texts = training_texts([spec], _MAX_DOCS.value)
        print(f"read {len(texts)} documents ({sum(map(len, texts)) / 1e6:.1f} M characters) "
              f"in {time.perf_counter() - t:.1f}s; training a {_MODEL_TYPE.value} model of {_VOCAB.value} pieces")
        tok = train_sentencepiece(texts, vocab_size=_VOCAB.value, model_type=_MODEL_TYPE.value)
        tok.save(_OUTPUT.value)
        sample = "".join(texts[:100])
        ids = tok.encode(sample)
        assert tok.decode(ids) == sample, "round trip failed"
        print(f"wrote {_OUTPUT.value}: {tok.vocab_size} pieces, {len(sample.encode()) / max(len(ids), 1):.2f} "
              f"bytes/token on the first documents, exact round trip")
    else:
        if not _MODEL.value:
            raise app.UsageError("encode needs --model")
        tok = SentencePieceTokenizer.from_file(_MODEL.value)
        ids = tok.encode(_TEXT.value)
        print(ids)
        print([tok.id_to_piece(i) for i in ids])
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
