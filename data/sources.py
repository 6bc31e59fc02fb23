"""Data sources: every format becomes grain records with one interface.

A record is a dict
    {"text": str, "source": name, "file": path, "line": int, "fields": dict | None}
where `line` is 1-based (the line of a text/JSONL file, the row of a Parquet/Arrow file, the
index of an ArrayRecord/TFDS record) and `fields` holds every input field when asked for
(`keep_fields=True`, as the cleaning tool does). A source whose `schema` is a chat schema (SFT:
"auto", "messages", "prompt_completion", "alpaca"; see data/sft.py) gives
`"messages": [{"role", "content"}, ...]` instead of "text", read from the fields the schema
names; a record that is no chat is a bad record like any other. A preference schema
("preference", "implicit_prompt", "explicit_prompt"; see data/preferences.py) gives
`"pair": {"prompt", "chosen", "rejected", "render"}` the same way.

Formats (`SourceSpec.format`):
  text          files or directories (globs, comma-separated; `.gz` / `.zst` decompressed on the
                fly); a document is a whole file, a line, or a blank-line separated paragraph
  jsonl         one JSON object per line (`.gz` / `.zst` too); the text at `text_field` (dots
                reach nested keys: "meta.body")
  parquet       `text_field` column (nested struct fields with dots), read row group by row group
  hf            a Hugging Face `datasets` directory: `save_to_disk` Arrow files or Parquet shards
  array_record  records that are UTF-8 JSON objects (what `data.prepare` writes)
  tfds          `tfds.data_source(name, split, file_format="array_record")`, no TensorFlow
  embedded      the running Python's standard library (data/corpus.py)
  synthetic     `num_examples` examples of a data/synthetic.py `task` (seeded by `split`): records
                {"text": prompt + answer, "prompt", "completion": answer, "task"}, plus
                "chosen": answer and "rejected": a near miss under a preference schema

Held-out splits (`SourceSpec.heldout`, a `HeldOut`; `split_heldout(specs, ...)` makes both
sides): a deterministic share of a jsonl / parquet / hf / text (line or file units) source's
records, chosen by a hash of each record's index in the source (its files sorted, every line or
row counted), goes to the "eval" side and never to the "train" side. The choice depends only on
the files' unit counts, so it is the same in every process, data shard, worker and resumed run.

Streaming formats (text, jsonl, parquet, hf) never hold more than one file's current unit in
memory; their iterator state is (epoch, file, unit, byte offset), so a resumed run reopens the
file where it stopped. Random-access formats (array_record, tfds, embedded, synthetic) are grain
MapDatasets and can be shuffled globally.

Bad input (malformed JSON, bytes that are not UTF-8, a missing or non-string field, an empty
document, a truncated or corrupt `.gz` / `.zst` file, whose lines before the break are kept) is
skipped, counted and logged with file and line (the first few of each kind, then a
count at every power of ten); with `strict=True` the first one raises `DataError` naming file,
line and reason. A source that yields no document at all raises `EmptySourceError` instead of
spinning: when it has skipped `MAX_SKIPPED_WITHOUT_DOCUMENT` records without a document, or at
the end of an epoch without one when another epoch would follow.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import gzip
import io
import json
import logging
import os
import pathlib
import random
from typing import Any, Iterator, Sequence

import grain
import numpy as np

FORMATS = ("text", "jsonl", "parquet", "hf", "array_record", "tfds", "embedded", "synthetic")
STREAMING = ("text", "jsonl", "parquet", "hf")
TEXT_UNITS = ("file", "line", "paragraph")
CHAT_SCHEMAS = ("auto", "messages", "prompt_completion", "alpaca")  # records read as chats (data/sft.py)
# records read as chosen / rejected pairs (data/preferences.py)
PREFERENCE_SCHEMAS = ("preference", "implicit_prompt", "explicit_prompt")
SCHEMAS = ("text",) + CHAT_SCHEMAS + PREFERENCE_SCHEMAS
_EXTENSIONS = {
    "text": None,  # any file
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst"),
    "parquet": (".parquet",),
    "hf": (".arrow", ".parquet"),
    "array_record": (".array_record",),
}


# A source that has skipped this many records without yielding a single document is broken (a
# wrong format or text_field, a binary file): stop rather than read the rest of it.
MAX_SKIPPED_WITHOUT_DOCUMENT = 100_000


class DataError(ValueError):
    """A bad record, with where it is and why."""

    def __init__(self, file: str, line: int, reason: str):
        super().__init__(f"{file}:{line}: {reason}")
        self.file, self.line, self.reason = file, line, reason


class EmptySourceError(ValueError):
    """A source (or one data shard of it) with no usable document, which would otherwise spin forever."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    format: str
    path: str = ""  # globs (comma-separated), files or directories; tfds: the dataset name
    split: str = "train"  # embedded, tfds, hf (a `DatasetDict` subdirectory, if present)
    text_field: str = "text"  # jsonl / parquet / hf / array_record / tfds; dots reach nested keys
    text_unit: str = "file"  # text: "file" | "line" | "paragraph"
    weight: float = 1.0  # share of documents in a mixture
    data_dir: str = ""  # tfds data_dir
    validation_fraction: float = 0.02  # embedded
    strict: bool = False  # raise on the first bad record instead of skipping it
    # What a record is: "text" (the text at text_field; pretraining) or a chat for SFT, its shape
    # detected per record ("auto") or forced, read from these fields (dots reach nested keys):
    schema: str = "text"  # "text" | "auto" | "messages" | "prompt_completion" | "alpaca" | a PREFERENCE_SCHEMAS one
    messages_field: str = "messages"  # messages: a list of {"role", "content"}
    prompt_field: str = "prompt"  # prompt_completion: strings, or lists of messages
    completion_field: str = "completion"
    instruction_field: str = "instruction"  # alpaca: instruction (+ input, optional) -> output
    input_field: str = "input"
    output_field: str = "output"
    # preference pairs (data/preferences.py): prompt at prompt_field (explicit prompts only)
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    task: str = ""  # synthetic: a data/synthetic.py task name
    size: int = 0  # synthetic: the task's difficulty (digits / characters); 0 = its default
    num_examples: int = 10_000  # synthetic: examples per epoch
    heldout: "HeldOut | None" = None  # a held-out split: this spec reads its "train" or "eval" side

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"source {self.name!r}: format={self.format!r} is not valid; expected one of {FORMATS}")
        if self.text_unit not in TEXT_UNITS:
            raise ValueError(f"source {self.name!r}: text_unit={self.text_unit!r} is not valid; "
                             f"expected one of {TEXT_UNITS}")
        if self.weight <= 0:
            raise ValueError(f"source {self.name!r}: weight={self.weight} must be positive")
        if self.format not in ("embedded", "synthetic") and not self.path:
            raise ValueError(f"source {self.name!r}: format {self.format!r} needs a path")
        if self.schema not in SCHEMAS:
            raise ValueError(f"source {self.name!r}: schema={self.schema!r} is not valid; expected one of {SCHEMAS}")
        if self.schema != "text" and self.format in ("text", "embedded"):
            raise ValueError(f"source {self.name!r}: format {self.format!r} gives plain text, which holds no "
                             f"chat (schema={self.schema!r}); use jsonl, parquet, hf, array_record, tfds or synthetic")
        if self.format == "synthetic":
            from data import synthetic

            if self.task not in synthetic.TASKS:
                raise ValueError(f"source {self.name!r}: format 'synthetic' needs a task; task={self.task!r} is "
                                 f"not one of {tuple(synthetic.TASKS)}")
            if self.num_examples < 1 or self.size < 0:
                raise ValueError(f"source {self.name!r}: num_examples={self.num_examples} must be >= 1 and "
                                 f"size={self.size} >= 0")
        if self.heldout is not None and not can_hold_out(self):
            raise ValueError(f"source {self.name!r}: a held-out split reads jsonl, parquet, hf or text (line or "
                             f"file units) sources, not format {self.format!r}" +
                             (f" with text_unit={self.text_unit!r}" if self.format == "text" else "") +
                             "; give held-out sources of their own")

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "SourceSpec":
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"source {name!r}: unknown keys {unknown}; valid keys: {sorted(known)}")
        return cls(name=name, **{k: v for k, v in d.items() if v is not None})


# --------------------------------------------------------------------------------------------
# Bad records


class BadRecords:
    """Counts bad records per reason; logs the first few of each reason, then a count at every
    power of ten (a garbage file must not flood the log with millions of lines)."""

    MAX_EXAMPLES = 20

    def __init__(self, source: str, strict: bool):
        self.source, self.strict = source, strict
        self.counts: collections.Counter = collections.Counter()
        self.examples: list[str] = []  # "file:line: reason" of the first bad records this process saw

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def first(self) -> str | None:
        return self.examples[0] if self.examples else None

    def report(self, file: str, line: int, reason: str, kind: str) -> None:
        if self.strict:
            raise DataError(file, line, reason)
        self.counts[kind] += 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(f"{file}:{line}: {reason}")
        n = self.counts[kind]
        if n <= 5 or _is_power_of_ten(n):
            logging.warning("data source %r: skipped record %s:%d (%s)%s", self.source, file, line, reason,
                            f" [{n} {kind} so far]" if n > 5 else "")


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def no_documents_error(spec: SourceSpec, skipped: int, first: str | None, *, num_files: int | None = None,
                       where: str = "", why: str = "") -> EmptySourceError:
    """`source 'x' (path) yielded 0 documents; N records skipped (first: file:line: reason)`."""
    if first is not None:
        detail = f" (first: {first})"
    elif skipped == 0 and num_files is not None:
        detail = f" (its {num_files} file{' holds' if num_files == 1 else 's hold'} no records)"
    else:
        detail = ""
    return EmptySourceError(f"source {spec.name!r} ({spec.path or spec.format + ':' + spec.split}) yielded 0 "
                            f"documents{where}; {skipped} records skipped{detail}{why}")


def get_field(obj: Any, dotted: str):
    """obj["a"]["b"] for "a.b"; KeyError naming the missing part."""
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(part)
        obj = obj[part]
    return obj


def _text_of(obj: Any, spec: SourceSpec, file: str, line: int, bad: BadRecords) -> str | list[dict] | None:
    """The record's text, its chat messages for a chat schema, or its pair for a preference
    schema; None (reported to `bad`) if bad."""
    if spec.schema in PREFERENCE_SCHEMAS:
        from data.preferences import record_pair
        from data.sft import ChatRecordError

        try:
            return record_pair(obj, spec)
        except ChatRecordError as e:
            bad.report(file, line, str(e), e.kind)
            return None
    if spec.schema != "text":
        from data.sft import ChatRecordError, record_messages

        try:
            return record_messages(obj, spec)
        except ChatRecordError as e:
            bad.report(file, line, str(e), e.kind)
            return None
    try:
        value = get_field(obj, spec.text_field)
    except KeyError as e:
        bad.report(file, line, f"missing field {spec.text_field!r} (no {e.args[0]!r})", "missing_field")
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.report(file, line, f"field {spec.text_field!r} is not UTF-8 ({e.reason} at byte {e.start})",
                       "not_utf8")
            return None
    if not isinstance(value, str):
        bad.report(file, line, f"field {spec.text_field!r} is {type(value).__name__}, not a string", "not_string")
        return None
    if not value.strip():
        bad.report(file, line, "empty document", "empty")
        return None
    return value


def _record(value, spec, file, line, fields, keep_fields):
    key = "text" if isinstance(value, str) else "pair" if isinstance(value, dict) else "messages"
    return {key: value, "source": spec.name, "file": file, "line": line, "fields": fields if keep_fields else None}


# --------------------------------------------------------------------------------------------
# Files


def expand_paths(pattern: str, fmt: str) -> list[str]:
    """Sorted files matching comma-separated globs, files or directories (searched recursively)."""
    exts = _EXTENSIONS.get(fmt)
    out: set[str] = set()
    for part in (p.strip() for p in pattern.split(",") if p.strip()):
        for match in sorted(glob.glob(os.path.expanduser(part), recursive=True)) or []:
            p = pathlib.Path(match)
            if p.is_dir():
                files = [f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
                out.update(str(f) for f in files if exts is None or f.name.endswith(exts))
            elif p.is_file():
                out.add(str(p))
    if not out:
        raise FileNotFoundError(f"no {fmt} files match {pattern!r}")
    return sorted(out)


def open_binary(path: str):
    """A binary stream of the file's contents, decompressing .gz and .zst. A compressed file that
    ends inside its stream raises EOFError once everything before the cut has been read."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path))
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """Decompresses a .zst file of one or more frames (skippable ones included).

    zstandard's own stream reader ends quietly where a truncated file ends, so a cut file would
    pass for a shorter one; this one tracks the frame it is in and raises EOFError if the file
    ends inside it.
    """

    def __init__(self, path: str, chunk_bytes: int = 1 << 16):
        import zstandard

        self._file, self._chunk = open(path, "rb"), chunk_bytes
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # the current frame's decompressor; None between frames
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos >= len(self._out):
            data = self._file.read(self._chunk)
            if not data:
                if self._frame is not None:
                    raise EOFError("compressed file ended before the end of its zstd frame")
                return 0
            self._out, self._pos = self._decompress(data), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            data = b""
            if self._frame.eof:  # what follows the frame's end belongs to the next frame
                data, self._frame = self._frame.unused_data, None
        return b"".join(out)

    def close(self):
        self._file.close()
        super().close()


def _broken_stream_errors() -> tuple[type[Exception], ...]:
    """What reading a truncated or corrupt .gz / .zst file raises."""
    import zlib

    import zstandard

    return EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError


def _report_broken(path: str, line: int, error: Exception, bad: "BadRecords", *, by_line: bool = True) -> None:
    """A compressed file that breaks before line `line` is complete: counted as one bad record
    (what came before it is kept), or DataError with `strict`."""
    suffix = os.path.splitext(path)[1]
    where = f" after {line - 1} complete lines" if by_line else " inside the document"
    if isinstance(error, EOFError):
        bad.report(path, line, f"truncated {suffix} file: the compressed data ends{where} ({error})", "truncated_file")
    else:
        bad.report(path, line, f"corrupt {suffix} file{where} ({error})", "corrupt_file")


def _seekable(path: str) -> bool:
    return not path.endswith((".gz", ".zst"))


def _decode(raw: bytes, file: str, first_line: int, bad: BadRecords) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - raw.rfind(b"\n", 0, e.start) - 1
        bad.report(file, line, f"not UTF-8 ({e.reason} at byte {column} of the line)", "not_utf8")
        return None


def _iter_lines(path: str, start_unit: int, start_offset: int, bad: BadRecords):
    """(unit index, line number, raw line, offset after it) from `start_unit` (seek when possible).
    A truncated or corrupt compressed file ends at its last complete line and is reported to `bad`."""
    with open_binary(path) as f:
        unit = 0
        if start_offset > 0 and _seekable(path):
            f.seek(start_offset)
            unit = start_unit
        offset = start_offset if unit else 0
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except _broken_stream_errors() as e:
                _report_broken(path, unit + 1, e, bad)
                return
            offset += len(raw)
            if unit >= start_unit:
                yield unit, unit + 1, raw, offset
            unit += 1


def _text_units(path, spec, start_unit, start_offset, bad, keep_fields):
    """Yields (next unit, next offset, record or None) for a text file."""
    if spec.text_unit == "file":
        if start_unit > 0:
            return
        try:
            with open_binary(path) as f:
                raw = f.read()
        except _broken_stream_errors() as e:
            _report_broken(path, 1, e, bad, by_line=False)
            yield 1, -1, None
            return
        text = _decode(raw, path, 1, bad)
        if text is not None and not text.strip():
            bad.report(path, 1, "empty document", "empty")
            text = None
        yield 1, -1, None if text is None else _record(text, spec, path, 1, {"text": text}, keep_fields)
        return
    if spec.text_unit == "line":
        for unit, line, raw, offset in _iter_lines(path, start_unit, start_offset, bad):
            text = _decode(raw.rstrip(b"\r\n"), path, line, bad)
            if text is not None and not text.strip():
                text = None  # blank lines separate nothing here: not a bad record
            yield unit + 1, offset, None if text is None else _record(text, spec, path, line, {"text": text},
                                                                      keep_fields)
        return
    # paragraphs: a unit is a line; a record is emitted at the blank line (or EOF) that ends it
    buf, first, last_unit, last_offset = [], 0, start_unit, start_offset
    for unit, line, raw, offset in _iter_lines(path, start_unit, start_offset, bad):
        if raw.strip():
            if not buf:
                first = line
            buf.append(raw)
            continue
        last_unit, last_offset = unit + 1, offset
        if buf:
            rec = _paragraph(buf, first, path, spec, bad, keep_fields)
            buf = []
            yield last_unit, last_offset, rec
    if buf:
        yield 1 << 62, -1, _paragraph(buf, first, path, spec, bad, keep_fields)


def _paragraph(lines, first, path, spec, bad, keep_fields):
    text = _decode(b"".join(lines), path, first, bad)
    return None if text is None else _record(text.rstrip("\r\n"), spec, path, first, {"text": text}, keep_fields)


def _jsonl_units(path, spec, start_unit, start_offset, bad, keep_fields):
    for unit, line, raw, offset in _iter_lines(path, start_unit, start_offset, bad):
        rec = None
        if raw.strip():
            s = _decode(raw, path, line, bad)
            if s is not None:
                try:
                    obj = json.loads(s)
                except json.JSONDecodeError as e:
                    bad.report(path, line, f"malformed JSON ({e.msg} at column {e.colno})", "malformed_json")
                    obj = None
                if obj is not None and not isinstance(obj, dict):
                    bad.report(path, line, f"malformed JSON (a {type(obj).__name__}, not an object)", "malformed_json")
                    obj = None
                if obj is not None:
                    text = _text_of(obj, spec, path, line, bad)
                    if text is not None:
                        rec = _record(text, spec, path, line, obj, keep_fields)
        yield unit + 1, offset, rec


def _table_rows(path, spec, start_unit, bad, keep_fields):
    """Parquet or Arrow IPC rows from row `start_unit`, one record batch in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    top = spec.text_field.split(".")[0] if spec.schema == "text" else None  # chats may use any columns
    if path.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        if top is not None and top not in pf.schema_arrow.names:
            raise DataError(path, 0, f"no column {top!r}; columns: {pf.schema_arrow.names}")
        columns = None if keep_fields or top is None else [top]
        row = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n <= start_unit:
                row += n
                continue
            for batch in pf.iter_batches(row_groups=[g], columns=columns, batch_size=4096):
                yield from _batch_rows(batch.to_pylist(), row, start_unit, path, spec, bad, keep_fields)
                row += batch.num_rows
        return
    with pa.memory_map(path) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        row = 0
        for batch in batches:
            if row + batch.num_rows <= start_unit:
                row += batch.num_rows
                continue
            if top is not None and top not in batch.schema.names:
                raise DataError(path, 0, f"no column {top!r}; columns: {batch.schema.names}")
            yield from _batch_rows(batch.to_pylist(), row, start_unit, path, spec, bad, keep_fields)
            row += batch.num_rows


def _batch_rows(rows, row0, start_unit, path, spec, bad, keep_fields):
    for i, obj in enumerate(rows):
        unit = row0 + i
        if unit < start_unit:
            continue
        text = _text_of(obj, spec, path, unit + 1, bad)
        yield unit + 1, -1, None if text is None else _record(text, spec, path, unit + 1, obj, keep_fields)


def _units(path, spec, start_unit, start_offset, bad, keep_fields):
    if spec.format == "text":
        return _text_units(path, spec, start_unit, start_offset, bad, keep_fields)
    if spec.format == "jsonl":
        return _jsonl_units(path, spec, start_unit, start_offset, bad, keep_fields)
    return _table_rows(path, spec, start_unit, bad, keep_fields)


# --------------------------------------------------------------------------------------------
# Held-out splits

HELDOUT_SIDES = ("train", "eval")
_GOLDEN = 0x9E3779B97F4A7C15


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """One side of a source's held-out split. The split holds out k of the source's N units (the
    lines of jsonl / text files, the rows of Parquet / Arrow files, or the files of a text source
    read whole): k = round(fraction * N), at least `min_records`, at most `max_records`, and never
    more than N // 2; the k units whose indices (files in sorted order, units counted from the first
    file's first) hash lowest under `seed`. Blank lines and bad records are units too (they just
    give no record on either side)."""

    side: str  # "train": every record but the held-out ones | "eval": the held-out ones only
    fraction: float = 0.02
    min_records: int = 16
    max_records: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.side not in HELDOUT_SIDES:
            raise ValueError(f"held-out side={self.side!r} is not valid; expected one of {HELDOUT_SIDES}")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"the held-out fraction {self.fraction} must be in (0, 1)")
        if not 0 <= self.min_records <= self.max_records:
            raise ValueError(f"held-out counts min={self.min_records}, max={self.max_records}: need 0 <= min <= max")

    def count(self, n: int) -> int:
        """Units held out of a source of `n`."""
        return min(max(round(self.fraction * n), self.min_records), self.max_records, n // 2)


def can_hold_out(spec: SourceSpec) -> bool:
    """Whether a source's records can be split by `HeldOut` (streaming files with countable units)."""
    return spec.format in ("jsonl", "parquet", "hf") or (spec.format == "text" and spec.text_unit in ("line", "file"))


def split_heldout(specs: Sequence[SourceSpec], *, fraction: float, min_records: int = 16, max_records: int = 1000,
                  seed: int = 0) -> tuple[list[SourceSpec], list[SourceSpec]]:
    """(train specs, eval specs): each source's two sides of its held-out split (see `HeldOut`)."""
    train, held = [], []
    for s in specs:
        if not can_hold_out(s):
            raise ValueError(f"source {s.name!r} (format {s.format!r}) cannot be split into training and held-out "
                             "records (jsonl, parquet, hf and text sources can): give held-out sources of its own")
        h = HeldOut("train", fraction, min_records, max_records, seed)
        train.append(dataclasses.replace(s, heldout=h))
        held.append(dataclasses.replace(s, heldout=dataclasses.replace(h, side="eval")))
    return train, held


def count_units(path: str, spec: SourceSpec) -> int:
    """Units of one file, as records' `line` numbers count them: lines (jsonl, text by line), rows
    (Parquet, Arrow), or 1 (text read whole). A truncated compressed file counts what is readable."""
    if spec.format == "text" and spec.text_unit == "file":
        return 1
    if spec.format in ("jsonl", "text"):
        n, last = 0, b"\n"
        try:
            with open_binary(path) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    n, last = n + chunk.count(b"\n"), chunk[-1:]
        except _broken_stream_errors():
            pass
        return n + (last != b"\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return pq.ParquetFile(path).metadata.num_rows
    with pa.memory_map(path) as source:
        try:
            return sum(b.num_rows for b in pa.ipc.open_stream(source))
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).count_rows()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of uint64, so no two indices tie)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def heldout_indices(n: int, k: int, seed: int = 0, chunk: int = 1 << 20) -> np.ndarray:
    """The k of range(n) whose hashes under `seed` are lowest, sorted (O(chunk + k) memory)."""
    offset = np.uint64((seed * _GOLDEN + _GOLDEN) % (1 << 64))
    best_h, best_i = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    if k <= 0:
        return best_i
    for a in range(0, n, chunk):
        i = np.arange(a, min(n, a + chunk), dtype=np.int64)
        h = np.concatenate([best_h, _mix64(i.astype(np.uint64) + offset)])
        i = np.concatenate([best_i, i])
        if len(h) > k:
            keep = np.argpartition(h, k - 1)[:k]
            h, i = h[keep], i[keep]
        best_h, best_i = h, i
    return np.sort(best_i)


@functools.lru_cache(maxsize=32)
def _heldout_units(name: str, files: tuple[str, ...], stamps: tuple, fmt: str, text_unit: str, counts: tuple):
    spec = SourceSpec(name, fmt, path=files[0], text_unit=text_unit)
    sizes = [count_units(f, spec) for f in files]
    total = sum(sizes)
    fraction, min_records, max_records, seed = counts
    held = heldout_indices(total, HeldOut("eval", fraction, min_records, max_records).count(total), seed)
    starts = np.cumsum([0] + sizes)
    lines = {}
    for j, f in enumerate(files):
        mine = held[(held >= starts[j]) & (held < starts[j + 1])]
        if len(mine):
            lines[f] = frozenset(int(u - starts[j]) + 1 for u in mine)
    logging.info("source %r: %d of its %d records (lines / rows) held out (fraction %g, at least %d, at most %d, "
                 "at most half)", name, len(held), total, fraction, min_records, max_records)
    return lines, dict(zip(files, sizes)), len(held), total


def heldout_lines(spec: SourceSpec, files: Sequence[str]) -> tuple[dict[str, frozenset[int]], dict[str, int]]:
    """({file: the held-out `line` numbers in it}, {file: its units}) of `spec.heldout`'s split of
    `files`; computed once per process for the same files (their sizes and times are part of the key)."""
    h = spec.heldout
    stamps = tuple((os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
    lines, sizes, k, total = _heldout_units(spec.name, tuple(files), stamps, spec.format, spec.text_unit,
                                            (h.fraction, h.min_records, h.max_records, h.seed))
    if k == 0 and h.side == "eval":
        raise EmptySourceError(f"source {spec.name!r} ({spec.path}) has {total} records: too few to hold any out")
    return lines, sizes


# --------------------------------------------------------------------------------------------
# Streaming sources as grain IterDatasets


class StreamingSource(grain.IterDataset):
    """Records of text / JSONL / Parquet / Arrow files, for one shard, with resumable state.

    Sharding: with at least as many files as shards, shard k reads files k, k+n, ...; otherwise
    every shard reads every file and keeps records k, k+n, ... Worker processes (grain's
    `mp_prefetch`) subdivide a shard the same way (`set_slice`). `num_epochs=None` repeats
    forever; each epoch visits the files in a fresh seeded order when `shuffle_files`. With
    `spec.heldout` only the files holding records of its side are read, and records of the other
    side are passed over before sharding (so shards split the side's records evenly).
    """

    def __init__(self, spec: SourceSpec, *, shard_index: int = 0, shard_count: int = 1,
                 num_epochs: int | None = 1, seed: int = 0, shuffle_files: bool = False, keep_fields: bool = False,
                 files: Sequence[str] | None = None):
        super().__init__()
        if spec.format not in STREAMING:
            raise ValueError(f"StreamingSource reads {STREAMING}, not {spec.format!r}")
        self.spec = spec
        self.files = list(files) if files is not None else _source_files(spec)
        self.heldout, self.eval_side = None, False  # {file: held-out line numbers}, and which side is read
        if spec.heldout is not None:
            self.heldout, units = heldout_lines(spec, self.files)
            self.eval_side = spec.heldout.side == "eval"
            self.files = [f for f in self.files
                          if (f in self.heldout if self.eval_side else len(self.heldout.get(f, ())) < units[f])]
        self.shard_index, self.shard_count = shard_index, shard_count
        self.num_epochs, self.seed, self.shuffle_files, self.keep_fields = num_epochs, seed, shuffle_files, keep_fields

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain worker slicing: worker i of w reads items i, i+w, ... of this shard."""
        start, step = sl.start or 0, sl.step or 1
        self.shard_index = self.shard_index + self.shard_count * start
        self.shard_count = self.shard_count * step

    def __iter__(self):
        return _StreamingIterator(self)

    def __str__(self):
        return f"StreamingSource({self.spec.name!r}, {len(self.files)} files, shard {self.shard_index}/{self.shard_count})"


def _source_files(spec: SourceSpec) -> list[str]:
    if spec.format == "hf":
        root = pathlib.Path(spec.path)
        if root.is_dir() and (root / spec.split).is_dir() and not list(root.glob("*.arrow")):
            root = root / spec.split  # a DatasetDict saved to disk: <dir>/<split>/data-*.arrow
        files = expand_paths(str(root), "hf")
        arrow = [f for f in files if f.endswith(".arrow")]
        return arrow or files
    return expand_paths(spec.path, spec.format)


class _StreamingIterator(grain.DatasetIterator):
    def __init__(self, ds: StreamingSource):
        super().__init__()
        self.ds = ds
        self.bad = BadRecords(ds.spec.name, ds.spec.strict)
        self._file_level = len(ds.files) >= ds.shard_count
        self.epoch, self.file_pos, self.unit, self.offset, self.counter = 0, 0, 0, 0, 0
        self._gen = None
        self._order = self._epoch_files(0)
        # Documents seen (before record-level sharding) in this epoch and since this iterator was
        # made; a restored iterator has seen only part of its epoch, so it cannot call one empty.
        self._epoch_documents, self._documents, self._whole_epoch, self._restored = 0, 0, True, False
        self._empty_files: set[str] = set()  # files read whole in an epoch that gave no document

    def _shard_files(self) -> list[str]:
        """Every file an epoch may give this shard: a shuffled file-level shard gets new ones each epoch."""
        return self.ds.files if self._file_level and self.ds.shuffle_files else self._order

    def _epoch_files(self, epoch: int) -> list[str]:
        files = list(self.ds.files)
        if self.ds.shuffle_files:
            random.Random(self.ds.seed * 1_000_003 + epoch).shuffle(files)
        if self._file_level:
            files = files[self.ds.shard_index::self.ds.shard_count]
        return files

    def __next__(self):
        while True:
            if self._gen is None:
                if self.file_pos >= len(self._order):
                    self.epoch += 1
                    if self.ds.num_epochs is not None and self.epoch >= self.ds.num_epochs:
                        raise StopIteration
                    if self._whole_epoch and self._order and not self._epoch_documents:
                        self._empty_files.update(self._order)
                        if self._empty_files.issuperset(self._shard_files()):
                            raise self.no_documents_error()  # every later epoch would be as empty
                    self._order, self.file_pos, self.unit, self.offset = self._epoch_files(self.epoch), 0, 0, 0
                    self._epoch_documents, self._whole_epoch = 0, True
                    if not self._order:
                        raise StopIteration
                    continue
                self._gen = _units(self._order[self.file_pos], self.ds.spec, self.unit, self.offset, self.bad,
                                   self.ds.keep_fields)
            try:
                unit, offset, rec = next(self._gen)
            except StopIteration:
                self._gen, self.file_pos, self.unit, self.offset = None, self.file_pos + 1, 0, 0
                continue
            self.unit, self.offset = unit, offset if offset >= 0 else 0
            if rec is None:
                if not self._documents and not self._restored and self.bad.total >= MAX_SKIPPED_WITHOUT_DOCUMENT:
                    raise self.no_documents_error(
                        why=f"; stopped after {MAX_SKIPPED_WITHOUT_DOCUMENT} bad records without a document")
                continue
            held = self.ds.heldout
            if held is not None and (rec["line"] in held.get(rec["file"], ())) != self.ds.eval_side:
                continue  # the other side of the held-out split
            self._epoch_documents += 1
            self._documents += 1
            if not self._file_level:
                mine = self.counter % self.ds.shard_count == self.ds.shard_index
                self.counter += 1
                if not mine:
                    continue
            return rec

    def get_state(self):
        return {"epoch": self.epoch, "file_pos": self.file_pos, "unit": self.unit, "offset": self.offset,
                "counter": self.counter, "bad": dict(self.bad.counts)}

    def set_state(self, state):
        self.epoch, self.file_pos = int(state["epoch"]), int(state["file_pos"])
        self.unit, self.offset, self.counter = int(state["unit"]), int(state["offset"]), int(state["counter"])
        self.bad.counts = collections.Counter(state.get("bad", {}))
        self._order = self._epoch_files(self.epoch)
        self._gen = None
        self._epoch_documents, self._documents, self._whole_epoch, self._restored = 0, 0, False, True

    def no_documents_error(self, why: str = "") -> EmptySourceError:
        files = self._shard_files()
        where = ""
        if len(files) < len(self.ds.files):
            names = ", ".join(os.path.basename(f) for f in files[:5]) + (", ..." if len(files) > 5 else "")
            where = f" in data shard {self.ds.shard_index}/{self.ds.shard_count} (its files: {names})"
        return no_documents_error(self.ds.spec, self.bad.total, self.bad.first, num_files=len(files), where=where,
                                  why=why)


# --------------------------------------------------------------------------------------------
# Random-access sources as grain MapDatasets


class _ParseJsonRecord:
    """ArrayRecord bytes (a UTF-8 JSON object) -> record, or None for a bad record."""

    def __init__(self, spec: SourceSpec, file: str, size: int, keep_fields: bool, bad: BadRecords):
        self.spec, self.file, self.size, self.keep_fields, self.bad = spec, file, size, keep_fields, bad

    def __call__(self, index: int, raw: bytes):
        line = index % self.size + 1  # grain passes epoch-extended indices after repeat
        text = _decode(raw, self.file, line, self.bad)
        if text is None:
            return None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            self.bad.report(self.file, line, f"malformed JSON ({e.msg} at column {e.colno})", "malformed_json")
            return None
        if not isinstance(obj, dict):
            self.bad.report(self.file, line, f"malformed JSON (a {type(obj).__name__}, not an object)",
                            "malformed_json")
            return None
        value = _text_of(obj, self.spec, self.file, line, self.bad)
        return None if value is None else _record(value, self.spec, self.file, line, obj, self.keep_fields)


class _TfdsRecord:
    def __init__(self, spec: SourceSpec, size: int, keep_fields: bool, bad: BadRecords):
        self.spec, self.size, self.keep_fields, self.bad = spec, size, keep_fields, bad
        self.file = f"tfds:{spec.path}/{spec.split}"

    def __call__(self, index: int, example):
        index %= self.size  # grain passes epoch-extended indices after repeat
        value = _text_of(example, self.spec, self.file, index + 1, self.bad)
        if value is None:
            return None
        fields = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in example.items()} \
            if self.keep_fields else None
        return _record(value, self.spec, self.file, index + 1, fields, self.keep_fields)


class _EmbeddedRecord:
    def __init__(self, spec: SourceSpec, paths: Sequence[str], keep_fields: bool):
        self.spec, self.paths, self.keep_fields = spec, list(paths), keep_fields

    def __call__(self, index: int, text: str):
        path = self.paths[index % len(self.paths)]  # grain passes epoch-extended indices after repeat
        return _record(text, self.spec, path, 1, {"text": text, "path": path}, self.keep_fields)


class _SyntheticRecord:
    def __init__(self, spec: SourceSpec, size: int, keep_fields: bool, bad: BadRecords):
        self.spec, self.size, self.keep_fields, self.bad = spec, size, keep_fields, bad
        self.file = f"synthetic:{spec.task}/{spec.split}"

    def __call__(self, index: int, example: dict):
        line = index % self.size + 1  # grain passes epoch-extended indices after repeat
        obj = {"text": example["prompt"] + example["answer"], "prompt": example["prompt"],
               "completion": example["answer"], "task": self.spec.task}
        if self.spec.schema in PREFERENCE_SCHEMAS:  # a pair: the right answer over a near miss
            from data import synthetic

            obj.update(chosen=example["answer"],
                       rejected=synthetic.distractor(self.spec.task, example["answer"], f"{self.spec.split}:{line}"))
        value = _text_of(obj, self.spec, self.file, line, self.bad)
        return None if value is None else _record(value, self.spec, self.file, line, obj, self.keep_fields)


def synthetic_seed(split: str) -> int:
    """The example seed of a synthetic source's split: a stable hash of its name."""
    import zlib

    return zlib.crc32(split.encode())


def random_access_source(spec: SourceSpec, *, keep_fields: bool = False,
                         bad: BadRecords | None = None) -> grain.MapDataset:
    """A MapDataset of records (None where a record is bad) for array_record / tfds / embedded / synthetic;
    bad records are counted in `bad`."""
    bad = bad if bad is not None else BadRecords(spec.name, spec.strict)
    if spec.format == "embedded":
        from data import corpus

        c = corpus.load(spec.split, validation_fraction=spec.validation_fraction)
        return grain.MapDataset.source(list(c.texts)).map_with_index(_EmbeddedRecord(spec, c.paths, keep_fields))
    if spec.format == "synthetic":
        from data import synthetic

        examples = synthetic.get(spec.task).examples(spec.num_examples, seed=synthetic_seed(spec.split), size=spec.size)
        return grain.MapDataset.source(examples).map_with_index(_SyntheticRecord(spec, len(examples), keep_fields, bad))
    if spec.format == "array_record":
        files = expand_paths(spec.path, "array_record")
        parts = []
        for f in files:
            src = grain.sources.ArrayRecordDataSource([f])
            parse = _ParseJsonRecord(spec, f, len(src), keep_fields, bad)
            parts.append(grain.MapDataset.source(src).map_with_index(parse))
        return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    if spec.format == "tfds":
        import tensorflow_datasets as tfds

        src = tfds.data_source(spec.path, split=spec.split, data_dir=spec.data_dir or None,
                               builder_kwargs={"file_format": "array_record"})
        return grain.MapDataset.source(src).map_with_index(_TfdsRecord(spec, len(src), keep_fields, bad))
    raise ValueError(f"format {spec.format!r} is streaming; use StreamingSource")


def source_dataset(spec: SourceSpec, *, shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = 1,
                   seed: int = 0, shuffle: bool = False, keep_fields: bool = False) -> grain.IterDataset:
    """Records of one source for one shard, as an IterDataset (bad records already skipped).

    Random-access sources are sharded by record index and, with `shuffle`, shuffled globally
    with a fresh order every epoch; streaming sources shard by file (or record) and shuffle their
    file order per epoch.
    """
    if spec.format in STREAMING:
        return StreamingSource(spec, shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
                               seed=seed, shuffle_files=shuffle, keep_fields=keep_fields)
    bad = BadRecords(spec.name, spec.strict)
    ds = random_access_source(spec, keep_fields=keep_fields, bad=bad)
    if len(ds) < shard_count:
        raise ValueError(f"source {spec.name!r} has {len(ds)} records, fewer than the {shard_count} shards")
    ds = ds[shard_index::shard_count]
    epoch = len(ds)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return _SkipBadRecords(ds.to_iter_dataset(allow_nones=True), spec, bad, epoch, repeats=num_epochs != 1)


class _SkipBadRecords(grain.IterDataset):
    """Drops the None (bad) records of a random-access source, and raises `EmptySourceError` where
    a repeated source has no document at all (grain's filter would spin forever)."""

    def __init__(self, parent: grain.IterDataset, spec: SourceSpec, bad: BadRecords, epoch: int, repeats: bool):
        super().__init__(parent)
        self.spec, self.bad, self.epoch, self.repeats = spec, bad, epoch, repeats

    def __iter__(self):
        return _SkipBadIterator(self._parent.__iter__(), self)


class _SkipBadIterator(grain.DatasetIterator):
    # Stateless beyond its parent (checkpoints keep their shape): a restored iterator waits for
    # two epochs' worth of bad records, which no source with a document can produce in a row
    # (shuffled epochs put any one record at most 2 * epoch - 2 records apart).
    def __init__(self, parent, ds: _SkipBadRecords):
        super().__init__(parent)
        self.ds, self.bad = ds, ds.bad
        self.documents, self.skipped, self.restored = 0, 0, False

    def __next__(self):
        while True:
            rec = next(self._parent)
            if rec is not None:
                self.documents += 1
                self.skipped = 0
                return rec
            self.skipped += 1
            fresh = not self.documents and not self.restored
            if fresh and self.skipped >= MAX_SKIPPED_WITHOUT_DOCUMENT:
                raise self.no_documents_error(
                    why=f"; stopped after {MAX_SKIPPED_WITHOUT_DOCUMENT} bad records without a document")
            if self.ds.repeats and self.skipped >= (1 if fresh else 2) * self.ds.epoch:
                raise self.no_documents_error()

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)
        self.skipped, self.restored = 0, True

    def no_documents_error(self, why: str = "") -> EmptySourceError:
        # records read ahead by grain's threads are counted in `bad`, so count the consumed ones
        return no_documents_error(self.ds.spec, self.skipped, self.bad.first, why=why)


def read_all(spec: SourceSpec, **kw) -> Iterator[dict]:
    """Every record of a source once (convenience for tools and tests)."""
    return iter(source_dataset(spec, num_epochs=1, **kw))


def check_paths(specs: list[SourceSpec]) -> None:
    """FileNotFoundError naming the source when a file-based source's path matches no file (before
    a program writes anything, rather than deep inside a reader)."""
    for spec in specs:
        if spec.format in ("embedded", "tfds", "synthetic"):
            continue
        try:
            _source_files(spec)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"source {spec.name!r}: {e}") from None


def specs_from_config(sources) -> list[SourceSpec]:
    """SourceSpecs from a config mapping {name: {format, path, ...}} (ConfigDict or dict)."""
    items = sources.items() if hasattr(sources, "items") else sources
    specs = [SourceSpec.from_dict(name, dict(v.to_dict() if hasattr(v, "to_dict") else v)) for name, v in items]
    if not specs:
        raise ValueError("no data sources configured")
    return specs
