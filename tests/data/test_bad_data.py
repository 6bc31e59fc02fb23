"""Bad data gets a clear error, fast: sources with no usable document, truncated compressed files,
and what the cleaning tool leaves behind when it fails."""

import gzip
import json
import logging
import threading

import numpy as np
import pytest

from data import pipeline
from data.sources import SourceSpec, read_all


class CharTokenizer:
    """One id per character (the pipeline needs only encode and the special ids)."""

    vocab_size, pad_id, bos_id, eos_id = 300, 0, 1, 2

    def encode(self, text):
        return [3 + ord(c) % 290 for c in text]


def _call_or_hang(fn, timeout=120):
    """fn()'s result or exception; fails (instead of hanging the suite) if it is still running after
    `timeout` seconds (a hang guard, not a speed requirement: a fixed program returns at once)."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"still running after {timeout}s: the pipeline hangs")
    if "error" in out:
        raise out["error"]
    return out["value"]


def _first_batch(specs, **kw):
    return _call_or_hang(lambda: next(iter(pipeline.source_batches(specs, CharTokenizer(), seq_len=16, batch_size=2,
                                                                    **kw))))


def _garbage_lines(rng, n):
    """n lines of random bytes (no newlines inside), each starting with 0xff, which UTF-8 never uses."""
    return b"".join(b"\xff" + bytes(rng.integers(128, 256, rng.integers(0, 40)).astype(np.uint8)) + b"\n"
                    for _ in range(n))


# ---------------------------------------------------------------------------------------------
# A source with no usable document (issue 18, items 7 and 8)

def test_all_bad_jsonl_source_stops_with_the_first_bad_record(tmp_path):
    rng = np.random.default_rng(11)
    p = tmp_path / "garbage.jsonl"
    p.write_bytes(_garbage_lines(rng, 57))
    with pytest.raises(ValueError, match=rf"^source 'web' \({p}\) yielded 0 documents; 57 records skipped "
                                         rf"\(first: {p}:1: not UTF-8"):
        _first_batch([SourceSpec("web", "jsonl", path=str(p))])


def test_empty_file_stops_instead_of_spinning(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^source 'e' \({p}\) yielded 0 documents; 0 records skipped "
                                         r"\(its 1 file holds no records\)"):
        _first_batch([SourceSpec("e", "jsonl", path=str(p))])


def test_one_empty_source_in_a_mixture_is_named(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(9)))  # wrong field
    specs = [SourceSpec("good", "jsonl", path=str(good)), SourceSpec("bad", "jsonl", path=str(bad))]
    with pytest.raises(ValueError, match=rf"source 'bad' \({bad}\) yielded 0 documents; 9 records skipped "
                                         rf"\(first: {bad}:1: missing field 'text'"):
        _call_or_hang(lambda: [b for _, b in zip(range(50), pipeline.source_batches(
            specs, CharTokenizer(), seq_len=16, batch_size=2))])


def test_all_bad_array_record_source_stops(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    p = tmp_path / "x.array_record"
    w = ArrayRecordWriter(str(p), "group_size:1")
    for i in range(7):
        w.write(json.dumps({"id": i, "body": "no text field"}).encode())
    w.close()
    with pytest.raises(ValueError, match=rf"^source 'ar' \({p}\) yielded 0 documents; 7 records skipped "
                                         rf"\(first: {p}:\d: missing field 'text'"):
        _first_batch([SourceSpec("ar", "array_record", path=str(p))])


def test_a_huge_bad_source_stops_within_a_bounded_number_of_records(tmp_path):
    from data.sources import MAX_SKIPPED_WITHOUT_DOCUMENT

    n = MAX_SKIPPED_WITHOUT_DOCUMENT + 5000
    p = tmp_path / "big.jsonl"
    p.write_bytes(b'{"no": "text"}\n' * n + json.dumps({"text": "a real document at the very end"}).encode() + b"\n")
    with pytest.raises(ValueError, match=rf"yielded 0 documents; {MAX_SKIPPED_WITHOUT_DOCUMENT} records skipped"):
        _call_or_hang(lambda: list(read_all(SourceSpec("big", "jsonl", path=str(p)))))


def test_a_data_shard_whose_files_hold_no_documents_is_named(tmp_path):
    for name, n in (("a", 3), ("b", 0), ("c", 2), ("d", 0)):  # unshuffled, shard 1 of 2 reads b and d
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(n)))
    spec = SourceSpec("s", "jsonl", path=str(tmp_path / "*.jsonl"))
    assert _first_batch([spec], shard_index=0, shard_count=2, shuffle=False)["inputs_BT"].shape == (2, 16)
    with pytest.raises(ValueError, match=r"source 's' .* yielded 0 documents in data shard 1/2 \(its files: "
                                         r"b.jsonl, d.jsonl\); 0 records skipped \(its 2 files hold no records\)"):
        _first_batch([spec], shard_index=1, shard_count=2, shuffle=False)
    # shuffled, each epoch deals the files afresh: the shard gets documents in a later epoch
    assert _first_batch([spec], shard_index=1, shard_count=2, shuffle=True)["inputs_BT"].shape == (2, 16)
    # fewer documents than shards: records are dealt round-robin across epochs, so every shard gets some
    one = tmp_path / "one" / "x.jsonl"
    one.parent.mkdir()
    one.write_text(json.dumps({"text": "the only document"}) + "\n")
    assert _first_batch([SourceSpec("o", "jsonl", path=str(one))], shard_index=3, shard_count=4)["inputs_BT"].shape \
        == (2, 16)


def test_sources_with_some_bad_records_keep_working_and_finite_reads_end_quietly(tmp_path):
    rng = np.random.default_rng(12)
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(_garbage_lines(rng, 30) + json.dumps({"text": "the only document"}).encode() + b"\n")
    spec = SourceSpec("m", "jsonl", path=str(p))
    docs = _call_or_hang(lambda: [d for _, d in zip(range(5), pipeline.mixture_docs([spec], CharTokenizer()))])
    assert len(docs) == 5  # the same document, epoch after epoch
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert list(read_all(SourceSpec("e", "jsonl", path=str(tmp_path / "empty.jsonl")))) == []


def test_skip_warnings_are_rate_limited(tmp_path, caplog):
    rng = np.random.default_rng(13)
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(_garbage_lines(rng, 3000) + json.dumps({"text": "ok"}).encode() + b"\n")
    with caplog.at_level(logging.WARNING):
        assert [r["text"] for r in read_all(SourceSpec("m", "jsonl", path=str(p)))] == ["ok"]
    lines = [r.getMessage() for r in caplog.records if "skipped record" in r.getMessage()]
    bad_lines = sum(1 for line in p.read_bytes().splitlines()[:-1])
    assert bad_lines == 3000
    assert 5 <= len(lines) <= 12, lines  # the first few, then a count at 10, 100, 1000
    assert f"{p}:1 " in lines[0] and "[1000 not_utf8 so far]" in lines[-1]


def test_tokenizer_training_on_a_source_with_no_documents_names_it(tmp_path, monkeypatch):
    from data.tokenizer import from_config

    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(14)
    p = tmp_path / "garbage.txt"
    p.write_bytes(_garbage_lines(rng, 20))
    cfg = {"kind": "sentencepiece", "path": None, "vocab_size": 300, "model_type": "bpe", "train_documents": 100}
    with pytest.raises(ValueError, match=rf"^source 'raw' \({p}\) yielded 0 documents; 20 records skipped "
                                         rf"\(first: {p}:1: not UTF-8"):
        from_config(cfg, [SourceSpec("raw", "text", path=str(p), text_unit="line")])
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"source 'e' .* yielded 0 documents; 0 records skipped"):
        from_config(cfg, [SourceSpec("e", "jsonl", path=str(tmp_path / "empty.jsonl"))])


def test_tokenizer_cli_on_an_empty_source_prints_one_line(tmp_path):
    from tests.helpers import run_program

    (tmp_path / "empty.jsonl").write_bytes(b"")
    proc = run_program("data.tokenizer", "train", "--format=jsonl", f"--path={tmp_path / 'empty.jsonl'}",
                       "--vocab_size=300", f"--output={tmp_path / 't.model'}", check=False, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: source 'input'")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "t.model").exists()


# ---------------------------------------------------------------------------------------------
# Truncated compressed files (issue 18, item 9)

def _compress(data: bytes, kind: str) -> bytes:
    if kind == "gz":
        return gzip.compress(data)
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _recoverable(truncated: bytes, kind: str) -> bytes:
    """What the bytes of a truncated file decompress to (one-shot decompressors, no stream readers)."""
    import zlib

    if kind == "gz":
        return zlib.decompressobj(wbits=31).decompress(truncated)
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(truncated)


def _jsonl_docs(rng, n):
    words = ["alpha", "beta", "gamma", "delta", "é", "漢字"]
    return [" ".join(rng.choice(words, rng.integers(20, 200))) + f" #{i}" for i in range(n)]


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_compressed_jsonl_keeps_what_was_read_and_counts_the_file(tmp_path, kind):
    rng = np.random.default_rng(21 if kind == "gz" else 22)
    docs = _jsonl_docs(rng, 1500)
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    packed = _compress(data, kind)
    cut = int(len(packed) * rng.uniform(0.4, 0.8))
    p = tmp_path / f"x.jsonl.{kind}"
    p.write_bytes(packed[:cut])
    complete = _recoverable(packed[:cut], kind).count(b"\n")
    assert 0 < complete < len(docs)
    it = iter(read_all(SourceSpec("z", "jsonl", path=str(p))))
    assert [r["text"] for r in it] == docs[:complete]
    assert it.get_state()["bad"] == {"truncated_file": 1}
    from data.sources import DataError

    with pytest.raises(DataError, match=rf"^{p}:{complete + 1}: truncated .{kind} file: the compressed data ends "
                                        rf"after {complete} complete lines"):
        list(read_all(SourceSpec("z", "jsonl", path=str(p), strict=True)))


def test_truncated_compressed_text_files(tmp_path):
    rng = np.random.default_rng(23)
    docs = _jsonl_docs(rng, 300)
    whole = "\n".join(docs).encode()
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(whole))
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(whole)[:-100])  # a whole-file document, cut
    it = iter(read_all(SourceSpec("t", "text", path=str(tmp_path / "*.gz"))))
    assert [r["text"] for r in it] == [whole.decode()]
    assert it.get_state()["bad"] == {"truncated_file": 1}
    from data.sources import DataError

    with pytest.raises(DataError, match=rf"{tmp_path / 'b.txt.gz'}:1: truncated .gz file"):
        list(read_all(SourceSpec("t", "text", path=str(tmp_path / "*.gz"), strict=True)))


def test_multi_frame_zst_reads_whole_and_truncation_in_a_later_frame_is_found(tmp_path):
    import struct

    import zstandard

    rng = np.random.default_rng(24)
    docs = _jsonl_docs(rng, 600)
    parts = ["".join(json.dumps({"text": d}) + "\n" for d in docs[i:i + 200]).encode() for i in (0, 200, 400)]
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"meta"  # pzstd-style metadata frame
    frames = [skippable + zstandard.ZstdCompressor(level=3).compress(p) for p in parts]
    (tmp_path / "whole.jsonl.zst").write_bytes(b"".join(frames))
    it = iter(read_all(SourceSpec("w", "jsonl", path=str(tmp_path / "whole.jsonl.zst"))))
    assert [r["text"] for r in it] == docs and it.get_state()["bad"] == {}
    (tmp_path / "cut.jsonl.zst").write_bytes(b"".join(frames)[:-(len(frames[2]) // 2)])
    it = iter(read_all(SourceSpec("c", "jsonl", path=str(tmp_path / "cut.jsonl.zst"))))
    got = [r["text"] for r in it]
    assert 400 <= len(got) < 600 and got == docs[:len(got)]
    assert it.get_state()["bad"] == {"truncated_file": 1}


def test_corrupt_gzip_is_named_not_a_bare_error(tmp_path):
    docs = [f"doc {i}" for i in range(50)]
    data = bytearray(gzip.compress(b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs)))
    data[-8] ^= 0xFF  # the trailer's CRC-32 no longer matches the data
    p = tmp_path / "c.jsonl.gz"
    p.write_bytes(bytes(data))
    from data.sources import DataError

    with pytest.raises(DataError, match=rf"^{p}:51: corrupt .gz file after 50 complete lines \(CRC check failed"):
        list(read_all(SourceSpec("c", "jsonl", path=str(p), strict=True)))
    it = iter(read_all(SourceSpec("c", "jsonl", path=str(p))))
    assert [r["text"] for r in it] == docs
    assert it.get_state()["bad"] == {"corrupt_file": 1}


# ---------------------------------------------------------------------------------------------
# data.prepare on a truncated file: counted, or named; never a half-written output (items 9, 14)

def _prepare_config(tmp_path, path, **source):
    from configs.data import clean as clean_config

    cfg = clean_config.get_config()
    cfg.source.path, cfg.output_dir = str(path), str(tmp_path / "out")
    cfg.quality.enabled = False  # the documents here are not prose
    for k, v in source.items():
        cfg.source[k] = v
    return cfg


def _cut_gz_jsonl(tmp_path, seed):
    rng = np.random.default_rng(seed)
    docs = _jsonl_docs(rng, 1200)
    packed = gzip.compress("".join(json.dumps({"id": i, "text": d}, ensure_ascii=False) + "\n"
                                   for i, d in enumerate(docs)).encode())
    cut = packed[:int(len(packed) * 0.6)]
    p = tmp_path / "in" / "x.jsonl.gz"
    p.parent.mkdir()
    p.write_bytes(cut)
    return p, docs, _recoverable(cut, "gz").count(b"\n")


def test_prepare_keeps_the_records_of_a_truncated_file_and_reports_it(tmp_path):
    from data import prepare

    p, docs, complete = _cut_gz_jsonl(tmp_path, 31)
    report = prepare.run(_prepare_config(tmp_path, p))
    st = report["sources"]["input"]
    assert st["documents_in"] == complete
    assert st["bad_records"] == {"truncated_file": 1}
    assert any(e.startswith(f"{p}:{complete + 1}: truncated .gz file") for e in st["bad_examples"])
    assert "truncated_file 1" in (tmp_path / "out" / "report.md").read_text()


def _leftovers(tmp_path):
    return sorted(q.name for q in tmp_path.iterdir() if q.name != "in")


def test_prepare_that_fails_leaves_nothing_behind(tmp_path):
    from data import prepare
    from data.sources import DataError

    p, docs, complete = _cut_gz_jsonl(tmp_path, 32)
    cfg = _prepare_config(tmp_path, p, strict=True)
    cfg.shard_size = 100  # several part files are written before the break
    with pytest.raises(DataError, match=rf"{p}:{complete + 1}: truncated .gz file"):
        prepare.run(cfg)
    assert _leftovers(tmp_path) == []  # no output and no .out.tmp-PID directory
    # with overwrite, a failed run leaves the previous output whole
    cfg.source.strict = False
    first = prepare.run(cfg)
    before = {q.name: q.read_bytes() for q in (tmp_path / "out").rglob("*") if q.is_file()}
    cfg.source.strict, cfg.overwrite = True, True
    with pytest.raises(DataError):
        prepare.run(cfg)
    assert _leftovers(tmp_path) == ["out"]
    assert {q.name: q.read_bytes() for q in (tmp_path / "out").rglob("*") if q.is_file()} == before
    assert first["output"]["records"] == complete


def test_prepare_cli_names_the_truncated_file_in_one_line(tmp_path):
    from tests.helpers import run_program

    p, _, complete = _cut_gz_jsonl(tmp_path, 33)
    proc = run_program("data.prepare", "--config=configs/data/clean.py", f"--config.source.path={p}",
                       f"--config.output_dir={tmp_path / 'out'}", "--config.source.strict=True",
                       "--config.quality.enabled=False", check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {p}:{complete + 1}: truncated .gz file"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert _leftovers(tmp_path) == []
