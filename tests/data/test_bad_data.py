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
